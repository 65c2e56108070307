//! Least-squares refit on the real ResNet-8 and real CIFAR-10 images.

use whittle_calib::{CaptureSpec, Dataset, Preprocess, input_specs};
use whittle_compress::refit::{LayerRef, RefitJob, RefitOptions, collect, refit};
use whittle_core::Model;
use whittle_core::onnx::NodeProto;
use whittle_core::tensor;
use whittle_test_support::runtime::{RuntimeKind, RuntimeOptions, load};
use whittle_test_support::{attr_int, shared_assets, values};

fn replace_initializer(model: &mut Model, name: &str, dims: &[i64], values: &[f32]) {
    whittle_core::edit::set_initializer(model.graph_mut(), tensor::from_f32(name, dims, values));
}

/// The predicted class of every item, running `model` on ONNX Runtime's CPU provider.
fn predictions(model: &Model, data: &Dataset, pre: &Preprocess, indices: &[usize]) -> Vec<usize> {
    let opts = RuntimeOptions {
        threads: Some(2),
        ..Default::default()
    };
    let mut session = load(RuntimeKind::OrtCpu, &model.to_bytes(), &opts).expect("loads");
    let (specs, bs) = input_specs(session.inputs(), 50, None).expect("specs");
    let mut out = Vec::new();
    for chunk in indices.chunks(bs) {
        let batch = data.load_batch(chunk, &specs, pre).expect("batch");
        let values = session.run(&batch.inputs).expect("runs");
        let scores = values[0].to_f32_vec();
        let classes = scores.len() / chunk.len();
        for row in scores.chunks(classes) {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            out.push(best);
        }
    }
    out
}

