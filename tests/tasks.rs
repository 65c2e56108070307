//! Fidelity that fits the task (issue 17): a dense map is judged by IoU, a CTC head by decoded
//! sequences, an encoder by cosine; `verify` says which metric and why; compress warns under its
//! floor and `--strict` makes that exit 1 (the model is still written).

use std::path::{Path, PathBuf};

use crate::common::*;
use serde_json::Value;
use whittle_test_support::{GraphBuilder, Lcg, attr_ints};

/// A one-channel probability map: `x` [N,3,32,32] → Conv 3x3 → Sigmoid → `map` [N,1,32,32]; the
/// weights moved by `shift` (a candidate that disagrees in places).
fn dense_map(dir: &Path, name: &str, shift: f32) -> PathBuf {
    let mut g = GraphBuilder::new("dense", Lcg::seeded(3, 0));
    let x = g.input("x", &["N", "3", "32", "32"]);
    let w: Vec<f32> = (0..27).map(|_| g.rng.symmetric(0.3) + shift).collect();
    let w = g.initializer(tensor_f32("w", &[1, 3, 3, 3], &w));
    let b = g.initializer(tensor_f32("b", &[1], &[0.0]));
    let c = g.node(
        "Conv",
        "conv",
        &[&x, &w, &b],
        vec![attr_ints("pads", &[1, 1, 1, 1])],
    );
    g.node("Sigmoid", "prob", &[&c], vec![]);
    g.graph.node.last_mut().unwrap().output[0] = "map".into();
    g.output("map", &["N", "1", "32", "32"]);
    let p = dir.join(name);
    write_model(&p, &g.model(8, &[("", 13)]));
    p
}

/// A CTC-like head: `feats` [N,20,16] → MatMul [16,8] → Softmax over the classes → `probs`
/// [N,20,8]; weights moved by `noise`.
fn ctc_head(dir: &Path, name: &str, noise: f32) -> PathBuf {
    let mut base = Lcg::seeded(5, 0);
    let mut other = Lcg::seeded(9, 0);
    let w: Vec<f32> = (0..16 * 8)
        .map(|_| base.symmetric(1.0) + noise * other.symmetric(1.0))
        .collect();
    let mut g = GraphBuilder::new("ctc", Lcg::seeded(1, 0));
    let x = g.input("feats", &["N", "20", "16"]);
    let w = g.initializer(tensor_f32("w", &[16, 8], &w));
    let m = g.node("MatMul", "logits", &[&x, &w], vec![]);
    g.node("Softmax", "softmax", &[&m], vec![attr_int("axis", 2)]);
    g.graph.node.last_mut().unwrap().output[0] = "probs".into();
    g.output("probs", &["N", "20", "8"]);
    let p = dir.join(name);
    write_model(&p, &g.model(8, &[("", 13)]));
    p
}

/// `whittle verify A B --data DATA EXTRA...`.
fn verify(a: &Path, b: &Path, data: &Path, extra: &[&str]) -> Run {
    let mut args = argv("verify {} {} --data {}", &[&a, &b, &data]);
    args.extend(extra.iter().map(std::ffi::OsString::from));
    run(&args)
}

fn verify_json(a: &Path, b: &Path, data: &Path, extra: &[&str]) -> Value {
    let mut extra = extra.to_vec();
    extra.push("--json");
    verify(a, b, data, &extra).ok().json()
}

#[test]
fn r17_a_dense_map_is_judged_by_iou() {
    let dir = tempfile::tempdir().unwrap();
    let data = npy(dir.path(), "x.npy", 24, &[3, 32, 32], -1.0, 1.0);
    let r = dense_map(dir.path(), "r.onnx", 0.0);
    let c = dense_map(dir.path(), "c.onnx", 0.05);
    let v = verify_json(&r, &r, &data, &[]);
    let o = &v["outputs"][0];
    assert_eq!(o["task"], "dense", "{v}");
    assert_eq!(o["metric"].as_f64(), Some(1.0), "{v}");
    assert!(
        o["top1_agreement"].is_null(),
        "a map is not a classifier: {v}"
    );
    assert!(
        o["task_reason"].as_str().unwrap().contains("Sigmoid"),
        "{v}"
    );
    let v = verify_json(&r, &c, &data, &[]);
    let iou = v["outputs"][0]["metric"].as_f64().unwrap();
    assert!(iou > 0.3 && iou < 0.999, "IoU {iou}: {v}");
    // the table says which metric and why
    let t = verify(&r, &c, &data, &[]).ok();
    t.stdout_has("task dense, IoU ([N, 1, 32, 32] made by Sigmoid: a map per pixel)");
    // --min-agreement checks the task metric
    let f = verify(&r, &c, &data, &["--min-agreement", "0.9999"]);
    assert_eq!(f.code, 1, "{}", f.dump());
    f.stderr_has("IoU of output 'map'");
    // a task that does not fit the output is refused by name
    verify(&r, &c, &data, &["--task", "classify"])
        .error(&["--task classify needs an output [N, C]"]);
    let bad = verify(&r, &c, &data, &["--task", "boxes"]);
    assert!(
        bad.code == 2
            && bad
                .stderr
                .contains("unknown task 'boxes' (one of classify, embed"),
        "{}",
        bad.dump()
    );
}

