//! ONNX Runtime (CPU) and tract on the real models of `shared/assets`: reference outputs, agreement
//! between the runtimes, input checking, provider fallback and benchmarking.
//!
//! Missing assets or a missing ONNX Runtime library skip a test with a note, except under `CI=true`,
//! where they fail it.

use ndarray::{ArrayD, IxDyn};
use whittle_runtime::{
    BenchConfig, Dim, Error, IoInfo, RuntimeKind, RuntimeOptions, Session, Value, bench, load,
    locate_ort_library, peak_rss_bytes, probe_tensor, synthetic_inputs,
};
use whittle_test_support::{asset, unavailable};

const RESNET8_REFERENCE: [f32; 10] = [
    0.99916, 0.0, 0.0, 0.0008, 0.0, 1e-05, 0.0, 1e-05, 0.0, 1e-05,
];
const MNIST_REFERENCE: [f32; 10] = [
    -7.9711, -18.405, 2.2448, 4.7569, -28.3656, 6.5638, -18.5905, -4.5173, -6.9507, -17.286,
];

/// The bytes of `shared/assets/models/<name>`, or `None` (skip) when the assets are missing.
fn model(name: &str) -> Option<Vec<u8>> {
    let path = asset(&format!("models/{name}"))?;
    Some(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// True when the ONNX Runtime library can be found (else skip, or fail under CI).
fn ort_available() -> bool {
    match locate_ort_library() {
        Ok(_) => true,
        Err(e) => {
            unavailable(&e.to_string());
            false
        }
    }
}

/// The bytes of `shared/assets/models/<name>` where ONNX Runtime can be found too, or `None`
/// (skip) when either is missing.
fn model_with_ort(name: &str) -> Option<Vec<u8>> {
    let bytes = model(name)?;
    ort_available().then_some(bytes)
}

/// The bundled ResNet-8, where ONNX Runtime is here too (see [`model_with_ort`]).
fn resnet8_with_ort() -> Option<Vec<u8>> {
    model_with_ort("resnet8_cifar10.onnx")
}

/// The runtimes whose results the tests compare.
const BOTH: [RuntimeKind; 2] = [RuntimeKind::OrtCpu, RuntimeKind::Tract];

/// A float input of zeros.
fn zeros(shape: &[usize]) -> ArrayD<f32> {
    ArrayD::zeros(IxDyn(shape))
}

macro_rules! require {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return,
        }
    };
}

fn load_ok(kind: RuntimeKind, bytes: &[u8], opts: &RuntimeOptions) -> Box<dyn Session> {
    load(kind, bytes, opts).unwrap_or_else(|e| panic!("{kind} failed to load: {e}"))
}

/// Options that pin the input `input` to `shape`.
fn pinned(input: &str, shape: &[usize]) -> RuntimeOptions {
    RuntimeOptions {
        input_shapes: vec![(input.into(), shape.to_vec())],
        ..Default::default()
    }
}

fn run_f32(session: &mut dyn Session, input: ArrayD<f32>) -> Vec<f32> {
    let out = session
        .run(&[Value::F32(input)])
        .unwrap_or_else(|e| panic!("run failed: {e}"));
    assert_eq!(out.len(), 1);
    out[0]
        .as_f32()
        .expect("a float output")
        .iter()
        .copied()
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol,
        "{what}: max |diff| {worst} > {tol}\n got  {got:?}\n want {want:?}"
    );
}

fn sig(infos: &[IoInfo]) -> Vec<String> {
    infos.iter().map(IoInfo::to_string).collect()
}

/// `bytes` loaded in ONNX Runtime (CPU) and tract: both show the one input `input` and the one
/// output `output` (as [`sig`] writes them), and on `probe` agree with each other within 1e-4 and
/// with `reference` within `tol`. The two sessions.
fn both_match_reference(
    bytes: &[u8],
    (input, output): (&str, &str),
    probe: ArrayD<f32>,
    reference: &[f32],
    tol: f32,
) -> (Box<dyn Session>, Box<dyn Session>) {
    let mut ort = load_ok(RuntimeKind::OrtCpu, bytes, &RuntimeOptions::default());
    let mut tract = load_ok(RuntimeKind::Tract, bytes, &RuntimeOptions::default());
    for s in [&ort, &tract] {
        assert_eq!(sig(s.inputs()), [input]);
        assert_eq!(sig(s.outputs()), [output]);
    }
    let a = run_f32(ort.as_mut(), probe.clone());
    let b = run_f32(tract.as_mut(), probe);
    assert_close("ort-cpu vs tract", &a, &b, 1e-4);
    assert_close("ort-cpu vs reference", &a, reference, tol);
    assert_close("tract vs reference", &b, reference, tol);
    (ort, tract)
}

#[test]
fn resnet8_matches_reference_on_ort_cpu_and_tract() {
    let bytes = require!(resnet8_with_ort());
    let (ort, tract) = both_match_reference(
        &bytes,
        ("input: float [N,3,32,32]", "output: float [N,10]"),
        probe_tensor(&[1, 3, 32, 32], -1.0, 1.0),
        &RESNET8_REFERENCE,
        1e-4,
    );
    assert_eq!(ort.provider().actual, "CPUExecutionProvider");
    assert!(!ort.provider().fallback);
    assert_eq!(tract.provider().actual, "tract");
}

