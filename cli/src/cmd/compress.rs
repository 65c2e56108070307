//! `whittle compress`: prune channels (more methods to come) and repair by least squares.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use whittle_calib::capture::{CaptureSpec, capture};
use whittle_calib::{Dataset, Preprocess};
use whittle_compress::cleanup::{self, CleanupReport};
use whittle_compress::drop_attention::{self, DropAttentionReport};
use whittle_compress::drop_blocks::{self, DropOptions, DropReport};
use whittle_compress::groups::{self, Groups};
use whittle_compress::latency::LatencyTable;
use whittle_compress::lowrank::{self, LowRankOptions, LowRankReport, RankRule, Scheme};
use whittle_compress::prune::{self, Budget, Importance, Plan, PruneOptions};
use whittle_compress::prune_ffn::{self, WidthOptions, WidthReport};
use whittle_compress::prune_heads;
use whittle_compress::refit::{self, RefitJob, RefitOptions, RefitReport};
use whittle_core::{Model, cost, shape};
use whittle_export::{VerifyOptions, VerifyReport};
use whittle_runtime::RuntimeKind;

use crate::Outcome;
use crate::progress::bar;

mod merging;
use crate::table::{Table, pct, si};
use merging::{MergeSummary, merge_goal, merge_stage};

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
    /// Calibration items used for importance and reconstruction.
    #[arg(long, default_value_t = 128)]
    calib_items: usize,
    /// Held-apart calibration items for the fidelity report.
    #[arg(long, default_value_t = 128)]
    holdout_items: usize,
    /// Prune channels (the default method when no other is given).
    #[arg(long)]
    prune_channels: bool,
    /// Factorise layers into two thinner ones (truncated SVD) instead of pruning; combine both
    /// with a recipe (each method gets its own target).
    #[arg(long)]
    low_rank: bool,
    /// Low rank: channel (C→r same kernel, r→N 1×1), spatial (kh×1 then 1×kw) or auto (per layer).
    #[arg(long, default_value = "auto")]
    scheme: String,
    /// Merge consecutive convolutions (removing activations between them where that pays), chosen
    /// by a dynamic programme over measured latencies and damages: `--target latency=F` (the
    /// least damage keeping that latency fraction) or `--target damage=D` (the most latency
    /// saved within that output damage).
    #[arg(long)]
    merge: bool,
    /// Transformers: remove this many consecutive blocks (the span whose entering and leaving
    /// hidden states are closest on the calibration data, or the one at --drop-start).
    #[arg(long, value_name = "N")]
    drop_blocks: Option<usize>,
    /// Transformers: remove the attention of this many blocks (those that change the hidden state
    /// least on the calibration data), keeping their feed-forward parts.
    #[arg(long, value_name = "N")]
    drop_attention: Option<usize>,
    /// Transformers: remove this fraction of every block's feed-forward neurons (by mean
    /// |activation| times output-row norm), refitting the down projection.
    #[arg(long, value_name = "FRACTION")]
    prune_ffn: Option<f64>,
    /// Transformers: remove this fraction of every block's attention heads (by the norm of their
    /// output), refitting the output projection.
    #[arg(long, value_name = "FRACTION")]
    prune_heads: Option<f64>,
    /// With --drop-blocks: replace the span by one affine map fitted by least squares (ReplaceMe)
    /// instead of removing it outright.
    #[arg(long)]
    linear_replace: bool,
    /// With --drop-blocks: remove the span starting at this block (0-based; see `whittle inspect`).
    #[arg(long, value_name = "BLOCK")]
    drop_start: Option<usize>,
    /// Low rank: factorise against the calibration inputs' statistics (channel-wise).
    #[arg(long)]
    data_aware: bool,
    /// Low rank: the same rank for every layer (instead of --target).
    #[arg(long, conflicts_with_all = ["rank_fraction", "rank_energy"])]
    rank: Option<usize>,
    /// Low rank: this fraction of each layer's full rank (instead of --target).
    #[arg(long, conflicts_with = "rank_energy")]
    rank_fraction: Option<f64>,
    /// Low rank: per layer, the smallest rank keeping this share of its energy (instead of --target).
    #[arg(long)]
    rank_energy: Option<f64>,
    /// Budget: `macs=0.75`, `params=0.5` or `latency=0.7` (the fraction kept).
    #[arg(long, default_value = "macs=0.75")]
    target: String,
    /// Latency table for `latency=` budgets, from `whittle profile MODEL -o TABLE` (default:
    /// measure one now on --runtime); `--merge` reads the merge candidates' latencies from it
    /// (`whittle profile --merge`).
    #[arg(long)]
    latency_table: Option<PathBuf>,
    /// How channels are scored.
    #[arg(long, value_enum, default_value = "activation")]
    importance: ImportanceArg,
    /// Prune every group by the same ratio instead of ranking channels globally.
    #[arg(long)]
    uniform: bool,
    /// Every group keeps at least this many channels.
    #[arg(long, default_value_t = 4)]
    min_channels: usize,
    /// Every group keeps at least this fraction of its channels.
    #[arg(long, default_value_t = 0.1)]
    min_fraction: f64,
    /// Kept channel counts are multiples of this (4, 8, 16 suit SIMD and tensor cores).
    #[arg(long, default_value_t = 1)]
    round_to: usize,
    /// Rank groups by their channel scores only, without measuring how much the output suffers
    /// when each group alone is pruned.
    #[arg(long)]
    no_sensitivity: bool,
    /// Calibration items used to measure each group's sensitivity.
    #[arg(long, default_value_t = 32)]
    sensitivity_items: usize,
    /// Skip the least-squares reconstruction of the layers after each cut (for comparison).
    #[arg(long)]
    no_reconstruct: bool,
    /// Ridge strength of the reconstruction, relative to the mean diagonal.
    #[arg(long, default_value_t = 1e-3)]
    ridge: f64,
    /// Print the channel groups (sizes, members, why a group is frozen); without -o, stop there.
    #[arg(long)]
    explain: bool,
    /// Also write the plan as JSON here: `{"prune_channels": .., "merge": ..}` (null for a method
    /// that did not run).
    #[arg(long)]
    plan_out: Option<PathBuf>,
    /// Depth merging: merge the segments a saved plan (`--plan-out`) lists instead of measuring
    /// and choosing again (the same model, or one with the same convolution names).
    #[arg(long)]
    apply_plan: Option<PathBuf>,
    /// Depth merging: take each candidate's damage from a plan written by `--plan-out` (skips
    /// refitting and judging every candidate) and choose anew for `--target`.
    #[arg(long = "candidates", value_name = "PLAN")]
    merge_candidates: Option<PathBuf>,
    /// Depth merging: rounds of each side-by-side measurement made now (candidates without a
    /// latency table, and the chosen plan); more is steadier on a busy machine, and slower.
    #[arg(long, default_value_t = super::profile::MERGE_ROUNDS)]
    merge_rounds: usize,
    /// Runtime for calibration runs and checks.
    #[arg(long, default_value = "ort-cpu")]
    runtime: RuntimeKind,
    /// Threads for ONNX Runtime.
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// A recipe TOML holding the same settings (`[calibration]`, `[prune_channels]`,
    /// `[low_rank]`, `[merge]`, methods run in the file's order); its values replace the flags'
    /// (see recipes/README.md).
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Methods in order, from a recipe (empty: from the flags).
    #[arg(skip)]
    methods: Vec<Method>,
    /// A recipe's `[low_rank] target` (the flags' --target otherwise).
    #[arg(skip)]
    low_rank_target: Option<String>,
    /// A recipe's `[low_rank] round_to` (--round-to otherwise).
    #[arg(skip)]
    low_rank_round_to: Option<usize>,
    /// A recipe's `[merge] target` (the flags' --target otherwise).
    #[arg(skip)]
    merge_target: Option<String>,
    /// A recipe's `[merge] latency_table`.
    #[arg(skip)]
    merge_table: Option<PathBuf>,
}

