//! Dynamic input shapes through the binary (issue 17): a -1 batch inspects with `--input`,
//! symbolic height and width are named as unknown until bound, MACs at the bound shape equal the
//! fixed-shape copy's, profile measures at the bound shape, and the fixtures run in ONNX Runtime
//! and tract at two sizes.

#[path = "../core/tests/fixtures/dynamic.rs"]
pub mod dynamic;

use std::path::{Path, PathBuf};

use crate::common::*;
use dynamic::*;

fn write(dir: &Path, name: &str, m: &whittle_core::onnx::ModelProto) -> PathBuf {
    let p = dir.join(name);
    write_proto(&p, m);
    p
}

/// A temp folder, the shared ResNet-8 and in the folder `hw.onnx`, its copy with -1 height and
/// width; `None` (after the skip note) without the shared model.
fn resnet8_with_symbolic_hw() -> Option<(tempfile::TempDir, PathBuf, PathBuf)> {
    let src = shared_model("resnet8_cifar10.onnx")?;
    let dir = tempfile::tempdir().unwrap();
    let hw = write(dir.path(), "hw.onnx", &symbolic_hw(&src, "-1", "-1"));
    Some((dir, src, hw))
}

/// The bundled CIFAR-10 images and ResNet-8's preprocessing profile.
fn bundled_cifar() -> (PathBuf, PathBuf) {
    (
        cifar10(),
        repo_root().join("models/resnet8_cifar10.profile.toml"),
    )
}

#[test]
fn r17_minus_one_batch_inspects_with_input() {
    let Some(src) = shared_model("resnet8_cifar10.onnx") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "b.onnx", &minus_one_batch(&src, 32));
    let original = inspect_json(&src, &[])["macs"].as_u64().unwrap();

    let v = inspect_json(&m, &["--input", "input=1x3x32x32"]);
    assert_eq!(v["macs"].as_u64(), Some(original), "{v}");
    assert_eq!(v["costed_at"], "input=1x3x32x32");
    assert_eq!(v["per_item"].as_array().map(Vec::len), Some(0));
    assert_eq!(v["inputs"][0]["shape"], "[1,3,32,32]");
    let r = cli("inspect {} --input input=2x3x32x32 --brief", &[&m]).ok();
    assert!(
        r.stdout.contains(&format!("MACs    {} ", 2 * original))
            && r.stdout.contains("at input=2x3x32x32"),
        "{}",
        r.dump()
    );

    // without --input the batch is a symbol counted per item, never a size of -1
    let v = inspect_json(&m, &[]);
    assert_eq!(v["macs"].as_u64(), Some(original), "{v}");
    assert_eq!(v["per_item"][0], "input_dim0");
    assert_eq!(v["inputs"][0]["shape"], "[input_dim0,3,32,32]");
    let r = run(&["inspect", &s(&m), "--brief"]).ok();
    r.stdout_has("per item (input_dim0 as 1) at input=1x3x32x32");
}

#[test]
fn r17_symbolic_height_and_width_are_named_until_bound() {
    let Some((dir, src, m)) = resnet8_with_symbolic_hw() else {
        return;
    };

    let v = inspect_json(&m, &[]);
    assert!(
        v["macs"].is_null(),
        "MACs with H = W = 1 must not be printed: {v}"
    );
    let names = list(&v["unknown_dims"], |d| d["name"].as_str());
    assert_eq!(names, ["input_dim2", "input_dim3"], "{v}");
    assert_eq!(v["unknown_dims"][0]["input"], "input");
    assert_eq!(v["unknown_dims"][0]["axis"], 2);
    assert_eq!(v["layers"][0]["op"], "Conv");
    assert!(v["layers"][0]["macs"].is_null(), "{v}");
    assert_eq!(
        v["layers"][0]["output_shape"],
        "[N,16,input_dim2,input_dim3]"
    );
    let r = run(&["inspect", &s(&m)]).ok();
    r.stdout_has(
        "MACs    unknown: dims input_dim2 (input input axis 2), input_dim3 (input input axis 3) \
             not bound; give --input input=1x3x?x? (numbers for ?)",
    );
    // per layer: a conv's MACs are "?" with the dims they need
    r.stdout_has("? (input_dim2, input_dim3)");

    // bound: the same count as a copy declared at that shape
    for shape in ["1x3x48x64", "2x3x16x40"] {
        let dims: Vec<i64> = shape.split('x').map(|d| d.parse().unwrap()).collect();
        let fixed = write(
            dir.path(),
            &format!("fixed{shape}.onnx"),
            &fixed_at(&src, [dims[0], dims[1], dims[2], dims[3]]),
        );
        let bound = inspect_json(&m, &["--input", &format!("input={shape}")]);
        let expected = inspect_json(&fixed, &[])["macs"].as_u64().unwrap();
        assert_eq!(bound["macs"].as_u64(), Some(expected), "{shape}: {bound}");
        assert_eq!(bound["costed_at"], format!("input={shape}"));
    }
    // a -1 dim is no longer a "fixed size -1"; a real contradiction still is
    run(&["inspect", &s(&m), "--input", "input=1x4x48x64"]).error(&["fixed size 3 at axis 1"]);
}

