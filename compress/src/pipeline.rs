//! The compression pipeline: a recipe is an ordered list of steps, each step one registered
//! [`Method`]; every step plans, applies, and is checked before the next one runs.
//!
//! A method is one file under `compress/src/` that implements [`Method`] and one line in
//! [`METHODS`]. Its options are one struct that clap maps from flags and serde reads from a recipe
//! step (`[[step]] method = "NAME" ...`); its plan is serialisable (`--plan-out` saves it,
//! `--apply-plan` replays it); its report is serialised into the summary and described in a few
//! lines. After every step the pipeline checks the graph (topological order, every input
//! produced), infers shapes end to end, flushes subnormal floats to zero and refuses NaN or
//! infinity in any float initializer, and runs the model once in the runtime, which must give the
//! original's output shapes; a failure names the step and what failed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use whittle_calib::{CaptureSpec, Dataset, Preprocess};
use whittle_core::Model;
use whittle_runtime::RuntimeKind;

use crate::Error;

/// The registered methods: a recipe step's `method` names one of them, and their flags are
/// `whittle compress`'s.
pub static METHODS: &[Entry] = &[
    entry::<crate::prune_channels::PruneChannels>(),
    entry::<crate::lowrank::LowRank>(),
    entry::<crate::merging::Merge>(),
    entry::<crate::drop_blocks::DropBlocks>(),
    entry::<crate::prune_ffn::PruneFfn>(),
    entry::<crate::prune_heads::PruneHeads>(),
    entry::<crate::drop_attention::DropAttention>(),
    entry::<crate::quantize::Quantize>(),
];

/// A compression method: options, a plan that can be saved and replayed, and a report.
pub trait Method: 'static {
    /// The name of a recipe step (`method = "..."`) and of its summary entry.
    const NAME: &'static str;
    /// Options: clap reads them from `whittle compress`'s flags, serde from a recipe step (give
    /// each clap argument an `id` unique among all methods).
    type Options: clap::Args + Serialize + DeserializeOwned + Default;
    /// What was decided (which channels, ranks, merges, blocks): saved by `--plan-out`.
    type Plan: Serialize + DeserializeOwned;
    /// What was done, for the summary and `--json`.
    type Report: Serialize;

    /// Whether the flags ask for this method.
    fn requested(options: &Self::Options) -> bool;
    /// Fill what the options leave unset from the shared settings (the flags, or a recipe's
    /// defaults: never another step's settings).
    fn inherit(_options: &mut Self::Options, _shared: &Shared) {}
    /// Refuse options that cannot work, before any work.
    fn validate(_options: &Self::Options) -> Result<(), Error> {
        Ok(())
    }
    /// Why the method needs calibration data, or `None` when it does not with these options.
    fn needs_data(_options: &Self::Options) -> Option<&'static str> {
        Some("it is fitted and judged on calibration data")
    }
    /// Plan and apply (or apply `replay`, a plan saved earlier) to `model`.
    fn run(
        options: &Self::Options,
        model: &mut Model,
        cx: &Context,
        replay: Option<Self::Plan>,
    ) -> Result<(Self::Plan, Self::Report), Error>;
    /// The report in a few lines for people.
    fn describe(report: &Self::Report) -> Vec<String>;
}

/// Settings several methods share, given once as flags. A recipe step sets its own; what a step
/// leaves out takes the default here, never another step's value.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct Shared {
    /// Budget: `macs=0.75`, `params=0.5` or `latency=0.7` (the fraction kept); depth merging also
    /// takes `damage=D`.
    #[arg(long, default_value = "macs=0.75")]
    pub target: String,
    /// Latency table for `latency=` budgets, from `whittle profile MODEL -o TABLE` (default:
    /// measure one now on --runtime); `--merge` reads the merge candidates' latencies from it
    /// (`whittle profile --merge`).
    #[arg(long)]
    pub latency_table: Option<PathBuf>,
    /// Kept channel counts (and ranks) are multiples of this (4, 8, 16 suit SIMD and tensor cores).
    #[arg(long, default_value_t = 1)]
    pub round_to: usize,
    /// Skip the least-squares reconstruction after each cut (for comparison).
    #[arg(long)]
    pub no_reconstruct: bool,
    /// Ridge strength of the reconstruction, relative to the mean diagonal.
    #[arg(long, default_value_t = 1e-3)]
    pub ridge: f64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            target: "macs=0.75".into(),
            latency_table: None,
            round_to: 1,
            no_reconstruct: false,
            ridge: 1e-3,
        }
    }
}

/// Progress of long work, shown by the caller (bars on stderr in the CLI).
pub trait Progress {
    /// Work called `label` begins, `total` steps long (0: unknown).
    fn start(&self, label: &str, total: usize);
    /// Steps done of the current work.
    fn set(&self, done: usize);
    /// The current work ended.
    fn finish(&self);
}

/// No progress shown.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: &str, _: usize) {}
    fn set(&self, _: usize) {}
    fn finish(&self) {}
}

/// The calibration data and its one split: the items methods fit and judge on, and the items
/// held apart (never seen by a method). Callers that judge the result (the fidelity report,
/// `deploy`) take the held-apart items from here.
pub struct Calibration<'a> {
    /// The data.
    pub dataset: &'a Dataset,
    /// Its preprocessing.
    pub pre: &'a Preprocess,
    /// Items the methods use.
    pub fit: Vec<usize>,
    /// Every other item, in the split's order.
    pub held_apart: Vec<usize>,
}

