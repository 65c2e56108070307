//! An interrupted run (SIGINT) leaves no partial output and no stray temporary file.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn sigint_after(args: &[String], after: Duration) -> i32 {
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
        let args = vec![
            "convert".to_string(),
            s(&m),
            "-o".into(),
            s(&out),
            "--external-data".into(),
        ];
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
    let (Some(m), Some(data)) = (
        asset("models/efficientnet_lite0_224.onnx"),
        asset("data/imagenet"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let args: Vec<String> = [
        "compress",
        &s(&m),
        "-o",
        &s(&out),
        "--calib",
        &s(&data),
        "--profile",
        "efficientnet",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let code = sigint_after(&args, Duration::from_millis(1500));
    assert_eq!(code, 130, "interrupted runs exit 130");
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
}
