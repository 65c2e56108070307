//! `whittle deploy --target qemu-aarch64`: the bundled ResNet-8 (original and pruned) measured with
//! ONNX Runtime in the aarch64 runner under qemu-user, through the same frames as the host target.
//! The timings are emulated (not meaningful); what is checked is that the cross-built runner runs
//! on the CPU execution provider and computes what the host's runner computes.
//!
//! Needs `just setup-cross` (qemu-user >= 10, the aarch64 sysroot and ONNX Runtime library) and
//! `just build-runner` (the aarch64 runner). Without them the test is skipped, or fails when
//! `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use whittle_deploy::target::{Connection, Target};

const TRIPLE: &str = "aarch64-unknown-linux-gnu";

/// The aarch64 runner beside this build: `target/<triple>/release/whittle-runner`.
fn aarch64_runner() -> PathBuf {
    let release = whittle().parent().expect("target/release").to_path_buf();
    let target_dir = release.parent().expect("target/").to_path_buf();
    target_dir
        .join(TRIPLE)
        .join(release.file_name().expect("profile folder"))
        .join("whittle-runner")
}

/// qemu-aarch64's major version, if it runs.
fn qemu_major(program: &str) -> Option<u32> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split("version ").nth(1)?;
    version.split('.').next()?.trim().parse().ok()
}

/// What is missing to run the emulated target, if anything.
fn missing_pieces(target: &Target, runner: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let Connection::Emulated(link) = &target.connection else {
        return vec![format!("an emulated target ({} is not one)", target.name)];
    };
    let qemu = link.qemu.as_str();
    match qemu_major(qemu) {
        Some(m) if m >= 10 => {}
        Some(m) => missing.push(format!("{qemu} >= 10 (found {m}.x)")),
        None => missing.push(format!("{qemu} (qemu-user)")),
    }
    if let Some(root) = &link.sysroot
        && !root.join("lib/ld-linux-aarch64.so.1").is_file()
    {
        missing.push(format!("the aarch64 sysroot {}", root.display()));
    }
    if let Some(lib) = &target.ort_library
        && !lib.is_file()
    {
        missing.push(format!("ONNX Runtime for aarch64 at {}", lib.display()));
    }
    if !runner.is_file() {
        missing.push(format!("the aarch64 runner at {}", runner.display()));
    }
    missing
}

#[test]
fn deploy_qemu_aarch64_runs_ort_cpu_and_matches_the_host() {
    let target = Target::load("qemu-aarch64", &repo_root().join("targets")).expect("target");
    let runner = aarch64_runner();
    let missing = missing_pieces(&target, &runner);
    // (`ready` puts the recipe in backquotes: two recipes here)
    let missing = (!missing.is_empty()).then(|| missing.join(", "));
    if !ready(missing, "just setup-cross` and `just build-runner") {
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let args = deploy_args("qemu-aarch64", 5, dir.path(), &[]);
    let r = run_env(None, &args, &[("WHITTLE_RUNNER", Some(&runner))]).ok();
    let rows = r.rows("resnet8_cifar10");
    assert_eq!(rows.len(), 3, "{}", r.dump());
    assert!(
        r.stderr.contains("qemu-aarch64 -L /usr/aarch64-linux-gnu"),
        "stderr should name the emulated runner's command\n{}",
        r.dump()
    );
    assert!(
        r.stderr.contains("timings are emulated"),
        "the timings must be flagged\n{}",
        r.dump()
    );

    let report = &report_dir(&dir.path().join("qemu-aarch64"), &r);
    let results = results_json(report);
    assert_eq!(results["target"].as_str(), Some("qemu-aarch64"));
    assert_eq!(results["triple"].as_str(), Some(TRIPLE));
    assert_eq!(results["transport"].as_str(), Some("emulated"));
    assert_eq!(results["complete"], true);
    let note = results["timing_note"].as_str().unwrap_or_default();
    assert!(note.contains("emulated"), "{results:#}");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("timings are emulated"), "{md}");

    assert_rows_match_host_runner(report, &results, "", 1e-4, "under qemu");
}
