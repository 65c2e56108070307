//! `whittle compress`: run a recipe's steps (or the one method the flags name) on a model, check
//! the result, report its fidelity on held-apart items and write it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use whittle_calib::{Dataset, Preprocess};
use whittle_compress::cleanup;
use whittle_compress::groups;
pub use whittle_compress::job::Summary;
use whittle_compress::job::{self, Job};
use whittle_compress::pipeline::{self, MethodFlags, SavedPlan, Shared};
use whittle_runtime::RuntimeKind;

mod print;

use print::{print_groups, print_summary};

use crate::Outcome;
use crate::progress::Bars;

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
    #[command(flatten)]
    data: super::DataArgs,
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

/// Compress as the arguments say, write the result and return the summary (`None` for
/// `--explain` alone).
pub fn execute(a: &Args) -> Result<Option<Summary>> {
    // everything that can be refused is refused before any work
    let replay = a.apply_plan.as_deref().map(SavedPlan::read).transpose()?;
    let pipeline::Recipe {
        steps,
        calibration: c,
        checks,
    } = pipeline::choose_steps(a.recipe.as_deref(), &a.methods, &a.shared, replay.as_ref())
        .inspect_err(|e| {
            if let whittle_compress::Error::OldRecipe { new_form, .. } = e {
                // the recipe in the new form, above the one-line error
                eprintln!("{new_form}\n");
            }
        })?;
    // a recipe's calibration settings replace the flags'
    let data = c.data.or(a.calib.clone());
    let profile = c.profile.or(a.data.profile.clone());
    if let Some(out) = &a.output {
        super::not_the_input(out, &a.model)?;
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
    let inputs = super::parse_overrides(&a.data.inputs)?;
    let data = data.as_ref().map(|p| Dataset::open(p)).transpose()?;
    let original = super::load_model(&a.model)?;
    if a.explain {
        let mut model = original.clone();
        cleanup::cleanup(&mut model).context("cleanup")?;
        let gs = groups::analyse(&model).context("channel groups")?;
        print_groups(&gs, a.json && a.output.is_none());
    }
    let Some(out) = &a.output else {
        return Ok(None);
    };
    let job = Job {
        original: &original,
        steps: &steps,
        replay: replay.as_ref(),
        data: data.as_ref().map(|d| (d, &pre)),
        inputs: &inputs,
        items: c.items.or(a.data.calib_items),
        holdout: c.holdout.or(a.data.holdout_items),
        floor: a.min_agreement.or(checks.min_agreement),
        strict: a.strict || checks.strict == Some(true),
        runtime: a.runtime,
        threads: a.threads,
        task: a.task,
        speed_check: !a.no_speed_check,
    };
    let (model, mut summary) = job::run(&job, &a.model.display().to_string(), &Bars::default())?;
    whittle_export::save_model(&model, out, Some(&a.model), false)?;
    summary.output = Some(out.display().to_string());
    if let Some(path) = &a.plan_out {
        let plan = serde_json::to_string_pretty(&summary.plan())?;
        whittle_export::write_atomic(path, plan.as_bytes())?;
    }
    Ok(Some(summary))
}
