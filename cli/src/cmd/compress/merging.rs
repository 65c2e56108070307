//! The depth-merging stage of `whittle compress` (`--merge`): each candidate segment's latency
//! saving (measured now, or from a `whittle profile --merge` table) and damage (measured now
//! after its refit, or from an earlier `--plan-out`), a dynamic programme's choice under the
//! latency budget, and the chosen merges applied and refitted in sequence.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use whittle_calib::capture::CaptureSpec;
use whittle_calib::{Dataset, Preprocess};
use whittle_compress::latency::LatencyTable;
use whittle_compress::merge;
use whittle_compress::prune::Budget;
use whittle_compress::refit::{self, RefitJob, RefitOptions, RefitReport};
use whittle_core::Model;

use super::{Args, Reference};
use crate::progress::bar;

/// What `--merge` aims at.
#[derive(Clone, Copy)]
pub(super) enum Goal {
    /// Keep this fraction of the latency, with the least damage.
    Latency(f64),
    /// Save the most latency with at most this output damage (summed over the merges).
    Damage(f64),
}

/// The goal of `--merge`: `--target latency=F` or `--target damage=D`.
pub(super) fn merge_goal(a: &Args) -> Result<Goal> {
    let t = a.merge_target.as_deref().unwrap_or(&a.target);
    if let Some(d) = t.strip_prefix("damage=") {
        return match d.parse::<f64>() {
            Ok(d) if d > 0.0 && d.is_finite() => Ok(Goal::Damage(d)),
            _ => bail!("--target damage=D takes a positive number, not '{d}'"),
        };
    }
    match t.parse::<Budget>() {
        Ok(Budget::Latency(f)) => Ok(Goal::Latency(f)),
        Ok(_) => bail!(
            "--merge takes --target latency=F (the latency kept) or damage=D (the output damage allowed), not '{t}'"
        ),
        Err(e) => bail!("--target: {e}"),
    }
}

/// One merge candidate, or one merged segment.
#[derive(Clone, Serialize, serde::Deserialize)]
pub struct MergedSegment {
    /// The convolutions merged (the result keeps the last one's name).
    pub convs: Vec<String>,
    /// Activations removed.
    pub acts: Vec<String>,
    /// A residual Add folded in.
    pub add: Option<String>,
    /// Whether the merge is exact (no activation removed, no padding moved).
    pub exact: bool,
    /// Latency saved on the segment alone, ms.
    pub saved_ms: f64,
    /// Output damage on calibration items with only this merge (after its refit; infinite when
    /// the merge saves nothing and was not judged).
    #[serde(with = "finite_or_null")]
    pub damage: f64,
    /// Whether the merged conv is refitted: a merge that removed an activation is judged both
    /// as composed and refitted, and keeps the one with less damage on the held-out items (a
    /// least-squares fit of the segment's output can do worse downstream than the plain
    /// composition, where the next activation discards what the fit spent itself on).
    #[serde(default = "yes")]
    pub refit: bool,
}

/// JSON has no infinity: an unjudged candidate's damage is written as null.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
    }
}

/// What `--merge` did.
#[derive(Serialize, serde::Deserialize)]
pub struct MergeSummary {
    /// Candidate segments.
    pub candidates: usize,
    /// The model's latency before, ms (fastest runs).
    pub model_ms: f64,
    /// Where the latencies come from: `measured` now, or the latency table's path.
    #[serde(default)]
    pub latency_from: String,
    /// Whether merged layers were refitted (the damages are of refitted merges).
    #[serde(default = "yes")]
    pub refitted: bool,
    /// The chosen plan's latency as a fraction of the model's, measured as a whole beside the
    /// model on --runtime (when the latencies are this runtime's).
    #[serde(default)]
    pub plan_latency: Option<f64>,
    /// The segments merged.
    pub merged: Vec<MergedSegment>,
    /// Output damage of all the merges together (sequentially refitted) on the items that judged
    /// each merge alone: what the plan's summed damage predicts.
    #[serde(default, skip_deserializing)]
    pub combined_damage: Option<f64>,
    /// Every candidate with its measured saving and damage (`--candidates` reads them back).
    #[serde(default)]
    pub measured: Vec<MergedSegment>,
    /// Per merged layer refitted.
    #[serde(default, skip_deserializing)]
    pub refit: Vec<RefitReport>,
}

