//! `whittle compress --quantize int8` end to end: the QDQ model keeps the original's inputs and
//! outputs, ONNX Runtime runs it on int8 kernels (its optimised graph, not latency), tract loads
//! and runs it, an opset-8 model is raised and quantized, and a quantized model is refused with
//! nothing written.

use crate::common::*;

/// Compress `model` with `--quantize int8` on `calib`; the JSON summary.
fn quantize(model: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut a = argv("compress {} -o {} --quantize int8 --json", &[&model, &out]);
    a.extend(extra.iter().map(std::ffi::OsString::from));
    run(&a).ok().json()
}

/// ResNet-8 quantized (see [`quantize`]) on the bundled CIFAR-10 sample, then `extra`.
fn quantize_resnet8(out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let calib = s(&cifar10());
    let mut flags = vec!["--calib", &calib];
    flags.extend(extra);
    quantize(&resnet8(), out, &flags)
}

fn io(model: &std::path::Path) -> (serde_json::Value, serde_json::Value) {
    let j = run(&["inspect", &s(model), "--json"]).ok().json();
    (j["inputs"].clone(), j["outputs"].clone())
}

fn agreement(original: &std::path::Path, candidate: &std::path::Path, runtime: &str) -> f64 {
    let data = cifar10();
    let line = "verify {} {} --data {} --runtime {} --json";
    let j = cli(line, &[&original, &candidate, &data, &runtime])
        .ok()
        .json();
    j["outputs"][0]["top1_agreement"].as_f64().unwrap()
}

#[test]
fn resnet8_int8_runs_on_int8_kernels_in_onnx_runtime_and_loads_in_tract() {
    let (dir, out) = temp_path("r8.int8.onnx");
    // all int8 (the default may keep a few activations float where that measures no slower)
    let j = quantize_resnet8(&out, &["--keep-float", "0"]);
    let q = &j["quantize"];
    // every Conv and the Gemm: int8 weights, int8 kernels in ONNX Runtime, nothing left in float
    assert_eq!(q["quantized"]["Conv"], 9, "{q}");
    assert_eq!(q["weights"], 10, "{q}");
    assert_eq!(q["ort_kernels"]["QLinearConv"], 9, "{q}");
    assert_eq!(q["ort_kernels"]["QGemm"], 1, "{q}");
    assert_eq!(q["unfused"], 0, "{q}");
    assert!(q["ort_kernels"].get("Conv").is_none(), "{q}");
    // the calibrators were compared and the least damaging kept
    let chosen = q["calibrator"].as_str().unwrap();
    let damage = q["damage"].as_object().unwrap();
    assert_eq!(damage.len(), 4, "{q}");
    let least = damage
        .iter()
        .min_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
        .unwrap();
    assert_eq!(least.0, chosen, "{q}");
    // the model's interface is the original's
    let r8 = resnet8();
    assert_eq!(io(&r8), io(&out));
    // it agrees with the float model in both runtimes
    let fid = j["fidelity"]["outputs"][0]["top1_agreement"]
        .as_f64()
        .unwrap();
    assert!(fid >= 0.95, "held-apart agreement {fid}");
    for rt in ["ort-cpu", "tract"] {
        let a = agreement(&r8, &out, rt);
        assert!(a >= 0.95, "{rt}: agreement {a}");
    }
    // --float-stem keeps the stem (3 input channels) and the model input float
    let stem = dir.path().join("r8.stem.onnx");
    let q = quantize_resnet8(&stem, &["--float-stem", "--keep-float", "0"])["quantize"].clone();
    assert_eq!(q["float_activations"][0][0], "input", "{q}");
    assert_eq!(q["weights"], 9, "{q}");
    assert_eq!(q["kept_float"]["Conv"], 1, "{q}");
    assert_eq!(q["ort_kernels"]["QLinearConv"], 8, "{q}");
    assert_eq!(q["ort_kernels"]["Conv"], 1, "{q}");
}

#[test]
fn an_opset_8_model_is_raised_to_13_and_quantized() {
    let Some((m, data)) = mnist_and_digits() else {
        return;
    };
    let (_dir, out) = temp_path("mnist.int8.onnx");
    let j = quantize(&m, &out, &["--calib", &s(&data), "--profile", "mnist"]);
    assert_eq!(j["quantize"]["opset_raised_from"], 8, "{j}");
    assert_eq!(
        run(&["inspect", &s(&out), "--json"]).ok().json()["opset"],
        13
    );
    let fid = j["fidelity"]["outputs"][0]["top1_agreement"]
        .as_f64()
        .unwrap();
    assert!(fid >= 0.98, "held-apart agreement {fid}");
    assert_eq!(io(&m), io(&out));
}

#[test]
fn a_quantized_model_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (once, twice) = (dir.path().join("once.onnx"), dir.path().join("twice.onnx"));
    quantize_resnet8(&once, &["--calibrate", "minmax"]);
    compress(&once, &twice, "--quantize int8 --calib {}", &[&cifar10()])
        .error(&["quantized already", "QuantizeLinear"]);
    assert!(!twice.exists(), "a refused model was written");
    // a quantize step without data is refused before any work
    compress(&resnet8(), &twice, "--quantize int8", &[]).error(&["quantize", "data"]);
    assert!(!twice.exists());
}

