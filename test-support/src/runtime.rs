//! Running a model in a runtime. Tests take the runtime types from here (re-exported), so that
//! where the runtimes live is written once.

pub use whittle_runtime::{
    BenchConfig, RuntimeKind, RuntimeOptions, Session, Value, load, locate_ort_library,
    probe_tensor, synthetic_inputs,
};

use whittle_core::Model;

/// The outputs of `m` on `inputs` in `kind`; a load or run error panics, naming the runtime.
pub fn run_model(kind: RuntimeKind, m: &Model, inputs: &[Value]) -> Vec<Value> {
    let mut s = load(kind, &m.to_bytes(), &RuntimeOptions::default())
        .unwrap_or_else(|e| panic!("{}: load: {e}", kind.name()));
    s.run(inputs)
        .unwrap_or_else(|e| panic!("{}: run: {e}", kind.name()))
}

/// The outputs of `a` and `b` on `inputs` agree in each runtime of `kinds`: as many, of the same
/// shapes, max |diff| < 1e-4; and every output of `a` has a value above 0.05 in magnitude (else
/// the comparison says nothing).
pub fn assert_same_outputs(a: &Model, b: &Model, inputs: &[Value], kinds: &[RuntimeKind]) {
    for &kind in kinds {
        let x = run_model(kind, a, inputs);
        let y = run_model(kind, b, inputs);
        assert_eq!(x.len(), y.len(), "{}: output count", kind.name());
        for (i, (x, y)) in x.iter().zip(&y).enumerate() {
            assert_eq!(x.shape(), y.shape(), "{}: shape of output {i}", kind.name());
            let (x, y) = (x.to_f32_vec(), y.to_f32_vec());
            let peak = max_abs(&x);
            assert!(
                peak > 0.05,
                "{}: output {i} is degenerate (max |v| = {peak})",
                kind.name()
            );
            let diff = max_abs_diff(&x, &y);
            assert!(diff < 1e-4, "{}: output {i} differs by {diff}", kind.name());
        }
    }
}

/// Max |v|.
pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Max |a - b| over two slices of the same length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Max |a - b| / max |a| over every output of models `a` and `b` on one probe input of shape
/// `input`, the worst of ONNX Runtime (CPU) and tract. Each output of `a` must have a peak above
/// `min_peak` (else the comparison says nothing) and the shape of `b`'s.
pub fn rel_diff(a: &Model, b: &Model, input: &[usize], min_peak: f32) -> f32 {
    let x = Value::F32(probe_tensor(input, -1.0, 1.0));
    let mut worst = 0f32;
    for kind in [RuntimeKind::OrtCpu, RuntimeKind::Tract] {
        let (ya, yb) = (
            run_model(kind, a, std::slice::from_ref(&x)),
            run_model(kind, b, std::slice::from_ref(&x)),
        );
        assert_eq!(ya.len(), yb.len(), "{}: output count", kind.name());
        for (ya, yb) in ya.iter().zip(&yb) {
            assert_eq!(ya.shape(), yb.shape(), "{}: shapes", kind.name());
            let (ya, yb) = (ya.to_f32_vec(), yb.to_f32_vec());
            let peak = max_abs(&ya);
            assert!(peak > min_peak, "degenerate output");
            worst = worst.max(max_abs_diff(&ya, &yb) / peak);
        }
    }
    worst
}
