//! The regression suite (issue 8, point 5): every model in ../shared/assets/models through
//! inspect, a load / save round trip, every compression method that has landed at a moderate
//! budget, and verify. Any panic, invalid graph or runtime error fails, and so does a subnormal,
//! NaN or infinite float in any tensor a method wrote (issue 17); a model a method does not apply
//! to is listed as skipped with the reason.

use std::path::{Path, PathBuf};

use crate::common::*;
use ndarray::{Array2, ArrayD};

use crate::shapes::dynamic;

/// Synthetic but valid inputs for each model: (data file, item count).
fn data_for(name: &str, dir: &Path) -> PathBuf {
    let n = 4;
    if name.starts_with("minilm") {
        let mut ids = Array2::<i64>::zeros((n, 12));
        let mut mask = Array2::<i64>::zeros((n, 12));
        for i in 0..n {
            for j in 0..12 {
                ids[[i, j]] = if j == 0 {
                    101
                } else if j == 11 {
                    102
                } else {
                    2000 + (i * 37 + j * 11) as i64 % 3000
                };
                mask[[i, j]] = 1;
            }
        }
        let p = dir.join(format!("{name}.npz"));
        let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&p).unwrap());
        w.add_array("input_ids", &ids).unwrap();
        w.add_array("attention_mask", &mask).unwrap();
        w.add_array("token_type_ids", &Array2::<i64>::zeros((n, 12)))
            .unwrap();
        w.finish().unwrap();
        return p;
    }
    let item: &[usize] = match name {
        "mobilenetv1_025_vww96" => &[3, 96, 96],
        "dscnn_kws" => &[1, 50, 10],
        "efficientnet_lite0_224" => &[3, 224, 224],
        "mnist-8" => &[1, 28, 28],
        _ => &[3, 32, 32],
    };
    let mut shape = vec![n];
    shape.extend_from_slice(item);
    let len: usize = shape.iter().product();
    let vals: Vec<f32> = noise(len, 3)
        .iter()
        .map(|&b| b as f32 / 128.0 - 1.0)
        .collect();
    let p = dir.join(format!("{name}.npy"));
    ndarray_npy::write_npy(&p, &ArrayD::from_shape_vec(shape, vals).unwrap()).unwrap();
    p
}