#[test]
fn keep_float_measures_each_activation_and_keeps_the_costliest_in_float() {
    let (_dir, out) = temp_path("r8.mixed.onnx");
    let j = quantize_resnet8(&out, &["--keep-float", "1"]);
    let q = &j["quantize"];
    let kept = q["float_activations"].as_array().unwrap();
    assert_eq!(kept.len(), 1, "{q}");
    assert!(kept[0][1].as_f64().unwrap() > 0.0, "{q}");
    let plan = &j["steps"][0]["plan"];
    assert_eq!(plan["float"][0], kept[0][0], "{plan}");
    // the activation kept in float is no longer quantized in the written model
    let t = kept[0][0].as_str().unwrap();
    let m = run(&["inspect", &s(&out), "--json"]).ok().json();
    let ops = m["ops"].to_string();
    assert!(ops.contains("QuantizeLinear"), "{ops}");
    let needle = format!("{t}_QuantizeLinear");
    let bytes = std::fs::read(&out).unwrap();
    assert!(
        !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "'{t}' still has a QuantizeLinear"
    );
    // (the same search finds another activation's QuantizeLinear: the check can fail)
    let other = plan["activations"]
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != t)
        .unwrap();
    let needle = format!("{other}_QuantizeLinear");
    assert!(bytes.windows(needle.len()).any(|w| w == needle.as_bytes()));
    assert!(agreement(&resnet8(), &out, "ort-cpu") >= 0.95);
}

#[test]
fn mixed_precision_by_default_keeps_the_most_measured_no_slower() {
    let (_dir, out) = temp_path("r8.int8.onnx");
    let j = quantize_resnet8(&out, &[]);
    let q = &j["quantize"];
    // up to 3 candidates, each measured beside the all-int8 model
    let speeds: Vec<f64> = list(&q["float_speed"], |v| v.as_f64());
    assert!((1..=3).contains(&speeds.len()), "{q}");
    assert!(speeds.iter().all(|v| *v > 0.0), "{q}");
    // kept: the most whose model was not slower than all-int8 (beyond 5%)
    let expect = speeds
        .iter()
        .rposition(|v| *v >= 1.0 / 1.05)
        .map_or(0, |i| i + 1);
    let kept = q["float_activations"].as_array().unwrap();
    assert_eq!(kept.len(), expect, "{q}");
    assert_eq!(
        j["steps"][0]["plan"]["float"].as_array().unwrap().len(),
        expect
    );
    assert!(agreement(&resnet8(), &out, "ort-cpu") >= 0.95);
}

#[test]
fn the_tensorrt_form_follows_its_explicit_quantization_rules() {
    // checked on the graph (no GPU here): every Q/DQ zero point int8 and 0, per-channel weight
    // scales along the output axis, biases float, Q/DQ in front of every Conv input
    use whittle_core::attr::Attrs;
    let (_dir, out) = temp_path("r8.trt.onnx");
    let j = quantize_resnet8(&out, &["--qdq-for", "tensorrt", "--keep-float", "0"]);
    assert_eq!(j["quantize"]["qdq_for"], "tensorrt", "{j}");
    let m = whittle_core::Model::load(&out).unwrap();
    let g = m.graph();
    let producer = |t: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == t));
    let (mut qdq, mut convs) = (0, 0);
    for n in &g.node {
        match n.op_type() {
            "QuantizeLinear" | "DequantizeLinear" => {
                qdq += 1;
                let z = m.initializer(&n.input[2]).expect("a constant zero point");
                let kind = whittle_core::onnx::tensor_proto::DataType::Int8 as i32;
                assert_eq!(z.data_type(), kind, "{}: zero point type", n.name());
                assert!(
                    z.raw_data().iter().all(|&b| b == 0) && z.int32_data.iter().all(|&v| v == 0)
                );
            }
            "Conv" => {
                convs += 1;
                let x = producer(&n.input[0]).expect("the input has a producer");
                assert_eq!(x.op_type(), "DequantizeLinear", "{}: input", n.name());
                let w = producer(&n.input[1]).expect("a dequantized weight");
                assert_eq!(w.op_type(), "DequantizeLinear");
                assert_eq!(w.attr_int("axis"), Some(0), "{}: weight axis", n.name());
                let out_channels = m.initializer(&w.input[0]).unwrap().dims[0];
                assert_eq!(m.initializer(&w.input[1]).unwrap().dims, vec![out_channels]);
                if let Some(b) = n.input.get(2) {
                    let b = m.initializer(b).expect("a float bias initializer");
                    assert_eq!(b.data_type(), 1, "{}: bias type", n.name());
                }
            }
            _ => {}
        }
    }
    assert!(qdq > 20 && convs == 9, "{qdq} Q/DQ, {convs} Conv");
    // and ONNX Runtime still runs it, in agreement with the original
    assert!(agreement(&resnet8(), &out, "ort-cpu") >= 0.9);
}

#[test]
fn minilm_int8_quantizes_only_its_layers_and_keeps_sts_spearman() {
    let dir = tempfile::tempdir().unwrap();
    let Some((m, calib)) = minilm_and_calibration(dir.path(), "--limit 256 --max-length 64") else {
        return;
    };
    let out = dir.path().join("mini.int8.onnx");
    let j = quantize(&m, &out, &["--calib", &s(&calib), "--calib-items", "128"]);
    let q = &j["quantize"];
    assert_eq!(q["transformer"], true, "{q}");
    // the 36 MatMuls with weights run as ONNX Runtime's int8 MatMulIntegerToFloat, nothing else
    assert_eq!(q["weights"], 36, "{q}");
    assert_eq!(q["ort_kernels"]["MatMulIntegerToFloat"], 36, "{q}");
    assert_eq!(q["unfused"], 0, "{q}");
    assert!(q["ort_kernels"].get("QLinearAdd").is_none(), "{q}");
    let v = sts_verify(&m, &out, 300);
    let kept = v["kept"].as_f64().unwrap();
    assert!(kept >= 0.99, "STS Spearman kept {kept}: {v}");
}
