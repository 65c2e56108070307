//! `whittle profile` and latency budgets: per-layer tables on both runtimes, depthwise layers,
//! `compress --target latency=` against a saved table or one measured on the spot, and the
//! errors of a table that does not fit and a budget that cannot be met.

use crate::common::*;
use serde_json::Value;

fn check_table(t: &Value, runtime: &str, layers: usize) {
    assert_eq!(t["runtime"], runtime);
    let fr = t["fractions"].as_array().unwrap();
    assert_eq!(fr.last().unwrap().as_f64(), Some(1.0));
    assert!(t["model_ms"].as_f64().unwrap() > 0.0);
    let ls = t["layers"].as_array().unwrap();
    assert_eq!(ls.len(), layers, "one entry per weighted layer");
    for l in ls {
        let ms = l["ms"].as_array().unwrap();
        assert_eq!(ms.len(), fr.len(), "{l}");
        let cols = if l["diagonal"].as_bool().unwrap() {
            1
        } else {
            fr.len()
        };
        let mut prev: Vec<f64> = vec![0.0; cols];
        for row in ms {
            let row: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(row.len(), cols, "{l}");
            for (j, v) in row.iter().enumerate() {
                assert!(v.is_finite() && *v >= 0.0, "{l}");
                assert!(*v >= prev[j], "monotone in axis 0: {l}");
                assert!(j == 0 || *v >= row[j - 1], "monotone in axis 1: {l}");
            }
            prev = row;
        }
    }
}

#[test]
fn profile_lists_every_weighted_layer_on_both_runtimes() {
    let m = resnet8();
    for rt in ["ort-cpu", "tract"] {
        let t = run(&["profile", &s(&m), "--runtime", rt, "--json"])
            .ok()
            .json();
        // 9 convolutions and the classifier
        check_table(&t, rt, 10);
    }
    // the text table names each layer and the split between layers and the rest
    let r = run(&["profile", &s(&m)]).ok();
    assert!(r.stdout.contains("conv2d_7") && r.stdout.contains("dense"));
    r.stdout_has("layers alone");
}

#[test]
fn profile_handles_depthwise_convolutions() {
    let Some(m) = asset("models/mobilenetv1_025_vww96.onnx") else {
        return;
    };
    let t = run(&["profile", &s(&m), "--json"]).ok().json();
    let ls = t["layers"].as_array().unwrap();
    let diagonal = ls.iter().filter(|l| l["diagonal"] == true).count();
    assert!(
        diagonal >= 10,
        "depthwise layers measured along the diagonal"
    );
    check_table(&t, "ort-cpu", ls.len());
}

#[test]
fn latency_budget_from_a_saved_table() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("r8.latency.json");
    run(&["profile", &s(&resnet8()), "-o", &s(&table)]).ok();
    let out = dir.path().join("r8.lat.onnx");
    let data = cifar10();
    let flags = "--calib {} --profile resnet8 --target latency=0.8 --latency-table {} \
                 --calib-items 64 --holdout-items 32 --json";
    let j = compress(&resnet8(), &out, flags, &[&data, &table])
        .ok()
        .json();
    let lat = j["prune_channels"]["plan"]["latency_ms"]
        .as_array()
        .expect("predicted latency");
    let (before, after) = (lat[0].as_f64().unwrap(), lat[1].as_f64().unwrap());
    assert!(after <= 0.8 * before + 1e-9, "{before} -> {after}");
    assert!(
        after >= 0.7 * before,
        "stops near the budget: {before} -> {after}"
    );
    assert!(j["macs"][1].as_u64() < j["macs"][0].as_u64());
    cli("bench {} --runtime tract --iters 3", &[&out]).ok();

    // a budget below what the table allows names the smallest reachable
    let latency = |out: &std::path::Path, target: &str, table: &std::path::Path, flags: &str| {
        let latency_table = "--latency-table {}";
        let flags = format!("{latency_table} --target {target} {flags}");
        compress(&resnet8(), out, &flags, &[&table])
    };
    let quick = "--no-reconstruct --importance l2";
    let e = latency(&dir.path().join("x.onnx"), "latency=0.01", &table, quick).error(&[
        "latency=0.01 is unreachable",
        "smallest reachable is latency=",
    ]);
    assert!(!e.is_empty());

    // a table of another model is refused before anything is written
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    t["layers"][3]["weight_dims"][0] = 48.into();
    let bad = dir.path().join("other.latency.json");
    std::fs::write(&bad, t.to_string()).unwrap();
    let x = dir.path().join("y.onnx");
    latency(&x, "latency=0.8", &bad, quick)
        .error(&["latency table does not fit this model", "whittle profile"]);
    assert!(!x.exists());
    std::fs::write(&bad, "{").unwrap();
    latency(&x, "latency=0.8", &bad, "").error(&["not a table written by `whittle profile`"]);
}

#[test]
fn latency_budget_measures_a_table_when_none_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r8.onnx");
    let flags = "--target latency=0.85 --runtime tract --no-reconstruct --importance l2 --json";
    let j = compress(&resnet8(), &out, flags, &[]).ok().json();
    let lat = j["prune_channels"]["plan"]["latency_ms"]
        .as_array()
        .expect("predicted latency");
    assert!(lat[1].as_f64().unwrap() <= 0.85 * lat[0].as_f64().unwrap() + 1e-9);
    cli("bench {} --runtime tract --iters 3", &[&out]).ok();
}