fn yes() -> bool {
    true
}

/// The depth-merging part of a plan file written by `--plan-out`.
fn read_plan(path: &Path) -> Result<MergeSummary> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let plan: super::SavedPlan = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a plan written by --plan-out", path.display()))?;
    plan.merge
        .with_context(|| format!("{} holds no depth-merging plan", path.display()))
}

/// Where each of `list` is among this model's candidates (by their convolutions' names).
fn positions(list: &[MergedSegment], segs: &[merge::Segment], what: &str) -> Result<Vec<usize>> {
    list.iter()
        .map(|p| {
            segs.iter()
                .position(|s| s.convs == p.convs && s.acts == p.acts && s.add == p.add)
                .with_context(|| {
                    format!(
                        "the {what} merges {}, which is not a merge candidate of this model",
                        p.convs.join(" + ")
                    )
                })
        })
        .collect()
}

/// A latency table with merge entries that fits `model`.
fn merge_table(path: &Path, model: &Model) -> Result<LatencyTable> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("latency table {}", path.display()))?;
    let t: LatencyTable = serde_json::from_str(&text).with_context(|| {
        format!(
            "latency table {}: not a table written by `whittle profile`",
            path.display()
        )
    })?;
    if t.merges.is_empty() {
        bail!(
            "latency table {} has no merge candidates: measure it with `whittle profile --merge`",
            path.display()
        );
    }
    t.check(model)
        .with_context(|| format!("latency table {}", path.display()))?;
    Ok(t)
}

