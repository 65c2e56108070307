//! The runner through the local transport: ResNet-8 on ort-cpu and tract gives sane results whose
//! output checksums match the same model run in this process, and a model that fails to load comes
//! back as an Error frame after which the same runner still serves.
//!
//! A missing ONNX Runtime library skips the ort-cpu part with a note, except under `CI=true`,
//! where it fails.

use whittle_deploy::protocol::{output_checksum, pb};
use whittle_deploy::transport::{Local, ModelSource, RunRequest, Transport, TransportError};
use whittle_test_support::runtime::{
    BenchConfig, RuntimeKind, RuntimeOptions, load, locate_ort_library, synthetic_inputs,
};
use whittle_test_support::{resnet8, unavailable};

fn runner() -> Local {
    Local::new(env!("CARGO_BIN_EXE_whittle-runner"))
}

/// The runtimes to test: tract when the runner has it (the `tract` feature), ort-cpu when ONNX
/// Runtime can be found.
fn runtimes() -> Vec<RuntimeKind> {
    let mut kinds = Vec::new();
    if cfg!(feature = "tract") {
        kinds.push(RuntimeKind::Tract);
    }
    match locate_ort_library() {
        Ok(_) => kinds.insert(0, RuntimeKind::OrtCpu),
        Err(e) => unavailable(&format!("ort-cpu: {e}")),
    }
    kinds
}

fn request(id: u64, runtime: RuntimeKind, model: ModelSource) -> RunRequest {
    let mut r = RunRequest::new(id, "resnet8_cifar10.onnx", model, runtime);
    r.bench = BenchConfig {
        warmup: 2,
        iters: 10,
        max_seconds: None,
    };
    r.options.threads = Some(2);
    r.options.input_shapes = vec![("input".into(), vec![1, 3, 32, 32])];
    r
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1e-6)
}

fn check_result(r: &pb::Result, runtime: RuntimeKind, progress: &[(u64, u64)]) {
    assert_eq!(r.iters, 10, "{r:?}");
    assert!(r.min_ms > 0.0 && r.min_ms <= r.p50_ms, "{r:?}");
    assert!(
        r.p50_ms <= r.p90_ms && r.p90_ms <= r.p99_ms && r.p99_ms <= r.max_ms,
        "{r:?}"
    );
    assert!(r.mean_ms >= r.min_ms && r.mean_ms <= r.max_ms, "{r:?}");
    assert!(close(r.fps, 1000.0 / r.mean_ms), "{r:?}");
    let rss = r.peak_rss_bytes.expect("peak RSS on Linux");
    assert!(rss > 1 << 20, "{rss}");
    let p = r.provider_info();
    assert_eq!(p.requested, runtime.provider_name());
    assert_eq!(p.actual, runtime.provider_name());
    assert!(!p.fallback && p.reason.is_none(), "{p:?}");
    assert_eq!(r.shapes(), vec![("input".to_string(), vec![1, 3, 32, 32])]);
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(
        (r.outputs[0].dtype.as_str(), r.outputs[0].shape.as_slice()),
        ("float", &[1u64, 10][..])
    );
    assert_eq!(progress.last(), Some(&(12, 12)), "{progress:?}");
    assert!(progress.windows(2).all(|w| w[0].0 < w[1].0), "{progress:?}");
}

/// The checksums of running ResNet-8 in this process on the same synthetic inputs.
fn in_process(runtime: RuntimeKind, bytes: &[u8]) -> Vec<pb::OutputChecksum> {
    let opts = RuntimeOptions {
        threads: Some(2),
        input_shapes: vec![("input".into(), vec![1, 3, 32, 32])],
        ..Default::default()
    };
    let mut s = load(runtime, bytes, &opts).expect("loads in process");
    let inputs = synthetic_inputs(s.inputs(), &opts.input_shapes).expect("inputs");
    let outputs = s.run(&inputs).expect("runs in process");
    s.outputs()
        .iter()
        .zip(&outputs)
        .map(|(info, v)| output_checksum(&info.name, v))
        .collect()
}

