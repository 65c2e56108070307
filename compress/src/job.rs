//! One compression job, as `whittle compress` and `deploy` run it: cleanup, symbolic dims bound,
//! the work sized by the model's MACs, the calibration split, the steps ([`pipeline::run`]), then
//! the checks a user reads: speed beside the original, fidelity on held-apart items, the floor. It
//! returns the result (with the original's dynamic dims back) and a [`Summary`]; writing is the
//! caller's.

use std::collections::BTreeMap;

use serde::Serialize;
use whittle_calib::{Dataset, Preprocess};
use whittle_core::stats::{pct, si};
use whittle_core::{Model, cost, shape};
use whittle_export::{Task, VerifyOptions, VerifyReport};
use whittle_runtime::RuntimeKind;

use crate::Error;
use crate::cleanup::{self, CleanupReport};
use crate::latency::{self, SpeedCheck};
use crate::pipeline::{self, Calibration, Context, Progress, SavedPlan, Step, StepRecord};
use crate::report::{self, LayerChange};

/// The floor of the task metric when neither the caller nor the recipe gives one.
pub const DEFAULT_FLOOR: f64 = 0.5;

/// What to compress and how to judge it.
#[derive(Clone)]
pub struct Job<'a> {
    /// The model as loaded (never changed).
    pub original: &'a Model,
    /// The steps, in order.
    pub steps: &'a [Step],
    /// Plans to replay (`--apply-plan`).
    pub replay: Option<&'a SavedPlan>,
    /// Calibration data and its preprocessing.
    pub data: Option<(&'a Dataset, &'a Preprocess)>,
    /// Input shapes given by the user (`--input`), binding symbolic dims.
    pub inputs: &'a [(String, Vec<i64>)],
    /// Calibration items for the methods (`None`: 128, fewer for a large input).
    pub items: Option<usize>,
    /// Held-apart items for the fidelity report (`None`: 128, fewer for a large input).
    pub holdout: Option<usize>,
    /// The floor of the task metric (`None`: [`DEFAULT_FLOOR`], and silence where nothing can
    /// be judged).
    pub floor: Option<f64>,
    /// Whether a failed check is an error to the caller.
    pub strict: bool,
    /// Runtime for calibration runs and checks.
    pub runtime: RuntimeKind,
    /// Threads for ONNX Runtime.
    pub threads: Option<usize>,
    /// What the outputs are for (`None`: guessed per output).
    pub task: Option<Task>,
    /// Measure the result beside the original.
    pub speed_check: bool,
}

/// What a compression did.
#[derive(Serialize)]
pub struct Summary {
    /// The input model.
    pub input: String,
    /// The written model.
    pub output: Option<String>,
    /// What cleanup changed.
    pub cleanup: CleanupReport,
    /// Params before / after.
    pub params: (u64, u64),
    /// MACs before / after (per item where a batch axis is symbolic); placeholders when
    /// `unknown_dims` is not empty.
    pub macs: (u64, u64),
    /// The input shapes MACs are counted at (`x=1x3x48x320`; `?` for a dim not bound).
    pub costed_at: String,
    /// The dims the MAC count depends on that neither `--input` nor the data bound.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_dims: Vec<String>,
    /// Fraction of MACs kept.
    pub macs_kept: f64,
    /// The result against the original on held-apart calibration items.
    pub fidelity: Option<VerifyReport>,
    /// The result's speed beside the original's on the checking runtime.
    pub speed: Option<SpeedCheck>,
    /// Checks the result fails (under the floor, slower than the original): a line each.
    pub warnings: Vec<String>,
    /// For a large input, how much calibration work it got (`None`: the defaults).
    pub large_input: Option<String>,
    /// Per layer before / after.
    pub layers: Vec<LayerChange>,
    /// Every step: method, options, plan, report.
    pub steps: Vec<StepRecord>,
    /// Each method's report under its name (the last step of that method).
    #[serde(flatten)]
    pub reports: BTreeMap<&'static str, serde_json::Value>,
    /// Wall time of the whole compression.
    pub seconds: f64,
    /// The calibration items not used by any method (what `deploy` judges on).
    #[serde(skip)]
    pub held_apart: Vec<usize>,
    /// Whether a failed check is an error (`--strict`, or the recipe's `strict`).
    #[serde(skip)]
    pub strict: bool,
}

