//! An interrupted run (SIGINT) leaves no partial output and no stray temporary file.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn sigint_after(args: &[std::ffi::OsString], after: Duration) -> i32 {
    let mut child = Command::new(whittle())
        .args(args)
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    child.wait().unwrap().code().unwrap_or(-1)
}

#[test]
fn r8_sigint_while_writing_leaves_no_partial_file() {
    let Some(m) = asset("models/efficientnet_lite0_224.onnx") else {
        return;
    };
    for (k, ms) in [0u64, 5, 10, 20, 40, 60, 90, 120, 150, 200, 300, 400]
        .into_iter()
        .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.onnx");
        let args = argv("convert {} -o {} --external-data", &[&m, &out]);
        let code = sigint_after(&args, Duration::from_millis(ms));
        let files = listing(dir.path());
        assert!(
            files.iter().all(|f| !f.starts_with('.')),
            "run {k} (SIGINT after {ms} ms, exit {code}): a temporary file was left: {files:?}"
        );
        if out.exists() {
            // whatever is there is whole: it loads
            run(&["inspect", &s(&out), "--brief"]).ok();
        }
    }
}

#[test]
fn r8_sigint_during_compress_writes_nothing() {
    let Some((m, data)) = lite0_and_photos() else {
        return;
    };
    let (dir, out) = temp_path("out.onnx");
    let args = argv(
        "compress {} -o {} --calib {} --profile efficientnet",
        &[&m, &out, &data],
    );
    let code = sigint_after(&args, Duration::from_millis(1500));
    assert_eq!(code, 130, "interrupted runs exit 130");
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
}

#[test]
fn r8_sigint_during_deploy_keeps_the_rows_already_measured() {
    // the main job on the bundled ResNet-8: compress, then one row per model and runtime; stop it
    // once results.json holds a row
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(whittle())
        .args(["deploy", "--target", "host", "--reports"])
        .arg(dir.path())
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let results = |dir: &std::path::Path| -> Option<serde_json::Value> {
        let f = listing(dir)
            .into_iter()
            .find(|f| f.ends_with("results.json") && !f.contains("/auto/"))?;
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).ok()?).ok()
    };
    let started = std::time::Instant::now();
    let partial = loop {
        if let Some(r) = results(dir.path()) {
            break r;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "deploy ended before writing a row"
        );
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no row in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let code = child.wait().unwrap().code().unwrap_or(-1);
    let kept = results(dir.path()).expect("results.json survives the interrupt");
    if code == 0 {
        // it finished between the poll and the signal: then the file says so
        assert_eq!(kept["complete"], true);
        return;
    }
    assert_eq!(code, 130, "interrupted runs exit 130");
    assert_eq!(partial["complete"], false, "{partial}");
    assert_eq!(kept["complete"], false);
    let rows = kept["rows"].as_array().unwrap();
    assert!(!rows.is_empty() && rows.len() < 6, "{} rows", rows.len());
    assert!(rows[0]["bench"]["stats"]["p50_ms"].as_f64().unwrap() > 0.0);
    let files = listing(dir.path());
    assert!(
        files
            .iter()
            .all(|f| !f.rsplit('/').next().unwrap().starts_with('.')),
        "a temporary file was left: {files:?}"
    );
}