#[test]
fn resnet8_through_the_local_runner_matches_in_process() {
    let bytes = std::fs::read(resnet8()).expect("the bundled ResNet-8");
    let mut t = runner();
    let path = t.send_file(&resnet8()).expect("local path");
    for (i, runtime) in runtimes().into_iter().enumerate() {
        // By path for one request, by bytes for the next: both ways must give the same model.
        for (j, model) in [
            ModelSource::Path(path.clone()),
            ModelSource::Bytes(bytes.clone()),
        ]
        .into_iter()
        .enumerate()
        {
            let mut progress = Vec::new();
            let r = t
                .request(
                    &request((2 * i + j) as u64 + 1, runtime, model),
                    &mut |d, n| progress.push((d, n)),
                )
                .unwrap_or_else(|e| panic!("{runtime}: {e}"));
            check_result(&r, runtime, &progress);
            let local = in_process(runtime, &bytes);
            assert_eq!(local.len(), r.outputs.len());
            for (a, b) in local.iter().zip(&r.outputs) {
                assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
                assert!(
                    close(a.sum, b.sum) && close(a.sum_squares, b.sum_squares),
                    "{runtime}: in process {a:?}, runner {b:?}"
                );
            }
        }
    }
    t.close().expect("closes");
}

#[test]
fn a_garbage_model_is_an_error_frame_and_the_runner_serves_on() {
    let bytes = std::fs::read(resnet8()).expect("the bundled ResNet-8");
    let mut t = runner();
    for runtime in runtimes() {
        let mut bad = request(1, runtime, ModelSource::Bytes(b"garbage".to_vec()));
        bad.name = "garbage.onnx".into();
        let err = t.request(&bad, &mut |_, _| {}).unwrap_err();
        let TransportError::Remote(msg) = &err else {
            panic!("{runtime}: expected an Error frame, got {err}");
        };
        assert!(msg.starts_with("garbage.onnx: "), "{msg}");
        let names_runtime = match runtime {
            RuntimeKind::Tract => msg.contains("tract failed") || msg.contains("invalid model"),
            _ => msg.contains("ONNX Runtime failed") || msg.contains("invalid model"),
        };
        assert!(names_runtime, "{runtime}: {msg}");

        let mut progress = Vec::new();
        let r = t
            .request(
                &request(2, runtime, ModelSource::Bytes(bytes.clone())),
                &mut |d, n| progress.push((d, n)),
            )
            .unwrap_or_else(|e| panic!("{runtime} after an error: {e}"));
        check_result(&r, runtime, &progress);
    }
    t.close().expect("closes");
}

/// No GPU here: an `ort-tensorrt` request with fallback allowed runs on CPU and says why, after
/// making the engine cache folder it was given; without fallback it is an error naming TensorRT.
/// Session creation and the first run are timed apart from the timed runs. (That TensorRT itself
/// honours fp16, the cache and the workspace size is not checked: no TensorRT here.)
#[test]
fn tensorrt_options_reach_the_runner_and_a_missing_provider_is_named() {
    let Ok(lib) = locate_ort_library() else {
        unavailable("ONNX Runtime");
        return;
    };
    let cache = std::env::temp_dir().join(format!("whittle-trt-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let mut req = request(1, RuntimeKind::OrtTensorRt, ModelSource::Path(resnet8()));
    req.ort_library = Some(lib);
    req.options.tensorrt_fp16 = Some(true);
    req.options.tensorrt_cache_dir = Some(cache.clone());
    req.options.tensorrt_workspace_bytes = Some(256 << 20);
    let mut t = runner();
    let err = t.request(&req, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, TransportError::Remote(_)), "{err}");
    assert!(err.to_string().contains("TensorRT"), "{err}");
    assert!(
        cache.is_dir(),
        "the cache folder is made before the session"
    );

    req.options.allow_fallback = true;
    let r = t.request(&req, &mut |_, _| {}).expect("falls back to CPU");
    let p = r.provider_info();
    assert_eq!(p.requested, "TensorrtExecutionProvider");
    assert_eq!(p.actual, "CPUExecutionProvider");
    assert!(p.fallback);
    assert!(
        p.reason.as_deref().unwrap_or_default().contains("TensorRT"),
        "{p:?}"
    );
    assert!(r.load_ms.unwrap_or(0.0) > 0.0, "{r:?}");
    assert!(r.first_run_ms.unwrap_or(0.0) > 0.0, "{r:?}");
    t.close().unwrap();
    let _ = std::fs::remove_dir_all(&cache);
}