/// `[calibration]` of a recipe.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibrationSection {
    data: Option<PathBuf>,
    profile: Option<String>,
    items: Option<usize>,
    holdout: Option<usize>,
}

/// `[prune_channels]` of a recipe.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneSection {
    target: Option<String>,
    latency_table: Option<PathBuf>,
    importance: Option<String>,
    uniform: Option<bool>,
    min_channels: Option<usize>,
    min_fraction: Option<f64>,
    round_to: Option<usize>,
    sensitivity: Option<bool>,
    sensitivity_items: Option<usize>,
    reconstruct: Option<bool>,
    ridge: Option<f64>,
}

/// `[low_rank]` of a recipe.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LowRankSection {
    target: Option<String>,
    scheme: Option<String>,
    data_aware: Option<bool>,
    rank: Option<usize>,
    rank_fraction: Option<f64>,
    rank_energy: Option<f64>,
    round_to: Option<usize>,
}

/// `[merge]` of a recipe.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeSection {
    target: Option<String>,
    latency_table: Option<PathBuf>,
    candidates: Option<PathBuf>,
}

/// `[drop_blocks]` of a recipe.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DropBlocksSection {
    count: usize,
    linear_replace: Option<bool>,
    start: Option<usize>,
}

/// `[prune_ffn]` / `[prune_heads]` of a recipe.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WidthSection {
    fraction: f64,
}

/// A compression recipe: the flags of `whittle compress`, in a file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recipe {
    calibration: Option<CalibrationSection>,
    prune_channels: Option<PruneSection>,
    low_rank: Option<LowRankSection>,
    merge: Option<MergeSection>,
    drop_blocks: Option<DropBlocksSection>,
    prune_ffn: Option<WidthSection>,
    prune_heads: Option<WidthSection>,
    drop_attention: Option<DropAttentionSection>,
}

/// `[drop_attention]` of a recipe.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DropAttentionSection {
    count: usize,
}

/// A compression method, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    PruneChannels,
    LowRank,
    Merge,
    DropBlocks,
    PruneFfn,
    PruneHeads,
    DropAttention,
}