#[test]
fn r8_every_shared_model_through_every_landed_method() {
    let Some(mut models) = shared_models() else {
        return;
    };
    models.extend(minilm());
    models.sort();
    assert!(models.len() >= 7, "{models:?}");
    let dir = tempfile::tempdir().unwrap();
    // the fixtures of issue 17: ResNet-8 with a -1 batch and with symbolic height and width, the
    // text detector (EfficientNet-Lite0 with -1 H and W, a Resize + Concat neck, a map head), at
    // 32x32 (`--input` binds them where a method runs without data)
    let r8 = models
        .iter()
        .find(|m| m.ends_with("resnet8_cifar10.onnx"))
        .cloned()
        .expect("resnet8");
    let mut fixtures = Vec::new();
    let effnet = models
        .iter()
        .find(|m| m.ends_with("efficientnet_lite0_224.onnx"))
        .cloned()
        .expect("efficientnet");
    for (file, proto) in [
        (
            "fixture_minus_one_batch.onnx",
            dynamic::minus_one_batch(&r8, 32),
        ),
        (
            "fixture_symbolic_hw.onnx",
            dynamic::symbolic_hw(&r8, "-1", "-1"),
        ),
        (
            "fixture_text_detector.onnx",
            whittle_test_support::fixtures::text_detector(&effnet),
        ),
    ] {
        let p = dir.path().join(file);
        dynamic::write_proto(&p, &proto);
        fixtures.push(p);
    }
    let mut report = Vec::new();
    for m in models.iter().chain(&fixtures) {
        let name = m
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .replace(".opset17", "");
        let bind: &[&str] = if name.starts_with("fixture") {
            &["--input", "input=1x3x32x32"]
        } else {
            &[]
        };
        let data = data_for(&name, dir.path());
        // inspect
        let j = run(&["inspect", &s(m), "--json", "--brief"]).ok().json();
        assert!(j["params"].as_u64().unwrap() > 0, "{name}");
        // round trip: identical outputs
        let rt = dir.path().join(format!("{name}.rt.onnx"));
        run(&["convert", &s(m), "-o", &s(&rt)]).ok();
        let v = run(&["verify", &s(m), &s(&rt), "--data", &s(&data), "--json"])
            .ok()
            .json();
        for o in v["outputs"].as_array().unwrap() {
            assert_eq!(o["max_abs_diff"].as_f64(), Some(0.0), "{name} round trip");
        }
        // channel pruning at a moderate budget (fast settings: weight norms, no data)
        let pruned = dir.path().join(format!("{name}.pruned.onnx"));
        let r = run(&[
            "compress",
            &s(m),
            "-o",
            &s(&pruned),
            "--target",
            "macs=0.8",
            "--importance",
            "l2",
            "--no-reconstruct",
            "--json",
        ]
        .iter()
        .chain(bind)
        .collect::<Vec<_>>());
        if r.code == 0 {
            let kept = r.json()["macs_kept"].as_f64().unwrap();
            assert!(kept <= 0.8 + 1e-6, "{name}: {kept}");
        }
        report.push(method_outcome(
            &name,
            "channel pruning",
            m,
            &pruned,
            &data,
            r,
            &["nothing to prune"],
        ));
        // the other methods at moderate settings: (method, flags, the refusals that may apply)
        let calib = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = extra.iter().map(|x| x.to_string()).collect();
            v.extend(
                [
                    "--calib",
                    &s(&data),
                    "--calib-items",
                    "4",
                    "--holdout-items",
                    "0",
                ]
                .iter()
                .map(|x| x.to_string()),
            );
            v
        };
        let not_a_transformer = ["no residual Add", "none whose branch holds a Softmax"];
        let methods: Vec<(&str, Vec<String>, &[&str])> = vec![
            // low rank: half of each layer's rank (plain SVD, no data)
            (
                "low rank",
                vec!["--low-rank".into(), "--rank-fraction".into(), "0.5".into()],
                &["nothing to factorise"],
            ),
            // depth merging at latency=0.95, refitted on the synthetic items (one measuring round:
            // the figures do not matter here); on a model where no merge pays on this machine the
            // refusal names the best reachable latency
            (
                "depth merging",
                calib(&["--merge", "--target", "latency=0.95", "--merge-rounds", "1"]),
                &["nothing to merge", "unreachable by merging"],
            ),
            // transformers: one block replaced by a fitted linear map, a quarter of the FFN
            // neurons, a quarter of the heads; a model with no recognised block says which
            // pattern failed
            (
                "block removal",
                calib(&["--drop-blocks", "1", "--linear-replace"]),
                &not_a_transformer,
            ),
            (
                "feed-forward pruning",
                calib(&["--prune-ffn", "0.25"]),
                &not_a_transformer,
            ),
            (
                "head pruning",
                calib(&["--prune-heads", "0.25"]),
                &not_a_transformer,
            ),
            (
                "attention removal",
                calib(&["--drop-attention", "1"]),
                &not_a_transformer,
            ),
            // int8 (the calibrator fixed and all int8: one range pass over the few synthetic
            // items, no mixed-precision runs)
            (
                "int8",
                calib(&[
                    "--quantize",
                    "int8",
                    "--calibrate",
                    "minmax",
                    "--keep-float",
                    "0",
                ]),
                &["cannot be raised"],
            ),
        ];
        for (method, flags, refusals) in methods {
            let out = dir
                .path()
                .join(format!("{name}.{}.onnx", method.replace(' ', "_")));
            let mut args = vec![
                "compress".to_string(),
                s(m),
                "-o".into(),
                s(&out),
                "--json".into(),
            ];
            args.extend(flags);
            args.extend(bind.iter().map(|x| x.to_string()));
            let r = run(&args);
            report.push(method_outcome(&name, method, m, &out, &data, r, refusals));
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// A method's run on one model: either it wrote a model that runs in ort-cpu and tract on `data`
/// (verify exits 0), or it refused on one line naming one of the `refusals` and wrote nothing.
/// Returns the report line.
fn method_outcome(
    name: &str,
    method: &str,
    model: &Path,
    out: &Path,
    data: &Path,
    r: Run,
    refusals: &[&str],
) -> String {
    if r.code != 0 {
        // one of the refusals (the first when none matches, so the failure names it)
        let stderr = r.stderr.to_lowercase();
        let needle = refusals
            .iter()
            .find(|n| stderr.contains(&n.to_lowercase()))
            .unwrap_or(&refusals[0]);
        let line = r.error(&[needle]);
        assert!(!out.exists(), "{name} {method}: nothing may be written");
        return format!("{name}: {method} skipped: {line}");
    }
    let j = r.json();
    assert_clean_numbers(name, method, out);
    for rt in ["ort-cpu", "tract"] {
        run(&[
            "verify",
            &s(model),
            &s(out),
            "--data",
            &s(data),
            "--runtime",
            rt,
            "--json",
        ])
        .ok();
    }
    format!(
        "{name}: {method} to {:.1}% MACs, runs in ort-cpu and tract",
        j["macs_kept"].as_f64().unwrap_or(f64::NAN) * 100.0
    )
}

/// Every float initializer of the written model is finite and free of subnormals (what ONNX
/// Runtime's x86 kernels slow down on by orders of magnitude).
fn assert_clean_numbers(name: &str, method: &str, out: &Path) {
    let m = whittle_core::Model::load(out).unwrap();
    let mut checked = 0;
    for t in &m.graph().initializer {
        if t.data_type != Some(1) {
            continue;
        }
        let v = whittle_core::tensor::to_f32(t).unwrap();
        checked += v.len();
        let bad = v
            .iter()
            .filter(|x| !x.is_finite() || x.is_subnormal())
            .count();
        assert_eq!(
            bad,
            0,
            "{name} {method}: '{}' holds {bad} subnormal, NaN or infinite floats",
            t.name()
        );
    }
    assert!(checked > 0, "{name} {method}: no float weights checked");
}
