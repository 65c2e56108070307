//! `whittle deploy` on a serial target, for real: a pseudo-terminal pair made by socat (`socat -d -d
//! pty,raw,echo=0,link=A pty,raw,echo=0,link=B`), the host's `whittle-runner --serial B` on one
//! end, and `whittle deploy` with a target TOML whose `device` is A on the other. The "board" is
//! this machine, so the runner's output checksums must equal those of the host's runner run
//! directly, and the uploaded files must equal the local ones byte for byte. One test kills socat
//! in the middle of an upload and starts it again with the same link names: the deploy must reopen
//! the port and resume the upload from the acknowledged offset. A device that does not exist, and a
//! device with no runner behind it, end the run with one line before anything is measured.
//!
//! Needs socat (`just setup-serial`) and ONNX Runtime (`just setup`). Without them the tests are
//! skipped, or fail when `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// What is missing to run socat and the runner here, if anything; `None` when all is there.
fn missing() -> Option<String> {
    let mut gone = Vec::new();
    if !installed("socat", "-V") {
        gone.push("socat".to_string());
    }
    missing_and_ort(gone)
}

/// True when the test should go on (see [`common::ready`]).
fn ready() -> bool {
    crate::common::ready(missing(), "just setup-serial")
}

/// When socat and the runner are here (see [`ready`]): a new temp folder and a socat pty pair in
/// it.
fn pty_pair() -> Option<(tempfile::TempDir, Socat)> {
    if !ready() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let socat = Socat::start(dir.path());
    Some((dir, socat))
}