impl<'a> Calibration<'a> {
    /// `items` calibration items (fewer if the data has fewer), drawn by a fixed seed.
    pub fn split(
        dataset: &'a Dataset,
        pre: &'a Preprocess,
        items: usize,
    ) -> Result<Calibration<'a>, Error> {
        let n = items.min(dataset.len());
        let (fit, held_apart) = dataset.split(n as f64 / dataset.len().max(1) as f64, 0)?;
        Ok(Calibration {
            dataset,
            pre,
            fit,
            held_apart,
        })
    }
}

/// The symbolic dims of a model bound for compression (see [`bind_shapes`]), and its declared
/// inputs and outputs to restore before it is written.
pub struct Binding {
    /// The sizes given to symbols (`x_dim2 = 48`); a batch axis stays symbolic.
    pub sizes: std::collections::BTreeMap<String, i64>,
    /// The declared inputs, outputs and value_info before binding.
    pub declared: whittle_core::shape::DeclaredIo,
}

impl Binding {
    /// Make the dims the binding fixed dynamic again in `model` (a result about to be written).
    pub fn restore(&self, model: &mut Model) {
        whittle_core::shape::restore_io(model, &self.declared);
    }
}

/// Bind every symbolic dim of `model`'s inputs other than a batch axis, so that costs, budgets
/// and passes see the shapes the model runs at: first from `given` (`--input x=1x3x48x320`),
/// then from the calibration data's first item (an image after its preprocessing, a tensor's
/// item shape), as calibration runs read them. A batch axis stays symbolic (calibration runs in
/// batches; costs count it as 1), even when `given` sizes it. A dim neither fixes stays
/// symbolic: a MAC budget then refuses, naming it.
pub fn bind_shapes(
    model: &mut Model,
    given: &[(String, Vec<i64>)],
    data: Option<(&Dataset, &Preprocess)>,
) -> Result<Binding, Error> {
    use whittle_core::shape::{self, Dim};
    let declared = shape::declared_io(model);
    let unbound = shape::infer(model, &[])?;
    let batch: std::collections::BTreeSet<String> = unbound
        .batch_symbols()
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut overrides: Vec<(String, Vec<i64>)> = given.to_vec();
    if let Some((dataset, pre)) = data {
        for v in model.inputs() {
            if given.iter().any(|(n, _)| n == v.name()) {
                continue;
            }
            let Some(decl) = shape::value_info_type(v).and_then(|t| t.shape) else {
                continue;
            };
            let symbolic = |d: &Dim| matches!(d, Dim::Sym(s) if !batch.contains(s));
            if !decl.iter().any(symbolic) {
                continue;
            }
            let Some(item) = dataset.item_shape_with(v.name(), pre, 0)? else {
                continue;
            };
            if item.len() + 1 != decl.len() {
                continue; // the first run names the mismatch
            }
            let first = decl[0].known().unwrap_or(1);
            let dims = std::iter::once(first)
                .chain(item.iter().map(|&d| d as i64))
                .collect();
            overrides.push((v.name().to_string(), dims));
        }
    }
    let info = shape::infer(model, &overrides)?;
    let sizes: std::collections::BTreeMap<String, i64> = info
        .bound
        .into_iter()
        .filter(|(s, _)| !batch.contains(s))
        .collect();
    shape::bind_symbols(model, &sizes);
    Ok(Binding { sizes, declared })
}

/// MACs per item up to which calibration work keeps its defaults (EfficientNet-Lite0 at 224x224
/// is 0.39 G, ResNet-56 0.13 G).
pub const LARGE_INPUT_MACS: f64 = 0.5e9;

/// How much of the default calibration work a model of `macs` per item gets: 1 up to
/// [`LARGE_INPUT_MACS`], then in inverse proportion (at least 1/8). A large input (a 640x640
/// detector: 3 G) brings many more positions per item, and every run of it costs as much as
/// several small ones: fewer items, more positions sampled from each (see
/// [`Context::rows_per_item`]) keep the statistics' rows and the time about constant.
pub fn work_scale(macs: u64) -> f64 {
    (LARGE_INPUT_MACS / (macs as f64).max(1.0)).clamp(0.125, 1.0)
}

/// `default` calibration items scaled by `scale`, at least `floor` (and never above `default`).
pub fn scaled_items(default: usize, scale: f64, floor: usize) -> usize {
    ((default as f64 * scale).round() as usize)
        .max(floor)
        .min(default)
}

/// What every step is given: the calibration split, the runtime and its threads, progress.
pub struct Context<'a> {
    /// Calibration data, when given.
    pub calib: Option<Calibration<'a>>,
    /// The share of the default calibration work (items of sensitivity, ...) this model gets:
    /// [`work_scale`] of its MACs per item.
    pub scale: f64,
    /// The runtime calibration runs, measurements and the checks use.
    pub runtime: RuntimeKind,
    /// Its threads.
    pub threads: Option<usize>,
    /// Progress display.
    pub progress: &'a dyn Progress,
}

