//! Helpers shared by the end-to-end tests: running the built `whittle` and checking its output
//! (the assets, fixtures and RNG come from whittle-test-support).

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use whittle_test_support::runtime::locate_ort_library;
pub use whittle_test_support::{
    asset, attr_int, graph, minilm, model, node, noise, ready, repo_root, resnet8, shared_assets,
    shared_models, tensor_external, tensor_f32, value_info, weight_elements, write_model,
};

/// A temp folder holding a copy of ResNet-8 as `m.onnx`.
pub fn with_resnet8() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.onnx");
    std::fs::copy(resnet8(), &m).unwrap();
    (dir, m)
}

/// A new temp folder and the path `name` in it (nothing written there yet).
pub fn temp_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    (dir, p)
}

/// The bundled CIFAR-10 sample (`data/cifar10`), ResNet-8's data.
pub fn cifar10() -> PathBuf {
    repo_root().join("data/cifar10")
}

/// `text` written to `dir/name`; its path.
pub fn write_text(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    p
}

/// Whether `program arg` starts here (its output dropped): the tool is installed.
pub fn installed(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// What a test needs and lacks (`gone`), with ONNX Runtime added where it cannot be found, as one
/// line for [`ready`]; `None` when nothing is missing.
pub fn missing_and_ort(mut gone: Vec<String>) -> Option<String> {
    if let Err(e) = locate_ort_library() {
        gone.push(format!("ONNX Runtime ({e}; run `just setup`)"));
    }
    (!gone.is_empty()).then(|| gone.join(", "))
}

/// The built binary.
pub fn whittle() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_whittle"))
}

/// What one run of the binary gave.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub cmd: String,
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Everything, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "command: {}\nexit: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.cmd, self.code, self.stdout, self.stderr
        )
    }

    /// Assert exit code 0 and return self.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success\n{}", self.dump());
        assert!(!self.stderr.contains("panicked"), "{}", self.dump());
        self
    }

    /// Assert stdout contains `needle`; returns self.
    pub fn stdout_has(&self, needle: &str) -> &Self {
        self.has("stdout", &self.stdout, needle)
    }

    /// Assert stderr contains `needle`; returns self.
    pub fn stderr_has(&self, needle: &str) -> &Self {
        self.has("stderr", &self.stderr, needle)
    }

    fn has(&self, stream: &str, text: &str, needle: &str) -> &Self {
        let dump = self.dump();
        assert!(text.contains(needle), "{stream} lacks {needle:?}\n{dump}");
        self
    }

    /// The lines of stdout that start with `prefix` (a table's rows).
    pub fn rows(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// stdout as exactly one JSON object on one line.
    pub fn json(&self) -> serde_json::Value {
        let lines: Vec<&str> = self.stdout.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "--json must print exactly one line on stdout\n{}",
            self.dump()
        );
        let v: serde_json::Value = serde_json::from_str(lines[0])
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", self.dump()));
        assert!(
            v.is_object(),
            "stdout is JSON but not an object\n{}",
            self.dump()
        );
        v
    }

    /// Assert the error contract: exit 2, no panic, nothing on stdout, stderr ends with one line
    /// `error: ...` that contains every needle (case-insensitive). Returns that line.
    pub fn error(&self, needles: &[&str]) -> String {
        assert_eq!(self.code, 2, "expected exit code 2\n{}", self.dump());
        assert!(
            !self.stderr.contains("panicked"),
            "the binary panicked\n{}",
            self.dump()
        );
        assert!(
            self.stdout.trim().is_empty(),
            "an error must not print results on stdout\n{}",
            self.dump()
        );
        let last = self
            .stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .to_string();
        assert!(
            last.starts_with("error: "),
            "stderr must end with one `error: ...` line\n{}",
            self.dump()
        );
        assert_eq!(
            self.stderr.matches("error: ").count(),
            1,
            "exactly one error line expected\n{}",
            self.dump()
        );
        let low = last.to_lowercase();
        for n in needles {
            assert!(
                low.contains(&n.to_lowercase()),
                "the error line should mention {n:?}\n{}",
                self.dump()
            );
        }
        last
    }
}

/// Run `whittle args...` in `cwd` (the repository root when `None`).
pub fn run_in<S: AsRef<std::ffi::OsStr>>(cwd: Option<&Path>, args: &[S]) -> Run {
    run_env(cwd, args, &[])
}