/// Read a recipe and apply it to the arguments (paths are relative to the recipe's folder).
fn apply_recipe(a: &mut Args, path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("recipe {}", path.display()))?;
    let r: Recipe = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("recipe {}: {}", path.display(), e.message()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    if let Some(c) = r.calibration {
        if let Some(d) = c.data {
            a.calib = Some(if d.is_absolute() { d } else { base.join(d) });
        }
        a.profile = c.profile.or(a.profile.take());
        a.calib_items = c.items.unwrap_or(a.calib_items);
        a.holdout_items = c.holdout.unwrap_or(a.holdout_items);
    }
    // methods run in the order the recipe lists them
    let mut methods: Vec<(usize, Method)> = [
        (
            "[prune_channels]",
            Method::PruneChannels,
            r.prune_channels.is_some(),
        ),
        ("[low_rank]", Method::LowRank, r.low_rank.is_some()),
        ("[merge]", Method::Merge, r.merge.is_some()),
        ("[drop_blocks]", Method::DropBlocks, r.drop_blocks.is_some()),
        ("[prune_ffn]", Method::PruneFfn, r.prune_ffn.is_some()),
        ("[prune_heads]", Method::PruneHeads, r.prune_heads.is_some()),
        (
            "[drop_attention]",
            Method::DropAttention,
            r.drop_attention.is_some(),
        ),
    ]
    .into_iter()
    .filter(|x| x.2)
    .map(|(h, m, _)| (text.find(h).unwrap_or(usize::MAX), m))
    .collect();
    methods.sort_by_key(|x| x.0);
    a.methods = methods.into_iter().map(|x| x.1).collect();
    if a.methods.is_empty() {
        bail!(
            "recipe {}: no method section ([prune_channels], [low_rank], [merge], [drop_blocks], [prune_ffn], [prune_heads], [drop_attention])",
            path.display()
        );
    }
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    if let Some(m) = r.merge {
        a.merge_target = m.target;
        a.merge_table = m.latency_table.map(resolve);
        a.merge_candidates = m.candidates.map(resolve).or(a.merge_candidates.take());
    }
    if let Some(d) = r.drop_attention {
        a.drop_attention = Some(d.count);
    }
    if let Some(w) = r.prune_ffn {
        a.prune_ffn = Some(w.fraction);
    }
    if let Some(w) = r.prune_heads {
        a.prune_heads = Some(w.fraction);
    }
    if let Some(d) = r.drop_blocks {
        a.drop_blocks = Some(d.count);
        a.linear_replace = d.linear_replace.unwrap_or(a.linear_replace);
        a.drop_start = d.start.or(a.drop_start);
    }
    if let Some(l) = r.low_rank {
        a.low_rank_target = l.target;
        a.scheme = l.scheme.unwrap_or(a.scheme.clone());
        a.data_aware = l.data_aware.unwrap_or(a.data_aware);
        a.rank = l.rank.or(a.rank);
        a.rank_fraction = l.rank_fraction.or(a.rank_fraction);
        a.rank_energy = l.rank_energy.or(a.rank_energy);
        a.low_rank_round_to = l.round_to;
    }
    let Some(p) = r.prune_channels else {
        return Ok(());
    };
    a.target = p.target.unwrap_or(a.target.clone());
    if let Some(t) = p.latency_table {
        a.latency_table = Some(resolve(t));
    }
    if let Some(i) = p.importance {
        a.importance = <ImportanceArg as clap::ValueEnum>::from_str(&i, true).map_err(|_| {
            anyhow::anyhow!(
                "recipe {}: importance '{i}' is not l1, l2 or activation",
                path.display()
            )
        })?;
    }
    a.uniform = p.uniform.unwrap_or(a.uniform);
    a.min_channels = p.min_channels.unwrap_or(a.min_channels);
    a.min_fraction = p.min_fraction.unwrap_or(a.min_fraction);
    a.round_to = p.round_to.unwrap_or(a.round_to);
    a.no_sensitivity = p.sensitivity.map(|v| !v).unwrap_or(a.no_sensitivity);
    a.sensitivity_items = p.sensitivity_items.unwrap_or(a.sensitivity_items);
    a.no_reconstruct = p.reconstruct.map(|v| !v).unwrap_or(a.no_reconstruct);
    a.ridge = p.ridge.unwrap_or(a.ridge);
    Ok(())
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ImportanceArg {
    L1,
    L2,
    Activation,
}

/// One layer before and after.
#[derive(Serialize)]
pub struct Layer {
    name: String,
    op: String,
    channels_before: usize,
    channels_after: usize,
    params_before: u64,
    params_after: u64,
    macs_before: u64,
    macs_after: u64,
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
    /// Channel groups found.
    pub groups: usize,
    /// Groups that could be pruned.
    pub prunable_groups: usize,
    /// Params before / after.
    pub params: (u64, u64),
    /// MACs before / after.
    pub macs: (u64, u64),
    /// Fraction of MACs kept.
    pub macs_kept: f64,
    /// How channels were scored.
    pub importance: String,
    /// Whether least-squares reconstruction ran.
    pub reconstructed: bool,
    /// Per refitted layer.
    pub refit: Vec<RefitReport>,
    /// The result against the original on held-apart calibration items.
    pub fidelity: Option<VerifyReport>,
    /// Per layer before / after.
    pub layers: Vec<Layer>,
    /// The channel-pruning plan that was applied.
    pub plan: Option<Plan>,
    /// What low-rank factorisation did.
    pub low_rank: Option<LowRankReport>,
    /// What depth merging did.
    pub merge: Option<MergeSummary>,
    /// What transformer block removal did.
    pub drop_blocks: Option<DropReport>,
    /// What feed-forward neuron pruning did.
    pub prune_ffn: Option<WidthReport>,
    /// What attention head pruning did.
    pub prune_heads: Option<WidthReport>,
    /// What attention sub-module removal did.
    pub drop_attention: Option<DropAttentionReport>,
    /// Wall time of the whole compression.
    pub seconds: f64,
}

/// Channel pruning's options (its budget only when it runs: other methods read --target their
/// own way).
fn parse_opts(a: &Args, prunes: bool) -> Result<PruneOptions> {
    let budget: Budget = if prunes {
        a.target
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--target: {e}"))?
    } else {
        Budget::Macs(1.0)
    };
    if !(0.0..=1.0).contains(&a.min_fraction) {
        bail!("--min-fraction {} is not between 0 and 1", a.min_fraction);
    }
    if a.round_to == 0 {
        bail!("--round-to must be at least 1");
    }
    Ok(PruneOptions {
        budget,
        global: !a.uniform,
        min_channels: a.min_channels,
        min_fraction: a.min_fraction,
        round_to: a.round_to,
        latency: None,
    })
}

/// Run the command.
pub fn run(mut a: Args) -> Result<Outcome> {
    if let Some(r) = a.recipe.clone() {
        apply_recipe(&mut a, &r)?;
    }
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
    let (m, o, c) = (
        model.display().to_string(),
        out.display().to_string(),
        calib.display().to_string(),
    );
    let mut a =
        <Wrap as clap::Parser>::try_parse_from(["compress", &m, "-o", &o, "--calib", &c])?.a;
    apply_recipe(&mut a, recipe)?;
    Ok(a)
}

impl Args {
    /// The latency table `--merge` reads: a recipe's `[merge] latency_table`, or with flags
    /// alone `--latency-table`.
    fn merge_table(&self) -> Option<&Path> {
        if self.methods.is_empty() {
            self.latency_table.as_deref()
        } else {
            self.merge_table.as_deref()
        }
    }

    /// Calibration items the compression uses (the rest of the data is held apart).
    pub fn calib_items(&self) -> usize {
        self.calib_items
    }

    /// The budget, as given.
    pub fn target(&self) -> &str {
        &self.target
    }
}

/// The methods to run, in order: a recipe's, else the flags' (channel pruning by default).
fn methods(a: &Args) -> Result<Vec<Method>> {
    if !a.methods.is_empty() {
        return Ok(a.methods.clone());
    }
    let given: Vec<Method> = [
        (a.prune_channels, Method::PruneChannels),
        (a.low_rank, Method::LowRank),
        (a.merge, Method::Merge),
        (a.drop_blocks.is_some(), Method::DropBlocks),
        (a.prune_ffn.is_some(), Method::PruneFfn),
        (a.prune_heads.is_some(), Method::PruneHeads),
        (a.drop_attention.is_some(), Method::DropAttention),
    ]
    .into_iter()
    .filter(|x| x.0)
    .map(|x| x.1)
    .collect();
    match given.len() {
        0 => Ok(vec![Method::PruneChannels]),
        1 => Ok(given),
        _ => bail!(
            "--prune-channels, --low-rank, --merge, --drop-blocks, --drop-attention, --prune-ffn and --prune-heads together need a recipe (each method gets its own settings and order; see recipes/README.md)"
        ),
    }
}

/// Low-rank options from the flags (or the recipe's `[low_rank]`).
fn low_rank_opts(a: &Args) -> Result<LowRankOptions> {
    let scheme: Scheme = a
        .scheme
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--scheme: {e}"))?;
    let rule = match (a.rank, a.rank_fraction, a.rank_energy) {
        (Some(r), _, _) => RankRule::Rank(r),
        (_, Some(f), _) => RankRule::Fraction(f),
        (_, _, Some(e)) => RankRule::Energy(e),
        _ => RankRule::Budget(
            a.low_rank_target
                .as_deref()
                .unwrap_or(&a.target)
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--target: {e}"))?,
        ),
    };
    if let RankRule::Rank(0) = rule {
        bail!("--rank 0 would remove the layers; give a rank of at least 1");
    }
    if let RankRule::Fraction(f) | RankRule::Energy(f) = rule
        && !(f > 0.0 && f <= 1.0)
    {
        bail!("--rank-fraction / --rank-energy {f} is not in (0, 1]");
    }
    if a.data_aware && scheme == Scheme::Spatial {
        bail!(
            "--data-aware factors are channel-wise: use --scheme channel or auto with --data-aware"
        );
    }
    let round_to = a.low_rank_round_to.unwrap_or(a.round_to);
    if round_to == 0 {
        bail!("round_to must be at least 1");
    }
    Ok(LowRankOptions {
        rule,
        scheme,
        data_aware: a.data_aware,
        round_to,
    })
}

/// What `--plan-out` writes and `--apply-plan` / `--candidates` read.
#[derive(Serialize, serde::Deserialize)]
struct SavedPlan {
    prune_channels: Option<serde_json::Value>,
    merge: Option<MergeSummary>,
}

/// What channel pruning did.
struct Pruned {
    model: Model,
    plan: Plan,
    refits: Vec<RefitReport>,
    groups: usize,
    prunable: usize,
}

/// Compress as the arguments say and return the summary (`None` for `--explain` alone).
pub fn execute(a: &Args) -> Result<Option<Summary>> {
    let started = std::time::Instant::now();
    // everything that can be refused is refused before any work
    let methods = methods(a)?;
    let prunes = methods.contains(&Method::PruneChannels);
    let lr_opts = if methods.contains(&Method::LowRank) {
        Some(low_rank_opts(a)?)
    } else {
        None
    };
    let mut opts = parse_opts(a, prunes)?;
    let is_latency = prunes && matches!(opts.budget, Budget::Latency(_));
    if !methods.contains(&Method::DropBlocks) && (a.linear_replace || a.drop_start.is_some()) {
        bail!("--linear-replace and --drop-start go with --drop-blocks N");
    }
    if methods.contains(&Method::Merge) {
        if a.apply_plan.is_none() {
            merge_goal(a)?;
        }
        if a.apply_plan.is_some() && a.merge_candidates.is_some() {
            bail!(
                "--apply-plan replays a plan, --candidates chooses anew from its measurements: give one"
            );
        }
    } else if a.apply_plan.is_some() || a.merge_candidates.is_some() {
        bail!("--apply-plan and --candidates read a depth-merging plan: give --merge with them");
    }
    let table: Option<LatencyTable> = match &a.latency_table {
        Some(p) if is_latency => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("latency table {}", p.display()))?;
            Some(serde_json::from_str(&text).with_context(|| {
                format!(
                    "latency table {}: not a table written by `whittle profile`",
                    p.display()
                )
            })?)
        }
        _ => None,
    };
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
    let needs_data = (prunes
        && (!a.no_reconstruct || matches!(a.importance, ImportanceArg::Activation)))
        || lr_opts.as_ref().is_some_and(|o| o.data_aware)
        || methods.contains(&Method::Merge)
        || methods.contains(&Method::DropBlocks)
        || methods.contains(&Method::PruneFfn)
        || methods.contains(&Method::PruneHeads)
        || methods.contains(&Method::DropAttention);
    if needs_data && a.calib.is_none() && a.output.is_some() {
        bail!(if prunes {
            "--calib DATA is needed for reconstruction and activation importance (or use --no-reconstruct --importance l2)"
        } else if methods.contains(&Method::Merge) {
            "--calib DATA is needed for --merge (each merge is refitted and judged on it)"
        } else if methods.contains(&Method::DropBlocks) {
            "--calib DATA is needed for --drop-blocks (the span is chosen, and replaced, on it): e.g. `whittle tokenize sentences.tsv --tokenizer DIR -o calib.npz`"
        } else if methods.contains(&Method::PruneFfn)
            || methods.contains(&Method::PruneHeads)
            || methods.contains(&Method::DropAttention)
        {
            "--calib DATA is needed for --prune-ffn / --prune-heads / --drop-attention (importance and refit): e.g. `whittle tokenize sentences.tsv --tokenizer DIR -o calib.npz`"
        } else {
            "--calib DATA is needed for --data-aware"
        });
    }
    let pre = match &a.calib {
        Some(c) => super::resolve_profile(a.profile.as_deref(), &a.model, c)?,
        None => Preprocess::default(),
    };
    let data = a.calib.as_ref().map(|p| Dataset::open(p)).transpose()?;

    let original = super::load_model(&a.model)?;
    let mut model = original.clone();
    let clean = cleanup::cleanup(&mut model).context("cleanup")?;
    if a.explain {
        let gs = groups::analyse(&model).context("channel groups")?;
        print_groups(&model, &gs, a.json && a.output.is_none());
        if a.output.is_none() {
            return Ok(None);
        }
    }
    let (calib_idx, hold_idx) = match &data {
        Some(d) => {
            let calib_n = a.calib_items.min(d.len());
            let frac = calib_n as f64 / d.len() as f64;
            let (c, h) = d.split(frac, 0)?;
            (c, h.into_iter().take(a.holdout_items).collect::<Vec<_>>())
        }
        None => (vec![], vec![]),
    };
    let spec = data.as_ref().map(|d| CaptureSpec {
        dataset: d,
        indices: &calib_idx,
        pre: &pre,
        batch: 16,
        runtime: a.runtime,
        threads: a.threads,
    });
    let mut current = model.clone();
    let mut pruned: Option<Pruned> = None;
    let mut low_rank: Option<LowRankReport> = None;
    let mut merged: Option<MergeSummary> = None;
    let mut dropped: Option<DropReport> = None;
    let mut ffn: Option<WidthReport> = None;
    let mut attention: Option<DropAttentionReport> = None;
    let mut heads: Option<WidthReport> = None;
    for m in &methods {
        match m {
            Method::PruneChannels => {
                if is_latency {
                    let t = match &table {
                        Some(t) => t.clone(),
                        None => super::profile::measure_table(
                            &current,
                            a.runtime,
                            a.threads,
                            vec![],
                            None,
                        )?,
                    };
                    opts.latency = Some(std::sync::Arc::new(t));
                }
                let p = prune_stage(a, &opts, &current, data.as_ref(), &calib_idx, &pre, &spec)?;
                current = p.model.clone();
                pruned = Some(p);
            }
            Method::Merge => {
                let d = data.as_ref().expect("--merge needs --calib, checked above");
                let r = merge_stage(a, &current, d, &calib_idx, &pre)?;
                current = r.0;
                merged = Some(r.1);
            }
            Method::DropBlocks => {
                let spec = spec
                    .as_ref()
                    .expect("--drop-blocks needs --calib, checked above");
                let o = DropOptions {
                    count: a.drop_blocks.unwrap_or(1),
                    linear_replace: a.linear_replace,
                    start: a.drop_start,
                    ridge: a.ridge,
                };
                let mut next = current.clone();
                let pb =
                    crate::progress::spinner("blocks", "hidden states on the calibration data");
                let r = drop_blocks::drop_blocks(&mut next, &o, spec);
                pb.finish_and_clear();
                dropped = Some(r?);
                current = next;
            }
            Method::DropAttention => {
                let spec = spec
                    .as_ref()
                    .expect("--drop-attention needs --calib, checked above");
                let mut next = current.clone();
                let pb =
                    crate::progress::spinner("attention", "hidden states on the calibration data");
                let r =
                    drop_attention::drop_attention(&mut next, a.drop_attention.unwrap_or(1), spec);
                pb.finish_and_clear();
                attention = Some(r?);
                current = next;
            }
            Method::PruneFfn | Method::PruneHeads => {
                let spec = spec
                    .as_ref()
                    .expect("width pruning needs --calib, checked above");
                let ffn_pass = *m == Method::PruneFfn;
                let o = WidthOptions {
                    fraction: if ffn_pass { a.prune_ffn } else { a.prune_heads }.unwrap_or(0.25),
                    round_to: a.round_to,
                    refit: !a.no_reconstruct,
                    ridge: a.ridge,
                };
                let mut next = current.clone();
                let pb = crate::progress::spinner(
                    if ffn_pass { "ffn" } else { "heads" },
                    "activations on the calibration data",
                );
                let r = if ffn_pass {
                    prune_ffn::prune_ffn(&mut next, &o, spec)
                } else {
                    prune_heads::prune_heads(&mut next, &o, spec)
                };
                pb.finish_and_clear();
                if ffn_pass {
                    ffn = Some(r?);
                } else {
                    heads = Some(r?);
                }
                current = next;
            }
            Method::LowRank => {
                let o = lr_opts.as_ref().expect("low-rank options parsed above");
                let stats = match (&spec, o.data_aware) {
                    (Some(spec), true) => Some(refit::collect(
                        &current,
                        &lowrank::layers(&current)?,
                        spec,
                        &RefitOptions::default(),
                    )?),
                    _ => None,
                };
                let mut next = current.clone();
                low_rank = Some(lowrank::factorise(&mut next, stats.as_ref(), o)?);
                current = next;
            }
        }
    }
    // the result must be a valid graph that runs with the original's input and output shapes
    let bytes = current.to_bytes();
    check_runs(&original, &bytes, a.runtime)?;
    let fidelity = match &data {
        Some(d) if !hold_idx.is_empty() => Some(fidelity(
            &original, &bytes, d, &hold_idx, &pre, a.runtime, a.threads,
        )?),
        _ => None,
    };
    if let Some(out) = &a.output {
        whittle_export::save_model(&current, out, Some(&a.model), false)?;
    }
    if let Some(path) = &a.plan_out {
        let plan = serde_json::json!({
            "prune_channels": pruned.as_ref().map(|p| &p.plan),
            "merge": merged,
        });
        whittle_export::write_atomic(path, serde_json::to_string_pretty(&plan)?.as_bytes())?;
    }
    let layers = layer_table(&model, &current)?;
    let after = cost::count(&current, &shape::infer(&current, &[])?);
    let before = cost::count(&original, &shape::infer(&original, &[])?);
    let s = Summary {
        input: a.model.display().to_string(),
        output: a.output.as_ref().map(|p| p.display().to_string()),
        cleanup: clean,
        groups: pruned.as_ref().map_or(0, |p| p.groups),
        prunable_groups: pruned.as_ref().map_or(0, |p| p.prunable),
        params: (before.params, after.params),
        macs: (before.macs, after.macs),
        macs_kept: after.macs as f64 / before.macs.max(1) as f64,
        importance: scores_name(a.importance).to_string(),
        reconstructed: pruned.as_ref().is_some_and(|p| !p.refits.is_empty()),
        refit: pruned
            .as_ref()
            .map(|p| p.refits.clone())
            .unwrap_or_default(),
        fidelity,
        layers,
        plan: pruned.map(|p| p.plan),
        low_rank,
        merge: merged,
        drop_blocks: dropped,
        prune_ffn: ffn,
        prune_heads: heads,
        drop_attention: attention,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(Some(s))
}

