//! Verify a candidate model against a reference on real data.
//!
//! Both models run in the same runtime on the same batches. Per output: the largest absolute
//! difference and the mean cosine similarity between the two models' per-item outputs. For a
//! classifier output (`[N, C]` with C ≥ 2): top-1 agreement, and both models' accuracy when the
//! dataset has labels.

use serde::Serialize;
use whittle_calib::{Dataset, Preprocess};
use whittle_core::Value;
use whittle_core::stats::cosine;
use whittle_runtime::{IoInfo, RuntimeKind, RuntimeOptions, Session};

use crate::Error;

/// How to run the comparison.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The runtime both models run in.
    pub runtime: RuntimeKind,
    /// Items per run for models with a symbolic batch axis.
    pub batch: usize,
    /// Use at most this many items (deterministic sample), all when `None`.
    pub limit: Option<usize>,
    /// Threads for the runtime.
    pub threads: Option<usize>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            runtime: RuntimeKind::OrtCpu,
            batch: 32,
            limit: None,
            threads: None,
        }
    }
}

/// The comparison of one output.
#[derive(Debug, Clone, Serialize)]
pub struct OutputReport {
    /// Output name.
    pub name: String,
    /// Largest |reference - candidate| over all elements.
    pub max_abs_diff: f64,
    /// Mean over items of the cosine similarity of the two outputs.
    pub mean_cosine: f64,
    /// Share of items whose argmax agrees (classifier outputs only).
    pub top1_agreement: Option<f64>,
    /// Reference accuracy against the labels (classifier outputs of labelled data only).
    pub reference_accuracy: Option<f64>,
    /// Candidate accuracy against the labels.
    pub candidate_accuracy: Option<f64>,
}

/// The result of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Items compared.
    pub items: usize,
    /// The runtime used.
    pub runtime: String,
    /// Per output, in graph order.
    pub outputs: Vec<OutputReport>,
}