impl Summary {
    /// The budget of the first step that has one, as given (`macs=0.75`).
    pub fn target(&self) -> Option<&str> {
        self.steps
            .iter()
            .find_map(|s| s.options.get("target")?.as_str())
    }

    /// The plan file of every step (`--plan-out`).
    pub fn plan(&self) -> SavedPlan {
        SavedPlan {
            steps: self.steps.iter().map(StepRecord::saved).collect(),
        }
    }
}

/// Run the job: the compressed model (dynamic dims as the original's) and its summary.
pub fn run(job: &Job, input: &str, progress: &dyn Progress) -> Result<(Model, Summary), Error> {
    let started = std::time::Instant::now();
    if let Some(f) = job.floor
        && !(0.0..=1.0).contains(&f)
    {
        return Err(Error::Recipe(format!(
            "the fidelity floor {f} is not a fraction between 0 and 1"
        )));
    }
    let mut model = job.original.clone();
    let clean = cleanup::cleanup(&mut model)?;
    // symbolic dims bound first: the work is sized by the MACs at the shape the model runs at
    let binding = pipeline::bind_shapes(&mut model, job.inputs, job.data)?;
    let before = cost::count(&model, &shape::infer(&model, &[])?);
    let scale = pipeline::work_scale(before.macs);
    let items = job.items.unwrap_or(pipeline::scaled_items(128, scale, 16));
    let holdout = job
        .holdout
        .unwrap_or(pipeline::scaled_items(128, scale, 32));
    let calib = job
        .data
        .map(|(d, pre)| Calibration::split(d, pre, items))
        .transpose()?;
    let held_apart = calib
        .as_ref()
        .map(|c| c.held_apart.clone())
        .unwrap_or_default();
    let holdout: Vec<usize> = held_apart.iter().copied().take(holdout).collect();
    let large_input = (scale < 1.0 && calib.is_some()).then(|| {
        format!(
            "large input ({} MACs per item): {} calibration items (more positions sampled from each), {} held apart for the fidelity report; --calib-items, --holdout-items and --sensitivity-items change them",
            si(before.macs),
            items,
            holdout.len()
        )
    });
    let cx = Context {
        calib,
        scale,
        runtime: job.runtime,
        threads: job.threads,
        progress,
    };
    let (mut current, steps) = pipeline::run(&model, job.steps, &cx, job.replay)?;
    let mut bound_original = job.original.clone();
    shape::bind_symbols(&mut bound_original, &binding.sizes);
    let speed = if job.speed_check {
        progress.start("speed beside the original", 0);
        let s = latency::compare_speed(&bound_original, &current, job.runtime, job.threads);
        progress.finish();
        Some(s?)
    } else {
        None
    };
    let after = cost::count(&current, &shape::infer(&current, &[])?);
    let layers = report::layer_changes(&model, &current)?;
    let fidelity = match job.data {
        Some((d, pre)) if !holdout.is_empty() => {
            let opts = VerifyOptions {
                runtime: job.runtime,
                threads: job.threads,
                batch: ((32.0 * scale).round() as usize).max(1),
                limit: None,
                task: job.task,
            };
            let (o, c) = (bound_original.to_bytes(), current.to_bytes());
            let v = whittle_export::verify::verify_items(
                &o,
                &c,
                d,
                &holdout,
                pre,
                &opts,
                &mut |_, _| {},
            )
            .map_err(|e| Error::Check(format!("fidelity on the held-apart items: {e}")))?;
            Some(v)
        }
        _ => None,
    };
    let warnings = check_result(fidelity.as_ref(), job.floor, speed.as_ref());
    binding.restore(&mut current);
    let summary = Summary {
        input: input.to_string(),
        output: None,
        cleanup: clean,
        params: (before.params, after.params),
        macs: (before.macs, after.macs),
        macs_kept: after.macs as f64 / before.macs.max(1) as f64,
        costed_at: before.costed_at_text(),
        unknown_dims: before.unknown_dims.iter().map(|d| d.to_string()).collect(),
        fidelity,
        layers,
        reports: steps.iter().map(|r| (r.method, r.report.clone())).collect(),
        steps,
        seconds: started.elapsed().as_secs_f64(),
        held_apart,
        speed,
        warnings,
        large_input,
        strict: job.strict,
    };
    Ok((current, summary))
}