/// Channel pruning of `model`: scores, sensitivity, plan, apply, least-squares repair.
fn prune_stage(
    a: &Args,
    opts: &PruneOptions,
    model: &Model,
    data: Option<&Dataset>,
    calib_idx: &[usize],
    pre: &Preprocess,
    spec: &Option<CaptureSpec>,
) -> Result<Pruned> {
    let gs = groups::analyse(model).context("channel groups")?;
    let weight = prune::weight_scores(
        model,
        &gs,
        if matches!(a.importance, ImportanceArg::L1) {
            Importance::L1
        } else {
            Importance::L2
        },
    )?;
    let scores = match (a.importance, spec) {
        (ImportanceArg::Activation, Some(spec)) => {
            let tensors = prune::consumer_inputs(model, &gs);
            let m2 = channel_moments(model, &tensors, spec)?;
            prune::energy_scores(model, &gs, &m2, &weight)?
        }
        _ => weight,
    };
    let refit_opts = RefitOptions {
        ridge: a.ridge,
        ..Default::default()
    };
    let sens = match data {
        Some(d) if !a.no_sensitivity => {
            // damage is measured on items the trial refits never see (a refit fits its own
            // items too well to judge it there)
            let n_eval = a.sensitivity_items.min(calib_idx.len() / 2).max(1);
            let idx: Vec<usize> = calib_idx[..n_eval].to_vec();
            let fit_idx: Vec<usize> = calib_idx[n_eval..].to_vec();
            let reference = Reference::new(model, d, &idx, pre, a.runtime, a.threads)?;
            let sens_spec = CaptureSpec {
                dataset: d,
                indices: &fit_idx,
                pre,
                batch: 16,
                runtime: a.runtime,
                threads: a.threads,
            };
            // one capture for all trials: each trial solves its kept subset from these
            let stats = if a.no_reconstruct {
                None
            } else {
                Some(refit::collect(
                    model,
                    &consumer_layers(model, &gs),
                    &sens_spec,
                    &refit_opts,
                )?)
            };
            let fractions = [0.25, 0.5];
            let pb = bar("sensitivity", gs.prunable().count() * fractions.len());
            let s = prune::measure_sensitivity(
                model,
                &gs,
                &scores,
                &fractions,
                &mut |m, changes| {
                    let fail = |e: String| whittle_compress::Error::Pass {
                        pass: "sensitivity".into(),
                        reason: e,
                    };
                    if let Some(stats) = &stats {
                        stats
                            .apply(m, &refit_jobs(model, changes), &refit_opts)
                            .map_err(|e| fail(e.to_string()))?;
                    }
                    reference.damage(m).map_err(|e| fail(format!("{e:#}")))
                },
                &mut |d, _| pb.set_position(d as u64),
            )?;
            pb.finish_and_clear();
            Some(s)
        }
        _ => None,
    };
    let plan = prune::plan(model, &gs, &scores, sens.as_deref(), opts)?;
    let mut pruned = model.clone();
    let changes = prune::apply(&mut pruned, &gs, &plan)?;
    let mut refits = Vec::new();
    if !a.no_reconstruct
        && let Some(spec) = spec
    {
        refits = refit::refit(
            model,
            &mut pruned,
            &refit_jobs(model, &changes),
            spec,
            &refit_opts,
        )?;
    }
    Ok(Pruned {
        model: pruned,
        plan,
        refits,
        groups: gs.groups.len(),
        prunable: gs.prunable().count(),
    })
}

