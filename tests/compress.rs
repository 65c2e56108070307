//! `whittle compress` end to end: every shared CNN prunes and still runs in ONNX Runtime and
//! tract; ResNet-8 keeps its predictions; bad budgets, bad data and bad paths are refused.

use std::path::Path;

use crate::common::*;

fn macs(model: &Path) -> f64 {
    inspect_json(model, &[])["macs"].as_f64().unwrap()
}

#[test]
fn every_shared_cnn_prunes_at_30_percent_and_runs_in_both_runtimes() {
    let cases: [(&str, &[usize], f32, f32); 6] = [
        ("resnet8_cifar10", &[3, 32, 32], -1.0, 1.0),
        ("resnet_large_cifar10", &[3, 32, 32], -2.0, 2.0),
        ("mobilenetv1_025_vww96", &[3, 96, 96], 0.0, 255.0),
        ("dscnn_kws", &[1, 50, 10], -1.0, 1.0),
        ("efficientnet_lite0_224", &[3, 224, 224], -1.0, 1.0),
        ("mnist-8", &[1, 28, 28], 0.0, 1.0),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, item, lo, hi) in cases {
        let Some(m) = asset(&format!("models/{name}.onnx")) else {
            return;
        };
        let data = npy(dir.path(), &format!("{name}.npy"), 8, item, lo, hi);
        let out = dir.path().join(format!("{name}.pruned.onnx"));
        // fast settings: weight norms, no data needed
        let flags = "--target macs=0.7 --importance l2 --no-reconstruct --json";
        let j = compress(&m, &out, flags, &[]).ok().json();
        let kept = j["macs_kept"].as_f64().unwrap();
        assert!(kept <= 0.7 + 1e-6 && kept > 0.3, "{name}: {kept}");
        assert!(
            (macs(&out) / macs(&m) - kept).abs() < 1e-6,
            "{name}: inspect agrees with compress"
        );
        for rt in ["ort-cpu", "tract"] {
            // verify loads both, checks the interfaces and output shapes match, and runs them
            let v = cli(
                "verify {} {} --data {} --runtime {} --json",
                &[&m, &out, &data, &rt],
            )
            .ok()
            .json();
            assert_eq!(v["items"], 8, "{name} {rt}");
        }
    }
}

#[test]
fn resnet8_at_25_percent_keeps_80_percent_agreement_on_unseen_images() {
    let (Some(calib), Some(eval)) = (asset("data/cifar10/test-b"), asset("data/cifar10/test-a"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r8.onnx");
    let r8 = resnet8();
    let at_75 = |out: &Path, flags: &str| {
        let flags = flags.to_owned() + " --calib {} --target macs=0.75";
        compress(&r8, out, &flags, &[&calib]).ok()
    };
    let agreement = |out: &Path| {
        let v = cli("verify {} {} --data {} --json", &[&r8, &out, &eval]);
        v.ok().json()["outputs"][0]["top1_agreement"]
            .as_f64()
            .unwrap()
    };
    let j = at_75(&out, "--json").json();
    assert!(j["macs_kept"].as_f64().unwrap() <= 0.75 + 1e-6);
    assert_eq!(j["prune_channels"]["reconstructed"], true);
    let agreed = agreement(&out);
    assert!(agreed >= 0.80, "top-1 agreement {agreed} on test-a");
    // and reconstruction is what gets it there
    let raw = dir.path().join("r8_raw.onnx");
    at_75(&raw, "--no-reconstruct");
    assert!(agreement(&raw) < agreed);
}

#[test]
fn explain_lists_groups_and_why_some_are_frozen() {
    let r = run(&["compress", &s(&resnet8()), "--explain"]).ok();
    r.stdout_has("prunable");
    r.stdout_has("frozen: a softmax over the channels");
    let Some(m) = asset("models/resnet_large_cifar10.onnx") else {
        return;
    };
    let r = run(&["compress", &s(&m), "--explain"]).ok();
    r.stdout_has("frozen: padding or slicing on the channel axis");
}

#[test]
fn unreachable_budget_names_the_smallest_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.onnx");
    let flags = "--target macs=0.01 --importance l2 --no-reconstruct";
    let r = compress(&resnet8(), &out, flags, &[]);
    r.error(&["macs=0.01", "unreachable", "smallest reachable is macs=0."]);
    assert!(listing(dir.path()).is_empty(), "nothing written");
}

#[test]
fn a_model_with_nothing_prunable_says_so_and_writes_nothing() {
    // input -> Conv -> output: the conv's channels are the graph output's
    let dir = tempfile::tempdir().unwrap();
    let w = tensor_f32("w", &[4, 3, 1, 1], &[0.5; 12]);
    let g = graph(
        "g",
        vec![node("conv", "Conv", &["x", "w"], &["y"])],
        vec![value_info("x", &["N", "3", "4", "4"])],
        vec![value_info("y", &["N", "4", "4", "4"])],
        vec![w],
    );
    let m = dir.path().join("m.onnx");
    write_model(&m, &model(g, &[]));
    let out = dir.path().join("out.onnx");
    compress(&m, &out, "--importance l2 --no-reconstruct", &[])
        .error(&["nothing to prune", "graph output 'y'"]);
    assert!(!out.exists());
}

#[test]
fn calibration_items_of_the_wrong_shape_name_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let data = npy(dir.path(), "bad.npy", 4, &[3, 16, 16], -1.0, 1.0);
    let out = dir.path().join("out.onnx");
    compress(&resnet8(), &out, "--calib {}", &[&data]).error(&["[3,32,32]", "[3,16,16]"]);
    assert!(!out.exists());
}