impl<'a> Context<'a> {
    /// The calibration data, or an error saying that `method` needs it.
    pub fn data(&self, method: &str) -> Result<&Calibration<'a>, Error> {
        self.calib.as_ref().ok_or_else(|| Error::Pass {
            pass: method.into(),
            reason: "needs calibration data (--calib DATA)".into(),
        })
    }

    /// A capture over some calibration items.
    pub fn spec<'b>(&'b self, c: &'b Calibration<'a>, indices: &'b [usize]) -> CaptureSpec<'b> {
        CaptureSpec {
            dataset: c.dataset,
            indices,
            pre: c.pre,
            batch: ((16.0 * self.scale).round() as usize).max(1),
            runtime: self.runtime,
            threads: self.threads,
        }
    }

    /// Items for work whose default is `default` items (sensitivity, judging): scaled by
    /// [`Context::scale`], at least 4 (a large input's output has many values per item).
    pub fn items(&self, default: usize) -> usize {
        scaled_items(default, self.scale, 4)
    }

    /// Conv output positions sampled per calibration item by a refit: 64, more for large inputs
    /// (fewer items, as many rows).
    pub fn rows_per_item(&self) -> usize {
        (64.0 / self.scale.max(0.01)).round() as usize
    }

    /// The calibration items split in two for methods that judge what they fit: the first
    /// `judge` items (at most half) judge, the others fit.
    pub fn judge_split<'b>(c: &'b Calibration<'a>, judge: usize) -> (&'b [usize], &'b [usize]) {
        let n = judge.min(c.fit.len() / 2).max(1).min(c.fit.len());
        c.fit.split_at(n)
    }

    /// The reference outputs of `model` on `indices`, to measure a candidate's damage.
    pub fn reference(&self, model: &Model, indices: &[usize]) -> Result<Reference, Error> {
        let c = self.data("damage")?;
        Reference::new(model, c.dataset, indices, c.pre, self.runtime, self.threads)
    }

    /// Show progress of `work` over `total` steps.
    pub fn start(&self, work: &str, total: usize) {
        self.progress.start(work, total);
    }
}

/// A model's outputs on a few calibration items: the damage of a candidate is measured against
/// them, one metric for every method.
pub struct Reference {
    inputs: Vec<Vec<whittle_core::Value>>,
    outputs: Vec<Vec<Vec<f32>>>,
    runtime: RuntimeKind,
    threads: Option<usize>,
}

impl Reference {
    /// Run `model` on the items `idx` of `d` (whole batches only when its batch is fixed).
    pub fn new(
        model: &Model,
        d: &Dataset,
        idx: &[usize],
        pre: &Preprocess,
        runtime: RuntimeKind,
        threads: Option<usize>,
    ) -> Result<Reference, Error> {
        let ropts = whittle_runtime::RuntimeOptions {
            threads,
            ..Default::default()
        };
        let mut s = whittle_runtime::load(runtime, &model.to_bytes(), &ropts)?;
        let (specs, bs) = whittle_calib::input_specs(s.inputs(), 16, Some((d, pre)))?;
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        for chunk in idx.chunks(bs) {
            if chunk.len() < bs
                && matches!(
                    s.inputs().first().and_then(|i| i.dims.first()),
                    Some(whittle_runtime::Dim::Fixed(_))
                )
            {
                break;
            }
            let b = d.load_batch(chunk, &specs, pre)?;
            let o = s.run(&b.inputs)?;
            outputs.push(o.iter().map(|v| v.to_f32_vec()).collect());
            inputs.push(b.inputs);
        }
        Ok(Reference {
            inputs,
            outputs,
            runtime,
            threads,
        })
    }

    /// Sum over outputs of ‖y − y'‖² / ‖y − mean(y)‖² (0: identical outputs).
    pub fn damage(&self, candidate: &Model) -> Result<f64, Error> {
        let ropts = whittle_runtime::RuntimeOptions {
            threads: self.threads,
            ..Default::default()
        };
        let mut s = whittle_runtime::load(self.runtime, &candidate.to_bytes(), &ropts)?;
        let n_out = self.outputs.first().map_or(0, |o| o.len());
        let (mut err, mut sq, mut sum, mut count) = (
            vec![0f64; n_out],
            vec![0f64; n_out],
            vec![0f64; n_out],
            vec![0f64; n_out],
        );
        for (inp, refo) in self.inputs.iter().zip(&self.outputs) {
            let o = s.run(inp)?;
            for (k, (y, yc)) in refo.iter().zip(&o).enumerate() {
                for (a, b) in y.iter().zip(yc.to_f32_vec()) {
                    err[k] += (*a as f64 - b as f64).powi(2);
                    sum[k] += *a as f64;
                    sq[k] += (*a as f64).powi(2);
                    count[k] += 1.0;
                }
            }
        }
        Ok((0..n_out)
            .map(|k| {
                let mean = sum[k] / count[k].max(1.0);
                err[k] / (sq[k] - count[k] * mean * mean).max(1e-12)
            })
            .sum())
    }
}