fn scores_name(i: ImportanceArg) -> &'static str {
    match i {
        ImportanceArg::L1 => "l1",
        ImportanceArg::L2 => "l2",
        ImportanceArg::Activation => "activation",
    }
}

/// E[x^2] per channel (axis 1) of each tensor over the calibration items.
fn channel_moments(
    model: &Model,
    tensors: &[String],
    spec: &CaptureSpec,
) -> Result<HashMap<String, Vec<f64>>> {
    let mut sums: Vec<Vec<f64>> = vec![vec![]; tensors.len()];
    let mut counts = vec![0f64; tensors.len()];
    capture(model, tensors, spec, &mut |vals, items| {
        for (k, v) in vals.iter().enumerate() {
            let sh = v.shape();
            if sh.len() < 2 {
                continue;
            }
            let c = sh[1];
            let inner: usize = sh[2..].iter().product();
            if sums[k].is_empty() {
                sums[k] = vec![0.0; c];
            }
            if let Some(data) = v.as_slice_memory_order() {
                for n in 0..items.min(sh[0]) {
                    for (ch, sum) in sums[k].iter_mut().enumerate() {
                        let base = (n * c + ch) * inner;
                        *sum += data[base..base + inner]
                            .iter()
                            .map(|x| (*x as f64).powi(2))
                            .sum::<f64>()
                            / inner as f64;
                    }
                }
            }
            counts[k] += items as f64;
        }
        Ok(())
    })?;
    Ok(tensors
        .iter()
        .cloned()
        .zip(sums.into_iter().zip(counts))
        .map(|(t, (s, n))| (t, s.into_iter().map(|v| v / n.max(1.0)).collect()))
        .collect())
}