#[test]
fn mnist8_opset8_ir3_matches_reference_on_ort_cpu_and_tract() {
    let bytes = require!(model_with_ort("mnist-8.onnx"));
    // IR 3 lists the weights among the graph inputs; neither runtime may ask for them. The
    // reference is printed with 4 decimals (rounding error up to 5e-5).
    both_match_reference(
        &bytes,
        ("input: float [N,1,28,28]", "logits: float [N,10]"),
        probe_tensor(&[1, 1, 28, 28], 0.0, 1.0),
        &MNIST_REFERENCE,
        1.5e-4,
    );
}

#[test]
fn both_runtimes_reject_wrong_inputs_with_input_mismatch() {
    let bytes = require!(resnet8_with_ort());
    for kind in BOTH {
        let mut s = load_ok(kind, &bytes, &RuntimeOptions::default());
        let err = s.run(&[Value::F32(zeros(&[1, 3, 64, 64]))]).unwrap_err();
        assert!(
            matches!(err, Error::InputMismatch { .. }),
            "{kind}: {err:?}"
        );
        assert_eq!(
            err.to_string(),
            "input 'input' expects float [N,3,32,32], got float [1,3,64,64]",
            "{kind}"
        );

        let err = s
            .run(&[Value::I64(ArrayD::zeros(IxDyn(&[1, 3, 32, 32])))])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'input' expects float [N,3,32,32], got int64 [1,3,32,32]",
            "{kind}"
        );

        let err = s.run(&[Value::F32(zeros(&[3, 32, 32]))]).unwrap_err();
        assert!(
            matches!(err, Error::InputMismatch { .. }),
            "{kind}: {err:?}"
        );

        let x = Value::F32(zeros(&[1, 3, 32, 32]));
        let err = s.run(&[x.clone(), x]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model expects 1 input (input: float [N,3,32,32]), got 2 values",
            "{kind}"
        );
        assert!(!err.to_string().contains('\n'));
    }
}

#[test]
fn symbolic_batch_runs_several_sizes_and_input_shapes_pin_it() {
    let bytes = require!(resnet8_with_ort());
    let one = run_f32(
        load_ok(RuntimeKind::OrtCpu, &bytes, &RuntimeOptions::default()).as_mut(),
        probe_tensor(&[1, 3, 32, 32], -1.0, 1.0),
    );
    for kind in BOTH {
        // Free batch: one session, two batch sizes.
        let mut s = load_ok(kind, &bytes, &RuntimeOptions::default());
        assert_eq!(
            run_f32(s.as_mut(), zeros(&[3, 3, 32, 32])).len(),
            30,
            "{kind}"
        );
        assert_eq!(
            run_f32(s.as_mut(), zeros(&[1, 3, 32, 32])).len(),
            10,
            "{kind}"
        );

        // Pinned batch 2: reported as fixed, other batches refused, both rows equal the batch-1 result.
        let mut s = load_ok(kind, &bytes, &pinned("input", &[2, 3, 32, 32]));
        assert_eq!(sig(s.inputs()), ["input: float [2,3,32,32]"], "{kind}");
        assert_eq!(
            s.outputs()[0].dims,
            [Dim::Fixed(2), Dim::Fixed(10)],
            "{kind}"
        );
        let row = probe_tensor(&[1, 3, 32, 32], -1.0, 1.0);
        let two =
            ndarray::concatenate(ndarray::Axis(0), &[row.view(), row.view()]).expect("concat");
        let out = run_f32(s.as_mut(), two);
        assert_close(&format!("{kind} batch 2, row 0"), &out[..10], &one, 1e-4);
        assert_close(&format!("{kind} batch 2, row 1"), &out[10..], &one, 1e-4);
        let err = s.run(&[Value::F32(zeros(&[1, 3, 32, 32]))]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'input' expects float [2,3,32,32], got float [1,3,32,32]",
            "{kind}"
        );

        // A shape that contradicts the model is refused at load time.
        let refused = |opts| load(kind, &bytes, &opts).err().expect("refused");
        let err = refused(pinned("input", &[1, 3, 64, 64]));
        assert!(
            matches!(err, Error::ShapeOverride { .. }),
            "{kind}: {err:?}"
        );
        let err = refused(pinned("image", &[1, 3, 32, 32]));
        assert_eq!(
            err.to_string(),
            "shape for input 'image': the model has no such input (inputs: input)",
            "{kind}"
        );
    }
}