/// Run `whittle args...` from the repository root.
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    run_in(None, args)
}

/// A command line written as one string: its words split on whitespace, each word `{}` replaced
/// by the next of `vals` (paths, or values that may hold spaces), taken as they are.
pub fn argv(line: &str, vals: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    let mut vals = vals.iter();
    let words: Vec<OsString> = line
        .split_whitespace()
        .map(|w| match w {
            "{}" => vals
                .next()
                .unwrap_or_else(|| panic!("more {{}} than values in {line:?}"))
                .as_ref()
                .to_owned(),
            w => w.into(),
        })
        .collect();
    assert!(vals.next().is_none(), "more values than {{}} in {line:?}");
    words
}

/// Run `whittle` from the repository root on the words of `line`, each `{}` one of `vals` (see
/// [`argv`]): `cli("compress {} -o {} --target macs=0.5 --json", &[&model, &out])`.
pub fn cli(line: &str, vals: &[&dyn AsRef<OsStr>]) -> Run {
    run(&argv(line, vals))
}

/// `whittle compress MODEL -o OUT` then the words of `flags`, and of `extra` where `on` (see
/// [`and_if`]), each `{}` one of `vals`: it must succeed; its `--json` object.
pub fn compress_json_if(
    model: &Path,
    out: &Path,
    flags: &str,
    (on, extra): (bool, &str),
    vals: &[&dyn AsRef<OsStr>],
) -> serde_json::Value {
    compress(model, out, &and_if(flags, on, extra), vals)
        .ok()
        .json()
}

/// The words of `flags`, then `extra` where `on`: `and_if("--json", aware, "--data-aware")`.
pub fn and_if(flags: &str, on: bool, extra: &str) -> String {
    if on {
        format!("{flags} {extra}")
    } else {
        flags.to_string()
    }
}

/// `whittle compress MODEL -o OUT` then the words of `flags`, each `{}` one of `vals` (see
/// [`argv`]): `compress(&model, &out, "--calib {} --target macs=0.5", &[&data])`.
pub fn compress(model: &Path, out: &Path, flags: &str, vals: &[&dyn AsRef<OsStr>]) -> Run {
    let mut args = argv("compress {} -o {}", &[&model, &out]);
    args.extend(argv(flags, vals));
    run(&args)
}