fn check_runs(original: &Model, candidate: &[u8], runtime: RuntimeKind) -> Result<()> {
    let opts = whittle_runtime::RuntimeOptions::default();
    let mut r = whittle_runtime::load(runtime, &original.to_bytes(), &opts)?;
    let mut c = whittle_runtime::load(runtime, candidate, &opts)
        .context("the compressed model does not load; nothing was written")?;
    let inputs = whittle_runtime::synthetic_inputs(r.inputs(), &[])?;
    let ro = r.run(&inputs)?;
    let co = c
        .run(&inputs)
        .context("the compressed model does not run; nothing was written")?;
    for ((a, b), io) in ro.iter().zip(&co).zip(r.outputs()) {
        if a.shape() != b.shape() {
            bail!(
                "the compressed model's output '{}' has shape {:?}, the original's {:?}; nothing was written",
                io.name,
                b.shape(),
                a.shape()
            );
        }
    }
    Ok(())
}

fn fidelity(
    original: &Model,
    candidate: &[u8],
    d: &Dataset,
    idx: &[usize],
    pre: &Preprocess,
    runtime: RuntimeKind,
    threads: Option<usize>,
) -> Result<VerifyReport> {
    let opts = VerifyOptions {
        runtime,
        threads,
        batch: 32,
        limit: None,
    };
    Ok(whittle_export::verify::verify_items(
        &original.to_bytes(),
        candidate,
        d,
        idx,
        pre,
        &opts,
        &mut |_, _| {},
    )?)
}