fn agreement(a: &[usize], b: &[usize]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

struct Setup {
    original: Model,
    data: Dataset,
    pre: Preprocess,
    calib: Vec<usize>,
    held: Vec<usize>,
}

impl Setup {
    /// Top-1 agreement of `m` with the original on the held-out items.
    fn agreement(&self, m: &Model) -> f64 {
        let predict = |m: &Model| predictions(m, &self.data, &self.pre, &self.held);
        agreement(&predict(&self.original), &predict(m))
    }
}

fn setup() -> Option<Setup> {
    let assets = shared_assets()?;
    let original = Model::load(&assets.join("models/resnet8_cifar10.onnx")).expect("loads resnet8");
    let data = Dataset::open(&assets.join("data/cifar10/test-b")).expect("opens test-b");
    let pre = Preprocess::from_name_or_path("resnet8").expect("built-in profile");
    // 300 items to calibrate on, the other 200 to evaluate.
    let (calib, held) = data.split(0.6, 0).expect("splits");
    assert_eq!((calib.len(), held.len()), (300, 200));
    Some(Setup {
        original,
        data,
        pre,
        calib,
        held,
    })
}

#[test]
fn refit_recovers_a_corrupted_conv_of_resnet8() {
    let Some(s) = setup() else { return };
    let w = s.original.initializer("conv2d_1.weight").expect("weight");
    assert_eq!(w.dims, vec![16, 16, 3, 3]);
    let clean = tensor::to_f32(w).expect("floats");
    let rms = (clean.iter().map(|v| v * v).sum::<f32>() / clean.len() as f32).sqrt();
    let noisy: Vec<f32> = clean
        .iter()
        .zip(values(clean.len(), 42))
        .map(|(v, n)| v + 0.5 * rms * n)
        .collect();
    let mut pruned = s.original.clone();
    replace_initializer(&mut pruned, "conv2d_1.weight", &[16, 16, 3, 3], &noisy);
    let corrupted = pruned.clone();

    let spec = CaptureSpec {
        dataset: &s.data,
        indices: &s.calib[..100],
        pre: &s.pre,
        batch: 50,
        runtime: RuntimeKind::OrtCpu,
        threads: Some(2),
    };
    let job = RefitJob {
        node: "conv2d_1".into(),
        input: "activation".into(),
        output: "conv2d_1".into(),
        kept_in: (0..16).collect(),
        kept_out: (0..16).collect(),
    };
    // One collection, then the refit from its statistics.
    let opts = RefitOptions::default();
    let stats = collect(&s.original, &[LayerRef::from(&job)], &spec, &opts).expect("collects");
    assert_eq!(stats.layers(), ["conv2d_1"]);
    let reports = stats.apply(&mut pruned, &[job], &opts).expect("applies");
    let r = &reports[0];
    let refitted =
        tensor::to_f32(pruned.initializer("conv2d_1.weight").expect("weight")).expect("floats");
    let max_diff = refitted
        .iter()
        .zip(&clean)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!(
        "conv2d_1: rows {} rel error before {:.4e} after {:.4e}; largest weight difference to the clean weights {max_diff:.3e} (weight rms {rms:.3e})",
        r.rows, r.rel_error_before, r.rel_error_after
    );
    assert_eq!(r.skipped, None);
    assert_eq!(r.rows, 100 * 64);
    assert!(r.rel_error_after < 1e-4, "{r:?}");
    assert!(r.rel_error_after < r.rel_error_before, "{r:?}");

    let (noisy_agree, refit_agree) = (s.agreement(&corrupted), s.agreement(&pruned));
    eprintln!(
        "top-1 agreement on 200 held-out images: corrupted {noisy_agree:.3}, refitted {refit_agree:.3}"
    );
    assert!(refit_agree >= noisy_agree);
    assert!(refit_agree >= 0.98, "{refit_agree}");
}

#[test]
fn refit_of_a_pruned_dense_layer_restores_agreement() {
    let Some(s) = setup() else { return };
    // Keep the even features of the 64 the dense layer reads: a Gather on the Flatten output
    // feeds a Gemm whose weight keeps the matching columns.
    let kept: Vec<usize> = (0..64).step_by(2).collect();
    let w = s.original.initializer("dense.weight").expect("weight");
    assert_eq!(w.dims, vec![10, 64]);
    let full = tensor::to_f32(w).expect("floats");
    let sliced: Vec<f32> = (0..10)
        .flat_map(|o| kept.iter().map(move |&k| (o, k)))
        .map(|(o, k)| full[o * 64 + k])
        .collect();
    let mut pruned = s.original.clone();
    replace_initializer(
        &mut pruned,
        "dense.weight",
        &[10, kept.len() as i64],
        &sliced,
    );
    let graph = pruned.graph_mut();
    let idx: Vec<i64> = kept.iter().map(|&k| k as i64).collect();
    graph
        .initializer
        .push(tensor::from_i64("dense.kept", &[kept.len() as i64], &idx));
    let at = graph
        .node
        .iter()
        .position(|n| n.name() == "dense")
        .expect("dense node");
    assert_eq!(graph.node[at].input[0], "flatten");
    graph.node[at].input[0] = "flatten.kept".into();
    graph.node.insert(
        at,
        NodeProto {
            name: Some("flatten.gather".into()),
            op_type: Some("Gather".into()),
            input: vec!["flatten".into(), "dense.kept".into()],
            output: vec!["flatten.kept".into()],
            attribute: vec![attr_int("axis", 1)],
            ..Default::default()
        },
    );
    let unrefitted = pruned.clone();

    let spec = CaptureSpec {
        dataset: &s.data,
        indices: &s.calib,
        pre: &s.pre,
        batch: 50,
        runtime: RuntimeKind::OrtCpu,
        threads: Some(2),
    };
    let job = RefitJob {
        node: "dense".into(),
        input: "flatten".into(),
        output: "dense_logits".into(),
        kept_in: kept.clone(),
        kept_out: (0..10).collect(),
    };
    let reports = refit(
        &s.original,
        &mut pruned,
        &[job],
        &spec,
        &RefitOptions::default(),
    )
    .expect("refits");
    let r = &reports[0];
    eprintln!(
        "dense: rows {} rel error before {:.4e} after {:.4e}",
        r.rows, r.rel_error_before, r.rel_error_after
    );
    assert_eq!(r.skipped, None);
    assert_eq!(r.rows, 300);
    assert!(r.rel_error_after < r.rel_error_before, "{r:?}");
    assert_eq!(
        pruned.initializer("dense.weight").expect("weight").dims,
        vec![10, 32]
    );
    assert_eq!(
        pruned.initializer("dense.bias").expect("bias").dims,
        vec![10]
    );

    let (before, after) = (s.agreement(&unrefitted), s.agreement(&pruned));
    eprintln!(
        "top-1 agreement with the original on 200 held-out images: unrefitted {before:.3}, refitted {after:.3}"
    );
    assert!(after >= before, "refitted {after} < unrefitted {before}");
}
