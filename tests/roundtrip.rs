//! Round trips through the binary on real models: `inspect` counts every stored weight, and
//! `convert` writes a model whose outputs are bit-identical to the input's (`verify` gives
//! max |diff| = 0 on every output), inline and with `--external-data`.

use std::path::Path;

use crate::common::*;
use ndarray::Array2;
use serde_json::Value;

/// `inspect --json` params of a model.
fn inspected_params(model: &Path) -> u64 {
    let r = run(&["inspect", "--json", &s(model)]).ok();
    r.json()["params"]
        .as_u64()
        .unwrap_or_else(|| panic!("no params\n{}", r.dump()))
}

/// Assert every output of a `verify --json` report is identical, and return the report.
fn assert_identical(r: &Run, items: u64) -> Value {
    let v = r.json();
    assert_eq!(v["items"].as_u64(), Some(items), "{}", r.dump());
    let outputs = v["outputs"].as_array().expect("outputs");
    assert!(!outputs.is_empty(), "{}", r.dump());
    for o in outputs {
        assert_eq!(
            o["max_abs_diff"].as_f64(),
            Some(0.0),
            "output {} differs after the round trip\n{}",
            o["name"],
            r.dump()
        );
        assert_eq!(o["mean_cosine"].as_f64(), Some(1.0), "{}", r.dump());
        if let Some(a) = o["top1_agreement"].as_f64() {
            assert_eq!(a, 1.0, "{}", r.dump());
        }
    }
    v
}

/// inspect counts the weights; convert; verify the copy is identical on `data` (with `flags`).
fn round_trip(model: &Path, data: &Path, flags: &str, items: u64) {
    let want = weight_elements(model);
    assert!(want > 0, "{}", model.display());
    assert_eq!(
        inspected_params(model),
        want,
        "{}: inspect params != element count of initializers + Constant tensors",
        model.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let c = run(&["convert", &s(model), "-o", &s(&out)]).ok();
    assert!(out.is_file(), "convert wrote nothing\n{}", c.dump());
    assert_eq!(
        listing(dir.path()),
        vec!["out.onnx".to_string()],
        "convert without --external-data writes one file and no temporaries"
    );
    // The converted file holds the same weights (Constants become initializers on the way).
    assert_eq!(weight_elements(&out), want, "{}", out.display());
    assert_eq!(inspected_params(&out), want, "{}", out.display());
    let mut args = argv("verify {} {} --data {} --json", &[&model, &out, &data]);
    args.extend(argv(flags, &[]));
    let r = run(&args);
    assert_identical(&r.ok(), items);
}

#[test]
fn resnet8_round_trip_is_lossless() {
    let Some(data) = asset("data/cifar10/test-a") else {
        return;
    };
    round_trip(&resnet8(), &data, "--profile resnet8 --limit 64", 64);
}

#[test]
fn efficientnet_lite0_round_trip_is_lossless() {
    // efficientnet_lite0_224 stands in for MobileNetV2 (see shared/assets/README.md).
    let Some((model, data)) = lite0_and_photos() else {
        return;
    };
    round_trip(&model, &data, "--profile efficientnet --limit 16", 16);
}

#[test]
fn mnist8_round_trip_is_lossless() {
    let Some((model, data)) = mnist_and_digits() else {
        return;
    };
    round_trip(&model, &data, "--profile mnist --limit 64", 64);
}

/// Token ids of the reference sentences (`[CLS] ... [SEP]`), cut or zero-padded to 16.
fn reference_tokens() -> Vec<Vec<i64>> {
    let mut rows = Vec::new();
    if let Some(p) = asset("models/minilm-l6-v2-reference.json") {
        let v: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        for sent in v["sentences"].as_array().into_iter().flatten() {
            rows.push(list(&sent["input_ids"], |x| x.as_i64()));
        }
    }
    // Top up to 8 rows with other valid ids: [CLS] 2000.. [SEP].
    let mut k = 0;
    while rows.len() < 8 {
        let len = 5 + 2 * k;
        let mut ids = vec![101];
        ids.extend((0..len as i64).map(|j| 2000 + 37 * (j + 3 * k as i64) % 1000));
        ids.push(102);
        rows.push(ids);
        k += 1;
    }
    rows.truncate(8);
    rows
}

#[test]
fn minilm_round_trip_is_lossless() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (n, seq) = (8, 16);
    let rows = reference_tokens();
    let mut ids = Array2::<i64>::zeros((n, seq));
    let mut mask = Array2::<i64>::zeros((n, seq));
    for (i, row) in rows.iter().enumerate() {
        let mut row = row.clone();
        if row.len() > seq {
            row.truncate(seq - 1);
            row.push(102);
        }
        for (j, &t) in row.iter().enumerate() {
            ids[[i, j]] = t;
            mask[[i, j]] = 1;
        }
    }
    let types = Array2::<i64>::zeros((n, seq));
    let npz = dir.path().join("tokens.npz");
    let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&npz).unwrap());
    w.add_array("input_ids", &ids).unwrap();
    w.add_array("attention_mask", &mask).unwrap();
    w.add_array("token_type_ids", &types).unwrap();
    w.finish().unwrap();
    round_trip(&model, &npz, "", n as u64);
}

#[test]
fn resnet8_external_data_round_trip_is_lossless() {
    let Some(data) = asset("data/cifar10/test-a") else {
        return;
    };
    let model = resnet8();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ext.onnx");
    let side = dir.path().join("ext.onnx.data");
    let c = cli("convert {} -o {} --external-data --json", &[&model, &out]).ok();
    let j = c.json();
    let written = list(&j["written"], |v| v.as_str());
    assert_eq!(written, vec![s(&out), s(&side)], "{}", c.dump());
    assert_eq!(
        listing(dir.path()),
        vec!["ext.onnx".to_string(), "ext.onnx.data".to_string()]
    );
    let model_len = std::fs::metadata(&out).unwrap().len();
    let side_len = std::fs::metadata(&side).unwrap().len();
    // 78,666 float weights: nearly all of them (every tensor of 1 KiB and more) move out.
    assert!(side_len >= 300_000, "side file has {side_len} bytes");
    assert!(
        model_len < 32 * 1024,
        "the model file still holds the weights ({model_len} bytes)"
    );
    assert_eq!(j["bytes"].as_u64(), Some(model_len + side_len));
    assert_eq!(inspected_params(&out), weight_elements(&model));
    let verify = |copy: &Path, limit: &str| {
        let line = "verify {} {} --data {} --profile resnet8 --limit {} --json";
        cli(line, &[&model, &copy, &data, &limit])
    };
    assert_identical(&verify(&out, "64").ok(), 64);
    // Converting the external-data model back inline gives the original weights again.
    let back = dir.path().join("back.onnx");
    cli("convert {} -o {}", &[&out, &back]).ok();
    assert_identical(&verify(&back, "32").ok(), 32);
}