#[test]
fn r17_a_ctc_head_is_judged_by_decoded_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let data = npy(dir.path(), "f.npy", 40, &[20, 16], -1.0, 1.0);
    let r = ctc_head(dir.path(), "r.onnx", 0.0);
    let c = ctc_head(dir.path(), "c.onnx", 0.15);
    let v = verify_json(&r, &c, &data, &[]);
    let o = &v["outputs"][0];
    assert_eq!(o["task"], "ctc", "{v}");
    let agree = o["metric"].as_f64().unwrap();
    // 20 steps of 8 classes: a small change flips some step of most items' decodings, while
    // each step's argmax mostly stays
    assert!(agree < 0.95, "sequence agreement {agree}: {v}");
    assert!(o["mean_cosine"].as_f64().unwrap() > 0.9, "{v}");
    assert_eq!(verify_json(&r, &r, &data, &[])["outputs"][0]["metric"], 1.0);
    // forced to embed, the same output gives the cosine
    let e = verify_json(&r, &c, &data, &["--task", "embed"]);
    assert_eq!(e["outputs"][0]["task"], "embed");
    assert_eq!(e["outputs"][0]["task_reason"], "given by --task");
    assert_eq!(e["outputs"][0]["metric"], e["outputs"][0]["mean_cosine"]);
}

#[test]
fn r17_an_encoder_is_judged_by_cosine() {
    let Some(m) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(tokens) = sts_calibration(dir.path(), "--limit 16") else {
        return;
    };
    let v = verify_json(&m, &m, &tokens, &[]);
    let o = &v["outputs"][0];
    assert_eq!(o["task"], "embed", "{v}");
    assert_eq!(o["metric"], o["mean_cosine"], "{v}");
    assert!(
        o["task_reason"]
            .as_str()
            .unwrap()
            .contains("per-token hidden states"),
        "{v}"
    );
}

#[test]
fn r17_compress_warns_under_its_floor_and_strict_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r8.onnx");
    let data = cifar10();
    let half = |flags: &str| {
        let fixed = "--calib {} --calib-items 64 --holdout-items 64 --target macs=0.5 \
                     --no-speed-check";
        compress(&resnet8(), &out, &format!("{fixed} {flags}"), &[&data])
    };
    let r = half("--min-agreement 0.99").ok();
    assert!(
        r.stdout
            .contains("warning: top-1 agreement of output 'output' is")
            && r.stdout.contains("under the floor 99.00%"),
        "{}",
        r.dump()
    );
    assert!(out.exists());
    std::fs::remove_file(&out).unwrap();
    // --strict: the same result is written, and the exit code says it failed the check
    let r = half("--min-agreement 0.99 --strict --json");
    assert_eq!(r.code, 1, "{}", r.dump());
    r.stderr_has("--strict: top-1 agreement");
    let j: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(j["warnings"].as_array().map(Vec::len), Some(1), "{j}");
    assert!(out.exists(), "a poor result is still written");
    // a floor it meets: no warning, exit 0
    let j = half("--min-agreement 0.2 --strict --json").ok().json();
    assert_eq!(j["warnings"].as_array().map(Vec::len), Some(0), "{j}");
    half("--min-agreement 1.5").error(&["not a fraction"]);
}

/// The text-detector fixture (EfficientNet-Lite0 with -1 height and width, a Resize + Concat neck
/// and a probability-map head) compresses at its data's shape and is judged by IoU.
#[test]
fn r17_the_detector_fixture_compresses_at_its_data_shape_and_reports_iou() {
    let Some((src, photos)) = lite0_and_photos() else {
        return;
    };
    let (dir, det) = temp_path("det.onnx");
    write_model(&det, &whittle_test_support::fixtures::text_detector(&src));
    let profile = write_text(
        dir.path(),
        "det.toml",
        "[preprocess]\nresize = [160, 128]\nmean = [127.5]\nstd = [127.5]\n",
    );
    let out = dir.path().join("det-pruned.onnx");
    let flags = "--calib {} --profile {} --calib-items 24 --holdout-items 16 \
                 --sensitivity-items 8 --target macs=0.7 --no-speed-check --json";
    let j = compress(&det, &out, flags, &[&photos, &profile])
        .ok()
        .json();
    assert_eq!(j["costed_at"], "input=1x3x128x160", "{j}");
    let inspected = inspect_json(&det, &["--input", "input=1x3x128x160"]);
    assert_eq!(j["macs"][0], inspected["macs"], "{j}");
    let o = &j["fidelity"]["outputs"][0];
    assert_eq!(o["task"], "dense", "{j}");
    let iou = o["metric"].as_f64().unwrap();
    assert!(iou > 0.5 && iou <= 1.0, "IoU {iou}");
    // the neck survives and the written model still takes any size
    let w = inspect_json(&out, &[]);
    assert_eq!(
        w["inputs"][0]["shape"], "[N,3,input_dim2,input_dim3]",
        "{w}"
    );
    bench_once(&out, "input=1x3x96x64");
}