/// A registered method, its types erased: what the registry, recipes and plans hold.
pub struct Entry {
    /// The method's name.
    pub name: &'static str,
    augment: fn(clap::Command) -> clap::Command,
    from_flags: fn(&clap::ArgMatches) -> Result<(bool, Value), clap::Error>,
    from_step: fn(toml::Table, &Shared) -> Result<Value, String>,
    inherit: fn(Value, &Shared) -> Result<Value, Error>,
    validate: fn(&Value) -> Result<(), Error>,
    needs_data: fn(&Value) -> Result<Option<&'static str>, Error>,
    run: fn(&Value, &mut Model, &Context, Option<Value>) -> Result<StepOutput, Error>,
}

/// What one step returns, types erased.
struct StepOutput {
    plan: Value,
    report: Value,
    lines: Vec<String>,
}

/// The registry line of a method.
pub const fn entry<M: Method>() -> Entry {
    Entry {
        name: M::NAME,
        augment: augment::<M>,
        from_flags: from_flags::<M>,
        from_step: from_step::<M>,
        inherit: inherit::<M>,
        validate: validate::<M>,
        needs_data: needs_data::<M>,
        run: run_typed::<M>,
    }
}

fn options<M: Method>(v: &Value) -> Result<M::Options, Error> {
    serde_json::from_value(v.clone()).map_err(|e| Error::Pass {
        pass: M::NAME.into(),
        reason: format!("options: {e}"),
    })
}

fn to_value<T: Serialize>(what: &str, x: &T) -> Result<Value, Error> {
    serde_json::to_value(x).map_err(|e| Error::Pass {
        pass: what.into(),
        reason: format!("serialising: {e}"),
    })
}

fn augment<M: Method>(cmd: clap::Command) -> clap::Command {
    <M::Options as clap::Args>::augment_args(cmd)
}

fn from_flags<M: Method>(m: &clap::ArgMatches) -> Result<(bool, Value), clap::Error> {
    let o = <M::Options as clap::FromArgMatches>::from_arg_matches(m)?;
    let v = serde_json::to_value(&o)
        .map_err(|e| clap::Error::raw(clap::error::ErrorKind::InvalidValue, e))?;
    Ok((M::requested(&o), v))
}

