//! `whittle compress`: run a recipe's steps (or the one method the flags name) on a model, check
//! the result, report its fidelity on held-apart items and write it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use whittle_calib::{Dataset, Preprocess};
use whittle_compress::cleanup::{self, CleanupReport};
use whittle_compress::groups::{self, Groups};
use whittle_compress::latency::{self, SpeedCheck};
use whittle_compress::pipeline::{
    self, Calibration, Context, MethodFlags, Progress as _, SavedPlan, Shared, StepRecord,
};
use whittle_compress::report::{self, LayerChange};
use whittle_core::{cost, shape};
use whittle_export::{VerifyOptions, VerifyReport};
use whittle_runtime::RuntimeKind;

use crate::Outcome;
use crate::progress::Bars;
use crate::table::{Table, pct, si};

/// Arguments of `whittle compress`.
#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model (never written).
    model: PathBuf,
    /// Where to write the compressed model (atomically).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Calibration data (image folder, .npy, .npz): importance, reconstruction and the fidelity check.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Preprocessing: a built-in profile or a TOML file (default: `<model>.profile.toml`).
    #[arg(long)]
    profile: Option<String>,
    /// Calibration items the methods use [default: 128; for a large input fewer, each giving
    /// more sampled positions: the summary says how many].
    #[arg(long)]
    calib_items: Option<usize>,
    /// Held-apart calibration items for the fidelity report [default: 128; fewer for a large
    /// input].
    #[arg(long)]
    holdout_items: Option<usize>,
    /// Give an input its shape, e.g. `x=1x3x48x320` (repeatable): binds its symbolic dims for
    /// costs, budgets and the passes. Without it they are bound to the calibration data's item
    /// shape; a batch axis stays symbolic (costs are per item). The written model keeps the
    /// original's dynamic dims.
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    inputs: Vec<String>,
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    methods: MethodFlags,
    /// A recipe TOML: `[calibration]` and `[[step]] method = "..."` tables, run in order (see
    /// recipes/README.md); its calibration settings replace the flags'.
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Also write the plan of every step as JSON here (`--apply-plan` replays it).
    #[arg(long)]
    plan_out: Option<PathBuf>,
    /// Replay the plans of a file written by `--plan-out`: alone, its steps with their saved
    /// options; with method flags or a recipe, their steps with the file's plans.
    #[arg(long)]
    apply_plan: Option<PathBuf>,
    /// Print the channel groups (sizes, members, why a group is frozen); without -o, stop there.
    #[arg(long)]
    explain: bool,
    /// Runtime for calibration runs and checks.
    #[arg(long, default_value = "ort-cpu")]
    runtime: RuntimeKind,
    /// Threads for ONNX Runtime.
    #[arg(long)]
    threads: Option<usize>,
    /// What the outputs are for, choosing the fidelity metric: classify (top-1 agreement), embed
    /// (cosine), dense (IoU of maps), ctc (decoded-sequence agreement). Default: guessed per
    /// output from its shape and last op, and the reason printed.
    #[arg(long)]
    task: Option<whittle_export::Task>,
    /// The floor of the task metric on held-apart items (0..1): below it the summary warns (and
    /// `--strict` exits 1). A recipe's `[checks] min_agreement` sets it too; without either the
    /// floor is 0.5 (and a result that cannot be judged is not warned about).
    #[arg(long, value_name = "F")]
    min_agreement: Option<f64>,
    /// Exit with code 1 when a check fails: under the floor, or slower than the original.
    #[arg(long)]
    strict: bool,
    /// Skip measuring the result beside the original (a second or two).
    #[arg(long)]
    no_speed_check: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
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
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    if let Some(s) = execute(&a)? {
        if a.json {
            outln!("{}", serde_json::to_string(&s)?);
        } else {
            print_summary(&s);
        }
        if s.strict && !s.warnings.is_empty() {
            return Ok(Outcome::CheckFailed(format!(
                "--strict: {}",
                s.warnings.join("; ")
            )));
        }
    }
    Ok(Outcome::Ok)
}

/// Arguments for compressing `model` into `out` with a recipe file, calibrating on `calib`
/// (no speed check: the caller measures on its target).
pub fn with_recipe(model: &Path, out: &Path, calib: &Path, recipe: &Path) -> Result<Args> {
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        a: Args,
    }
    let (m, o, c, r) = (
        model.display().to_string(),
        out.display().to_string(),
        calib.display().to_string(),
        recipe.display().to_string(),
    );
    let args = [
        "compress",
        &m,
        "-o",
        &o,
        "--calib",
        &c,
        "--recipe",
        &r,
        "--no-speed-check",
    ];
    Ok(<Wrap as clap::Parser>::try_parse_from(args)?.a)
}