/// Depth merging: each candidate's latency saving and damage (measured, or read back), a
/// dynamic programme picks the set with the least damage that meets the latency budget (or the
/// most saving within the damage allowed); apply and refit them.
pub(super) fn merge_stage(
    a: &Args,
    model: &Model,
    d: &Dataset,
    calib_idx: &[usize],
    pre: &Preprocess,
) -> Result<(Model, MergeSummary)> {
    let segs = merge::segments(model);
    if segs.is_empty() {
        bail!(merge::NOTHING_TO_MERGE);
    }
    // the first items judge damage, the others fit (the same split when a plan is replayed)
    let n_eval = 32.min(calib_idx.len() / 2).max(1);
    let fit_spec = CaptureSpec {
        dataset: d,
        indices: &calib_idx[n_eval..],
        pre,
        batch: 16,
        runtime: a.runtime,
        threads: a.threads,
    };
    let reference = Reference::new(model, d, &calib_idx[..n_eval], pre, a.runtime, a.threads)?;
    let refitted = !a.no_reconstruct;
    if let Some(path) = &a.apply_plan {
        let saved = read_plan(path)?;
        let chosen = positions(&saved.merged, &segs, "plan")?;
        eprintln!(
            "depth merging: replaying {} segment(s) from {}",
            chosen.len(),
            path.display()
        );
        let summary = MergeSummary {
            candidates: segs.len(),
            model_ms: saved.model_ms,
            latency_from: saved.latency_from.clone(),
            refitted,
            plan_latency: saved.plan_latency,
            merged: saved.merged,
            combined_damage: None,
            measured: saved.measured,
            refit: vec![],
        };
        return apply_merges(a, model, &segs, &chosen, summary, &fit_spec, &reference);
    }
    let goal = merge_goal(a)?;
    // latency: from a table, or measured now
    let (model_ms, saved_ms, latency_from, measured_here) = match a.merge_table() {
        Some(p) => {
            let t = merge_table(p, model)?;
            let saved = merge::table_savings(&t.merges, &segs)?;
            let here = t.runtime == a.runtime.name() && t.threads == a.threads;
            (t.model_ms, saved, p.display().to_string(), here)
        }
        None => {
            let (model_ms, t) = super::super::profile::measure_merges(
                model,
                a.runtime,
                a.threads,
                vec![],
                a.merge_rounds.max(1),
            )?;
            let saved = t.iter().map(merge::SegmentLatency::saved_ms).collect();
            (model_ms, saved, "measured".to_string(), true)
        }
    };
    // damage: from an earlier plan's candidates where it was judged there, else each paying
    // merge refitted and judged now
    let mut known: Vec<Option<MergedSegment>> = vec![None; segs.len()];
    if let Some(p) = &a.merge_candidates {
        let old = read_plan(p)?;
        if old.refitted != refitted {
            bail!(
                "{}: its damages were measured {} refit; this run {} (drop --candidates, or match --no-reconstruct)",
                p.display(),
                if old.refitted { "with" } else { "without" },
                if refitted { "refits" } else { "does not refit" }
            );
        }
        let at = positions(&old.measured, &segs, "candidate list")?;
        for (c, i) in old.measured.into_iter().zip(at) {
            known[i] = Some(c).filter(|c| c.damage.is_finite());
        }
    }
    let refit_opts = RefitOptions {
        ridge: a.ridge,
        ..Default::default()
    };
    let todo = known
        .iter()
        .zip(&saved_ms)
        .filter(|(k, s)| k.is_none() && **s > 0.0)
        .count();
    let pb = bar("merge damage", todo);
    let mut measured = Vec::with_capacity(segs.len());
    for ((seg, &saved), old) in segs.iter().zip(&saved_ms).zip(known) {
        let (exact, damage, refit) = match old {
            Some(c) => (c.exact, c.damage, c.refit),
            None if saved > 0.0 => {
                let mut cand = model.clone();
                let rep = merge::apply_segment(&mut cand, seg)?;
                let composed = reference.damage(&cand)?;
                let mut judged = (rep.exact, composed, false);
                if !rep.exact && refitted {
                    let job = merge_job(&cand, seg)?;
                    refit::refit(model, &mut cand, &[job], &fit_spec, &refit_opts)?;
                    let fitted = reference.damage(&cand)?;
                    if fitted < composed {
                        judged = (false, fitted, true);
                    }
                }
                pb.inc(1);
                judged
            }
            None => (seg.acts.is_empty(), f64::INFINITY, false),
        };
        measured.push(MergedSegment {
            convs: seg.convs.clone(),
            acts: seg.acts.clone(),
            add: seg.add.clone(),
            exact,
            saved_ms: saved,
            damage,
            refit,
        });
    }
    pb.finish_and_clear();
    let cands: Vec<merge::Measured> = segs
        .iter()
        .zip(&measured)
        .map(|(s, m)| merge::Measured {
            span: s.span,
            saved_ms: m.saved_ms,
            damage: m.damage,
        })
        .collect();
    let mut plan_latency = None;
    let chosen = match goal {
        Goal::Latency(f) => {
            let unreachable = |best: f64| {
                anyhow::anyhow!(
                    "latency={f} is unreachable by merging: the best reachable is latency={:.3} ({} candidate segments, {:.3} ms of {model_ms:.3} ms saved at most)",
                    (model_ms - best) / model_ms.max(1e-12),
                    segs.len(),
                    best
                )
            };
            let chosen = merge::choose(&cands, (1.0 - f) * model_ms).map_err(unreachable)?;
            if measured_here {
                // the plan measured as a whole, beside the model: savings measured one merge at a
                // time, the largest of noisy figures chosen, can promise more than they give
                // together (growing the plan by the shortfall was tried: it chased the noise)
                let mut measure = super::super::profile::merge_measure(
                    a.runtime,
                    a.threads,
                    vec![],
                    a.merge_rounds.max(1),
                );
                let mut m = model.clone();
                for &i in &chosen {
                    merge::apply_segment(&mut m, &segs[i])?;
                }
                let (before, after) = measure(model, &m)?;
                plan_latency = Some(after / before.max(1e-12));
            }
            chosen
        }
        Goal::Damage(d) => {
            let chosen = merge::choose_within_damage(&cands, d);
            if chosen.is_empty() {
                let least = cands
                    .iter()
                    .filter(|c| c.saved_ms > 0.0)
                    .map(|c| c.damage)
                    .fold(f64::INFINITY, f64::min);
                bail!(
                    "no merge saves latency within damage={d}: {}",
                    if least.is_finite() {
                        format!("the least damaging merge that pays has damage {least:.4}")
                    } else {
                        "no merge is faster than the segment it replaces".to_string()
                    }
                );
            }
            chosen
        }
    };
    let summary = MergeSummary {
        candidates: segs.len(),
        model_ms,
        latency_from,
        refitted,
        plan_latency,
        merged: chosen.iter().map(|&i| measured[i].clone()).collect(),
        combined_damage: None,
        measured,
        refit: vec![],
    };
    apply_merges(a, model, &segs, &chosen, summary, &fit_spec, &reference)
}