fn from_step<M: Method>(t: toml::Table, shared: &Shared) -> Result<Value, String> {
    let keys: Vec<String> = t.keys().cloned().collect();
    let mut o: M::Options = toml::Value::Table(t)
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    // every key must be an option (options serialise every field they read)
    let known = serde_json::to_value(&o).map_err(|e| e.to_string())?;
    if let Some(k) = keys.iter().find(|k| known.get(k.as_str()).is_none()) {
        let mut names: Vec<&String> = known
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        names.sort();
        return Err(format!(
            "unknown key '{k}' (options of {}: {})",
            M::NAME,
            names
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    M::inherit(&mut o, shared);
    serde_json::to_value(&o).map_err(|e| e.to_string())
}

fn inherit<M: Method>(v: Value, shared: &Shared) -> Result<Value, Error> {
    let mut o = options::<M>(&v)?;
    M::inherit(&mut o, shared);
    to_value(M::NAME, &o)
}

fn validate<M: Method>(v: &Value) -> Result<(), Error> {
    M::validate(&options::<M>(v)?)
}

fn needs_data<M: Method>(v: &Value) -> Result<Option<&'static str>, Error> {
    Ok(M::needs_data(&options::<M>(v)?))
}

fn run_typed<M: Method>(
    v: &Value,
    model: &mut Model,
    cx: &Context,
    replay: Option<Value>,
) -> Result<StepOutput, Error> {
    let o = options::<M>(v)?;
    let replay = replay
        .map(|p| {
            serde_json::from_value::<M::Plan>(p)
                .map_err(|e| Error::Plan(format!("{}: {e}", M::NAME)))
        })
        .transpose()?;
    let (plan, report) = M::run(&o, model, cx, replay)?;
    Ok(StepOutput {
        plan: to_value(M::NAME, &plan)?,
        report: to_value(M::NAME, &report)?,
        lines: M::describe(&report),
    })
}

/// The method called `name`.
pub fn method(name: &str) -> Result<&'static Entry, Error> {
    METHODS.iter().find(|e| e.name == name).ok_or_else(|| {
        Error::Recipe(format!(
            "no method '{name}' (methods: {})",
            METHODS
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// One step of a pipeline: a method and its options (complete: shared settings filled in).
#[derive(Clone)]
pub struct Step {
    entry: &'static Entry,
    options: Value,
}

impl Step {
    /// A step of `entry` with `options` (a JSON object of the method's options).
    pub fn new(entry: &'static Entry, options: Value) -> Result<Step, Error> {
        (entry.validate)(&options)?;
        Ok(Step { entry, options })
    }

    /// The method's name.
    pub fn method(&self) -> &'static str {
        self.entry.name
    }

    /// Why this step needs calibration data, if it does.
    pub fn needs_data(&self) -> Result<Option<&'static str>, Error> {
        (self.entry.needs_data)(&self.options)
    }

    /// The options, as JSON.
    pub fn options(&self) -> &Value {
        &self.options
    }
}

/// Every method's flags, for `whittle compress` (`#[command(flatten)]`): the steps the flags ask
/// for are read with [`MethodFlags::steps`].
#[derive(Debug, Clone, Default)]
pub struct MethodFlags {
    /// Every method's options as the flags give them.
    all: Vec<(&'static str, Value)>,
    /// The methods the flags ask for.
    requested: Vec<(&'static str, Value)>,
}

impl clap::FromArgMatches for MethodFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let (mut all, mut requested) = (Vec::new(), Vec::new());
        for e in METHODS {
            let (asked, v) = (e.from_flags)(m)?;
            if asked {
                requested.push((e.name, v.clone()));
            }
            all.push((e.name, v));
        }
        Ok(MethodFlags { all, requested })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for MethodFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        METHODS.iter().fold(cmd, |c, e| (e.augment)(c))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl MethodFlags {
    /// Whether the flags ask for any method.
    pub fn any(&self) -> bool {
        !self.requested.is_empty()
    }

    /// The methods the flags ask for, by name.
    pub fn names(&self) -> Vec<&'static str> {
        self.requested.iter().map(|r| r.0).collect()
    }

    /// The step the flags ask for (one method; channel pruning when none is named), with the
    /// shared flags filled in.
    pub fn steps(&self, shared: &Shared) -> Result<Vec<Step>, Error> {
        let (name, v) = match self.requested.as_slice() {
            [] => {
                let name = crate::prune_channels::PruneChannels::NAME;
                self.all
                    .iter()
                    .find(|a| a.0 == name)
                    .cloned()
                    .ok_or_else(|| Error::Recipe(format!("no method {name}")))?
            }
            [one] => one.clone(),
            many => {
                return Err(Error::Recipe(format!(
                    "the flags ask for {} methods ({}): together they need a recipe, where each step has its own settings and order (see recipes/README.md)",
                    many.len(),
                    many.iter().map(|m| m.0).collect::<Vec<_>>().join(", ")
                )));
            }
        };
        let e = method(name)?;
        Ok(vec![Step::new(e, (e.inherit)(v, shared)?)?])
    }
}

/// The steps to run: a recipe's, else with a plan to replay and no method flags the plan's own
/// steps, else the flags' (channel pruning when they name none); with the recipe's calibration
/// settings (empty without a recipe).
pub fn choose_steps(
    recipe: Option<&Path>,
    flags: &MethodFlags,
    shared: &Shared,
    replay: Option<&SavedPlan>,
) -> Result<Recipe, Error> {
    let flags_only = |steps| Recipe {
        calibration: CalibrationSection::default(),
        checks: ChecksSection::default(),
        steps,
    };
    match (recipe, replay) {
        (Some(_), _) if flags.any() => Err(Error::Recipe(format!(
            "--recipe and method flags ({}) together: give the methods in the recipe or as flags",
            flags.names().join(", ")
        ))),
        (Some(r), _) => read_recipe(r),
        (None, Some(p)) if !flags.any() => Ok(flags_only(p.steps()?)),
        _ => Ok(flags_only(flags.steps(shared)?)),
    }
}

/// `[checks]` of a recipe: what the result must meet. A check that fails is a warning in the
/// summary, and exit code 1 with `strict`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksSection {
    /// The floor of the task metric on the held-apart items (`--min-agreement`).
    pub min_agreement: Option<f64>,
    /// Exit with code 1 when a check fails (`--strict`).
    pub strict: Option<bool>,
}

/// `[calibration]` of a recipe.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSection {
    /// Calibration data (relative to the recipe's folder).
    pub data: Option<PathBuf>,
    /// A built-in preprocessing profile or a TOML file.
    pub profile: Option<String>,
    /// Calibration items.
    pub items: Option<usize>,
    /// Held-apart items for the fidelity report.
    pub holdout: Option<usize>,
}

/// A recipe: calibration settings, checks and the steps in order.
pub struct Recipe {
    /// `[calibration]`.
    pub calibration: CalibrationSection,
    /// `[checks]`.
    pub checks: ChecksSection,
    /// `[[step]]`s.
    pub steps: Vec<Step>,
}

/// Keys of a step whose values are paths (resolved against the recipe's folder).
const PATH_KEYS: &[&str] = &["latency_table", "candidates"];

/// Read a recipe (`[calibration]` and `[[step]] method = "..."` tables); relative paths are
/// taken from the recipe's folder.
pub fn read_recipe(path: &Path) -> Result<Recipe, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Recipe(format!("{}: {e}", path.display())))?;
    parse_recipe(&text, path)
}

/// [`read_recipe`] of a recipe's text.
pub fn parse_recipe(text: &str, path: &Path) -> Result<Recipe, Error> {
    let at = |m: String| Error::Recipe(format!("recipe {}: {m}", path.display()));
    let base = path.parent().unwrap_or(Path::new("."));
    let mut t: toml::Table = toml::from_str(text).map_err(|e| at(e.message().to_string()))?;
    let old: Vec<&str> = METHODS
        .iter()
        .map(|e| e.name)
        .filter(|n| t.contains_key(*n))
        .collect();
    if !old.is_empty() {
        return Err(Error::OldRecipe {
            path: path.display().to_string(),
            sections: format!("[{}]", old.join("], [")),
            new_form: new_form(text, &t),
        });
    }
    let calibration: CalibrationSection = match t.remove("calibration") {
        Some(v) => v
            .try_into()
            .map_err(|e: toml::de::Error| at(format!("[calibration]: {}", e.message())))?,
        None => CalibrationSection::default(),
    };
    let calibration = CalibrationSection {
        data: calibration.data.map(|d| base.join(d)),
        ..calibration
    };
    let checks: ChecksSection = match t.remove("checks") {
        Some(v) => v
            .try_into()
            .map_err(|e: toml::de::Error| at(format!("[checks]: {}", e.message())))?,
        None => ChecksSection::default(),
    };
    let steps = match t.remove("step") {
        Some(toml::Value::Array(a)) => a,
        Some(_) => return Err(at("`step` must be an array of tables: [[step]]".into())),
        None => vec![],
    };
    if let Some(k) = t.keys().next() {
        return Err(at(format!(
            "unknown section or key '{k}' (a recipe has [calibration], [checks] and [[step]] tables)"
        )));
    }
    if steps.is_empty() {
        return Err(at(format!(
            "no [[step]]: give at least one, e.g. [[step]] method = \"prune_channels\" (methods: {})",
            METHODS
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // steps before a quantize step keep channel counts that int8 kernels run at full speed
    let quantize_at = steps.iter().position(|s| {
        s.get("method").and_then(toml::Value::as_str) == Some(crate::quantize::Quantize::NAME)
    });
    let mut out = Vec::new();
    for (i, s) in steps.into_iter().enumerate() {
        let shared = match quantize_at {
            Some(q) if i < q => Shared {
                round_to: crate::quantize::INT8_ROUND_TO,
                ..Shared::default()
            },
            _ => Shared::default(),
        };
        let toml::Value::Table(mut s) = s else {
            return Err(at(format!("step {} is not a table", i + 1)));
        };
        let Some(toml::Value::String(name)) = s.remove("method") else {
            return Err(at(format!("step {} has no method = \"...\"", i + 1)));
        };
        let e = method(&name).map_err(|e| at(format!("step {}: {e}", i + 1)))?;
        for k in PATH_KEYS {
            if let Some(toml::Value::String(p)) = s.get(*k) {
                let full = base.join(p).display().to_string();
                s.insert(k.to_string(), toml::Value::String(full));
            }
        }
        let v =
            (e.from_step)(s, &shared).map_err(|m| at(format!("step {} ({name}): {m}", i + 1)))?;
        out.push(Step::new(e, v).map_err(|m| at(format!("step {} ({name}): {m}", i + 1)))?);
    }
    Ok(Recipe {
        calibration,
        checks,
        steps: out,
    })
}

/// An old recipe (one section per method, run in the file's order) written in the new form.
fn new_form(text: &str, t: &toml::Table) -> String {
    let mut sections: Vec<(usize, &str)> = METHODS
        .iter()
        .filter(|e| t.contains_key(e.name))
        .map(|e| {
            (
                text.find(&format!("[{}]", e.name)).unwrap_or(usize::MAX),
                e.name,
            )
        })
        .collect();
    sections.sort();
    let mut out = String::new();
    if let Some(c) = t.get("calibration") {
        let mut w = toml::Table::new();
        w.insert("calibration".into(), c.clone());
        out += &toml::to_string(&w).unwrap_or_default();
        out += "\n";
    }
    for (_, name) in sections {
        out += &format!("[[step]]\nmethod = \"{name}\"\n");
        if let Some(toml::Value::Table(s)) = t.get(name) {
            out += &toml::to_string(s).unwrap_or_default();
        }
        out += "\n";
    }
    out.trim_end().to_string()
}

/// A plan file (`--plan-out`): every step's method, its complete options and its plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedPlan {
    /// The steps in order.
    pub steps: Vec<SavedStep>,
}

/// One step of a plan file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedStep {
    /// The method.
    pub method: String,
    /// Its options.
    pub options: Value,
    /// Its plan.
    pub plan: Value,
}

impl SavedPlan {
    /// Read a plan file.
    pub fn read(path: &Path) -> Result<SavedPlan, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Plan(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::Plan(format!(
                "{} is not a plan written by --plan-out ({e})",
                path.display()
            ))
        })
    }

    /// The steps the plan records, with their saved options.
    pub fn steps(&self) -> Result<Vec<Step>, Error> {
        self.steps
            .iter()
            .map(|s| Step::new(method(&s.method)?, s.options.clone()))
            .collect()
    }

    /// The plan of the `k`-th step of `method` (0-based among that method's steps).
    pub fn plan_of(&self, method: &str, k: usize) -> Option<&Value> {
        self.steps
            .iter()
            .filter(|s| s.method == method)
            .nth(k)
            .map(|s| &s.plan)
    }
}

/// What one step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// The method.
    pub method: &'static str,
    /// Its options (complete).
    pub options: Value,
    /// Its plan.
    pub plan: Value,
    /// Its report.
    pub report: Value,
    /// The report in a few lines.
    pub lines: Vec<String>,
    /// Subnormal floats the step wrote, flushed to zero.
    pub subnormals_flushed: usize,
    /// Wall time of the step and its checks.
    pub seconds: f64,
}