/// A socat pty pair with the links `A` and `B` in a folder; stopped (SIGTERM) on drop.
struct Socat {
    a: PathBuf,
    b: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Socat {
    fn start(dir: &Path) -> Socat {
        let mut s = Socat {
            a: dir.join("A"),
            b: dir.join("B"),
            log: dir.join("socat.log"),
            child: None,
        };
        s.restart();
        s
    }

    /// Starts socat (again) with the same link names and waits for both links.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "socat is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("socat")
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", s(&self.a)))
            .arg(format!("pty,raw,echo=0,link={}", s(&self.b)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("socat: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(self.a.exists() && self.b.exists()) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "socat exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "socat made no links");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops socat with SIGTERM (it removes its links) and waits for it: both ends hang up.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        // Left behind only if socat died some other way.
        let _ = std::fs::remove_file(&self.a);
        let _ = std::fs::remove_file(&self.b);
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `whittle-runner --serial <device> --baud <baud> --dir <dir>`, its stderr in `<dir>.log`; killed
/// on drop.
struct Runner {
    child: Child,
    log: PathBuf,
}

impl Runner {
    fn start(device: &Path, baud: u32, dir: &Path) -> Runner {
        let exe = whittle_deploy::transport::Local::find_runner()
            .unwrap_or_else(|e| panic!("the host runner: {e}"));
        let log = dir.with_extension("log");
        let child = Command::new(exe)
            .args(["--serial", &s(device), "--baud", &baud.to_string()])
            .args(["--dir", &s(dir)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start whittle-runner");
        let r = Runner { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !r.stderr().contains("listening on") {
            assert!(
                Instant::now() < deadline,
                "the runner did not start: {}",
                r.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A serial target TOML for `device` at `baud`, written into `dir` as `<name>.toml`.
fn target(dir: &Path, name: &str, device: &Path, baud: u32) -> PathBuf {
    let lib = locate_ort_library().expect("ONNX Runtime");
    let toml = format!(
        "name = \"{name}\"\ntriple = \"host\"\nnotes = \"a socat pty pair started by tests/deploy_serial.rs\"\ntransport = \"serial\"\nruntimes = [\"ort-cpu\"]\ndevice = \"{}\"\nbaud = {baud}\ntimeout_s = 2\nreconnects = 5\nort_library = \"{}\"\n",
        s(device),
        s(&lib),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

#[test]
fn deploy_over_a_serial_pty_uploads_the_models_and_matches_the_host_runner() {
    let Some((dir, socat)) = pty_pair() else {
        return;
    };
    let uploads = dir.path().join("board");
    let runner = Runner::start(&socat.b, 2_000_000, &uploads);
    let target = target(dir.path(), "serial-pty", &socat.a, 2_000_000);
    let reports = dir.path().join("reports");
    let r = run(&deploy_args(&s(&target), 5, &reports, &[])).ok();
    let rows = r.rows("resnet8_cifar10");
    assert_eq!(rows.len(), 3, "{}", r.dump());
    assert!(
        r.stderr.contains(&format!(
            "runner: whittle-runner {} on {} at 2000000 baud, uploads in {}",
            env!("CARGO_PKG_VERSION"),
            s(&socat.a),
            s(&uploads)
        )),
        "stderr should name the runner and the device\n{}",
        r.dump()
    );
    assert!(!r.stderr.contains("dropped"), "{}", r.dump());

    let report = report_dir(&reports.join("serial-pty"), &r);
    // What went over the line: the models, intact, and no partial file left.
    assert_eq!(
        std::fs::read(uploads.join("resnet8_cifar10.onnx")).unwrap(),
        std::fs::read(resnet8()).unwrap()
    );
    assert_eq!(
        std::fs::read(uploads.join("resnet8_cifar10.pruned.onnx")).unwrap(),
        std::fs::read(report.join("resnet8_cifar10.pruned.onnx")).unwrap()
    );
    let partial: Vec<_> = std::fs::read_dir(uploads.join(".partial"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(partial.is_empty(), "{partial:?}");

    let results = results_json(&report);
    assert_eq!(results["target"].as_str(), Some("serial-pty"));
    assert_eq!(results["transport"].as_str(), Some("serial"));
    assert_eq!(results["complete"], true);
    assert!(results.get("link_events").is_none(), "{results:#}");
    let lib = locate_ort_library().expect("ONNX Runtime");
    assert_rows_match_host_runner(&report, &results, &s(&lib), 1e-6, "over serial");
    // The plot holds one point per row, as on every transport.
    let svg = std::fs::read_to_string(report.join("plot.svg")).unwrap();
    assert_eq!(svg.matches("<circle ").count(), 3, "{svg}");
    assert!(
        runner.stderr().contains("listening on"),
        "{}",
        runner.stderr()
    );
}

#[test]
fn a_link_dropped_mid_upload_reopens_and_resumes_from_the_acknowledged_offset() {
    let Some((dir, mut socat)) = pty_pair() else {
        return;
    };
    let uploads = dir.path().join("board");
    // 460800 baud: the 320 KB model takes about 7 s, time enough to pull the plug in the middle.
    let baud = 460_800;
    let runner = Runner::start(&socat.b, baud, &uploads);
    let target = target(dir.path(), "serial-drop", &socat.a, baud);
    let reports = dir.path().join("reports");
    let model = resnet8();
    let size = std::fs::metadata(&model).unwrap().len();
    let args = deploy_args(&s(&target), 5, &reports, &["--json".into(), s(&model)]);
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut deploy = Command::new(whittle())
        .args(&args)
        .current_dir(repo_root())
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("run whittle");

    // Wait until the board holds part of the model, then pull the plug.
    let partial = uploads.join(".partial/resnet8_cifar10.onnx");
    let deadline = Instant::now() + Duration::from_secs(60);
    let held_at_drop = loop {
        let held = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if held >= 64 * 1024 {
            break held;
        }
        if Instant::now() > deadline || deploy.try_wait().unwrap().is_some() {
            let _ = deploy.kill();
            panic!(
                "the upload never reached 64 KiB (held {held})\n{}\nrunner: {}",
                std::fs::read_to_string(&err).unwrap_or_default(),
                runner.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    socat.stop();
    assert!(
        held_at_drop < size,
        "the whole model was there before the drop"
    );
    std::thread::sleep(Duration::from_millis(800));
    socat.restart();

    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = deploy.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = deploy.kill();
            panic!(
                "deploy did not finish\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let r = Run {
        cmd: format!("whittle {}", args.join(" ")),
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
    .ok();
    let dropped = "the link dropped during the upload of resnet8_cifar10.onnx with ";
    r.stderr_has(dropped);
    let resumed = "resumed the upload of resnet8_cifar10.onnx at byte ";
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains(resumed))
        .unwrap_or_else(|| panic!("no resume on stderr\n{}", r.dump()));
    let at: u64 = line
        .split(resumed)
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {line:?}"));
    assert!(
        at >= held_at_drop && at < size,
        "resumed at {at}, the board held {held_at_drop} of {size} bytes at the drop\n{}",
        r.dump()
    );
    assert!(line.ends_with(&format!(" of {size}")), "{line}");
    let runner_log = runner.stderr();
    assert!(
        runner_log.contains("the link dropped") && runner_log.contains("reopened"),
        "{runner_log}"
    );

    // The JSON says the same, and the row is right.
    let j = r.json();
    assert_eq!(j["complete"], true);
    let events: Vec<&str> = j["link_events"]
        .as_array()
        .unwrap_or_else(|| panic!("no link_events\n{j:#}"))
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with(&format!("{resumed}{at} of {size}"))),
        "{events:?}"
    );
    assert_eq!(
        std::fs::read(uploads.join("resnet8_cifar10.onnx")).unwrap(),
        std::fs::read(&model).unwrap(),
        "the resumed upload is the model, byte for byte"
    );
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{j:#}");
    assert_eq!(rows[0]["agreement"].as_f64(), Some(1.0), "{j:#}");
    assert_eq!(rows[0]["bench"]["stats"]["iters"].as_u64(), Some(5));
    let lib = locate_ort_library().expect("ONNX Runtime");
    let mut host = whittle_deploy::transport::Local::from_env().unwrap();
    use whittle_deploy::transport::Transport;
    let req = one_run_request("resnet8", &model, Some(lib.clone()));
    let expected = host.request(&req, &mut |_, _| {}).unwrap().outputs;
    host.close().unwrap();
    let got = rows[0]["outputs"].as_array().unwrap();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g["name"].as_str(), Some(e.name.as_str()));
        for (key, want) in [("sum", e.sum), ("sum_squares", e.sum_squares)] {
            let have = g[key].as_f64().unwrap();
            assert!(
                (have - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{key}: {have} over serial, {want} on the host"
            );
        }
    }
}

#[test]
fn a_serial_device_that_does_not_exist_is_one_line_and_nothing_is_measured() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("no-such-tty");
    let lib = "/nonexistent/libonnxruntime.so";
    let toml = format!(
        "name = \"gone\"\ntriple = \"host\"\ntransport = \"serial\"\nruntimes = [\"ort-cpu\"]\ndevice = \"{}\"\nort_library = \"{lib}\"\n",
        s(&device)
    );
    let target = dir.path().join("gone.toml");
    std::fs::write(&target, toml).unwrap();
    let reports = dir.path().join("reports");
    let started = Instant::now();
    let r = run(&deploy_args(&s(&target), 5, &reports, &[]));
    r.error(&[
        &format!("serial {}", s(&device)),
        "cannot open the serial port",
        "no such file",
    ]);
    assert_eq!(
        r.stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{}",
        r.dump()
    );
    assert!(!reports.exists(), "nothing was measured\n{}", r.dump());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a missing device fails at once"
    );
}

#[test]
fn a_serial_device_with_no_runner_behind_it_is_one_line() {
    let Some((dir, socat)) = pty_pair() else {
        return;
    };
    let target = target(dir.path(), "silent", &socat.a, 115_200);
    let reports = dir.path().join("reports");
    let r = run(&deploy_args(&s(&target), 5, &reports, &[]));
    r.error(&[
        &format!("serial {}", s(&socat.a)),
        "no answer from the runner within 2.0 s",
        "whittle-runner --serial",
    ]);
    assert!(!reports.exists(), "nothing was measured\n{}", r.dump());
}
