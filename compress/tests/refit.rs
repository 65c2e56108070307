//! Least-squares refit on the real ResNet-8 and real CIFAR-10 images.

use std::path::PathBuf;

use whittle_calib::{CaptureSpec, Dataset, Preprocess, input_specs};
use whittle_compress::refit::{LayerRef, RefitJob, RefitOptions, collect, refit};
use whittle_core::Model;
use whittle_core::onnx::{AttributeProto, NodeProto, attribute_proto};
use whittle_core::tensor;
use whittle_runtime::{RuntimeKind, RuntimeOptions};

/// The shared assets folder, or `None` (after a skip note) when it is missing outside CI.
fn assets(test: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/assets"));
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{test}: test assets not found at {} (CI=true, so this fails instead of skipping)",
            dir.display()
        );
    }
    eprintln!(
        "{test}: skipped, test assets not found at {}",
        dir.display()
    );
    None
}

/// Deterministic values in [-1, 1) (splitmix64).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn replace_initializer(model: &mut Model, name: &str, dims: &[i64], values: &[f32]) {
    let t = model
        .graph_mut()
        .initializer
        .iter_mut()
        .find(|t| t.name() == name)
        .expect("initializer exists");
    *t = tensor::from_f32(name, dims, values);
}

/// The predicted class of every item, running `model` on ONNX Runtime's CPU provider.
fn predictions(model: &Model, data: &Dataset, pre: &Preprocess, indices: &[usize]) -> Vec<usize> {
    let opts = RuntimeOptions {
        threads: Some(2),
        ..Default::default()
    };
    let mut session =
        whittle_runtime::load(RuntimeKind::OrtCpu, &model.to_bytes(), &opts).expect("loads");
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

fn setup(test: &str) -> Option<Setup> {
    let assets = assets(test)?;
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
    let Some(s) = setup("refit_recovers_a_corrupted_conv_of_resnet8") else {
        return;
    };
    let w = s.original.initializer("conv2d_1.weight").expect("weight");
    assert_eq!(w.dims, vec![16, 16, 3, 3]);
    let clean = tensor::to_f32(w).expect("floats");
    let rms = (clean.iter().map(|v| v * v).sum::<f32>() / clean.len() as f32).sqrt();
    let noisy: Vec<f32> = clean
        .iter()
        .zip(noise(clean.len(), 42))
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

    let reference = predictions(&s.original, &s.data, &s.pre, &s.held);
    let noisy_agree = agreement(
        &reference,
        &predictions(&corrupted, &s.data, &s.pre, &s.held),
    );
    let refit_agree = agreement(&reference, &predictions(&pruned, &s.data, &s.pre, &s.held));
    eprintln!(
        "top-1 agreement on 200 held-out images: corrupted {noisy_agree:.3}, refitted {refit_agree:.3}"
    );
    assert!(refit_agree >= noisy_agree);
    assert!(refit_agree >= 0.98, "{refit_agree}");
}

#[test]
fn refit_of_a_pruned_dense_layer_restores_agreement() {
    let Some(s) = setup("refit_of_a_pruned_dense_layer_restores_agreement") else {
        return;
    };
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
            attribute: vec![AttributeProto {
                name: Some("axis".into()),
                i: Some(1),
                r#type: Some(attribute_proto::AttributeType::Int as i32),
                ..Default::default()
            }],
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

    let reference = predictions(&s.original, &s.data, &s.pre, &s.held);
    let before = agreement(
        &reference,
        &predictions(&unrefitted, &s.data, &s.pre, &s.held),
    );
    let after = agreement(&reference, &predictions(&pruned, &s.data, &s.pre, &s.held));
    eprintln!(
        "top-1 agreement with the original on 200 held-out images: unrefitted {before:.3}, refitted {after:.3}"
    );
    assert!(after >= before, "refitted {after} < unrefitted {before}");
}

/// `model` with the weight and bias of the Conv or Gemm (`transB` 1) `job.node` sliced to the
/// job's inputs and outputs (refit never runs the pruned model, so nothing else changes).
fn slice_layer(model: &mut Model, original: &Model, job: &RefitJob) {
    let w = original
        .initializer(&format!("{}.weight", job.node))
        .expect("weight");
    let b = original
        .initializer(&format!("{}.bias", job.node))
        .expect("bias");
    let dims: Vec<usize> = w.dims.iter().map(|&d| d as usize).collect();
    let full = tensor::to_f32(w).expect("floats");
    let bias = tensor::to_f32(b).expect("floats");
    let inner: usize = dims[2..].iter().product();
    let mut sliced = Vec::new();
    for &o in &job.kept_out {
        for &i in &job.kept_in {
            let at = (o * dims[1] + i) * inner;
            sliced.extend_from_slice(&full[at..at + inner]);
        }
    }
    let mut new_dims = w.dims.clone();
    new_dims[0] = job.kept_out.len() as i64;
    new_dims[1] = job.kept_in.len() as i64;
    replace_initializer(model, w.name(), &new_dims, &sliced);
    let kept: Vec<f32> = job.kept_out.iter().map(|&o| bias[o]).collect();
    replace_initializer(model, b.name(), &[kept.len() as i64], &kept);
}

#[test]
fn one_collection_refits_two_subsets_like_refit_does() {
    let Some(s) = setup("one_collection_refits_two_subsets_like_refit_does") else {
        return;
    };
    let spec = CaptureSpec {
        dataset: &s.data,
        indices: &s.calib[..100],
        pre: &s.pre,
        batch: 50,
        runtime: RuntimeKind::OrtCpu,
        threads: Some(2),
    };
    let opts = RefitOptions::default();
    let layer = |node: &str, input: &str, output: &str| LayerRef {
        node: node.into(),
        input: input.into(),
        output: output.into(),
    };
    let layers = [
        layer("conv2d_1", "activation", "conv2d_1"),
        layer("conv2d_7", "activation_5", "conv2d_7"),
        layer("conv2d_8", "activation_4", "conv2d_8"),
        layer("dense", "flatten", "dense_logits"),
    ];
    let range = |a: usize, b: usize, step: usize| (a..b).step_by(step).collect::<Vec<usize>>();
    let kept = [
        [
            (range(0, 16, 2), range(0, 16, 1)),
            (range(0, 40, 1), range(0, 64, 1)),
            (range(0, 24, 1), range(0, 64, 2)),
            (range(0, 64, 2), range(0, 10, 1)),
        ],
        [
            (range(0, 12, 1), range(4, 16, 1)),
            (range(20, 64, 1), range(0, 64, 4)),
            (range(8, 32, 1), range(0, 64, 1)),
            (range(0, 48, 1), vec![0, 1, 2, 4, 5, 6, 7, 8, 9]),
        ],
    ];
    let t = std::time::Instant::now();
    let stats = collect(&s.original, &layers, &spec, &opts).expect("collects");
    let collected = t.elapsed();
    let (mut per_call, mut applied) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for set in &kept {
        // The jobs come in the layers' order, so that refit samples the same positions.
        let jobs: Vec<RefitJob> = set
            .iter()
            .zip(&layers)
            .map(|((i, o), l)| RefitJob {
                node: l.node.clone(),
                input: l.input.clone(),
                output: l.output.clone(),
                kept_in: i.clone(),
                kept_out: o.clone(),
            })
            .collect();
        let mut pruned = s.original.clone();
        for job in &jobs {
            slice_layer(&mut pruned, &s.original, job);
        }
        let mut via_refit = pruned.clone();
        let t = std::time::Instant::now();
        let want = refit(&s.original, &mut via_refit, &jobs, &spec, &opts).expect("refits");
        per_call += t.elapsed();
        let t = std::time::Instant::now();
        let got = stats.apply(&mut pruned, &jobs, &opts).expect("applies");
        applied += t.elapsed();
        for r in &got {
            eprintln!(
                "{}: rows {} rel error before {:.4e} after {:.4e} {:?}",
                r.node, r.rows, r.rel_error_before, r.rel_error_after, r.skipped
            );
            assert!(
                r.skipped.is_some() || r.rel_error_after < r.rel_error_before,
                "{r:?}"
            );
        }
        assert!(
            got.iter().filter(|r| r.skipped.is_none()).count() >= 3,
            "{got:?}"
        );
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
        assert_eq!(pruned, via_refit);
    }
    eprintln!(
        "resnet8, 100 items, 4 layers: refit per job set (2 captures) {per_call:?}; collect once {collected:?} + 2 applies {applied:?}"
    );
}