#[test]
fn output_equal_to_input_is_refused_before_any_work() {
    let (_dir, m) = with_resnet8();
    let before = std::fs::read(&m).unwrap();
    compress(&m, &m, "--importance l2 --no-reconstruct", &[]).error(&["is the input model"]);
    assert_eq!(std::fs::read(&m).unwrap(), before);
}

#[test]
fn bad_flags_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    let r8 = |flags: &str| compress(&resnet8(), &out, flags, &[]);
    r8("--target macs=1.5").error(&["fraction"]);
    r8("--target latency=0.5 --latency-table no-such-table.json")
        .error(&["latency table no-such-table.json"]);
    r8("").error(&["--calib"]);
    assert!(listing(dir.path()).is_empty());
}

#[test]
fn a_recipe_holds_the_flags_and_unknown_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "[[step]]\nmethod = \"prune_channels\"\ntarget = \"params=0.9\"\nimportance = \"l1\"\nreconstruct = false\nsensitivity = false\n").unwrap();
    let out = dir.path().join("o.onnx");
    let with_recipe = |out: &Path, flags: &str| {
        compress(
            &resnet8(),
            out,
            &(flags.to_owned() + " --recipe {}"),
            &[&recipe],
        )
    };
    let j = with_recipe(&out, "--json").ok().json();
    let (before, after) = (
        j["params"][0].as_f64().unwrap(),
        j["params"][1].as_f64().unwrap(),
    );
    assert!(
        after <= 0.9 * before + 1.0,
        "params budget from the recipe: {before} -> {after}"
    );
    assert_eq!(j["prune_channels"]["reconstructed"], false);
    std::fs::write(
        &recipe,
        "[[step]]\nmethod = \"prune_channels\"\ncolour = 1\n",
    )
    .unwrap();
    let out2 = dir.path().join("o2.onnx");
    with_recipe(&out2, "").error(&["colour", "r.toml"]);
    assert!(!out2.exists());
    // the old form (a section per method) is refused with the recipe written as steps
    std::fs::write(&recipe, "[prune_channels]\ntarget = \"params=0.9\"\n").unwrap();
    let r = with_recipe(&out2, "");
    r.error(&["old form", "[[step]]"]);
    r.stderr_has("[[step]]\nmethod = \"prune_channels\"\ntarget = \"params=0.9\"");
    assert!(!out2.exists());
}