#[test]
fn r17_profile_measures_at_the_bound_shape() {
    let Some((dir, src, m)) = resnet8_with_symbolic_hw() else {
        return;
    };
    run(&["profile", &s(&m)]).error(&["input_dim2 (input input axis 2)", "--input input=1x3x?x?"]);

    let t = run(&["profile", &s(&m), "--input", "input=1x3x48x64", "--json"])
        .ok()
        .json();
    let layers = t["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 10, "{t}");
    assert_eq!(layers[0]["input_shape"], serde_json::json!([1, 3, 48, 64]));
    let total: u64 = layers.iter().map(|l| l["macs"].as_u64().unwrap()).sum();
    let fixed = write(dir.path(), "fixed.onnx", &fixed_at(&src, [1, 3, 48, 64]));
    assert_eq!(Some(total), inspect_json(&fixed, &[])["macs"].as_u64());

    // a -1 batch profiles with and without --input (the batch runs as 1)
    let b = write(dir.path(), "b.onnx", &minus_one_batch(&src, 32));
    for extra in [&[][..], &["--input", "input=1x3x32x32"][..]] {
        let mut a = argv("profile {} --json", &[&b]);
        a.extend(extra.iter().map(std::ffi::OsString::from));
        let t = run(&a).ok().json();
        assert_eq!(
            t["layers"][0]["input_shape"],
            serde_json::json!([1, 3, 32, 32])
        );
    }
}

#[test]
fn r17_dynamic_fixtures_run_at_two_sizes_in_both_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    for (file, native) in CNNS {
        let Some(src) = shared_model(file) else {
            return;
        };
        let hw = write(
            dir.path(),
            &format!("hw-{file}"),
            &symbolic_hw(&src, "-1", "-1"),
        );
        let b = write(
            dir.path(),
            &format!("b-{file}"),
            &minus_one_batch(&src, native),
        );
        let other = format!("input=2x3x{}x{}", native + 16, native / 2 + 8);
        let native = format!("input=1x3x{native}x{native}");
        for rt in ["ort-cpu", "tract"] {
            for (m, shape) in [(&hw, &native), (&hw, &other), (&b, &native)] {
                let line = "bench {} --runtime {} --iters 1 --warmup 0 --input {} --json";
                let r = cli(line, &[m, &rt, shape]);
                assert_eq!(r.code, 0, "{file} {rt} {shape}\n{}", r.dump());
            }
        }
    }
}

#[test]
fn r17_the_fixtures_global_pool_matches_the_original() {
    let Some(src) = shared_model("resnet8_cifar10.onnx") else {
        return;
    };
    let Some(data) = asset("data/cifar10/test-a") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // every copy has the global pool in place of the 8x8 average pool: the same outputs at 32x32
    // (declared as the original is: verify compares the declarations)
    let b = write(dir.path(), "g.onnx", &derive(&src, "N", "32", "32"));
    let r = cli(
        "verify {} {} --data {} --limit 64 --json",
        &[&src, &b, &data],
    )
    .ok();
    let v = r.json();
    for o in v["outputs"].as_array().unwrap() {
        assert!(o["max_abs_diff"].as_f64().unwrap() < 1e-5, "{}", r.dump());
    }
}