/// Run `whittle args...` in `cwd` (the repository root when `None`) with these environment
/// variables set (`Some`) or removed (`None`).
pub fn run_env<S: AsRef<std::ffi::OsStr>>(
    cwd: Option<&Path>,
    args: &[S],
    env: &[(&str, Option<&Path>)],
) -> Run {
    let root = repo_root();
    let dir = cwd.unwrap_or(&root);
    let mut cmd = Command::new(whittle());
    cmd.args(args).current_dir(dir).env_remove("RUST_BACKTRACE");
    let mut shown = Vec::new();
    for &(k, v) in env {
        match v {
            Some(v) => {
                cmd.env(k, v);
                shown.push(format!("{k}={} ", v.display()));
            }
            None => {
                cmd.env_remove(k);
            }
        }
    }
    let out = cmd.output().expect("run whittle");
    Run {
        cmd: format!(
            "(cd {} && {}whittle {})",
            dir.display(),
            shown.concat(),
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The arguments of `whittle deploy --target <target> --iters <iters> --warmup 1 --reports
/// <reports>`, then `extra`.
pub fn deploy_args(target: &str, iters: u32, reports: &Path, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "deploy",
        "--target",
        target,
        "--iters",
        &iters.to_string(),
        "--warmup",
        "1",
        "--reports",
        &s(reports),
    ]
    .map(String::from)
    .to_vec();
    args.extend_from_slice(extra);
    args
}

/// The one `<stamp>` folder of a deploy in `dir` (`<reports>/<target name>`); `r` is the run,
/// for the message.
pub fn report_dir(dir: &Path, r: &Run) -> PathBuf {
    let stamps: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", dir.display(), r.dump()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(stamps.len(), 1, "{stamps:?}");
    stamps[0].clone()
}

/// `results.json` of a deploy's report folder.
pub fn results_json(report: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(report.join("results.json")).unwrap()).unwrap()
}

/// Path as a string argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Every entry below `dir` (relative paths, sorted), to show nothing was written.
pub fn listing(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(base, &p, out);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// The rows of a `whittle deploy` of the bundled ResNet-8 (`results.json` in `report`, original,
/// pruned and int8 on ort-cpu, 5 timed runs): the CPU provider ran without fallback, agreement as expected,
/// and each row's output checksums equal those of the host runner run directly on the same model
/// (within `rel_tol`; `how` names the board side in the message; `ort_library` is passed to the
/// host runner, empty for its default).
pub fn assert_rows_match_host_runner(
    report: &Path,
    results: &serde_json::Value,
    ort_library: &str,
    rel_tol: f64,
    how: &str,
) {
    use whittle_deploy::transport::{Local, Transport};
    let jrows = results["rows"].as_array().unwrap();
    assert!(
        jrows.len() >= 2,
        "the original and a compressed model\n{results:#}"
    );
    let mut host = Local::find_runner()
        .map(Local::new)
        .unwrap_or_else(|e| panic!("the host runner: {e}"));
    for row in jrows {
        let bench = &row["bench"];
        assert_eq!(bench["runtime"].as_str(), Some("ort-cpu"), "{row:#}");
        assert_eq!(
            bench["provider"]["actual"].as_str(),
            Some("CPUExecutionProvider"),
            "{row:#}"
        );
        assert_eq!(bench["provider"]["fallback"], false, "{row:#}");
        assert_eq!(bench["stats"]["iters"].as_u64(), Some(5), "{row:#}");
        let original = row["variant"].as_str() == Some("original");
        if original {
            assert_eq!(row["agreement"].as_f64(), Some(1.0), "{row:#}");
        } else {
            assert!(row["agreement"].as_f64().unwrap() > 0.6, "{row:#}");
        }

        // The same model in the host's runner, on the same synthetic inputs: the same outputs,
        // up to the float rounding of another architecture's kernels.
        let model_name = row["model"].as_str().unwrap();
        let model = if original {
            resnet8()
        } else {
            report.join(model_name)
        };
        let lib = (!ort_library.is_empty()).then(|| PathBuf::from(ort_library));
        let req = one_run_request(model_name, &model, lib);
        let expected = host
            .request(&req, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("host runner on {}: {e}", model.display()))
            .outputs;
        let got = row["outputs"].as_array().expect("output checksums");
        assert_eq!(got.len(), expected.len(), "{row:#}");
        assert!(!got.is_empty(), "{row:#}");
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g["name"].as_str(), Some(e.name.as_str()), "{row:#}");
            assert_eq!(g["dtype"].as_str(), Some(e.dtype.as_str()), "{row:#}");
            assert_eq!(list(&g["shape"], |d| d.as_u64()), e.shape, "{row:#}");
            for (key, want) in [("sum", e.sum), ("sum_squares", e.sum_squares)] {
                let have = g[key].as_f64().unwrap();
                assert!(
                    (have - want).abs() <= rel_tol * want.abs().max(1.0),
                    "{model_name} output {}: {key} {have} {how}, {want} on the host",
                    e.name
                );
            }
        }
    }
    host.close().unwrap();
}

/// A shared model and a shared data folder, or `None` (after the skip notes) when either is
/// missing.
pub fn model_and_data(model: &str, data: &str) -> Option<(PathBuf, PathBuf)> {
    asset(model).zip(asset(data))
}

/// The VWW MobileNetV1 (96x96) and the imagenet photos, from the shared assets.
pub fn vww_and_photos() -> Option<(PathBuf, PathBuf)> {
    model_and_data("models/mobilenetv1_025_vww96.onnx", "data/imagenet")
}

/// EfficientNet-Lite0 (224x224) and the imagenet photos, from the shared assets.
pub fn lite0_and_photos() -> Option<(PathBuf, PathBuf)> {
    model_and_data("models/efficientnet_lite0_224.onnx", "data/imagenet")
}

/// MNIST-8 and its test digits, from the shared assets.
pub fn mnist_and_digits() -> Option<(PathBuf, PathBuf)> {
    model_and_data("models/mnist-8.onnx", "data/mnist/test")
}

