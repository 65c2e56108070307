//! Verify a candidate model against a reference on real data.
//!
//! Both models run in the same runtime on the same batches. Per output: the largest absolute
//! difference, the mean cosine similarity between the two models' per-item outputs, and the
//! metric of the output's task ([`crate::task`]: given, or guessed with the reason reported):
//! top-1 agreement (and both models' accuracy when the dataset has labels), cosine, IoU of maps,
//! or CTC sequence agreement.

use serde::Serialize;
use whittle_calib::{Dataset, Preprocess};
use whittle_core::Value;
use whittle_core::stats::cosine;
use whittle_runtime::{Dim, IoInfo, RuntimeKind, RuntimeOptions, Session};

use crate::Error;
use crate::task::{self, Task};

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
    /// The task of every output (`None`: guessed per output).
    pub task: Option<Task>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            runtime: RuntimeKind::OrtCpu,
            batch: 32,
            limit: None,
            threads: None,
            task: None,
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
    /// The output's task (`None`: no task fits; the cosine is all there is).
    pub task: Option<Task>,
    /// Why that task: given by `--task`, or the guess's reason.
    pub task_reason: String,
    /// The task's metric (`task.metric_name()`): top-1 agreement, mean cosine, IoU or sequence
    /// agreement.
    pub metric: Option<f64>,
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

    /// The first output with a task metric: its name, task and value (what a floor is checked
    /// against).
    pub fn primary(&self) -> Option<(&str, Task, f64)> {
        self.outputs
            .iter()
            .find_map(|o| Some((o.name.as_str(), o.task?, o.metric?)))
    }
}

#[derive(Default)]
struct Acc {
    max_abs: f64,
    cos_sum: f64,
    /// Task score summed over items (agreeing argmax or sequence, IoU).
    score: f64,
    ref_ok: usize,
    cand_ok: usize,
    task: Option<(Option<Task>, String)>,
    /// A one-channel map's threshold, from the first batch's reference values.
    threshold: Option<f32>,
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
        let (specs, bs) = whittle_calib::input_specs(&declared, opts.batch, Some((data, pre)))?;
        ropts.input_shapes = specs
            .into_iter()
            .map(|s| {
                let shape = std::iter::once(bs).chain(s.item_shape).collect();
                (s.name, shape)
            })
            .collect();
    }
    // the reference's graph, decoded only when a task is guessed (the guess reads its last ops)
    let model = opts
        .task
        .is_none()
        .then(|| whittle_core::Model::from_bytes(reference, None, "reference", &Default::default()))
        .and_then(Result::ok);
    let mut r = whittle_runtime::load(opts.runtime, reference, &ropts)?;
    let mut c = whittle_runtime::load(opts.runtime, candidate, &ropts)?;
    check_same_interface(r.as_ref(), c.as_ref())?;
    let (specs, bs) = whittle_calib::input_specs(r.inputs(), opts.batch, Some((data, pre)))?;
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
            let float = matches!(a, Value::F32(_));
            let (t, _) = acc.task.get_or_insert_with(|| match opts.task {
                Some(t) => (Some(t), "given by --task".into()),
                None if float => task::guess(model.as_ref(), &r.outputs()[k].name, a.shape()),
                None => (None, "not a float output".into()),
            });
            let t = *t;
            if let Some(why) = t.and_then(|t| t.unfit(a.shape())) {
                return Err(Error::Mismatch(format!(
                    "output '{}' is {:?}: {why}",
                    r.outputs()[k].name,
                    a.shape()
                )));
            }
            let threshold = *acc
                .threshold
                .get_or_insert_with(|| task::map_threshold(&av));
            let channels = a.shape().get(1).copied().unwrap_or(1);
            let classes = a.shape().last().copied().unwrap_or(1).max(1);
            for i in 0..chunk.len().min(rows) {
                let (ra, rb) = (&av[i * per..(i + 1) * per], &bv[i * per..(i + 1) * per]);
                let cos = cosine(ra, rb);
                acc.cos_sum += cos;
                match t {
                    Some(Task::Classify) => {
                        let (pa, pb) = (task::argmax(ra), task::argmax(rb));
                        acc.score += (pa == pb) as usize as f64;
                        if let Some(l) = batch.labels.as_ref().and_then(|l| l.get(i)) {
                            labelled = true;
                            acc.ref_ok += (pa == *l) as usize;
                            acc.cand_ok += (pb == *l) as usize;
                        }
                    }
                    Some(Task::Embed) => acc.score += cos,
                    Some(Task::Dense) => acc.score += task::map_iou(ra, rb, channels, threshold),
                    Some(Task::Ctc) => {
                        let same = task::ctc_decode(ra, classes) == task::ctc_decode(rb, classes);
                        acc.score += same as usize as f64;
                    }
                    None => {}
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
        .map(|(io, a)| {
            let (task, task_reason) = a.task.unwrap_or((None, String::new()));
            let classifier = task == Some(Task::Classify);
            OutputReport {
                name: io.name.clone(),
                max_abs_diff: a.max_abs,
                mean_cosine: a.cos_sum / n,
                task,
                task_reason,
                metric: task.map(|_| a.score / n),
                top1_agreement: classifier.then(|| a.score / n),
                reference_accuracy: (classifier && labelled).then(|| a.ref_ok as f64 / n),
                candidate_accuracy: (classifier && labelled).then(|| a.cand_ok as f64 / n),
            }
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
    // a dim may be fixed in one and symbolic in the other (an export at one size against the
    // dynamic original): both then run at the data's shape
    let fits = |a: &IoInfo, b: &IoInfo| {
        a.name == b.name
            && a.dtype == b.dtype
            && a.dims.len() == b.dims.len()
            && a.dims.iter().zip(&b.dims).all(|(x, y)| match (x, y) {
                (Dim::Fixed(p), Dim::Fixed(q)) => p == q,
                _ => true,
            })
    };
    let (ri, ci) = (r.inputs(), c.inputs());
    if ri.len() != ci.len() || !ri.iter().zip(ci).all(|(a, b)| fits(a, b)) {
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