/// Compress as the arguments say and return the summary (`None` for `--explain` alone).
pub fn execute(a: &Args) -> Result<Option<Summary>> {
    let started = std::time::Instant::now();
    // everything that can be refused is refused before any work
    let replay = a.apply_plan.as_deref().map(SavedPlan::read).transpose()?;
    let recipe = a.recipe.as_deref();
    let pipeline::Recipe {
        steps,
        calibration: c,
        checks,
    } = pipeline::choose_steps(recipe, &a.methods, &a.shared, replay.as_ref()).inspect_err(
        |e| {
            if let whittle_compress::Error::OldRecipe { new_form, .. } = e {
                // the recipe in the new form, above the one-line error
                eprintln!("{new_form}\n");
            }
        },
    )?;
    // a recipe's calibration settings replace the flags'
    let data = c.data.or(a.calib.clone());
    let profile = c.profile.or(a.profile.clone());
    let (items, holdout) = (c.items.or(a.calib_items), c.holdout.or(a.holdout_items));
    let floor = a.min_agreement.or(checks.min_agreement);
    if let Some(f) = floor
        && !(0.0..=1.0).contains(&f)
    {
        bail!("the fidelity floor {f} is not a fraction between 0 and 1");
    }
    if let Some(out) = &a.output {
        let same = out == &a.model
            || matches!((out.canonicalize(), a.model.canonicalize()), (Ok(x), Ok(y)) if x == y);
        if same {
            bail!(
                "output {} is the input model; whittle never overwrites its input",
                out.display()
            );
        }
    } else if !a.explain {
        bail!("give -o OUTPUT (or --explain to only list the channel groups)");
    }
    if data.is_none() && a.output.is_some() {
        for s in &steps {
            if let Some(why) = s.needs_data()? {
                bail!("--calib DATA is needed for {}: {why}", s.method());
            }
        }
    }
    let pre = match &data {
        Some(c) => super::resolve_profile(profile.as_deref(), &a.model, c)?,
        None => Preprocess::default(),
    };
    let overrides = super::parse_overrides(&a.inputs)?;
    let data = data.as_ref().map(|p| Dataset::open(p)).transpose()?;
    let original = super::load_model(&a.model)?;
    let mut model = original.clone();
    let clean = cleanup::cleanup(&mut model).context("cleanup")?;
    if a.explain {
        let gs = groups::analyse(&model).context("channel groups")?;
        print_groups(&gs, a.json && a.output.is_none());
        if a.output.is_none() {
            return Ok(None);
        }
    }
    // symbolic dims bound first: the work is sized by the MACs at the shape the model runs at
    let binding = pipeline::bind_shapes(&mut model, &overrides, data.as_ref().map(|d| (d, &pre)))?;
    let before = cost::count(&model, &shape::infer(&model, &[])?);
    let scale = pipeline::work_scale(before.macs);
    let items = items.unwrap_or(pipeline::scaled_items(128, scale, 16));
    let holdout = holdout.unwrap_or(pipeline::scaled_items(128, scale, 32));
    let calib = data
        .as_ref()
        .map(|d| Calibration::split(d, &pre, items))
        .transpose()?;
    let holdout: Vec<usize> = calib
        .as_ref()
        .map(|c| c.held_apart.iter().copied().take(holdout).collect())
        .unwrap_or_default();
    let held_apart = calib
        .as_ref()
        .map(|c| c.held_apart.clone())
        .unwrap_or_default();
    let large_input = (scale < 1.0 && calib.is_some()).then(|| {
        format!(
            "large input ({} MACs per item): {} calibration items (more positions sampled from each), {} held apart for the fidelity report; --calib-items, --holdout-items and --sensitivity-items change them",
            si(before.macs),
            items,
            holdout.len()
        )
    });
    let bars = Bars::default();
    let cx = Context {
        calib,
        scale,
        runtime: a.runtime,
        threads: a.threads,
        progress: &bars,
    };
    let (mut current, records) = pipeline::run(&model, &steps, &cx, replay.as_ref())?;
    let mut bound_original = original.clone();
    shape::bind_symbols(&mut bound_original, &binding.sizes);
    let speed = if a.no_speed_check || a.output.is_none() {
        None
    } else {
        bars.start("speed beside the original", 0);
        let s = latency::compare_speed(&bound_original, &current, a.runtime, a.threads);
        bars.finish();
        Some(s?)
    };
    let after = cost::count(&current, &shape::infer(&current, &[])?);
    let layers = report::layer_changes(&model, &current)?;
    let opts = VerifyOptions {
        runtime: a.runtime,
        threads: a.threads,
        batch: ((32.0 * scale).round() as usize).max(1),
        limit: None,
        task: a.task,
    };
    let (o, c) = (bound_original.to_bytes(), current.to_bytes());
    let fidelity = match &data {
        Some(d) if !holdout.is_empty() => Some(whittle_export::verify::verify_items(
            &o,
            &c,
            d,
            &holdout,
            &pre,
            &opts,
            &mut |_, _| {},
        )?),
        _ => None,
    };
    let warnings = check_result(fidelity.as_ref(), floor, speed.as_ref());
    binding.restore(&mut current);
    if let Some(out) = &a.output {
        whittle_export::save_model(&current, out, Some(&a.model), false)?;
    }
    if let Some(path) = &a.plan_out {
        let plan = SavedPlan {
            steps: records.iter().map(StepRecord::saved).collect(),
        };
        whittle_export::write_atomic(path, serde_json::to_string_pretty(&plan)?.as_bytes())?;
    }
    Ok(Some(Summary {
        input: a.model.display().to_string(),
        output: a.output.as_ref().map(|p| p.display().to_string()),
        cleanup: clean,
        params: (before.params, after.params),
        macs: (before.macs, after.macs),
        macs_kept: after.macs as f64 / before.macs.max(1) as f64,
        costed_at: before.costed_at_text(),
        unknown_dims: before.unknown_dims.iter().map(|d| d.to_string()).collect(),
        fidelity,
        layers,
        reports: records
            .iter()
            .map(|r| (r.method, r.report.clone()))
            .collect(),
        steps: records,
        seconds: started.elapsed().as_secs_f64(),
        held_apart,
        speed,
        warnings,
        large_input,
        strict: a.strict || checks.strict == Some(true),
    }))
}