/// compress binds symbolic dims to the calibration data's shape: its MACs are inspect's at that
/// shape, the budget is met there, and the written model stays dynamic.
#[test]
fn r17_compress_costs_symbolic_models_at_the_calibration_shape() {
    let Some((dir, src, hw)) = resnet8_with_symbolic_hw() else {
        return;
    };
    let (data, profile) = bundled_cifar();
    let b = write(dir.path(), "b.onnx", &minus_one_batch(&src, 32));
    let at = inspect_json(&hw, &["--input", "input=1x3x32x32"])["macs"]
        .as_u64()
        .unwrap();
    for (m, other) in [(&hw, "input=2x3x48x40"), (&b, "input=2x3x32x32")] {
        let out = dir.path().join("out.onnx");
        let flags = "--calib {} --profile {} --calib-items 48 --holdout-items 32 --target macs=0.7 \
                     --json";
        let j = compress(m, &out, flags, &[&data, &profile]).ok().json();
        assert_eq!(j["macs"][0].as_u64(), Some(at), "{}: {j}", m.display());
        assert_eq!(j["costed_at"], "input=1x3x32x32", "{j}");
        let kept = j["macs_kept"].as_f64().unwrap();
        assert!(kept <= 0.7 + 1e-6 && kept > 0.5, "MACs kept {kept}");
        // the written model keeps the original's dynamic dims and runs at another size
        let w = inspect_json(&out, &[]);
        assert_eq!(
            w["inputs"][0]["shape"],
            inspect_json(m, &[])["inputs"][0]["shape"],
            "{w}"
        );
        let after = inspect_json(&out, &["--input", "input=1x3x32x32"])["macs"].as_u64();
        assert_eq!(after, j["macs"][1].as_u64());
        bench_once(&out, other);
    }
    // --input binds instead of the data: the count is at that shape
    let flags = "--calib {} --profile {} --calib-items 32 --holdout-items 16 \
                 --input input=1x3x64x64 --target macs=0.8 --json";
    let j = compress(&hw, &dir.path().join("big.onnx"), flags, &[&data, &profile]);
    // the data's 32x32 images do not fit a model bound at 64x64: refused, nothing written
    j.error(&["64"]);
    assert!(!dir.path().join("big.onnx").exists());
}

/// Without data or --input, a MAC budget on a model with symbolic H and W is refused naming them.
#[test]
fn r17_a_mac_budget_with_unknown_dims_is_refused_naming_them() {
    let Some((dir, _src, hw)) = resnet8_with_symbolic_hw() else {
        return;
    };
    let out = dir.path().join("out.onnx");
    compress(&hw, &out, "--low-rank --target macs=0.8", &[])
        .error(&["input_dim2 (input input axis 2)", "input_dim3"]);
    assert!(!out.exists());
    // bound by --input, the same budget is planned and met
    let flags = "--low-rank --target macs=0.8 --input input=1x3x32x32 --json";
    let j = compress(&hw, &out, flags, &[]).ok().json();
    assert!(j["macs_kept"].as_f64().unwrap() <= 0.8 + 1e-6, "{j}");
}

/// verify compares a model with -1 height and width against the fixed original (either way
/// round), at the data's shape; a real difference in the inputs is still refused.
#[test]
fn r17_verify_compares_a_dynamic_model_with_its_fixed_original() {
    let Some((dir, src, hw)) = resnet8_with_symbolic_hw() else {
        return;
    };
    let (data, profile) = bundled_cifar();
    for (a, b) in [(&src, &hw), (&hw, &src)] {
        let line = "verify {} {} --data {} --profile {} --limit 40 --json";
        let v = cli(line, &[a, b, &data, &profile]).ok().json();
        // the same weights: the global pool of the fixture equals the original's fixed pool
        assert_eq!(v["outputs"][0]["top1_agreement"], 1.0, "{v}");
    }
    // a different channel count is refused
    let mut other = fixed_at(&src, [1, 3, 32, 32]);
    {
        use whittle_core::onnx::tensor_shape_proto::dimension::Value as D;
        use whittle_core::onnx::type_proto;
        let g = other.graph.as_mut().unwrap();
        if let Some(type_proto::Value::TensorType(t)) =
            g.input[0].r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.shape.as_mut().unwrap().dim[1].value = Some(D::DimValue(4));
        }
    }
    let bad = write(dir.path(), "bad.onnx", &other);
    cli(
        "verify {} {} --data {} --profile {}",
        &[&src, &bad, &data, &profile],
    )
    .error(&["differ from the reference's"]);
}
