//! Channel pruning as a pipeline method (`--prune-channels`, the default of `whittle compress`;
//! `method = "prune_channels"`): channel groups ([`crate::groups`]), channel scores, each group's
//! measured sensitivity, a budgeted plan ([`crate::prune`]), and the least-squares repair of the
//! layers that lost inputs ([`crate::refit`]).
//!
//! Accepts `macs=`, `params=` and `latency=` budgets (the last with a latency table, read or
//! measured now on the context's runtime). Declines: nothing prunable (names why the groups are
//! frozen), an unreachable budget (names the smallest reachable). Guarantees: graph inputs and
//! outputs unchanged; a replayed plan applies exactly the channels it lists.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use whittle_calib::{CaptureSpec, capture};
use whittle_core::Model;

use crate::Error;
use crate::groups::{self, Groups, Role};
use crate::latency::LatencyTable;
use crate::pipeline::{Context, Method, Shared};
use crate::prune::{self, Budget, Importance, Plan, PruneOptions};
use crate::refit::{self, RefitJob, RefitOptions, RefitReport};

/// How channels are scored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportanceArg {
    /// L1 norm of the weights.
    L1,
    /// L2 norm of the weights.
    L2,
    /// Energy the channel delivers to its consumers on calibration data.
    #[default]
    Activation,
}

/// Channel pruning.
pub struct PruneChannels;

/// `--prune-channels` and its settings.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneChannelsOptions {
    /// Prune channels (the default method when no other is given).
    #[arg(id = "prune_channels", long = "prune-channels")]
    #[serde(skip)]
    pub enabled: bool,
    /// How channels are scored.
    #[arg(long, value_enum)]
    pub importance: Option<ImportanceArg>,
    /// Prune every group by the same ratio instead of ranking channels globally.
    #[arg(long)]
    #[serde(default)]
    pub uniform: bool,
    /// Every group keeps at least this many channels (default 4).
    #[arg(long)]
    pub min_channels: Option<usize>,
    /// Every group keeps at least this fraction of its channels (default 0.1).
    #[arg(long)]
    pub min_fraction: Option<f64>,
    /// Rank groups by their channel scores only, without measuring how much the output suffers
    /// when each group alone is pruned.
    #[arg(long = "no-sensitivity", action = clap::ArgAction::SetFalse, id = "sensitivity")]
    #[serde(default = "yes")]
    pub sensitivity: bool,
    /// Calibration items used to measure each group's sensitivity (default 32; fewer for large
    /// inputs, at least 4).
    #[arg(long)]
    pub sensitivity_items: Option<usize>,
    /// The budget.
    #[arg(skip)]
    pub target: Option<String>,
    /// Latency table for `latency=` budgets.
    #[arg(skip)]
    pub latency_table: Option<PathBuf>,
    /// Kept channel counts are multiples of this.
    #[arg(skip)]
    pub round_to: Option<usize>,
    /// Least-squares reconstruction after the cut.
    #[arg(skip)]
    pub reconstruct: Option<bool>,
    /// Ridge of the reconstruction.
    #[arg(skip)]
    pub ridge: Option<f64>,
}

fn yes() -> bool {
    true
}

impl PruneChannelsOptions {
    fn importance(&self) -> ImportanceArg {
        self.importance.unwrap_or_default()
    }

    fn budget(&self) -> Result<Budget, Error> {
        self.target
            .as_deref()
            .unwrap_or("macs=0.75")
            .parse()
            .map_err(|e: String| Error::Budget(format!("--target: {e}")))
    }

    fn refit_options(&self, cx: &Context) -> RefitOptions {
        RefitOptions {
            ridge: self.ridge.unwrap_or(1e-3),
            rows_per_item: cx.rows_per_item(),
            ..Default::default()
        }
    }

    fn reconstruct(&self) -> bool {
        self.reconstruct.unwrap_or(true)
    }

    fn prune_options(&self) -> Result<PruneOptions, Error> {
        let min_fraction = self.min_fraction.unwrap_or(0.1);
        let round_to = self.round_to.unwrap_or(1);
        let bad = |reason: String| Error::Pass {
            pass: PruneChannels::NAME.into(),
            reason,
        };
        if !(0.0..=1.0).contains(&min_fraction) {
            return Err(bad(format!(
                "--min-fraction {min_fraction} is not between 0 and 1"
            )));
        }
        if round_to == 0 {
            return Err(bad("--round-to must be at least 1".into()));
        }
        Ok(PruneOptions {
            budget: self.budget()?,
            global: !self.uniform,
            min_channels: self.min_channels.unwrap_or(4),
            min_fraction,
            round_to,
            latency: None,
        })
    }
}

/// What channel pruning did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneChannelsReport {
    /// Channel groups found.
    pub groups: usize,
    /// Groups that could be pruned.
    pub prunable_groups: usize,
    /// How channels were scored.
    pub importance: ImportanceArg,
    /// Whether least-squares reconstruction ran.
    pub reconstructed: bool,
    /// Per refitted layer.
    pub refit: Vec<RefitReport>,
    /// The plan applied.
    pub plan: Plan,
}

impl Method for PruneChannels {
    const NAME: &'static str = "prune_channels";
    type Options = PruneChannelsOptions;
    type Plan = Plan;
    type Report = PruneChannelsReport;

    fn requested(o: &PruneChannelsOptions) -> bool {
        o.enabled
    }

    fn inherit(o: &mut PruneChannelsOptions, s: &Shared) {
        o.target.get_or_insert_with(|| s.target.clone());
        if o.latency_table.is_none() {
            o.latency_table.clone_from(&s.latency_table);
        }
        o.round_to.get_or_insert(s.round_to);
        o.reconstruct.get_or_insert(!s.no_reconstruct);
        o.ridge.get_or_insert(s.ridge);
    }