/// The floor of the task metric when neither `--min-agreement` nor the recipe gives one.
const DEFAULT_FLOOR: f64 = 0.5;

/// The checks a written result must meet: the floor of its task metric, and no slower than the
/// original (a line each that fails). A floor given with nothing to check it on fails too.
fn check_result(
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

fn print_groups(gs: &Groups, json: bool) {
    if json {
        outln!("{}", serde_json::to_string(gs).unwrap_or_default());
        return;
    }
    let mut t = Table::new(&["group", "channels", "members", "producers", "status"]);
    for g in &gs.groups {
        let prods = g.producers();
        let shown = if prods.len() > 3 {
            format!("{}, ... ({} in all)", prods[..3].join(", "), prods.len())
        } else {
            prods.join(", ")
        };
        t.row(vec![
            g.id.to_string(),
            g.size.to_string(),
            g.members.len().to_string(),
            shown,
            g.frozen
                .as_ref()
                .map(|r| format!("frozen: {r}"))
                .unwrap_or_else(|| "prunable".into()),
        ]);
    }
    out!("{}", t.render());
    outln!();
}

fn print_summary(s: &Summary) {
    let mut t = Table::new(&["layer", "op", "channels", "params", "MACs"]);
    for l in &s.layers {
        t.row(vec![
            l.name.clone(),
            l.op.clone(),
            format!("{} -> {}", l.channels_before, l.channels_after),
            format!("{} -> {}", si(l.params_before), si(l.params_after)),
            format!("{} -> {}", si(l.macs_before), si(l.macs_after)),
        ]);
    }
    out!("{}", t.render());
    let macs = if s.unknown_dims.is_empty() {
        format!(
            "MACs {} -> {} ({} kept) at {}",
            si(s.macs.0),
            si(s.macs.1),
            pct(s.macs_kept),
            s.costed_at
        )
    } else {
        format!(
            "MACs not counted: {} unknown (give --input)",
            s.unknown_dims.join(", ")
        )
    };
    outln!(
        "\nparams {} -> {} ({}), {macs}; {:.1} s",
        si(s.params.0),
        si(s.params.1),
        pct(s.params.1 as f64 / s.params.0.max(1) as f64),
        s.seconds
    );
    if let Some(l) = &s.large_input {
        outln!("{l}");
    }
    for r in &s.steps {
        for l in &r.lines {
            outln!("{l}");
        }
        if r.subnormals_flushed > 0 {
            outln!(
                "{}: {} subnormal weights flushed to zero",
                r.method,
                r.subnormals_flushed
            );
        }
    }
    if let Some(f) = &s.fidelity {
        for o in &f.outputs {
            outln!(
                "fidelity on {} held-apart items: {}",
                f.items,
                fidelity_line(o)
            );
        }
    }
    if let Some(v) = &s.speed {
        outln!(
            "speed on {}: {:.2}x ({:.3} -> {:.3} ms per item, {} side-by-side rounds)",
            v.runtime,
            v.speedup,
            v.original_ms,
            v.result_ms,
            v.rounds
        );
    }
    for w in &s.warnings {
        outln!("warning: {w}");
    }
    if let Some(o) = &s.output {
        outln!("wrote {o}");
    }
}

/// One output's fidelity: its task (and why), the task metric, the cosine, accuracies.
fn fidelity_line(o: &whittle_export::OutputReport) -> String {
    let task = match (o.task, o.metric) {
        (Some(t), Some(v)) => format!(
            ", {} {} (task {t}: {})",
            t.metric_name(),
            pct(v),
            o.task_reason
        ),
        _ => format!(" (no task metric: {})", o.task_reason),
    };
    format!(
        "output '{}' mean cosine {:.4}{task}{}",
        o.name,
        o.mean_cosine,
        match (o.reference_accuracy, o.candidate_accuracy) {
            (Some(r), Some(c)) => format!(", accuracy {} -> {}", pct(r), pct(c)),
            _ => String::new(),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use whittle_export::{OutputReport, Task};

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
