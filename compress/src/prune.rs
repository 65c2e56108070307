//! Channel pruning: score channels, plan how many each group keeps against a budget, and apply
//! the plan by slicing every member of every group.
//!
//! Accepts any model [`crate::groups::analyse`] can read; prunes only unfrozen groups. The plan
//! is deterministic, printable and serialisable. Applying it keeps every graph input and output
//! shape and leaves a graph that passes the consistency check and shape inference (checked before
//! returning).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use whittle_core::Model;
use whittle_core::attr::Attrs;
use whittle_core::onnx::AttributeProto;
use whittle_core::tensor::{element_count, to_f32};
use whittle_core::{check, cost, shape};

use crate::Error;
use crate::groups::{Groups, Role};
use crate::latency::LatencyTable;

/// What the budget limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    /// Fraction of the model's MACs to keep.
    Macs(f64),
    /// Fraction of the model's params to keep.
    Params(f64),
    /// Fraction of the model's latency to keep, predicted from a per-layer latency table
    /// ([`PruneOptions::latency`]).
    Latency(f64),
}

impl Budget {
    /// The fraction kept.
    pub fn fraction(self) -> f64 {
        match self {
            Budget::Macs(f) | Budget::Params(f) | Budget::Latency(f) => f,
        }
    }

    /// The name used in `--target KIND=FRACTION`.
    pub fn kind(self) -> &'static str {
        match self {
            Budget::Macs(_) => "macs",
            Budget::Params(_) => "params",
            Budget::Latency(_) => "latency",
        }
    }

    /// Index of this budget's metric in a [`Cost`] triple.
    fn metric(self) -> usize {
        match self {
            Budget::Params(_) => 0,
            Budget::Macs(_) => 1,
            Budget::Latency(_) => 2,
        }
    }
}

impl std::str::FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not KIND=FRACTION (e.g. macs=0.75)"))?;
        let f: f64 = v
            .parse()
            .map_err(|_| format!("'{v}' in '{s}' is not a number"))?;
        if !(f > 0.0 && f <= 1.0) {
            return Err(format!("'{s}': the fraction kept must be in (0, 1]"));
        }
        match k {
            "macs" | "flops" => Ok(Budget::Macs(f)),
            "params" => Ok(Budget::Params(f)),
            "latency" => Ok(Budget::Latency(f)),
            _ => Err(format!("unknown budget kind '{k}' (macs, params, latency)")),
        }
    }
}

/// How channels are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// L1 norm of each channel's weights over the group's members.
    L1,
    /// L2 norm of each channel's weights over the group's members.
    L2,
    /// Energy each channel delivers to its consumers on calibration data (E[x^2] ||W||^2).
    Activation,
}

/// Options of [`plan`].
#[derive(Debug, Clone, Serialize)]
pub struct PruneOptions {
    /// The budget.
    pub budget: Budget,
    /// Rank channels of all groups together (greedy on importance per unit of cost) instead of
    /// one ratio for every group.
    pub global: bool,
    /// Every group keeps at least this many channels (or all it has, if fewer).
    pub min_channels: usize,
    /// Every group keeps at least this fraction of its channels.
    pub min_fraction: f64,
    /// Kept channel counts are multiples of this (1: any count).
    pub round_to: usize,
    /// The per-layer latency table a `latency=` budget is planned against.
    #[serde(skip)]
    pub latency: Option<Arc<LatencyTable>>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            budget: Budget::Macs(0.75),
            global: true,
            min_channels: 4,
            min_fraction: 0.1,
            round_to: 1,
            latency: None,
        }
    }
}

/// How much the model's output suffers when a group alone loses a fraction of its channels
/// (least important first), measured on calibration data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sensitivity {
    /// (fraction of channels removed, damage), ascending in the fraction.
    pub points: Vec<(f64, f64)>,
}

