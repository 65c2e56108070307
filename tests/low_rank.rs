//! `whittle compress --low-rank` end to end: ResNet-56 keeps its predictions at 30% of MACs
//! removed with data-aware factors (and they beat plain SVD there), recipes chain low rank with
//! pruning in their order, and bad ranks, schemes and combinations are refused.

use crate::common::*;

fn agreement(original: &std::path::Path, candidate: &std::path::Path) -> f64 {
    let data = asset("data/cifar10/test-a").expect("test-a");
    let line = "verify {} {} --data {} --profile resnet-large --json";
    let j = cli(line, &[&original, &candidate, &data]).ok().json();
    j["outputs"][0]["top1_agreement"].as_f64().unwrap()
}

#[test]
fn resnet56_at_30_percent_keeps_85_percent_agreement_data_aware() {
    let Some(m) = asset("models/resnet_large_cifar10.onnx") else {
        return;
    };
    let calib = asset("data/cifar10/test-b").expect("test-b");
    let dir = tempfile::tempdir().unwrap();
    let mut agree = vec![];
    for data_aware in [true, false] {
        let out = dir.path().join(format!("r56.{data_aware}.onnx"));
        let flags = "--calib {} --profile resnet-large --low-rank --target macs=0.7 --json";
        let j = compress_json_if(&m, &out, flags, (data_aware, "--data-aware"), &[&calib]);
        assert!(j["macs_kept"].as_f64().unwrap() <= 0.7 + 1e-6, "{j}");
        assert_eq!(j["low_rank"]["data_aware"], data_aware);
        let f = j["low_rank"]["factored"].as_array().unwrap();
        assert!(f.len() > 10);
        for l in f {
            assert!(l["macs"][1].as_u64() < l["macs"][0].as_u64(), "{l}");
        }
        agree.push(agreement(&m, &out));
    }
    assert!(agree[0] >= 0.85, "data-aware agreement {}", agree[0]);
    assert!(
        agree[0] > agree[1],
        "data-aware {} vs plain {}",
        agree[0],
        agree[1]
    );
}

#[test]
fn a_recipe_runs_low_rank_and_pruning_in_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_text(
        dir.path(),
        "r.toml",
        "[[step]]\nmethod = \"prune_channels\"\ntarget = \"macs=0.9\"\nimportance = \"l2\"\nreconstruct = false\nsensitivity = false\n\n[[step]]\nmethod = \"low_rank\"\nrank_fraction = 0.5\nscheme = \"channel\"\n",
    );
    let out = dir.path().join("r8.onnx");
    let j = compress(&resnet8(), &out, "--recipe {} --json", &[&recipe])
        .ok()
        .json();
    assert!(j["prune_channels"]["plan"].is_object(), "pruned: {j}");
    assert!(!j["low_rank"]["factored"].as_array().unwrap().is_empty());
    assert!(j["macs_kept"].as_f64().unwrap() < 0.9);
    cli("bench {} --runtime tract --iters 2", &[&out]).ok();
}

#[test]
fn bad_low_rank_requests_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.onnx");
    let m = resnet8();
    let with = |flags: &str| compress(&m, &out, &format!("--low-rank {flags}"), &[]);
    with("--rank 0").error(&["--rank 0"]);
    with("--rank-fraction 1.5").error(&["not in (0, 1]"]);
    with("--scheme diagonal").error(&["unknown scheme 'diagonal'"]);
    with("--scheme spatial --data-aware --calib data/cifar10").error(&["channel-wise"]);
    with("--data-aware").error(&["--calib"]);
    with("--prune-channels").error(&["need a recipe"]);
    with("--target latency=0.5").error(&["macs= or params="]);
    with("--target macs=0.001").error(&["unreachable by low rank", "smallest reachable"]);
    assert!(listing(dir.path()).is_empty(), "nothing written");
    // a rank above some layers' full rank: those are listed as skipped, the rest factorised
    let j = with("--rank 12 --json").ok().json();
    let skipped = j["low_rank"]["skipped"].as_array().unwrap();
    assert!(
        skipped.iter().any(|k| k["reason"]
            .as_str()
            .unwrap()
            .contains("exceeds its full rank 10")),
        "{j}"
    );
}
