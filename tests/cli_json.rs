//! `--json`: each command prints exactly one JSON object on one stdout line, with the fields a
//! script reads; and the ort-cuda provider rules (fail without fallback, say so with it).

use crate::common::*;

fn m() -> String {
    s(&resnet8())
}

#[test]
fn inspect_json_is_one_object() {
    let r = run(&["inspect", "--json", &m()]).ok();
    let v = r.json();
    assert_eq!(v["params"].as_u64(), Some(78_666), "{}", r.dump());
    assert!(v["macs"].as_u64().unwrap() > 0);
    assert_eq!(v["opset"].as_i64(), Some(13));
    assert_eq!(v["inputs"][0]["name"].as_str(), Some("input"));
    assert_eq!(v["inputs"][0]["dtype"].as_str(), Some("float"));
    assert_eq!(v["inputs"][0]["shape"].as_str(), Some("[N,3,32,32]"));
    assert_eq!(v["outputs"][0]["shape"].as_str(), Some("[N,10]"));
    assert_eq!(v["unknown_ops"].as_array().map(|a| a.len()), Some(0));
    assert_eq!(
        v["layers"].as_array().unwrap().len() as u64,
        v["nodes"].as_u64().unwrap()
    );
    // With a fixed batch, MACs scale with it.
    let r4 = run(&["inspect", "--json", "--input", "input=4x3x32x32", &m()]).ok();
    assert_eq!(
        r4.json()["macs"].as_u64().unwrap(),
        4 * v["macs"].as_u64().unwrap()
    );
}

fn bench_json(runtime: &str, extra: &str) -> Run {
    let line = "bench {} --iters 5 --warmup 1 --json --runtime";
    cli(&format!("{line} {runtime} {extra}"), &[&m()])
}

fn check_bench(r: &Run, runtime: &str, requested: &str, actual: &str, fallback: bool) {
    let v = r.json();
    assert_eq!(v["runtime"].as_str(), Some(runtime), "{}", r.dump());
    assert_eq!(
        v["provider"]["requested"].as_str(),
        Some(requested),
        "{}",
        r.dump()
    );
    assert_eq!(
        v["provider"]["actual"].as_str(),
        Some(actual),
        "{}",
        r.dump()
    );
    assert_eq!(
        v["provider"]["fallback"].as_bool(),
        Some(fallback),
        "{}",
        r.dump()
    );
    let st = &v["stats"];
    assert_eq!(st["iters"].as_u64(), Some(5), "{}", r.dump());
    let p50 = st["p50_ms"].as_f64().expect("p50_ms");
    assert!(p50 > 0.0, "{}", r.dump());
    assert!(st["p90_ms"].as_f64().unwrap() >= p50, "{}", r.dump());
    assert!(st["min_ms"].as_f64().unwrap() <= p50, "{}", r.dump());
    assert!(st["fps"].as_f64().unwrap() > 0.0, "{}", r.dump());
    assert_eq!(
        v["input_shapes"],
        serde_json::json!([["input", [1, 3, 32, 32]]]),
        "{}",
        r.dump()
    );
}

#[test]
fn bench_json_ort_cpu() {
    let r = bench_json("ort-cpu", "").ok();
    check_bench(
        &r,
        "ort-cpu",
        "CPUExecutionProvider",
        "CPUExecutionProvider",
        false,
    );
    assert!(r.json()["provider"]["reason"].is_null());
}

#[test]
fn bench_json_tract() {
    let r = bench_json("tract", "").ok();
    check_bench(&r, "tract", "tract", "tract", false);
}

#[test]
fn bench_json_with_a_fixed_batch() {
    let r = bench_json("ort-cpu", "--input input=2x3x32x32").ok();
    assert_eq!(
        r.json()["input_shapes"],
        serde_json::json!([["input", [2, 3, 32, 32]]])
    );
}

/// The bundled ONNX Runtime (`just setup`) is a CPU-only build. Set WHITTLE_EXPECT_CUDA=1 when
/// ORT_DYLIB_PATH points at a CUDA build on a GPU machine to check the other side.
fn expect_cuda() -> bool {
    std::env::var("WHITTLE_EXPECT_CUDA").is_ok_and(|v| v == "1")
}

#[test]
fn bench_ort_cuda_without_fallback_fails_naming_cuda() {
    let r = bench_json("ort-cuda", "");
    if expect_cuda() {
        check_bench(
            &r.ok(),
            "ort-cuda",
            "CUDAExecutionProvider",
            "CUDAExecutionProvider",
            false,
        );
        return;
    }
    eprintln!("note: expecting no CUDA provider (set WHITTLE_EXPECT_CUDA=1 on a CUDA build)");
    let line = r.error(&["CUDA"]);
    assert!(
        line.contains("fallback"),
        "the error should say how to proceed (allow fallback)\n{}",
        r.dump()
    );
}

#[test]
fn bench_ort_cuda_with_fallback_says_so() {
    let r = bench_json("ort-cuda", "--allow-fallback").ok();
    if expect_cuda() {
        check_bench(
            &r,
            "ort-cuda",
            "CUDAExecutionProvider",
            "CUDAExecutionProvider",
            false,
        );
        return;
    }
    check_bench(
        &r,
        "ort-cuda",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
        true,
    );
    let reason = r.json()["provider"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("CUDA"), "{}", r.dump());
    // The table form says it too (on stderr, so the table stays parseable).
    let table = "bench {} --runtime ort-cuda --allow-fallback --iters 2 --warmup 0";
    let t = cli(table, &[&m()]).ok();
    t.stdout_has("(fallback)");
    t.stderr_has("fell back");
}

/// `whittle verify` of ResNet-8 against itself on 20 bundled images, `--json`, then `extra`.
fn verify_json(extra: &str) -> Run {
    let data = cifar10();
    let line = "verify {} {} --data {} --limit 20 --json";
    cli(&format!("{line} {extra}"), &[&m(), &m(), &data])
}

#[test]
fn verify_json_is_one_object() {
    let r = verify_json("").ok();
    let v = r.json();
    assert_eq!(v["items"].as_u64(), Some(20), "{}", r.dump());
    assert_eq!(v["runtime"].as_str(), Some("ort-cpu"));
    let o = &v["outputs"][0];
    for k in [
        "name",
        "max_abs_diff",
        "mean_cosine",
        "top1_agreement",
        "reference_accuracy",
        "candidate_accuracy",
    ] {
        assert!(o.get(k).is_some(), "missing {k}\n{}", r.dump());
    }
    // Progress bars and notes stay on stderr.
    assert!(!r.stdout.contains("profile"), "{}", r.dump());
}

#[test]
fn verify_json_tract() {
    let r = verify_json("--runtime tract").ok();
    let v = r.json();
    assert_eq!(v["runtime"].as_str(), Some("tract"), "{}", r.dump());
    assert_eq!(v["outputs"][0]["max_abs_diff"].as_f64(), Some(0.0));
}

#[test]
fn convert_json_is_one_object() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c.onnx");
    let r = run(&["convert", &m(), "-o", &s(&out), "--json"]).ok();
    let v = r.json();
    assert_eq!(v["written"], serde_json::json!([s(&out)]), "{}", r.dump());
    assert_eq!(
        v["bytes"].as_u64(),
        Some(std::fs::metadata(&out).unwrap().len())
    );
}

#[test]
fn closed_stdout_is_not_a_panic() {
    // `whittle inspect --json m.onnx | head -c 100`: the reader goes away before whittle prints.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(whittle())
        .args(["inspect", "--json", &m()])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "a closed stdout made whittle panic (exit {:?}):\n{stderr}",
        out.status.code()
    );
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}