/// The checks a written result must meet: the floor of its task metric, and no slower than the
/// original (a line each that fails). A floor given with nothing to check it on fails too.
pub fn check_result(
    fidelity: Option<&VerifyReport>,
    floor: Option<f64>,
    speed: Option<&SpeedCheck>,
) -> Vec<String> {
    let mut w = Vec::new();
    let min = floor.unwrap_or(DEFAULT_FLOOR);
    match fidelity.and_then(VerifyReport::primary) {
        Some((output, task, v)) if v < min => w.push(format!(
            "{} of output '{output}' is {}, under the floor {}{}",
            task.metric_name(),
            pct(v),
            pct(min),
            if floor.is_none() { " (the default; set one with --min-agreement)" } else { "" }
        )),
        Some(_) => {}
        None if floor.is_some() => w.push(format!(
            "the floor {} cannot be checked: no held-apart items, or no output with a task metric (give --task)",
            pct(min)
        )),
        None => {}
    }
    if let Some(s) = speed.filter(|s| s.slower()) {
        w.push(format!(
            "the result is slower than the original on {}: {:.3} ms vs {:.3} ms ({:.2}x)",
            s.runtime, s.result_ms, s.original_ms, s.speedup
        ));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use whittle_export::OutputReport;

    fn speed(speedup: f64) -> SpeedCheck {
        SpeedCheck {
            runtime: "ort-cpu".into(),
            original_ms: 1.0,
            result_ms: 1.0 / speedup,
            speedup,
            rounds: 5,
        }
    }

    fn fidelity(task: Task, metric: f64) -> VerifyReport {
        VerifyReport {
            items: 10,
            runtime: "ort-cpu".into(),
            outputs: vec![OutputReport {
                name: "y".into(),
                max_abs_diff: 0.1,
                mean_cosine: 0.9,
                task: Some(task),
                task_reason: "given by --task".into(),
                metric: Some(metric),
                top1_agreement: None,
                reference_accuracy: None,
                candidate_accuracy: None,
            }],
        }
    }

    #[test]
    fn a_slower_result_or_one_under_the_floor_is_warned_about() {
        // slower beyond the noise allowance warns; a tie does not
        let w = check_result(None, None, Some(&speed(0.8)));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("slower than the original on ort-cpu"),
            "{w:?}"
        );
        assert!(check_result(None, None, Some(&speed(0.97))).is_empty());
        // the floor is the task's metric; without a floor, the default's
        let f = fidelity(Task::Dense, 0.6);
        assert!(check_result(Some(&f), Some(0.5), None).is_empty());
        let w = check_result(Some(&f), Some(0.7), None);
        assert!(w[0].starts_with("IoU of output 'y' is 60.00%"), "{w:?}");
        let w = check_result(Some(&fidelity(Task::Ctc, 0.3)), None, None);
        assert!(
            w[0].contains("(the default; set one with --min-agreement)"),
            "{w:?}"
        );
        // a floor given that nothing can check is a failed check; the default is silent
        assert_eq!(check_result(None, Some(0.9), None).len(), 1);
        assert!(check_result(None, None, None).is_empty());
    }
}