impl Sensitivity {
    /// Damage at a fraction removed: piecewise linear through (0, 0) and the points, continued
    /// past the last point with twice the last slope (damage grows faster as a group empties).
    pub fn damage(&self, f: f64) -> f64 {
        let mut prev = (0.0, 0.0);
        for &(x, y) in &self.points {
            if f <= x {
                let t = if x > prev.0 {
                    (f - prev.0) / (x - prev.0)
                } else {
                    1.0
                };
                return prev.1 + t * (y - prev.1);
            }
            prev = (x, y.max(prev.1));
        }
        let slope = match self.points.len() {
            0 => 0.0,
            1 => prev.1 / prev.0.max(1e-9),
            n => {
                let (a, b) = (self.points[n - 2], self.points[n - 1]);
                ((b.1 - a.1) / (b.0 - a.0).max(1e-9)).max(prev.1 / prev.0.max(1e-9))
            }
        };
        prev.1 + 2.0 * slope * (f - prev.0)
    }
}

/// The plan that removes the `fraction` least important channels of one group only.
pub fn single_group_plan(
    groups: &Groups,
    scores: &[Vec<f64>],
    group: usize,
    fraction: f64,
) -> Option<Plan> {
    let g = groups.groups.get(group).filter(|g| g.frozen.is_none())?;
    let remove = ((g.size as f64) * fraction).round() as usize;
    if remove == 0 || remove >= g.size {
        return None;
    }
    let s = scores.get(group)?;
    let mut idx: Vec<usize> = (0..g.size).collect();
    idx.sort_by(|&a, &b| {
        s[a].partial_cmp(&s[b])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut keep = idx[remove..].to_vec();
    keep.sort();
    Some(Plan {
        groups: vec![GroupPlan {
            id: group,
            size: g.size,
            keep,
        }],
        macs: (0, 0),
        params: (0, 0),
        latency_ms: None,
    })
}

/// Repairs a candidate (the given layers lost inputs) and measures how far its output is from
/// the original's (0: identical).
pub type DamageFn<'a> = dyn FnMut(&mut Model, &[ConsumerChange]) -> Result<f64, Error> + 'a;

/// Measure each prunable group's [`Sensitivity`] at the given fractions: `damage(model, changes)`
/// may repair the candidate (the layers in `changes` lost inputs), then runs it on calibration
/// data and says how far its output is from the original's.
pub fn measure_sensitivity(
    model: &Model,
    groups: &Groups,
    scores: &[Vec<f64>],
    fractions: &[f64],
    damage: &mut DamageFn,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Sensitivity>, Error> {
    let prunable: Vec<usize> = groups.prunable().map(|g| g.id).collect();
    let total = prunable.len() * fractions.len();
    let mut out = vec![Sensitivity::default(); groups.groups.len()];
    let mut done = 0;
    for &g in &prunable {
        for &f in fractions {
            done += 1;
            let Some(p) = single_group_plan(groups, scores, g, f) else {
                continue;
            };
            let mut m = model.clone();
            let changes = apply(&mut m, groups, &p)?;
            let d = damage(&mut m, &changes)?;
            out[g].points.push((f, d));
            progress(done, total);
        }
    }
    Ok(out)
}

/// How many and which channels one group keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupPlan {
    /// Group id.
    pub id: usize,
    /// Channels before.
    pub size: usize,
    /// Kept channel indices, ascending.
    pub keep: Vec<usize>,
}

/// A pruning plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// One entry per pruned group.
    pub groups: Vec<GroupPlan>,
    /// Predicted MACs before / after.
    pub macs: (u64, u64),
    /// Predicted params before / after.
    pub params: (u64, u64),
    /// Predicted latency before / after in ms, from the latency table (`latency=` budgets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<(f64, f64)>,
}

/// Per-channel scores from weight norms: for each member, the norm of the channel's slice,
/// divided by that member's mean channel norm, summed over members.
pub fn weight_scores(
    model: &Model,
    groups: &Groups,
    p: Importance,
) -> Result<Vec<Vec<f64>>, Error> {
    let g = model.graph();
    let mut out = Vec::new();
    for grp in &groups.groups {
        let mut score = vec![0f64; grp.size];
        for m in &grp.members {
            let node = &g.node[m.node];
            let Some((slot, axis)) = weight_axis(node, &m.role) else {
                continue;
            };
            let Some(t) = node.input.get(slot).and_then(|x| model.initializer(x)) else {
                continue;
            };
            let w = to_f32(t)?;
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let norms = channel_norms(&w, &dims, axis, m.offset, m.block, grp.size, p);
            let mean = norms.iter().sum::<f64>() / norms.len().max(1) as f64;
            if mean > 0.0 {
                for (s, v) in score.iter_mut().zip(&norms) {
                    *s += v / mean;
                }
            }
        }
        out.push(score);
    }
    Ok(out)
}

/// Every (input slot, axis) a member slices: its weight, and the bias of a producer.
fn member_slots(
    model: &Model,
    node: &whittle_core::onnx::NodeProto,
    role: &Role,
) -> Vec<(usize, usize)> {
    let mut slots: Vec<(usize, usize)> = match role {
        Role::Param { slot, axis } => vec![(*slot, *axis)],
        r => weight_axis(node, r).into_iter().collect(),
    };
    if matches!(role, Role::Producer | Role::Depthwise)
        && node.op_type() != "MatMul"
        && let Some(t) = node
            .input
            .get(2)
            .filter(|b| !b.is_empty())
            .and_then(|b| model.initializer(b))
    {
        slots.push((2, t.dims.len().saturating_sub(1)));
    }
    slots
}

/// The (input slot, axis) of a member's main weight.
fn weight_axis(node: &whittle_core::onnx::NodeProto, role: &Role) -> Option<(usize, usize)> {
    let trans_b = node.attr_int("transB").unwrap_or(0) != 0;
    let gemm = node.op_type() == "Gemm";
    let matmul = node.op_type() == "MatMul";
    match role {
        Role::Producer if gemm => Some((1, if trans_b { 0 } else { 1 })),
        Role::Producer if matmul => Some((1, 1)),
        Role::Producer => Some((1, 0)),
        Role::Consumer if gemm => Some((1, if trans_b { 1 } else { 0 })),
        Role::Consumer if matmul => Some((1, 0)),
        Role::Consumer => Some((1, 1)),
        Role::Depthwise => Some((1, 0)),
        Role::Param { .. } => None,
    }
}

fn channel_norms(
    w: &[f32],
    dims: &[usize],
    axis: usize,
    offset: usize,
    block: usize,
    size: usize,
    p: Importance,
) -> Vec<f64> {
    let outer: usize = dims[..axis].iter().product();
    let len = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut acc = vec![0f64; size];
    for o in 0..outer {
        for a in 0..len {
            let Some(c) = a
                .checked_sub(offset * block)
                .map(|x| x / block)
                .filter(|&c| c < size)
            else {
                continue;
            };
            let base = (o * len + a) * inner;
            for &v in &w[base..base + inner] {
                acc[c] += match p {
                    Importance::L2 => (v as f64) * (v as f64),
                    _ => (v as f64).abs(),
                };
            }
        }
    }
    if p == Importance::L2 {
        acc.iter_mut().for_each(|v| *v = v.sqrt());
    }
    acc
}

/// Scores from the energy each channel delivers to the layers that read it: for every consumer,
/// E[x_f^2] * ||W[:, f]||^2 summed over the channel's features f (`second_moment[t]` holds
/// E[x^2] per channel / feature of the consumer's input tensor `t`), relative to the consumer's
/// mean, summed over consumers. Groups without a measured consumer keep their `fallback` scores.
pub fn energy_scores(
    model: &Model,
    groups: &Groups,
    second_moment: &HashMap<String, Vec<f64>>,
    fallback: &[Vec<f64>],
) -> Result<Vec<Vec<f64>>, Error> {
    let g = model.graph();
    let mut out = Vec::new();
    for (grp, fb) in groups.groups.iter().zip(fallback) {
        let mut score = vec![0f64; grp.size];
        let mut used = false;
        for m in grp.members.iter().filter(|m| m.role == Role::Consumer) {
            let node = &g.node[m.node];
            let (Some((slot, axis)), Some(m2)) = (
                weight_axis(node, &m.role),
                node.input.first().and_then(|x| second_moment.get(x)),
            ) else {
                continue;
            };
            let Some(t) = node.input.get(slot).and_then(|x| model.initializer(x)) else {
                continue;
            };
            let w = to_f32(t)?;
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            // squared norm per feature along the input axis
            let per_feature = channel_norms(&w, &dims, axis, 0, 1, dims[axis], Importance::L2);
            let mut e = vec![0f64; grp.size];
            for (c, ec) in e.iter_mut().enumerate() {
                for f in (m.offset + c) * m.block..(m.offset + c + 1) * m.block {
                    if let (Some(n), Some(x2)) = (per_feature.get(f), m2.get(f)) {
                        *ec += n * n * x2;
                    }
                }
            }
            let mean = e.iter().sum::<f64>() / e.len().max(1) as f64;
            if mean > 0.0 {
                used = true;
                for (s, v) in score.iter_mut().zip(&e) {
                    *s += v / mean;
                }
            }
        }
        out.push(if used { score } else { fb.clone() });
    }
    Ok(out)
}

/// The input tensors of the consumers of prunable groups (what [`energy_scores`] needs measured).
pub fn consumer_inputs(model: &Model, groups: &Groups) -> Vec<String> {
    let mut v: Vec<String> = groups
        .prunable()
        .flat_map(|g| g.members.iter().filter(|m| m.role == Role::Consumer))
        .filter_map(|m| model.graph().node[m.node].input.first().cloned())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// One sliced axis of an initializer: its index, its length, and the (group, block) pairs that
/// slice it.
struct SlicedAxis {
    axis: usize,
    len: usize,
    groups: Vec<(usize, usize)>,
}

/// One initializer's cost: elements now, and per sliced axis the groups that slice it.
struct InitCost {
    elements: f64,
    macs_per_element: f64,
    axes: Vec<SlicedAxis>,
    /// The latency table's layer whose weight this is.
    layer: Option<usize>,
}

/// Params, MACs and predicted latency (ms), in this order ([`Budget::metric`]).
type Cost = [f64; 3];

fn add(a: Cost, b: Cost) -> Cost {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

struct CostModel {
    inits: Vec<InitCost>,
    by_group: Vec<Vec<usize>>,
    latency: Option<Arc<LatencyTable>>,
}

impl CostModel {
    fn new(
        model: &Model,
        groups: &Groups,
        latency: Option<Arc<LatencyTable>>,
    ) -> Result<CostModel, Error> {
        let g = model.graph();
        let shapes = shape::infer(model, &[])?;
        let costs = cost::count(model, &shapes);
        let layer_of = match &latency {
            Some(t) => t.check(model)?,
            None => HashMap::new(),
        };
        let mut index: BTreeMap<(String, usize), Vec<(usize, usize)>> = BTreeMap::new();
        for grp in groups.prunable() {
            for m in &grp.members {
                let node = &g.node[m.node];
                for (slot, axis) in member_slots(model, node, &m.role) {
                    if let Some(name) = node
                        .input
                        .get(slot)
                        .filter(|x| !x.is_empty() && model.initializer(x).is_some())
                    {
                        index
                            .entry((name.clone(), axis))
                            .or_default()
                            .push((grp.id, m.block));
                    }
                }
            }
        }
        let mut per_init: BTreeMap<String, InitCost> = BTreeMap::new();
        for ((name, axis), gs) in index {
            let t = model.initializer(&name).ok_or_else(|| Error::Pass {
                pass: "prune".into(),
                reason: format!("no initializer {name}"),
            })?;
            let e = per_init.entry(name.clone()).or_insert_with(|| InitCost {
                elements: element_count(t).unwrap_or(0) as f64,
                macs_per_element: 0.0,
                axes: vec![],
                layer: layer_of.get(&name).copied(),
            });
            e.axes.push(SlicedAxis {
                axis,
                len: t.dims.get(axis).copied().unwrap_or(1) as usize,
                groups: gs,
            });
        }
        for (node, nc) in g.node.iter().zip(&costs.nodes) {
            if nc.macs > 0
                && let Some(w) = node.input.get(1)
                && let Some(ic) = per_init.get_mut(w)
                && ic.elements > 0.0
            {
                ic.macs_per_element = nc.macs as f64 / ic.elements;
            }
        }
        let inits: Vec<InitCost> = per_init.into_values().collect();
        let mut by_group = vec![vec![]; groups.groups.len()];
        for (i, ic) in inits.iter().enumerate() {
            for a in &ic.axes {
                for (g, _) in &a.groups {
                    if !by_group[*g].contains(&i) {
                        by_group[*g].push(i);
                    }
                }
            }
        }
        Ok(CostModel {
            inits,
            by_group,
            latency,
        })
    }

    /// Params, MACs and latency of one initializer's layer given kept counts per group.
    fn init_cost(&self, i: usize, kept: &[usize], size: &[usize]) -> Cost {
        let ic = &self.inits[i];
        let mut f = 1.0;
        let mut per_axis = [1.0, 1.0];
        for a in &ic.axes {
            let removed: usize = a
                .groups
                .iter()
                .map(|(g, b)| (size[*g] - kept[*g]) * b)
                .sum();
            let fa = (a.len as f64 - removed as f64).max(0.0) / a.len.max(1) as f64;
            f *= fa;
            if let Some(p) = per_axis.get_mut(a.axis) {
                *p *= fa;
            }
        }
        let ms = match (&self.latency, ic.layer) {
            (Some(t), Some(l)) => t.layers[l].at(&t.fractions, per_axis[0], per_axis[1]),
            _ => 0.0,
        };
        [ic.elements * f, ic.elements * f * ic.macs_per_element, ms]
    }

    fn total(&self, kept: &[usize], size: &[usize]) -> Cost {
        (0..self.inits.len())
            .map(|i| self.init_cost(i, kept, size))
            .fold([0.0; 3], add)
    }

    fn group_cost(&self, g: usize, kept: &[usize], size: &[usize]) -> Cost {
        self.by_group[g]
            .iter()
            .map(|&i| self.init_cost(i, kept, size))
            .fold([0.0; 3], add)
    }
}

fn floor_kept(size: usize, opts: &PruneOptions) -> usize {
    let by_frac = (size as f64 * opts.min_fraction).ceil() as usize;
    let mut k = opts.min_channels.max(by_frac).min(size).max(1);
    let r = opts.round_to.max(1);
    if r > 1 && size >= r {
        k = k.div_ceil(r) * r;
    }
    k.min(size)
}

fn step_down(k: usize, floor: usize, r: usize) -> Option<usize> {
    if k <= floor {
        return None;
    }
    let next = if r > 1 && k >= r {
        if k.is_multiple_of(r) {
            k - r
        } else {
            k - k % r
        }
    } else {
        k - 1
    };
    (next >= floor).then_some(next)
}

/// Decide how many and which channels each prunable group keeps so the budget is met.
pub fn plan(
    model: &Model,
    groups: &Groups,
    scores: &[Vec<f64>],
    sensitivity: Option<&[Sensitivity]>,
    opts: &PruneOptions,
) -> Result<Plan, Error> {
    let prunable: Vec<usize> = groups.prunable().map(|g| g.id).collect();
    if prunable.is_empty() {
        let reasons: Vec<String> = groups
            .groups
            .iter()
            .filter_map(|g| g.frozen.clone())
            .take(3)
            .collect();
        return Err(Error::NothingToPrune(if groups.groups.is_empty() {
            "no Conv, Gemm or 2-D MatMul produces channels whittle can prune (MatMuls over token sequences belong to transformer block / head pruning)".into()
        } else {
            format!(
                "every channel group is frozen ({}{})",
                reasons.join("; "),
                if groups.groups.len() > 3 { "; ..." } else { "" }
            )
        }));
    }
    let shapes = shape::infer(model, &[])?;
    let base = cost::count(model, &shapes);
    if let Budget::Macs(_) = opts.budget {
        // a MAC budget is never planned on a guessed size: the unknown dims are named
        base.exact_macs()?;
    }
    let latency = match (opts.budget, &opts.latency) {
        (Budget::Latency(_), None) => {
            return Err(Error::Budget(
                "a latency= budget needs a per-layer latency table (measure one with `whittle profile MODEL -o TABLE`)".into(),
            ));
        }
        (Budget::Latency(_), Some(t)) => Some(t.clone()),
        _ => None,
    };
    let cm = CostModel::new(model, groups, latency.clone())?;
    let size: Vec<usize> = groups.groups.iter().map(|g| g.size).collect();
    let full = size.clone();
    let all = cm.total(&full, &size);
    // the part of the model no group touches
    let base_cost: Cost = [
        base.params as f64,
        base.macs as f64,
        latency.as_ref().map_or(0.0, |t| t.total_ms()),
    ];
    let fixed: Cost = [
        base_cost[0] - all[0],
        base_cost[1] - all[1],
        base_cost[2] - all[2],
    ];
    let k = opts.budget.metric();
    let measure =
        |kept: &[usize]| -> f64 { (cm.total(kept, &size)[k] + fixed[k]) / base_cost[k].max(1e-12) };
    let target = opts.budget.fraction();
    let floors: Vec<usize> = size.iter().map(|&s| floor_kept(s, opts)).collect();
    let mut smallest = full.clone();
    for &g in &prunable {
        smallest[g] = floors[g];
    }
    let reachable = measure(&smallest);
    if reachable > target + 1e-9 {
        let kind = opts.budget.kind();
        return Err(Error::Budget(format!(
            "{kind}={target} is unreachable: the smallest reachable is {kind}={reachable:.3} (every prunable group at its minimum: --min-channels {}, min fraction {}; {} of {} groups are frozen)",
            opts.min_channels,
            opts.min_fraction,
            groups.groups.len() - prunable.len(),
            groups.groups.len()
        )));
    }
    // channel order per group: least important first
    let order: Vec<Vec<usize>> = scores
        .iter()
        .map(|s| {
            let mut idx: Vec<usize> = (0..s.len()).collect();
            idx.sort_by(|&a, &b| {
                s[a].partial_cmp(&s[b])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.cmp(&b))
            });
            idx
        })
        .collect();
    // scores are comparable across groups: each member's norms are relative to that member's
    // mean, so a channel read by many layers (a residual stream) weighs more than an inner one
    let norm: Vec<f64> = vec![1.0; scores.len()];
    let mut kept = full.clone();
    let r = opts.round_to.max(1);
    if opts.global {
        while measure(&kept) > target + 1e-9 {
            let mut best: Option<(f64, usize, usize)> = None;
            for &g in &prunable {
                let Some(next) = step_down(kept[g], floors[g], r) else {
                    continue;
                };
                let by_score: f64 = order[g][size[g] - kept[g]..size[g] - next]
                    .iter()
                    .map(|&c| scores[g][c] / norm[g])
                    .sum();
                // measured damage when the group has it, the channels' scores otherwise
                let removed = match sensitivity.and_then(|s| s.get(g)) {
                    Some(sens) if !sens.points.is_empty() => {
                        let frac = |k: usize| 1.0 - k as f64 / size[g] as f64;
                        (sens.damage(frac(next)) - sens.damage(frac(kept[g]))).max(0.0)
                            + 1e-9 * by_score
                    }
                    _ => by_score,
                };
                let before = cm.group_cost(g, &kept, &size);
                let mut trial = kept.clone();
                trial[g] = next;
                let after = cm.group_cost(g, &trial, &size);
                let saved = before[k] - after[k];
                let score = removed / saved.max(1e-9);
                if best.is_none_or(|b| score < b.0) {
                    best = Some((score, g, next));
                }
            }
            let Some((_, g, next)) = best else { break };
            kept[g] = next;
        }
    } else {
        // one ratio for every group, by bisection on the fraction removed
        let at = |ratio: f64| -> Vec<usize> {
            let mut k = full.clone();
            for &g in &prunable {
                let want = ((size[g] as f64) * (1.0 - ratio)).round() as usize;
                let want = if r > 1 && size[g] >= r {
                    (want / r).max(1) * r
                } else {
                    want
                };
                k[g] = want.clamp(floors[g], size[g]);
            }
            k
        };
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..40 {
            let mid = (lo + hi) / 2.0;
            if measure(&at(mid)) > target {
                lo = mid
            } else {
                hi = mid
            }
        }
        kept = at(hi);
    }
    let groups_out: Vec<GroupPlan> = prunable
        .iter()
        .filter(|&&g| kept[g] < size[g])
        .map(|&g| {
            let mut keep: Vec<usize> = order[g][size[g] - kept[g]..].to_vec();
            keep.sort();
            GroupPlan {
                id: g,
                size: size[g],
                keep,
            }
        })
        .collect();
    let after = cm.total(&kept, &size);
    Ok(Plan {
        groups: groups_out,
        macs: (base.macs, (after[1] + fixed[1]).round() as u64),
        params: (base.params, (after[0] + fixed[0]).round() as u64),
        latency_ms: latency.map(|_| (base_cost[2], after[2] + fixed[2])),
    })
}

/// A layer whose input channels changed, for least-squares reconstruction.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerChange {
    /// Node name.
    pub node: String,
    /// Indices along its input channel / feature axis (original numbering) it still reads.
    pub kept_in: Vec<usize>,
    /// Indices of its output channels / features it still produces.
    pub kept_out: Vec<usize>,
}

/// Apply a plan. Returns the layers whose inputs lost channels.
pub fn apply(
    model: &mut Model,
    groups: &Groups,
    plan: &Plan,
) -> Result<Vec<ConsumerChange>, Error> {
    // (initializer, axis) -> indices to remove
    let mut cuts: BTreeMap<(String, usize), Vec<usize>> = BTreeMap::new();
    let mut group_attr: HashMap<usize, usize> = HashMap::new();
    let mut consumers: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut producers: HashMap<usize, Vec<usize>> = HashMap::new();
    let g = model.graph().clone();
    for gp in &plan.groups {
        let grp = groups.groups.get(gp.id).ok_or_else(|| Error::Pass {
            pass: "prune".into(),
            reason: format!("plan names group {} that does not exist", gp.id),
        })?;
        if grp.frozen.is_some()
            || grp.size != gp.size
            || gp.keep.iter().any(|&k| k >= gp.size)
            || gp.keep.is_empty()
        {
            return Err(Error::Pass {
                pass: "prune".into(),
                reason: format!(
                    "plan does not fit group {} ({} channels{})",
                    gp.id,
                    grp.size,
                    if grp.frozen.is_some() { ", frozen" } else { "" }
                ),
            });
        }
        let removed: Vec<usize> = (0..gp.size)
            .filter(|c| gp.keep.binary_search(c).is_err())
            .collect();
        for m in &grp.members {
            let node = &g.node[m.node];
            for (slot, axis) in member_slots(model, node, &m.role) {
                let Some(name) = node.input.get(slot).filter(|x| !x.is_empty()) else {
                    continue;
                };
                let e = cuts.entry((name.clone(), axis)).or_default();
                for &c in &removed {
                    e.extend((m.offset + c) * m.block..(m.offset + c + 1) * m.block);
                }
            }
            match m.role {
                Role::Depthwise => *group_attr.entry(m.node).or_insert(0) += removed.len(),
                Role::Consumer => consumers.entry(m.node).or_default().extend(
                    removed
                        .iter()
                        .flat_map(|&c| (m.offset + c) * m.block..(m.offset + c + 1) * m.block),
                ),
                Role::Producer => {
                    producers.insert(m.node, gp.keep.clone());
                }
                _ => {}
            }
        }
    }
    let gm = model.graph_mut();
    for ((name, axis), mut remove) in cuts {
        remove.sort();
        remove.dedup();
        let t = gm
            .initializer
            .iter_mut()
            .find(|t| t.name() == name)
            .ok_or_else(|| Error::Pass {
                pass: "prune".into(),
                reason: format!("no initializer {name}"),
            })?;
        slice_out(t, axis, &remove)?;
    }
    for (node, removed) in group_attr {
        let n = &mut gm.node[node];
        let old = n.attr_int("group").unwrap_or(1) as usize;
        set_int_attr(&mut n.attribute, "group", (old - removed) as i64);
    }
    gm.value_info.clear();
    check::check_graph(model.graph()).map_err(|e| Error::Pass {
        pass: "prune".into(),
        reason: e.to_string(),
    })?;
    let shapes = shape::infer(model, &[]).map_err(|e| Error::Pass {
        pass: "prune".into(),
        reason: format!("the pruned graph is inconsistent: {e}"),
    })?;
    for o in &model.graph().output {
        if shapes.shape(o.name()).is_none() {
            return Err(Error::Pass {
                pass: "prune".into(),
                reason: format!("output '{}' lost its shape", o.name()),
            });
        }
    }
    // layers to refit: consumers, with what they still read and produce
    let mut changes = Vec::new();
    for (node, mut removed) in consumers {
        removed.sort();
        removed.dedup();
        let n = &g.node[node];
        let Some(w) = n
            .input
            .get(1)
            .and_then(|x| g.initializer.iter().find(|t| t.name() == x.as_str()))
        else {
            continue;
        };
        let trans_b = n.attr_int("transB").unwrap_or(0) != 0;
        let (in_axis, out_axis) = match n.op_type() {
            "Gemm" if trans_b => (1, 0),
            "Gemm" | "MatMul" => (0, 1),
            _ => (1, 0),
        };
        let in_len = w.dims[in_axis] as usize;
        let out_len = w.dims[out_axis] as usize;
        changes.push(ConsumerChange {
            node: n.name().to_string(),
            kept_in: (0..in_len)
                .filter(|i| removed.binary_search(i).is_err())
                .collect(),
            kept_out: producers
                .get(&node)
                .cloned()
                .unwrap_or_else(|| (0..out_len).collect()),
        });
    }
    Ok(changes)
}

fn set_int_attr(attrs: &mut Vec<AttributeProto>, name: &str, v: i64) {
    match attrs.iter_mut().find(|a| a.name() == name) {
        Some(a) => a.i = Some(v),
        None => attrs.push(AttributeProto {
            name: Some(name.into()),
            i: Some(v),
            r#type: Some(whittle_core::onnx::attribute_proto::AttributeType::Int as i32),
            ..Default::default()
        }),
    }
}

/// Remove `remove` (sorted) along `axis` of a tensor, keeping its element type.
fn slice_out(
    t: &mut whittle_core::onnx::TensorProto,
    axis: usize,
    remove: &[usize],
) -> Result<(), Error> {
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    if axis >= dims.len() || remove.last().is_some_and(|&r| r >= dims[axis]) {
        return Err(Error::Pass {
            pass: "prune".into(),
            reason: format!(
                "cannot cut {:?} from axis {axis} of '{}' {:?}",
                remove.len(),
                t.name(),
                dims
            ),
        });
    }
    let v = to_f32(t)?;
    let outer: usize = dims[..axis].iter().product();
    let len = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(v.len());
    let keep: Vec<usize> = (0..len)
        .filter(|i| remove.binary_search(i).is_err())
        .collect();
    for o in 0..outer {
        for &a in &keep {
            let b = (o * len + a) * inner;
            out.extend_from_slice(&v[b..b + inner]);
        }
    }
    let mut nd = t.dims.clone();
    nd[axis] = keep.len() as i64;
    let name = t.name().to_string();
    *t = whittle_core::tensor::from_f32(&name, &nd, &out);
    Ok(())
}
