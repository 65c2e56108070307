//! `whittle compress`: run a recipe's steps (or the one method the flags name) on a model, check
//! the result, report its fidelity on held-apart items and write it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use whittle_calib::{Dataset, Preprocess};
use whittle_compress::cleanup::{self, CleanupReport};
use whittle_compress::groups::{self, Groups};
use whittle_compress::pipeline::{
    self, Calibration, Context, MethodFlags, SavedPlan, Shared, StepRecord,
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
    /// Calibration items the methods use.
    #[arg(long, default_value_t = 128)]
    calib_items: usize,
    /// Held-apart calibration items for the fidelity report.
    #[arg(long, default_value_t = 128)]
    holdout_items: usize,
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
    /// MACs before / after.
    pub macs: (u64, u64),
    /// Fraction of MACs kept.
    pub macs_kept: f64,
    /// The result against the original on held-apart calibration items.
    pub fidelity: Option<VerifyReport>,
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
    }
    Ok(Outcome::Ok)
}

/// Arguments for compressing `model` into `out` with a recipe file, calibrating on `calib`.
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
    let args = ["compress", &m, "-o", &o, "--calib", &c, "--recipe", &r];
    Ok(<Wrap as clap::Parser>::try_parse_from(args)?.a)
}

/// Compress as the arguments say and return the summary (`None` for `--explain` alone).
pub fn execute(a: &Args) -> Result<Option<Summary>> {
    let started = std::time::Instant::now();
    // everything that can be refused is refused before any work
    let replay = a.apply_plan.as_deref().map(SavedPlan::read).transpose()?;
    let recipe = a.recipe.as_deref();
    let (steps, c) = pipeline::choose_steps(recipe, &a.methods, &a.shared, replay.as_ref())
        .inspect_err(|e| {
            if let whittle_compress::Error::OldRecipe { new_form, .. } = e {
                // the recipe in the new form, above the one-line error
                eprintln!("{new_form}\n");
            }
        })?;
    // a recipe's calibration settings replace the flags'
    let data = c.data.or(a.calib.clone());
    let profile = c.profile.or(a.profile.clone());
    let (items, holdout) = (
        c.items.unwrap_or(a.calib_items),
        c.holdout.unwrap_or(a.holdout_items),
    );
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
    let bars = Bars::default();
    let cx = Context {
        calib,
        runtime: a.runtime,
        threads: a.threads,
        progress: &bars,
    };
    let (current, records) = pipeline::run(&model, &steps, &cx, replay.as_ref())?;
    let opts = VerifyOptions {
        runtime: a.runtime,
        threads: a.threads,
        batch: 32,
        limit: None,
    };
    let (o, c) = (original.to_bytes(), current.to_bytes());
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
    if let Some(out) = &a.output {
        whittle_export::save_model(&current, out, Some(&a.model), false)?;
    }
    if let Some(path) = &a.plan_out {
        let plan = SavedPlan {
            steps: records.iter().map(StepRecord::saved).collect(),
        };
        whittle_export::write_atomic(path, serde_json::to_string_pretty(&plan)?.as_bytes())?;
    }
    let after = cost::count(&current, &shape::infer(&current, &[])?);
    let before = cost::count(&original, &shape::infer(&original, &[])?);
    Ok(Some(Summary {
        input: a.model.display().to_string(),
        output: a.output.as_ref().map(|p| p.display().to_string()),
        cleanup: clean,
        params: (before.params, after.params),
        macs: (before.macs, after.macs),
        macs_kept: after.macs as f64 / before.macs.max(1) as f64,
        fidelity,
        layers: report::layer_changes(&model, &current)?,
        reports: records
            .iter()
            .map(|r| (r.method, r.report.clone()))
            .collect(),
        steps: records,
        seconds: started.elapsed().as_secs_f64(),
        held_apart,
    }))
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
    outln!(
        "\nparams {} -> {} ({}), MACs {} -> {} ({} kept); {:.1} s",
        si(s.params.0),
        si(s.params.1),
        pct(s.params.1 as f64 / s.params.0.max(1) as f64),
        si(s.macs.0),
        si(s.macs.1),
        pct(s.macs_kept),
        s.seconds
    );
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
                "fidelity on {} held-apart items: output '{}' mean cosine {:.4}{}{}",
                f.items,
                o.name,
                o.mean_cosine,
                o.top1_agreement
                    .map(|v| format!(", top-1 agreement {}", pct(v)))
                    .unwrap_or_default(),
                match (o.reference_accuracy, o.candidate_accuracy) {
                    (Some(r), Some(c)) => format!(", accuracy {} -> {}", pct(r), pct(c)),
                    _ => String::new(),
                }
            );
        }
    }
    if let Some(o) = &s.output {
        outln!("wrote {o}");
    }
}