fn out_channels(m: &Model, n: &whittle_core::onnx::NodeProto) -> usize {
    let Some(w) = n.input.get(1).and_then(|w| m.initializer(w)) else {
        return 0;
    };
    let trans_b = n
        .attribute
        .iter()
        .any(|a| a.name() == "transB" && a.i == Some(1));
    match n.op_type() {
        "Gemm" if !trans_b => w.dims.get(1).copied().unwrap_or(0) as usize,
        "MatMul" => w.dims.get(1).copied().unwrap_or(0) as usize,
        _ => w.dims.first().copied().unwrap_or(0) as usize,
    }
}

fn layer_table(before: &Model, after: &Model) -> Result<Vec<Layer>> {
    let cb = cost::count(before, &shape::infer(before, &[])?);
    let ca = cost::count(after, &shape::infer(after, &[])?);
    // by name: a factorised layer keeps its name for the second factor, the first is
    // `<name>/lowrank_a`
    let after_by_name: HashMap<&str, (usize, &whittle_core::cost::NodeCost)> = after
        .graph()
        .node
        .iter()
        .zip(&ca.nodes)
        .enumerate()
        .map(|(i, (n, c))| (n.name(), (i, c)))
        .collect();
    let mut rows = Vec::new();
    for (nb, b) in before.graph().node.iter().zip(&cb.nodes) {
        if !matches!(nb.op_type(), "Conv" | "Gemm" | "MatMul" | "ConvTranspose") {
            continue;
        }
        let Some(&(ia, a)) = after_by_name.get(nb.name()) else {
            continue;
        };
        let first = after_by_name.get(format!("{}/lowrank_a", nb.name()).as_str());
        rows.push(Layer {
            name: b.name.clone(),
            op: b.op.clone(),
            channels_before: out_channels(before, nb),
            channels_after: out_channels(after, &after.graph().node[ia]),
            params_before: b.params,
            params_after: a.params + first.map_or(0, |f| f.1.params),
            macs_before: b.macs,
            macs_after: a.macs + first.map_or(0, |f| f.1.macs),
        });
    }
    Ok(rows)
}