#[test]
fn accelerated_providers_without_fallback_fail_naming_the_provider() {
    let bytes = require!(resnet8_with_ort());
    for (kind, name) in [
        (RuntimeKind::OrtCuda, "CUDA"),
        (RuntimeKind::OrtTensorRt, "TensorRT"),
    ] {
        match load(kind, &bytes, &RuntimeOptions::default()) {
            Ok(s) => {
                // A GPU build of ONNX Runtime: the provider must really be in use.
                eprintln!(
                    "NOTE: {kind} is available here; checking it runs on {}",
                    s.provider().actual
                );
                assert_eq!(s.provider().actual, kind.provider_name());
                assert!(!s.provider().fallback);
            }
            Err(err) => {
                let msg = err.to_string();
                eprintln!("{kind}: {msg}");
                assert!(
                    msg.contains(&format!(
                        "{name} execution provider is not available in this ONNX Runtime build"
                    )),
                    "{msg}"
                );
                assert!(matches!(err, Error::ProviderUnavailable { .. }), "{err:?}");
                assert!(!msg.contains('\n'));
            }
        }
    }
}

#[test]
fn cuda_with_fallback_runs_on_cpu_and_says_so() {
    let bytes = require!(resnet8_with_ort());
    let opts = RuntimeOptions {
        allow_fallback: true,
        ..Default::default()
    };
    let mut s = load_ok(RuntimeKind::OrtCuda, &bytes, &opts);
    let p = s.provider().clone();
    assert_eq!(p.requested, "CUDAExecutionProvider");
    if p.fallback {
        assert_eq!(p.actual, "CPUExecutionProvider");
        let reason = p.reason.expect("a fallback has a reason");
        eprintln!("ort-cuda fell back to {}: {reason}", p.actual);
        assert!(reason.contains("CUDA"), "{reason}");
    } else {
        eprintln!("NOTE: CUDA is available here; no fallback happened");
        assert_eq!(p.actual, "CUDAExecutionProvider");
    }
    let out = run_f32(s.as_mut(), probe_tensor(&[1, 3, 32, 32], -1.0, 1.0));
    assert_close(
        "ort-cuda (fallback) vs reference",
        &out,
        &RESNET8_REFERENCE,
        1e-4,
    );
}

#[test]
fn bench_returns_sane_stats_on_both_runtimes() {
    let bytes = require!(resnet8_with_ort());
    let opts = RuntimeOptions {
        threads: Some(1),
        ..Default::default()
    };
    for kind in BOTH {
        let mut s = load_ok(kind, &bytes, &opts);
        let inputs = synthetic_inputs(s.inputs(), &[]).expect("synthetic inputs");
        assert_eq!(inputs[0].shape(), &[1, 3, 32, 32]);

        let cfg = BenchConfig {
            warmup: 2,
            iters: 15,
            max_seconds: None,
        };
        let mut calls = Vec::new();
        let st = bench(s.as_mut(), &inputs, &cfg, &mut |done, total| {
            calls.push((done, total))
        })
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(st.iters, 15, "{kind}");
        eprintln!("{kind}: {st:?}");
        assert!(st.min_ms > 0.0, "{kind}: {st:?}");
        assert!(
            st.min_ms <= st.p50_ms && st.p50_ms <= st.p90_ms,
            "{kind}: {st:?}"
        );
        assert!(
            st.p90_ms <= st.p99_ms && st.p99_ms <= st.max_ms,
            "{kind}: {st:?}"
        );
        assert!(
            st.min_ms <= st.mean_ms && st.mean_ms <= st.max_ms,
            "{kind}: {st:?}"
        );
        assert!(
            (st.fps - 1000.0 / st.mean_ms).abs() < 1e-6,
            "{kind}: {st:?}"
        );
        assert_eq!(calls.len(), 17, "{kind}");
        assert_eq!(calls.last(), Some(&(17, 17)), "{kind}");

        // A time budget stops early, after at least one timed run.
        let cfg = BenchConfig {
            warmup: 0,
            iters: 1_000_000,
            max_seconds: Some(0.05),
        };
        let st = bench(s.as_mut(), &inputs, &cfg, &mut |_, _| {}).expect("bench");
        assert!(st.iters >= 1 && st.iters < 1_000_000, "{kind}: {st:?}");
        let cfg = BenchConfig {
            warmup: 0,
            iters: 3,
            max_seconds: Some(0.0),
        };
        assert_eq!(
            bench(s.as_mut(), &inputs, &cfg, &mut |_, _| {})
                .expect("bench")
                .iters,
            1
        );

        let cfg = BenchConfig {
            warmup: 0,
            iters: 0,
            max_seconds: None,
        };
        let err = bench(s.as_mut(), &inputs, &cfg, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, Error::InvalidBenchConfig(_)), "{err:?}");

        // A run error stops the benchmark with that error.
        let wrong = [Value::F32(zeros(&[1, 3, 8, 8]))];
        let cfg = BenchConfig {
            warmup: 1,
            iters: 3,
            max_seconds: None,
        };
        let err = bench(s.as_mut(), &wrong, &cfg, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, Error::InputMismatch { .. }), "{err:?}");
    }
    assert!(peak_rss_bytes().is_some_and(|b| b > 10 * 1024 * 1024));
}

#[test]
fn garbage_bytes_are_an_error_not_a_panic() {
    if !ort_available() {
        return;
    }
    for kind in BOTH {
        let err = load(
            kind,
            b"definitely not an onnx model",
            &RuntimeOptions::default(),
        )
        .err()
        .expect("refused");
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{kind}: {msg}");
        eprintln!("{kind}: {msg}");
    }
}