/// MiniLM and STS-B calibration for it ([`sts_calibration`] with `flags`), or `None` (after the
/// skip notes) without them.
pub fn minilm_and_calibration(dir: &Path, flags: &str) -> Option<(PathBuf, PathBuf)> {
    minilm().zip(sts_calibration(dir, flags))
}

/// Every element of the JSON array `v` through `f`, which must give `Some` for each.
pub fn list<'a, T>(
    v: &'a serde_json::Value,
    f: impl Fn(&'a serde_json::Value) -> Option<T>,
) -> Vec<T> {
    let items = v.as_array().unwrap_or_else(|| panic!("not an array: {v}"));
    items
        .iter()
        .map(|x| f(x).unwrap_or_else(|| panic!("unexpected element {x} in {v}")))
        .collect()
}

/// A runner request for one untimed run (no warm-up) of `model` (`name` in the report) on
/// ort-cpu, `ort_library` given to the runner when `Some`: the host's output checksums to compare
/// a board's with.
pub fn one_run_request(
    name: &str,
    model: &Path,
    ort_library: Option<PathBuf>,
) -> whittle_deploy::transport::RunRequest {
    use whittle_deploy::transport::{ModelSource, RunRequest};
    let mut req = RunRequest::new(
        1,
        name,
        ModelSource::Path(model.to_path_buf()),
        whittle_runtime::RuntimeKind::OrtCpu,
    );
    req.bench = whittle_runtime::BenchConfig {
        warmup: 0,
        iters: 1,
        max_seconds: None,
    };
    req.ort_library = ort_library;
    req
}

/// STS-B training sentences tokenised into `dir/train.npz` for MiniLM (`whittle tokenize`, then
/// `flags` such as `--limit N`), or `None` (after a skip note) without the shared assets.
pub fn sts_calibration(dir: &Path, flags: &str) -> Option<PathBuf> {
    let (tok, train) = (
        asset("models/minilm-l6-v2-tokenizer")?,
        asset("data/sts/sts-train.tsv")?,
    );
    let calib = dir.join("train.npz");
    let mut args = argv("tokenize {} --tokenizer {} -o {}", &[&train, &tok, &calib]);
    args.extend(argv(flags, &[]));
    run(&args).ok();
    Some(calib)
}

/// `whittle verify ORIGINAL CANDIDATE` on the first `limit` STS-dev pairs with MiniLM's tokenizer:
/// the JSON report (`reference_spearman`, `kept`, `pairs`).
pub fn sts_verify(original: &Path, candidate: &Path, limit: usize) -> serde_json::Value {
    let (tok, dev) = (
        asset("models/minilm-l6-v2-tokenizer").expect("the tokenizer"),
        asset("data/sts/sts-dev.tsv").expect("sts-dev"),
    );
    let limit = limit.to_string();
    cli(
        "verify {} {} --data {} --tokenizer {} --limit {} --json",
        &[&original, &candidate, &dev, &tok, &limit],
    )
    .ok()
    .json()
}

/// A .npy of `n` items with the model's item shape, values uniform in [lo, hi).
pub fn npy(dir: &Path, name: &str, n: usize, item: &[usize], lo: f32, hi: f32) -> PathBuf {
    let mut shape = vec![n];
    shape.extend_from_slice(item);
    let len: usize = shape.iter().product();
    let bytes = noise(len * 4, 7);
    let vals: Vec<f32> = bytes
        .chunks(4)
        .map(|c| {
            lo + (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32 / u32::MAX as f32) * (hi - lo)
        })
        .collect();
    let a = ndarray::ArrayD::from_shape_vec(shape, vals).unwrap();
    let p = dir.join(name);
    ndarray_npy::write_npy(&p, &a).unwrap();
    p
}

/// `whittle inspect MODEL --json --brief EXTRA...`: the JSON report.
pub fn inspect_json(model: &Path, extra: &[&str]) -> serde_json::Value {
    let m = s(model);
    let mut a = vec!["inspect", "--json", "--brief", &m];
    a.extend(extra);
    run(&a).ok().json()
}

/// One untimed-warmup, one-iteration `whittle bench` of `model` at `--input SHAPE`: it must run.
pub fn bench_once(model: &Path, shape: &str) {
    cli(
        "bench {} --iters 1 --warmup 0 --input {}",
        &[&model, &shape],
    )
    .ok();
}
