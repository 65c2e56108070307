//! Helpers shared by the end-to-end tests: running the built `whittle`, locating the shared
//! assets, checking error output, and building tiny ONNX fixtures with the prost types.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use whittle_core::onnx::tensor_proto::{DataLocation, DataType};
use whittle_core::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, ValueInfoProto, attribute_proto,
};

/// The built binary.
pub fn whittle() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_whittle"))
}

/// The workspace root (the folder holding `models/`, `data/`, `targets/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

/// The bundled ResNet-8.
pub fn resnet8() -> PathBuf {
    repo_root().join("models/resnet8_cifar10.onnx")
}

/// A missing asset: a failure when `CI=true`, otherwise a note and `None` (the caller returns).
/// `hint` (may be empty) says how to get it.
fn missing(what: &str, p: &Path, hint: &str) -> Option<PathBuf> {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} missing at {}{hint} (CI=true: a missing asset is a failure)",
        p.display()
    );
    eprintln!("skipped: {what} not found at {}{hint}", p.display());
    None
}

/// `../shared/assets` next to the workspace.
pub fn shared_assets() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/assets");
    if p.is_dir() {
        Some(p)
    } else {
        missing("shared assets", &p, "")
    }
}

/// A file or folder inside the shared assets, e.g. `models/mnist-8.onnx`.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = shared_assets()?.join(rel);
    if p.exists() {
        Some(p)
    } else {
        missing("shared asset", &p, "")
    }
}

/// MiniLM, rebuilt into `$WHITTLE_ASSETS_CACHE` (default `~/.cache/whittle/assets`) by
/// `../shared/assets/fetch.sh`.
pub fn minilm() -> Option<PathBuf> {
    let cache = std::env::var_os("WHITTLE_ASSETS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/whittle/assets")
        });
    let p = cache.join("minilm-l6-v2.opset17.onnx");
    if p.is_file() {
        Some(p)
    } else {
        missing("MiniLM", &p, "; run ../shared/assets/fetch.sh")
    }
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
    let root = repo_root();
    let dir = cwd.unwrap_or(&root);
    let out = Command::new(whittle())
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run whittle");
    Run {
        cmd: format!(
            "(cd {} && whittle {})",
            dir.display(),
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

/// Run `whittle args...` from the repository root.
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    run_in(None, args)
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

/// Element count of every weight stored in the file, decoded independently of whittle's IR:
/// initializers plus the tensors held by `Constant` nodes (anywhere in the main graph).
pub fn weight_elements(path: &Path) -> u64 {
    let m = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    let g = m.graph.unwrap();
    let mut n: u64 = g
        .initializer
        .iter()
        .map(|t| t.dims.iter().product::<i64>() as u64)
        .sum();
    for node in g.node.iter().filter(|n| n.op_type() == "Constant") {
        for a in &node.attribute {
            match a.name() {
                "value" => {
                    n +=
                        a.t.as_ref()
                            .map_or(0, |t| t.dims.iter().product::<i64>() as u64)
                }
                "value_floats" => n += a.floats.len() as u64,
                "value_ints" => n += a.ints.len() as u64,
                "value_float" | "value_int" => n += 1,
                _ => {}
            }
        }
    }
    n
}

// ---- tiny ONNX fixtures -------------------------------------------------------------------

/// A float tensor with inline raw data.
pub fn tensor_f32(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    assert_eq!(dims.iter().product::<i64>() as usize, values.len());
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// A float tensor whose data lives in an external file.
pub fn tensor_external(name: &str, dims: &[i64], location: &str, length: usize) -> TensorProto {
    let e = |k: &str, v: &str| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    };
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            e("location", location),
            e("offset", "0"),
            e("length", &length.to_string()),
        ],
        ..Default::default()
    }
}

/// A float value info; a dim is a number or a symbol.
pub fn value_info(name: &str, dims: &[&str]) -> ValueInfoProto {
    whittle_core::model::float_value_info(name, dims)
}

/// A node in the default domain.
pub fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// An int attribute.
pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(attribute_proto::AttributeType::Int as i32),
        ..Default::default()
    }
}

/// A model (IR 8, opset 13, plus any extra domains) around a graph.
pub fn model(graph: GraphProto, extra_domains: &[(&str, i64)]) -> ModelProto {
    let mut opset_import = vec![OperatorSetIdProto {
        domain: Some(String::new()),
        version: Some(13),
    }];
    for (d, v) in extra_domains {
        opset_import.push(OperatorSetIdProto {
            domain: Some(d.to_string()),
            version: Some(*v),
        });
    }
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("whittle-tests".into()),
        opset_import,
        graph: Some(graph),
        ..Default::default()
    }
}

/// A graph.
pub fn graph(
    name: &str,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
) -> GraphProto {
    GraphProto {
        name: Some(name.into()),
        node: nodes,
        input: inputs,
        output: outputs,
        initializer: initializers,
        ..Default::default()
    }
}

/// Encode a model into a file.
pub fn write_model(path: &Path, m: &ModelProto) {
    std::fs::write(path, m.encode_to_vec()).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift64*), so "random" fixtures are reproducible.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// The rows of a `whittle deploy` of the bundled ResNet-8 (`results.json` in `report`, original and
/// pruned on ort-cpu, 5 timed runs): the CPU provider ran without fallback, agreement as expected,
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
    use whittle_deploy::transport::{Local, ModelSource, RunRequest, Transport};
    let jrows = results["rows"].as_array().unwrap();
    assert_eq!(jrows.len(), 2, "{results:#}");
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
        let mut req = RunRequest::new(
            1,
            model_name,
            ModelSource::Path(model.clone()),
            whittle_runtime::RuntimeKind::OrtCpu,
        );
        req.bench = whittle_runtime::BenchConfig {
            warmup: 0,
            iters: 1,
            max_seconds: None,
        };
        req.ort_library = (!ort_library.is_empty()).then(|| PathBuf::from(ort_library));
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
            let shape: Vec<u64> = g["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            assert_eq!(shape, e.shape, "{row:#}");
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

/// True when a test's system pieces are all there (`missing` is `None`); else it prints
/// "skipped: missing ..." naming `setup`, the recipe that installs them, or fails under `CI=true`.
pub fn ready(missing: Option<String>, setup: &str) -> bool {
    let Some(what) = missing else { return true };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "missing: {what}; run `{setup}` (CI=true: a missing piece is a failure)"
    );
    eprintln!("skipped: missing {what}; run `{setup}`");
    false
}