/// Applies the chosen segments (`summary.merged`, in the same order as `chosen`), refits the
/// merged layers that are not exact, measures the damage of the whole, and summarises.
fn apply_merges(
    a: &Args,
    model: &Model,
    segs: &[merge::Segment],
    chosen: &[usize],
    mut summary: MergeSummary,
    fit_spec: &CaptureSpec,
    reference: &Reference,
) -> Result<(Model, MergeSummary)> {
    let refit_opts = RefitOptions {
        ridge: a.ridge,
        ..Default::default()
    };
    // in graph order, each merge refitted before the next: the merged conv maps its input as the
    // partly merged model computes it to the original's output there (see merge::paired)
    let mut order: Vec<(usize, MergedSegment)> = chosen
        .iter()
        .copied()
        .zip(std::mem::take(&mut summary.merged))
        .collect();
    order.sort_by_key(|o| o.0);
    let mut out = model.clone();
    for (i, mut m) in order {
        let rep = merge::apply_segment(&mut out, &segs[i])?;
        if !rep.exact && summary.refitted && m.refit {
            let mut job = merge_job(&out, &segs[i])?;
            job.input = merge::paired_name(&out, &job.input);
            let pair = merge::paired(model, &out);
            summary.refit.extend(refit::refit(
                &pair,
                &mut out,
                &[job],
                fit_spec,
                &refit_opts,
            )?);
        }
        m.exact = rep.exact;
        m.refit &= summary.refitted && !rep.exact;
        summary.merged.push(m);
    }
    if !summary.merged.is_empty() {
        summary.combined_damage = Some(reference.damage(&out)?);
    }
    Ok((out, summary))
}

/// The refit of a merged segment: the merged conv against the original segment's output.
fn merge_job(merged: &Model, seg: &merge::Segment) -> Result<RefitJob> {
    let last = seg.convs.last().expect("segments have two convs or more");
    let n = merged
        .graph()
        .node
        .iter()
        .find(|n| n.name() == last)
        .context("merged conv")?;
    let w = merged.initializer(&n.input[1]).context("merged weight")?;
    let group = n
        .attribute
        .iter()
        .find(|x| x.name() == "group")
        .and_then(|x| x.i)
        .unwrap_or(1)
        .max(1) as usize;
    let (o, cin) = (w.dims[0] as usize, w.dims[1] as usize * group);
    Ok(RefitJob {
        node: last.clone(),
        input: seg.input.clone(),
        output: seg.output.clone(),
        kept_in: (0..cin).collect(),
        kept_out: (0..o).collect(),
    })
}