impl StepRecord {
    /// This step as a plan file's entry.
    pub fn saved(&self) -> SavedStep {
        SavedStep {
            method: self.method.into(),
            options: self.options.clone(),
            plan: self.plan.clone(),
        }
    }
}

/// Run `steps` on `model` in order (replaying the plans of `replay` where it has one for a step),
/// checking the model after every step.
pub fn run(
    model: &Model,
    steps: &[Step],
    cx: &Context,
    replay: Option<&SavedPlan>,
) -> Result<(Model, Vec<StepRecord>), Error> {
    let checker = Checker::new(model, cx)?;
    let mut current = model.clone();
    let mut records = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let started = Instant::now();
        let name = s.method();
        let k = seen.iter().filter(|n| **n == name).count();
        seen.push(name);
        let plan = match replay {
            Some(p) => Some(p.plan_of(name, k).cloned().ok_or_else(|| {
                Error::Plan(format!(
                    "the plan has no step '{name}' to replay for step {}",
                    i + 1
                ))
            })?),
            None => None,
        };
        let step_err = |e: Error| Error::Step {
            step: i + 1,
            method: name.into(),
            cause: Box::new(e),
        };
        let mut next = current.clone();
        let out = (s.entry.run)(&s.options, &mut next, cx, plan).map_err(step_err)?;
        let flushed = checker.check(&mut next).map_err(step_err)?;
        current = next;
        records.push(StepRecord {
            method: name,
            options: s.options.clone(),
            plan: out.plan,
            report: out.report,
            lines: out.lines,
            subnormals_flushed: flushed,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok((current, records))
}

/// The checks after every step.
struct Checker {
    runtime: RuntimeKind,
    inputs: Vec<whittle_core::Value>,
    shapes: Vec<(String, Vec<usize>)>,
}

impl Checker {
    fn new(original: &Model, cx: &Context) -> Result<Checker, Error> {
        let opts = whittle_runtime::RuntimeOptions::default();
        let mut s = whittle_runtime::load(cx.runtime, &original.to_bytes(), &opts)?;
        let inputs = whittle_runtime::synthetic_inputs(s.inputs(), &[])?;
        let out = s.run(&inputs).map_err(|e| {
            // symbolic dims run as 1: say which, and how to bind them
            let info = whittle_core::shape::infer(original, &[]).unwrap_or_default();
            let batch = info.batch_symbols();
            let dims: Vec<String> = info
                .unbound_symbols()
                .into_iter()
                .filter(|d| !batch.contains(d.symbol.as_str()))
                .map(|d| d.to_string())
                .collect();
            if dims.is_empty() {
                return Error::from(e);
            }
            Error::Pass {
                pass: "the first run".into(),
                reason: format!(
                    "the model does not run with its unbound dims {} as 1; bind them with --input NAME=SHAPE or calibration data",
                    dims.join(", ")
                ),
            }
        })?;
        let shapes = s
            .outputs()
            .iter()
            .zip(&out)
            .map(|(io, v)| (io.name.clone(), v.shape().to_vec()))
            .collect();
        Ok(Checker {
            runtime: cx.runtime,
            inputs,
            shapes,
        })
    }

    /// The graph check, shape inference, finite numbers (subnormals flushed: their count), and
    /// one run with the original's output shapes.
    fn check(&self, m: &mut Model) -> Result<usize, Error> {
        let bad = |what: &str, e: String| Error::Check(format!("{what}: {e}"));
        whittle_core::check::check_graph(m.graph())
            .map_err(|e| bad("graph check", e.to_string()))?;
        whittle_core::shape::infer(m, &[]).map_err(|e| bad("shape inference", e.to_string()))?;
        let flushed = flush_subnormals(m)?;
        let opts = whittle_runtime::RuntimeOptions::default();
        let mut s = whittle_runtime::load(self.runtime, &m.to_bytes(), &opts)
            .map_err(|e| bad("the model does not load", e.to_string()))?;
        let out = s
            .run(&self.inputs)
            .map_err(|e| bad("the model does not run", e.to_string()))?;
        for ((name, want), got) in self.shapes.iter().zip(&out) {
            if got.shape() != want.as_slice() {
                return Err(Error::Check(format!(
                    "output '{name}' has shape {:?}, the original's {:?}",
                    got.shape(),
                    want
                )));
            }
        }
        Ok(flushed)
    }
}

/// Flush subnormal floats in every float initializer to zero (ONNX Runtime's x86 kernels slow
/// down by orders of magnitude on them); refuse NaN and infinity, naming the tensor.
pub fn flush_subnormals(m: &mut Model) -> Result<usize, Error> {
    use whittle_core::tensor::{from_f32, to_f32};
    const FLOAT: i32 = 1;
    let mut flushed = 0;
    let g = m.graph_mut();
    for t in g.initializer.iter_mut() {
        if t.data_type != Some(FLOAT) {
            continue;
        }
        let Ok(v) = to_f32(t) else { continue };
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            return Err(Error::Check(format!(
                "initializer '{}' holds {x}",
                t.name()
            )));
        }
        let n = v.iter().filter(|x| x.is_subnormal()).count();
        if n > 0 {
            flushed += n;
            let clean: Vec<f32> = v
                .into_iter()
                .map(|x| if x.is_subnormal() { 0.0 } else { x })
                .collect();
            let (name, dims) = (t.name().to_string(), t.dims.clone());
            *t = from_f32(&name, &dims, &clean);
        }
    }
    Ok(flushed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A method that writes what its option says: a dangling input, a NaN, or subnormals.
    struct Broken;

    #[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
    struct BrokenOptions {
        #[arg(skip)]
        how: String,
    }

    impl Method for Broken {
        const NAME: &'static str = "broken";
        type Options = BrokenOptions;
        type Plan = ();
        type Report = ();

        fn requested(_: &BrokenOptions) -> bool {
            false
        }

        fn needs_data(_: &BrokenOptions) -> Option<&'static str> {
            None
        }

        fn run(
            o: &BrokenOptions,
            model: &mut Model,
            _: &Context,
            _: Option<()>,
        ) -> Result<((), ()), Error> {
            let g = model.graph_mut();
            let t = g
                .initializer
                .iter_mut()
                .find(|t| t.dims.len() == 4)
                .expect("a conv weight");
            let mut v = whittle_core::tensor::to_f32(t).unwrap();
            match o.how.as_str() {
                "dangling" => g.node[1].input[0] = "nothing_makes_this".into(),
                "nan" => v[0] = f32::NAN,
                _ => v[..3].fill(1e-40),
            }
            let (name, dims) = (t.name().to_string(), t.dims.clone());
            if o.how != "dangling" {
                *t = whittle_core::tensor::from_f32(&name, &dims, &v);
            }
            Ok(((), ()))
        }

        fn describe(_: &()) -> Vec<String> {
            vec![]
        }
    }

    static BROKEN: Entry = entry::<Broken>();

    fn resnet8() -> Model {
        Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/resnet8_cifar10.onnx"))
            .unwrap()
    }

    fn run_broken(how: &str) -> Result<(Model, Vec<StepRecord>), Error> {
        let cx = Context {
            calib: None,
            scale: 1.0,
            runtime: RuntimeKind::OrtCpu,
            threads: Some(1),
            progress: &Quiet,
        };
        let step = Step::new(&BROKEN, serde_json::json!({ "how": how })).unwrap();
        run(&resnet8(), &[step.clone(), step], &cx, None)
    }

    #[test]
    fn a_broken_step_is_refused_with_its_name() {
        let e = run_broken("dangling").unwrap_err().to_string();
        assert!(e.contains("step 1 (broken)"), "{e}");
        assert!(e.contains("graph check"), "{e}");
        let e = run_broken("nan").unwrap_err().to_string();
        assert!(e.contains("step 1 (broken)") && e.contains("NaN"), "{e}");
    }

    #[test]
    fn subnormals_are_flushed_after_every_step() {
        let (m, records) = run_broken("subnormal").unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].subnormals_flushed, 3);
        // the second step writes them again: flushed again
        assert_eq!(records[1].subnormals_flushed, 3);
        let subnormal = m
            .graph()
            .initializer
            .iter()
            .filter_map(|t| whittle_core::tensor::to_f32(t).ok())
            .flatten()
            .filter(|x| x.is_subnormal())
            .count();
        assert_eq!(subnormal, 0);
    }

    #[test]
    fn recipes_of_the_old_form_are_refused_with_the_new_form() {
        let old = "[calibration]\nitems = 64\n\n[merge]\ntarget = \"latency=0.9\"\n\n[prune_channels]\ntarget = \"macs=0.8\"\n";
        let e = parse_recipe(old, Path::new("r.toml")).err().unwrap();
        assert!(!e.to_string().contains('\n'), "one line: {e}");
        let Error::OldRecipe { new_form, .. } = e else {
            panic!("{e}")
        };
        let r = parse_recipe(&new_form, Path::new("r.toml")).unwrap();
        let names: Vec<&str> = r.steps.iter().map(Step::method).collect();
        assert_eq!(names, ["merge", "prune_channels"], "{new_form}");
        assert_eq!(r.calibration.items, Some(64));
        assert_eq!(r.steps[1].options()["target"], "macs=0.8");
        // a step's settings are its own: the merge step's target is not the pruning step's
        assert_eq!(r.steps[0].options()["target"], "latency=0.9");
        let e = parse_recipe(
            "[[step]]\nmethod = \"prune_channels\"\nridge = 0.1\ncolour = 2\n",
            Path::new("r.toml"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("colour") && e.contains("ridge"), "{e}");
        let e = parse_recipe("[[step]]\nmethod = \"sharpen\"\n", Path::new("r.toml"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no method 'sharpen'"), "{e}");
    }

    #[test]
    fn steps_before_quantize_round_to_int8_blocks_unless_they_say() {
        let recipe = |prune: &str| {
            let text = format!(
                "[[step]]\nmethod = \"prune_channels\"\n{prune}\n[[step]]\nmethod = \"low_rank\"\n\n[[step]]\nmethod = \"quantize\"\nprecision = \"int8\"\n\n[[step]]\nmethod = \"prune_channels\"\n"
            );
            parse_recipe(&text, Path::new("r.toml")).unwrap()
        };
        let r = recipe("");
        let round: Vec<&Value> = r.steps.iter().map(|s| &s.options()["round_to"]).collect();
        // before the quantize step 16, after it the plain default
        assert_eq!(round[0], crate::quantize::INT8_ROUND_TO);
        assert_eq!(round[1], crate::quantize::INT8_ROUND_TO);
        assert_eq!(round[3], 1);
        // a step's own round_to wins
        let r = recipe("round_to = 4\n");
        assert_eq!(r.steps[0].options()["round_to"], 4);
    }
}
