//! Every method's plan saves and replays: `--plan-out` then `--apply-plan` alone (the file's
//! steps with their saved options) writes the same model.

use std::ffi::OsString;

use crate::common::*;

/// Compress with `args`, saving the plan; replay it alone; the two models must be byte-identical
/// and the replay's steps must name the same methods.
fn saves_and_replays(model: &std::path::Path, calib: &[&str], args: &[&str], methods: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (first, again, plan) = (
        dir.path().join("first.onnx"),
        dir.path().join("again.onnx"),
        dir.path().join("plan.json"),
    );
    let base = |out: &std::path::Path| {
        let mut v = argv(
            "compress {} -o {} --calib-items 48 --holdout-items 8 --json",
            &[&model, &out],
        );
        v.extend(calib.iter().map(OsString::from));
        v
    };
    let mut a = base(&first);
    a.extend(args.iter().map(OsString::from));
    a.extend(argv("--plan-out {}", &[&plan]));
    let j = run(&a).ok().json();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let names = list(&saved["steps"], |s| s["method"].as_str());
    assert_eq!(names, methods, "{saved}");
    let mut b = base(&again);
    b.extend(argv("--apply-plan {}", &[&plan]));
    let jb = run(&b).ok().json();
    assert_eq!(j["macs"], jb["macs"], "{j}\n{jb}");
    assert_eq!(j["params"], jb["params"]);
    assert!(
        std::fs::read(&first).unwrap() == std::fs::read(&again).unwrap(),
        "the replayed model differs from the first ({args:?})"
    );
}

#[test]
fn channel_pruning_and_low_rank_plans_replay() {
    let data = s(&cifar10());
    let data = ["--calib", &data];
    let r8 = resnet8();
    saves_and_replays(
        &r8,
        &data,
        &["--target", "macs=0.8", "--sensitivity-items", "8"],
        &["prune_channels"],
    );
    saves_and_replays(
        &r8,
        &data,
        &["--low-rank", "--rank-fraction", "0.5", "--data-aware"],
        &["low_rank"],
    );
    saves_and_replays(&r8, &data, &["--quantize", "int8"], &["quantize"]);
    // a recipe of two steps replays as two steps
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_text(
        dir.path(),
        "r.toml",
        "[[step]]\nmethod = \"prune_channels\"\ntarget = \"macs=0.9\"\nsensitivity = false\n\n[[step]]\nmethod = \"low_rank\"\nrank_fraction = 0.5\n\n[[step]]\nmethod = \"quantize\"\nprecision = \"int8\"\n",
    );
    saves_and_replays(
        &r8,
        &data,
        &["--recipe", &s(&recipe)],
        &["prune_channels", "low_rank", "quantize"],
    );
}

#[test]
fn depth_merging_plans_replay() {
    let Some((m, photos)) = vww_and_photos() else {
        return;
    };
    // a set latency table: every candidate saves time, so the plan does not depend on timing
    let (_dir, table) = temp_path("t.json");
    cli("profile {} --merge --merge-rounds 1 -o {}", &[&m, &table]).ok();
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    for (k, e) in t["merges"].as_array_mut().unwrap().iter_mut().enumerate() {
        e["before_ms"] = 1.0.into();
        e["after_ms"] = (0.9 - 0.001 * k as f64).into();
    }
    t["model_ms"] = 10.0.into();
    std::fs::write(&table, t.to_string()).unwrap();
    let mut args = vec!["--merge", "--target", "damage=0.05", "--merge-rounds", "1"];
    let ts = s(&table);
    args.extend(["--latency-table", &ts]);
    let photos = s(&photos);
    saves_and_replays(
        &m,
        &["--calib", &photos, "--profile", "vww"],
        &args,
        &["merge"],
    );
}

#[test]
fn transformer_plans_replay() {
    let dir = tempfile::tempdir().unwrap();
    let Some((m, calib)) = minilm_and_calibration(dir.path(), "--limit 56 --max-length 32") else {
        return;
    };
    for (args, method) in [
        (
            &["--drop-blocks", "2", "--linear-replace"][..],
            "drop_blocks",
        ),
        (&["--prune-ffn", "0.25"][..], "prune_ffn"),
        (&["--prune-heads", "0.25"][..], "prune_heads"),
        (&["--drop-attention", "1"][..], "drop_attention"),
    ] {
        saves_and_replays(&m, &["--calib", &s(&calib)], args, &[method]);
    }
}