fn print_groups(model: &Model, gs: &Groups, json: bool) {
    if json {
        outln!("{}", serde_json::to_string(gs).unwrap_or_default());
        return;
    }
    let _ = model;
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
    if s.plan.is_some() {
        outln!(
            "channel pruning: {} of {} channel groups prunable; importance {}; reconstruction {}",
            s.prunable_groups,
            s.groups,
            s.importance,
            if s.reconstructed { "on" } else { "off" },
        );
    }
    if let Some(m) = &s.merge {
        outln!(
            "depth merging: {} of {} candidate segments merged (model {:.3} ms before, fastest runs; latencies {})",
            m.merged.len(),
            m.candidates,
            m.model_ms,
            m.latency_from
        );
        if let Some(k) = m.plan_latency {
            outln!(
                "  the plan measured as a whole: latency={k:.3} of the model's (predicted {:.3})",
                1.0 - m.merged.iter().map(|g| g.saved_ms).sum::<f64>() / m.model_ms.max(1e-12)
            );
        }
        if let Some(c) = m.combined_damage {
            outln!(
                "  damage of the merges together {c:.4} (their damages alone sum to {:.4})",
                m.merged.iter().map(|g| g.damage).sum::<f64>()
            );
        }
        for g in &m.merged {
            outln!(
                "  {}{}: saves {:.3} ms alone, damage {:.4}{}",
                g.convs.join(" + "),
                g.add
                    .as_ref()
                    .map(|a| format!(" + {a}"))
                    .unwrap_or_default(),
                g.saved_ms,
                g.damage,
                if g.exact {
                    " (exact)".to_string()
                } else {
                    format!(
                        " (removed {}; {})",
                        g.acts.join(", "),
                        if g.refit { "refitted" } else { "as composed" }
                    )
                }
            );
        }
    }
    if let Some(d) = &s.drop_blocks {
        let imp: Vec<String> = d.importance.iter().map(|v| format!("{v:.4}")).collect();
        outln!(
            "block importance (cosine distance in -> out, {} calibration tokens): {}",
            d.tokens,
            imp.join(", ")
        );
        outln!(
            "removed blocks {} of {}: {}",
            d.removed
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            d.blocks,
            match &d.fit {
                Some(f) if d.linear_replace => format!(
                    "replaced by one linear map (hidden-state error {:.4}, removal alone {:.4})",
                    f.rel_error_after, f.rel_error_before
                ),
                Some(f) => format!(
                    "removed outright: {}",
                    f.skipped.as_deref().unwrap_or("the fit did not help")
                ),
                None => "removed outright (no --linear-replace)".into(),
            }
        );
    }
    if let Some(d) = &s.drop_attention {
        let imp: Vec<String> = d.importance.iter().map(|v| format!("{v:.4}")).collect();
        outln!(
            "attention importance (cosine distance in -> out, {} calibration tokens): {}; removed the attention of blocks {:?}",
            d.tokens,
            imp.join(", "),
            d.removed
        );
    }
    for (what, r) in [
        ("feed-forward neurons", &s.prune_ffn),
        ("attention heads", &s.prune_heads),
    ] {
        if let Some(r) = r {
            let per: Vec<String> = r
                .layers
                .iter()
                .map(|l| {
                    format!(
                        "block {} {}/{}{}",
                        l.block,
                        l.kept,
                        l.of,
                        l.refit
                            .as_ref()
                            .filter(|f| f.skipped.is_none())
                            .map(|f| format!(
                                " (refit error {:.3} -> {:.3})",
                                f.rel_error_before, f.rel_error_after
                            ))
                            .unwrap_or_default()
                    )
                })
                .collect();
            outln!(
                "{what} kept ({} calibration tokens): {}",
                r.tokens,
                per.join(", ")
            );
        }
    }
    if let Some(lr) = &s.low_rank {
        let f: Vec<String> = lr
            .factored
            .iter()
            .map(|f| {
                format!(
                    "{} {:?} rank {}/{} (error {:.3})",
                    f.node, f.scheme, f.rank, f.full_rank, f.rel_error
                )
            })
            .collect();
        outln!(
            "low rank ({}): {} layers factorised: {}",
            if lr.data_aware {
                "data-aware"
            } else {
                "plain SVD"
            },
            f.len(),
            f.join(", ")
        );
        for k in &lr.skipped {
            outln!("low rank skipped {}: {}", k.node, k.reason);
        }
    }
    if let Some((before, after)) = s.plan.as_ref().and_then(|p| p.latency_ms) {
        outln!(
            "latency predicted from the table: {before:.3} ms -> {after:.3} ms ({} kept)",
            pct(after / before.max(1e-12))
        );
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

/// The original model's outputs on a few calibration items, to measure how far a candidate
/// drifts from them.
struct Reference {
    inputs: Vec<Vec<whittle_core::Value>>,
    outputs: Vec<Vec<Vec<f32>>>,
    runtime: RuntimeKind,
    threads: Option<usize>,
}

impl Reference {
    fn new(
        model: &Model,
        d: &Dataset,
        idx: &[usize],
        pre: &Preprocess,
        runtime: RuntimeKind,
        threads: Option<usize>,
    ) -> Result<Reference> {
        let ropts = whittle_runtime::RuntimeOptions {
            threads,
            ..Default::default()
        };
        let mut s = whittle_runtime::load(runtime, &model.to_bytes(), &ropts)?;
        let (specs, bs) = whittle_calib::input_specs(s.inputs(), 16, Some(d))?;
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

    /// Sum over outputs of ||y - y'||^2 / ||y - mean(y)||^2 (0: identical outputs).
    fn damage(&self, candidate: &Model) -> Result<f64> {
        let ropts = whittle_runtime::RuntimeOptions {
            threads: self.threads,
            ..Default::default()
        };
        let mut s = whittle_runtime::load(self.runtime, &candidate.to_bytes(), &ropts)?;
        let n_out = self.outputs.first().map_or(0, |o| o.len());
        let (mut err, mut var, mut sum, mut count) = (
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
                    var[k] += (*a as f64).powi(2);
                    count[k] += 1.0;
                }
            }
        }
        Ok((0..n_out)
            .map(|k| {
                let mean = sum[k] / count[k].max(1.0);
                err[k] / (var[k] - count[k] * mean * mean).max(1e-12)
            })
            .sum())
    }
}

/// Refit jobs for the layers that lost input channels (names as in `model`).
fn refit_jobs(model: &Model, changes: &[prune::ConsumerChange]) -> Vec<RefitJob> {
    changes
        .iter()
        .filter_map(|c| {
            let n = model.graph().node.iter().find(|n| n.name() == c.node)?;
            Some(RefitJob {
                node: c.node.clone(),
                input: n.input[0].clone(),
                output: n.output[0].clone(),
                kept_in: c.kept_in.clone(),
                kept_out: c.kept_out.clone(),
            })
        })
        .collect()
}

/// The layers that read the channels of prunable groups (the ones a cut may refit).
fn consumer_layers(model: &Model, gs: &Groups) -> Vec<refit::LayerRef> {
    let mut v: Vec<refit::LayerRef> = gs
        .prunable()
        .flat_map(|g| g.members.iter())
        .filter(|m| m.role == whittle_compress::groups::Role::Consumer)
        .map(|m| {
            let n = &model.graph().node[m.node];
            refit::LayerRef {
                node: n.name().to_string(),
                input: n.input[0].clone(),
                output: n.output[0].clone(),
            }
        })
        .collect();
    v.sort_by(|a, b| a.node.cmp(&b.node));
    v.dedup();
    v
}
