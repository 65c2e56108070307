//! `whittle verify` on real CIFAR-10 images: the reference figures of shared/assets/README.md,
//! the table, and `--min-agreement` (exit 1 when a candidate disagrees, exit 2 when the flag is
//! not a fraction).

use std::path::{Path, PathBuf};

use crate::common::*;

fn test_a() -> Option<PathBuf> {
    asset("data/cifar10/test-a")
}

#[test]
fn resnet8_against_itself_matches_the_reference_accuracy() {
    let Some(data) = test_a() else { return };
    let m = s(&resnet8());
    // Relative paths from the repository root, as a user types them.
    let r = run(&[
        "verify",
        "models/resnet8_cifar10.onnx",
        "models/resnet8_cifar10.onnx",
        "--data",
        &s(&data),
        "--json",
    ])
    .ok();
    let v = r.json();
    assert_eq!(v["items"].as_u64(), Some(500), "{}", r.dump());
    assert_eq!(v["runtime"].as_str(), Some("ort-cpu"), "{}", r.dump());
    let o = &v["outputs"][0];
    assert_eq!(o["name"].as_str(), Some("output"), "{}", r.dump());
    assert_eq!(o["max_abs_diff"].as_f64(), Some(0.0), "{}", r.dump());
    assert_eq!(o["top1_agreement"].as_f64(), Some(1.0), "{}", r.dump());
    // 341/500, the figure in shared/assets/README.md ("Reference numbers").
    assert_eq!(
        o["reference_accuracy"].as_f64(),
        Some(0.682),
        "{}",
        r.dump()
    );
    assert_eq!(
        o["candidate_accuracy"].as_f64(),
        Some(0.682),
        "{}",
        r.dump()
    );
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);

    // The same, as a table.
    let t = run(&["verify", &m, &m, "--data", &s(&data)]).ok();
    t.stdout_has("500 items");
    t.stdout_has("100.00%");
    t.stdout_has("68.20%");
    // The profile beside the model was used (that is what gives 68.20%).
    t.stderr_has("resnet8_cifar10.profile.toml");
}

/// A tiny CIFAR-shaped classifier with ResNet-8's interface: `input` float [N,3,32,32] →
/// GlobalAveragePool → Flatten → Gemm (fixed weights) → `output` float [N,10]. It looks only at
/// the mean colour, so its argmax disagrees with ResNet-8 on most images.
fn mean_colour_classifier(path: &Path) {
    let mut w = Vec::new();
    for k in 0..10 {
        let a = k as f32 * std::f32::consts::TAU / 10.0;
        w.extend_from_slice(&[a.cos(), a.sin(), 0.1 * k as f32 - 0.45]);
    }
    let b: Vec<f32> = (0..10).map(|k| 0.01 * k as f32).collect();
    let mut gemm = node("classify", "Gemm", &["flat", "W", "B"], &["output"]);
    gemm.attribute.push(attr_int("transB", 1));
    let mut flatten = node("flatten", "Flatten", &["pooled"], &["flat"]);
    flatten.attribute.push(attr_int("axis", 1));
    let g = graph(
        "mean_colour",
        vec![
            node("pool", "GlobalAveragePool", &["input"], &["pooled"]),
            flatten,
            gemm,
        ],
        vec![value_info("input", &["N", "3", "32", "32"])],
        vec![value_info("output", &["N", "10"])],
        vec![tensor_f32("W", &[10, 3], &w), tensor_f32("B", &[10], &b)],
    );
    write_model(path, &model(g, &[]));
}

#[test]
fn min_agreement_not_met_exits_1_and_names_the_agreement() {
    let Some(data) = test_a() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cand = dir.path().join("mean_colour.onnx");
    mean_colour_classifier(&cand);
    let args = |extra: &[&str]| {
        let mut a = vec![
            "verify".to_string(),
            s(&resnet8()),
            s(&cand),
            "--data".into(),
            s(&data),
            "--profile".into(),
            "resnet8".into(),
            "--limit".into(),
            "100".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    // First the numbers, with no check.
    let j = run(&args(&["--json"])).ok();
    let v = j.json();
    let agreement = v["outputs"][0]["top1_agreement"]
        .as_f64()
        .expect("agreement");
    assert!(
        agreement < 0.9,
        "the fixture should disagree with ResNet-8, agreement {agreement}"
    );
    assert!(v["outputs"][0]["max_abs_diff"].as_f64().unwrap() > 0.0);

    let r = run(&args(&["--min-agreement", "0.9"]));
    assert_eq!(r.code, 1, "a check not met exits 1\n{}", r.dump());
    assert!(!r.stderr.contains("panicked"), "{}", r.dump());
    assert!(!r.stderr.contains("error:"), "{}", r.dump());
    let pct = format!("{:.2}%", agreement * 100.0);
    assert!(
        r.stderr.contains("agreement") && r.stderr.contains(&pct) && r.stderr.contains("90.00%"),
        "stderr should name the agreement {pct} and the threshold 90.00%\n{}",
        r.dump()
    );
    // The table is still printed (results on stdout, the verdict on stderr).
    r.stdout_has(&pct);

    // With --json the one object still comes out, and the exit code still says 1.
    let r = run(&args(&["--min-agreement", "0.9", "--json"]));
    assert_eq!(r.code, 1, "{}", r.dump());
    assert_eq!(
        r.json()["outputs"][0]["top1_agreement"].as_f64(),
        Some(agreement)
    );

    // A threshold the candidate meets: exit 0.
    let low = format!("{}", (agreement - 0.01).max(0.0));
    run(&args(&["--min-agreement", &low])).ok();
}

#[test]
fn min_agreement_met_exits_0() {
    let Some(data) = test_a() else { return };
    let m = s(&resnet8());
    run(&[
        "verify",
        &m,
        &m,
        "--data",
        &s(&data),
        "--limit",
        "32",
        "--min-agreement",
        "1.0",
    ])
    .ok();
}

#[test]
fn min_agreement_outside_0_1_is_an_error() {
    let m = s(&resnet8());
    let data = s(&cifar10());
    for bad in ["1.5", "NaN"] {
        let r = run(&["verify", &m, &m, "--data", &data, "--min-agreement", bad]);
        r.error(&["--min-agreement", "fraction"]);
    }
}