    fn validate(o: &PruneChannelsOptions) -> Result<(), Error> {
        let opts = o.prune_options()?;
        // a table that cannot be read is refused before any work
        if let (Budget::Latency(_), Some(p)) = (opts.budget, &o.latency_table) {
            LatencyTable::read(p)?;
        }
        Ok(())
    }

    fn needs_data(o: &PruneChannelsOptions) -> Option<&'static str> {
        (o.reconstruct() || o.importance() == ImportanceArg::Activation).then_some(
            "reconstruction and activation importance need it (or use --no-reconstruct --importance l2)",
        )
    }

    fn run(
        o: &PruneChannelsOptions,
        model: &mut Model,
        cx: &Context,
        replay: Option<Plan>,
    ) -> Result<(Plan, PruneChannelsReport), Error> {
        let gs = groups::analyse(model)?;
        let plan = match replay {
            Some(p) => p,
            None => plan(o, model, &gs, cx)?,
        };
        let original = model.clone();
        let changes = prune::apply(model, &gs, &plan)?;
        let mut refits = Vec::new();
        if o.reconstruct()
            && let Some(c) = &cx.calib
        {
            refits = refit::refit(
                &original,
                model,
                &refit_jobs(&original, &changes),
                &cx.spec(c, &c.fit),
                &o.refit_options(cx),
            )?;
        }
        let report = PruneChannelsReport {
            groups: gs.groups.len(),
            prunable_groups: gs.prunable().count(),
            importance: o.importance(),
            reconstructed: !refits.is_empty(),
            refit: refits,
            plan: plan.clone(),
        };
        Ok((plan, report))
    }

    fn describe(r: &PruneChannelsReport) -> Vec<String> {
        let mut out = vec![format!(
            "channel pruning: {} of {} channel groups prunable; importance {}; reconstruction {}",
            r.prunable_groups,
            r.groups,
            serde_json::to_value(r.importance)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            if r.reconstructed { "on" } else { "off" },
        )];
        if let Some((before, after)) = r.plan.latency_ms {
            out.push(format!(
                "latency predicted from the table: {before:.3} ms -> {after:.3} ms ({:.2}% kept)",
                100.0 * after / before.max(1e-12)
            ));
        }
        out
    }
}

/// Scores, sensitivity and the budgeted plan.
fn plan(o: &PruneChannelsOptions, model: &Model, gs: &Groups, cx: &Context) -> Result<Plan, Error> {
    let mut opts = o.prune_options()?;
    if let Budget::Latency(_) = opts.budget {
        let table = match &o.latency_table {
            Some(p) => LatencyTable::read(p)?,
            None => crate::latency::measure_table(
                model,
                cx.runtime,
                cx.threads,
                vec![],
                None,
                cx.progress,
            )?,
        };
        opts.latency = Some(Arc::new(table));
    }
    let weight = prune::weight_scores(
        model,
        gs,
        if o.importance() == ImportanceArg::L1 {
            Importance::L1
        } else {
            Importance::L2
        },
    )?;
    let scores = match (o.importance(), &cx.calib) {
        (ImportanceArg::Activation, Some(c)) => {
            let tensors = prune::consumer_inputs(model, gs);
            let m2 = channel_moments(model, &tensors, &cx.spec(c, &c.fit))?;
            prune::energy_scores(model, gs, &m2, &weight)?
        }
        _ => weight,
    };
    let sens = match &cx.calib {
        Some(c) if o.sensitivity => {
            // damage is measured on items the trial refits never see (a refit fits its own
            // items too well to judge it there)
            let (judge, fit) = Context::judge_split(c, o.sensitivity_items.unwrap_or(cx.items(32)));
            let reference = cx.reference(model, judge)?;
            let refit_opts = o.refit_options(cx);
            // one capture for all trials: each trial solves its kept subset from these
            let stats = if o.reconstruct() {
                Some(refit::collect(
                    model,
                    &consumer_layers(model, gs),
                    &cx.spec(c, fit),
                    &refit_opts,
                )?)
            } else {
                None
            };
            let fractions = [0.25, 0.5];
            cx.start("sensitivity", gs.prunable().count() * fractions.len());
            let s = prune::measure_sensitivity(
                model,
                gs,
                &scores,
                &fractions,
                &mut |m, changes| {
                    let fail = |e: String| Error::Pass {
                        pass: "sensitivity".into(),
                        reason: e,
                    };
                    if let Some(stats) = &stats {
                        stats
                            .apply(m, &refit_jobs(model, changes), &refit_opts)
                            .map_err(|e| fail(e.to_string()))?;
                    }
                    reference.damage(m).map_err(|e| fail(e.to_string()))
                },
                &mut |d, _| cx.progress.set(d),
            );
            cx.progress.finish();
            Some(s?)
        }
        _ => None,
    };
    prune::plan(model, gs, &scores, sens.as_deref(), &opts)
}

/// E[x²] per channel (axis 1) of each tensor over the calibration items.
pub fn channel_moments(
    model: &Model,
    tensors: &[String],
    spec: &CaptureSpec,
) -> Result<HashMap<String, Vec<f64>>, Error> {
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

/// Refit jobs for the layers that lost input channels (names as in `model`).
pub fn refit_jobs(model: &Model, changes: &[prune::ConsumerChange]) -> Vec<RefitJob> {
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
pub fn consumer_layers(model: &Model, gs: &Groups) -> Vec<refit::LayerRef> {
    let mut v: Vec<refit::LayerRef> = gs
        .prunable()
        .flat_map(|g| g.members.iter())
        .filter(|m| m.role == Role::Consumer)
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
