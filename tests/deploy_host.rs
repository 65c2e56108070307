//! `whittle deploy --target host` from the repository root: the main job compresses the bundled
//! ResNet-8, measures original and compressed on each runtime, and writes
//! `<reports>/host/<stamp>/results.json` + `report.md` (+ the compressed model).

mod common;

use common::*;

#[test]
fn deploy_host_measures_resnet8_on_both_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&[
        "deploy",
        "--target",
        "host",
        "--iters",
        "5",
        "--warmup",
        "1",
        "--reports",
        &s(dir.path()),
    ])
    .ok();
    let rows: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("resnet8_cifar10"))
        .collect();
    assert_eq!(rows.len(), 4, "{}", r.dump());
    assert!(
        rows.iter()
            .any(|l| l.split_whitespace().any(|w| w == "ort-cpu")),
        "{}",
        r.dump()
    );
    assert!(
        rows.iter()
            .any(|l| l.split_whitespace().any(|w| w == "tract")),
        "{}",
        r.dump()
    );

    // Exactly one <stamp> folder, named YYYYMMDD-HHMMSS.
    let host = dir.path().join("host");
    let stamps: Vec<_> = std::fs::read_dir(&host)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", host.display(), r.dump()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(stamps.len(), 1, "{stamps:?}");
    let stamp = stamps[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let b = stamp.as_bytes();
    assert!(
        b.len() == 15
            && b[8] == b'-'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 8 || c.is_ascii_digit()),
        "stamp {stamp:?} is not YYYYMMDD-HHMMSS"
    );
    assert!(
        r.stderr.contains(&s(&stamps[0])),
        "stderr should name the report folder\n{}",
        r.dump()
    );

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stamps[0].join("results.json")).unwrap()).unwrap();
    assert_eq!(results["target"].as_str(), Some("host"));
    assert_eq!(results["started"].as_str(), Some(stamp.as_str()));
    assert_eq!(results["complete"], true, "a finished run says so");
    let jrows = results["rows"].as_array().unwrap();
    assert_eq!(jrows.len(), 4, "{results:#}");
    let mut runtimes: Vec<&str> = jrows
        .iter()
        .map(|row| row["bench"]["runtime"].as_str().unwrap())
        .collect();
    runtimes.sort();
    assert_eq!(runtimes, vec!["ort-cpu", "ort-cpu", "tract", "tract"]);
    let compression = &results["compression"];
    assert!(
        compression["macs_kept"].as_f64().unwrap() <= 0.75 + 1e-6,
        "{compression:#}"
    );
    for row in jrows {
        let original = row["variant"].as_str() == Some("original");
        let expect_model = if original {
            "resnet8_cifar10.onnx"
        } else {
            "resnet8_cifar10.pruned.onnx"
        };
        assert_eq!(row["model"].as_str(), Some(expect_model));
        if original {
            assert_eq!(row["params"].as_u64(), Some(78_666));
            assert_eq!(row["agreement"].as_f64(), Some(1.0));
        } else {
            assert!(row["macs"].as_u64().unwrap() as f64 <= 0.75 * 12_501_632.0 + 1.0);
            // held-apart images: the pruned model keeps most predictions
            assert!(row["agreement"].as_f64().unwrap() > 0.6, "{row:#}");
        }
        assert_eq!(
            row["items"].as_u64(),
            Some(172),
            "the 300 bundled images less the recipe's 128 calibration images"
        );
        let acc = row["accuracy"].as_f64().expect("accuracy present");
        assert!((0.4..0.9).contains(&acc), "accuracy {acc}");
        assert_eq!(row["bench"]["stats"]["iters"].as_u64(), Some(5));
        assert!(row["bench"]["stats"]["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(row["speedup"].as_f64().unwrap() > 0.0);
        // measured in whittle-runner, which reports its own peak memory
        assert!(
            row["peak_rss_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "{row:#}"
        );
    }
    let md = std::fs::read_to_string(stamps[0].join("report.md")).unwrap();
    assert!(md.contains("host"), "{md}");
    assert!(md.contains("ort-cpu") && md.contains("tract"), "{md}");
    // Nothing but the report files and the compressed model.
    assert_eq!(
        listing(dir.path()),
        vec![
            "host".to_string(),
            format!("host/{stamp}"),
            format!("host/{stamp}/report.md"),
            format!("host/{stamp}/resnet8_cifar10.pruned.onnx"),
            format!("host/{stamp}/results.json"),
        ]
    );
}

#[test]
fn deploy_unknown_target_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&[
        "deploy",
        "--target",
        "no-such-board",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--reports",
        &s(dir.path()),
    ]);
    r.error(&["no-such-board", "known", "host"]);
    assert!(listing(dir.path()).is_empty(), "a report was written");
}

#[test]
fn deploy_host_without_the_runner_says_how_to_build_it() {
    // The local transport measures in whittle-runner; a missing one fails before any work.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-runner");
    let reports = dir.path().join("reports");
    let out = std::process::Command::new(whittle())
        .args(["deploy", "--target", "host", "--reports", &s(&reports)])
        .current_dir(repo_root())
        .env("WHITTLE_RUNNER", &missing)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run whittle");
    let r = Run {
        cmd: format!(
            "WHITTLE_RUNNER={} whittle deploy --target host",
            s(&missing)
        ),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    r.error(&[
        "runner not found",
        "no-runner",
        "cargo build --release -p whittle-runner",
    ]);
    assert!(!reports.exists(), "a report folder was made");
}