impl VerifyReport {
    /// Top-1 agreement of the first classifier output, if any.
    pub fn agreement(&self) -> Option<f64> {
        self.outputs.iter().find_map(|o| o.top1_agreement)
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[derive(Default)]
struct Acc {
    max_abs: f64,
    cos_sum: f64,
    agree: usize,
    ref_ok: usize,
    cand_ok: usize,
    classifier: bool,
}

/// Run both models over the dataset and compare them. `progress(done, total)` is called after
/// each batch.
pub fn verify(
    reference: &[u8],
    candidate: &[u8],
    data: &Dataset,
    pre: &Preprocess,
    opts: &VerifyOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<VerifyReport, Error> {
    let indices = match opts.limit {
        Some(n) => data.sample(n, 0),
        None => (0..data.len()).collect(),
    };
    verify_items(reference, candidate, data, &indices, pre, opts, progress)
}

/// [`verify`] on the given dataset items (`opts.limit` is ignored).
pub fn verify_items(
    reference: &[u8],
    candidate: &[u8],
    data: &Dataset,
    indices: &[usize],
    pre: &Preprocess,
    opts: &VerifyOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<VerifyReport, Error> {
    let mut ropts = RuntimeOptions {
        threads: opts.threads,
        ..Default::default()
    };
    if opts.runtime == RuntimeKind::Tract {
        // tract plans for fixed shapes: give it the padded batch's (some graphs, a transformer's
        // attention over batch x sequence symbols, do not optimise with symbols at all)
        let declared = whittle_runtime::declared_inputs(reference)?;
        let (specs, bs) = whittle_calib::input_specs(&declared, opts.batch, Some(data))?;
        ropts.input_shapes = specs
            .into_iter()
            .map(|s| {
                let shape = std::iter::once(bs).chain(s.item_shape).collect();
                (s.name, shape)
            })
            .collect();
    }
    let mut r = whittle_runtime::load(opts.runtime, reference, &ropts)?;
    let mut c = whittle_runtime::load(opts.runtime, candidate, &ropts)?;
    check_same_interface(r.as_ref(), c.as_ref())?;
    let (specs, bs) = whittle_calib::input_specs(r.inputs(), opts.batch, Some(data))?;
    if indices.is_empty() {
        return Err(Error::Mismatch(format!(
            "no items to compare in {}",
            data.path().display()
        )));
    }
    let total = indices.len();
    let mut accs: Vec<Acc> = r.outputs().iter().map(|_| Acc::default()).collect();
    let mut labelled = false;
    let mut done = 0;
    for chunk in indices.chunks(bs) {
        let batch = data.load_batch(chunk, &specs, pre)?;
        let inputs = whittle_calib::pad_batch(&batch.inputs, chunk.len(), bs, r.inputs());
        let ro = r.run(&inputs)?;
        let co = c.run(&inputs)?;
        for (k, (a, b)) in ro.iter().zip(&co).enumerate() {
            if a.shape() != b.shape() {
                return Err(Error::Mismatch(format!(
                    "output '{}' has shape {:?} in the reference and {:?} in the candidate",
                    r.outputs()[k].name,
                    a.shape(),
                    b.shape()
                )));
            }
            let (av, bv) = (a.to_f32_vec(), b.to_f32_vec());
            let acc = &mut accs[k];
            for (x, y) in av.iter().zip(&bv) {
                let d = (*x as f64 - *y as f64).abs();
                if d > acc.max_abs || d.is_nan() {
                    acc.max_abs = if d.is_nan() { f64::INFINITY } else { d };
                }
            }
            let rows = a.shape().first().copied().unwrap_or(1).max(1);
            let per = av.len() / rows;
            let classifier = matches!(a, Value::F32(_)) && a.shape().len() == 2 && per >= 2;
            acc.classifier = classifier;
            for i in 0..chunk.len().min(rows) {
                let (ra, rb) = (&av[i * per..(i + 1) * per], &bv[i * per..(i + 1) * per]);
                acc.cos_sum += cosine(ra, rb);
                if classifier {
                    let (pa, pb) = (argmax(ra), argmax(rb));
                    acc.agree += (pa == pb) as usize;
                    if let Some(l) = batch.labels.as_ref().and_then(|l| l.get(i)) {
                        labelled = true;
                        acc.ref_ok += (pa == *l) as usize;
                        acc.cand_ok += (pb == *l) as usize;
                    }
                }
            }
        }
        done += chunk.len();
        progress(done, total);
    }
    let n = total.max(1) as f64;
    let outputs = r
        .outputs()
        .iter()
        .zip(accs)
        .map(|(io, a)| OutputReport {
            name: io.name.clone(),
            max_abs_diff: a.max_abs,
            mean_cosine: a.cos_sum / n,
            top1_agreement: a.classifier.then(|| a.agree as f64 / n),
            reference_accuracy: (a.classifier && labelled).then(|| a.ref_ok as f64 / n),
            candidate_accuracy: (a.classifier && labelled).then(|| a.cand_ok as f64 / n),
        })
        .collect();
    Ok(VerifyReport {
        items: total,
        runtime: opts.runtime.to_string(),
        outputs,
    })
}

fn check_same_interface(r: &dyn Session, c: &dyn Session) -> Result<(), Error> {
    let sig = |ios: &[IoInfo]| -> Vec<String> {
        ios.iter()
            .map(|i| format!("{}: {}", i.name, i.signature()))
            .collect()
    };
    if sig(r.inputs()) != sig(c.inputs()) {
        return Err(Error::Mismatch(format!(
            "the candidate's inputs ({}) differ from the reference's ({})",
            sig(c.inputs()).join(", "),
            sig(r.inputs()).join(", ")
        )));
    }
    let names = |ios: &[IoInfo]| -> Vec<String> { ios.iter().map(|i| i.name.clone()).collect() };
    if names(r.outputs()) != names(c.outputs()) {
        return Err(Error::Mismatch(format!(
            "the candidate's outputs ({}) differ from the reference's ({})",
            names(c.outputs()).join(", "),
            names(r.outputs()).join(", ")
        )));
    }
    Ok(())
}
