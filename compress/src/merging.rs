//! Depth merging as a pipeline method (`--merge`, `method = "merge"`): each candidate segment's
//! latency saving (measured now, or from a `whittle profile --merge` table) and damage (measured
//! now after its refit, or from an earlier `--plan-out`), a dynamic programme's choice under the
//! latency budget, and the chosen merges applied and refitted in sequence ([`crate::merge`] holds
//! the merges themselves and the programmes).
//!
//! Accepts `latency=F` (the least damage keeping that latency fraction) and `damage=D` (the most
//! latency saved within that output damage). Declines: nothing to merge, an unreachable budget
//! (names the best reachable latency), a damage allowance no paying merge fits, a latency table
//! without merges or of another model. Guarantees: exact merges stay exact; the plan records every
//! candidate measured, so another budget can reuse the judged damages (`--candidates`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use whittle_core::Model;

use crate::Error;
use crate::latency::LatencyTable;
use crate::merge;
use crate::pipeline::{Context, Method, Reference, SavedPlan, Shared};
use crate::prune::Budget;
use crate::refit::{self, RefitJob, RefitOptions, RefitReport};

fn fail(reason: String) -> Error {
    Error::Pass {
        pass: "merge".into(),
        reason,
    }
}

/// What `--merge` aims at.
#[derive(Clone, Copy)]
pub enum Goal {
    /// Keep this fraction of the latency, with the least damage.
    Latency(f64),
    /// Save the most latency with at most this output damage (summed over the merges).
    Damage(f64),
}

/// The goal of `--merge`: `--target latency=F` or `--target damage=D`.
pub fn merge_goal(t: &str) -> Result<Goal, Error> {
    if let Some(d) = t.strip_prefix("damage=") {
        return match d.parse::<f64>() {
            Ok(d) if d > 0.0 && d.is_finite() => Ok(Goal::Damage(d)),
            _ => Err(Error::Budget(format!(
                "--target damage=D takes a positive number, not '{d}'"
            ))),
        };
    }
    match t.parse::<Budget>() {
        Ok(Budget::Latency(f)) => Ok(Goal::Latency(f)),
        Ok(_) => Err(Error::Budget(format!(
            "--merge takes --target latency=F (the latency kept) or damage=D (the output damage allowed), not '{t}'"
        ))),
        Err(e) => Err(Error::Budget(format!("--target: {e}"))),
    }
}

/// One merge candidate, or one merged segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// The depth-merging step of a plan file written by `--plan-out`.
fn read_plan(path: &Path) -> Result<MergeSummary, Error> {
    let plan = SavedPlan::read(path)?;
    let v = plan
        .plan_of(Merge::NAME, 0)
        .ok_or_else(|| Error::Plan(format!("{} holds no depth-merging plan", path.display())))?;
    serde_json::from_value(v.clone())
        .map_err(|e| Error::Plan(format!("{}: its merge plan: {e}", path.display())))
}

/// Where each of `list` is among this model's candidates (by their convolutions' names).
fn positions(
    list: &[MergedSegment],
    segs: &[merge::Segment],
    what: &str,
) -> Result<Vec<usize>, Error> {
    list.iter()
        .map(|p| {
            segs.iter()
                .position(|s| s.convs == p.convs && s.acts == p.acts && s.add == p.add)
                .ok_or_else(|| {
                    Error::Plan(format!(
                        "the {what} merges {}, which is not a merge candidate of this model",
                        p.convs.join(" + ")
                    ))
                })
        })
        .collect()
}

/// A latency table with merge entries that fits `model`.
fn merge_table(path: &Path, model: &Model) -> Result<LatencyTable, Error> {
    let t = LatencyTable::read(path)?;
    if t.merges.is_empty() {
        return Err(fail(format!(
            "latency table {} has no merge candidates: measure it with `whittle profile --merge`",
            path.display()
        )));
    }
    t.check(model)
        .map_err(|e| fail(format!("latency table {}: {e}", path.display())))?;
    Ok(t)
}

/// Depth merging.
pub struct Merge;

/// `--merge` and its settings.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeOptions {
    /// Merge consecutive convolutions (removing activations between them where that pays), chosen
    /// by a dynamic programme over measured latencies and damages: `--target latency=F` (the
    /// least damage keeping that latency fraction) or `--target damage=D` (the most latency
    /// saved within that output damage).
    #[arg(id = "merge", long = "merge")]
    #[serde(skip)]
    pub enabled: bool,
    /// Depth merging: take each candidate's damage from a plan written by `--plan-out` (skips
    /// refitting and judging every candidate) and choose anew for `--target`.
    #[arg(id = "candidates", long = "candidates", value_name = "PLAN")]
    pub candidates: Option<PathBuf>,
    /// Depth merging: rounds of each side-by-side measurement made now (candidates without a
    /// latency table, and the chosen plan); more is steadier on a busy machine, and slower
    /// (default 11).
    #[arg(id = "merge_rounds", long = "merge-rounds")]
    pub rounds: Option<usize>,
    /// `latency=F` or `damage=D`.
    #[arg(skip)]
    pub target: Option<String>,
    /// A latency table with merge candidates (`whittle profile --merge`).
    #[arg(skip)]
    pub latency_table: Option<PathBuf>,
    /// Refit merged layers that removed an activation.
    #[arg(skip)]
    pub reconstruct: Option<bool>,
    /// Ridge of the refits.
    #[arg(skip)]
    pub ridge: Option<f64>,
}

impl Method for Merge {
    const NAME: &'static str = "merge";
    type Options = MergeOptions;
    type Plan = MergeSummary;
    type Report = MergeSummary;

    fn requested(o: &MergeOptions) -> bool {
        o.enabled || o.candidates.is_some()
    }

    fn inherit(o: &mut MergeOptions, s: &Shared) {
        o.target.get_or_insert_with(|| s.target.clone());
        if o.latency_table.is_none() {
            o.latency_table.clone_from(&s.latency_table);
        }
        o.reconstruct.get_or_insert(!s.no_reconstruct);
        o.ridge.get_or_insert(s.ridge);
    }

    fn run(
        o: &MergeOptions,
        model: &mut Model,
        cx: &Context,
        replay: Option<MergeSummary>,
    ) -> Result<(MergeSummary, MergeSummary), Error> {
        let (out, summary) = merge_stage(o, model, cx, replay)?;
        *model = out;
        Ok((summary.clone(), summary))
    }

    fn describe(m: &MergeSummary) -> Vec<String> {
        let mut out = vec![format!(
            "depth merging: {} of {} candidate segments merged (model {:.3} ms before, fastest runs; latencies {})",
            m.merged.len(),
            m.candidates,
            m.model_ms,
            m.latency_from
        )];
        if let Some(k) = m.plan_latency {
            out.push(format!(
                "  the plan measured as a whole: latency={k:.3} of the model's (predicted {:.3})",
                1.0 - m.merged.iter().map(|g| g.saved_ms).sum::<f64>() / m.model_ms.max(1e-12)
            ));
        }
        if let Some(c) = m.combined_damage {
            out.push(format!(
                "  damage of the merges together {c:.4} (their damages alone sum to {:.4})",
                m.merged.iter().map(|g| g.damage).sum::<f64>()
            ));
        }
        for g in &m.merged {
            out.push(format!(
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
            ));
        }
        out
    }
}

/// Depth merging: each candidate's latency saving and damage (measured, or read back), a
/// dynamic programme picks the set with the least damage that meets the latency budget (or the
/// most saving within the damage allowed); apply and refit them.
fn merge_stage(
    o: &MergeOptions,
    model: &Model,
    cx: &Context,
    replay: Option<MergeSummary>,
) -> Result<(Model, MergeSummary), Error> {
    let segs = merge::segments(model);
    if segs.is_empty() {
        return Err(fail(merge::NOTHING_TO_MERGE.into()));
    }
    // a replayed plan needs no goal; a goal is checked before any work
    let goal = match replay {
        Some(_) => None,
        None => Some(merge_goal(o.target.as_deref().unwrap_or_default())?),
    };
    let c = cx.data(Merge::NAME)?;
    // the first items judge damage, the others fit (the same split when a plan is replayed)
    let (judge, fit) = Context::judge_split(c, cx.items(32));
    let fit_spec = cx.spec(c, fit);
    let reference = cx.reference(model, judge)?;
    let refitted = o.reconstruct.unwrap_or(true);
    let ridge = o.ridge.unwrap_or(1e-3);
    let rounds = o.rounds.unwrap_or(crate::latency::MERGE_ROUNDS).max(1);
    if let Some(saved) = replay {
        if o.candidates.is_some() {
            return Err(Error::Plan(
                "--apply-plan replays a plan, --candidates chooses anew from its measurements: give one".into(),
            ));
        }
        let chosen = positions(&saved.merged, &segs, "plan")?;
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
        return apply_merges(ridge, model, &segs, &chosen, summary, &fit_spec, &reference);
    }
    let goal = goal.expect("a goal unless replaying");
    // latency: from a table, or measured now
    let (model_ms, saved_ms, latency_from, measured_here) = match &o.latency_table {
        Some(p) => {
            let t = merge_table(p, model)?;
            let saved = merge::table_savings(&t.merges, &segs)?;
            let here = t.runtime == cx.runtime.name() && t.threads == cx.threads;
            (t.model_ms, saved, p.display().to_string(), here)
        }
        None => {
            let (model_ms, t) = crate::latency::measure_merges(
                model,
                cx.runtime,
                cx.threads,
                vec![],
                rounds,
                cx.progress,
            )?;
            let saved = t.iter().map(merge::SegmentLatency::saved_ms).collect();
            (model_ms, saved, "measured".to_string(), true)
        }
    };
    // damage: from an earlier plan's candidates where it was judged there, else each paying
    // merge refitted and judged now
    let mut known: Vec<Option<MergedSegment>> = vec![None; segs.len()];
    if let Some(p) = &o.candidates {
        let old = read_plan(p)?;
        if old.refitted != refitted {
            return Err(Error::Plan(format!(
                "{}: its damages were measured {} refit; this run {} (drop --candidates, or match --no-reconstruct)",
                p.display(),
                if old.refitted { "with" } else { "without" },
                if refitted { "refits" } else { "does not refit" }
            )));
        }
        let at = positions(&old.measured, &segs, "candidate list")?;
        for (c, i) in old.measured.into_iter().zip(at) {
            known[i] = Some(c).filter(|c| c.damage.is_finite());
        }
    }
    let refit_opts = RefitOptions {
        ridge,
        rows_per_item: cx.rows_per_item(),
        ..Default::default()
    };
    let todo = known
        .iter()
        .zip(&saved_ms)
        .filter(|(k, s)| k.is_none() && **s > 0.0)
        .count();
    cx.start("merge damage", todo);
    let mut judged_n = 0;
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
                judged_n += 1;
                cx.progress.set(judged_n);
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
    cx.progress.finish();
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
                Error::Budget(format!(
                    "latency={f} is unreachable by merging: the best reachable is latency={:.3} ({} candidate segments, {:.3} ms of {model_ms:.3} ms saved at most)",
                    (model_ms - best) / model_ms.max(1e-12),
                    segs.len(),
                    best
                ))
            };
            let chosen = merge::choose(&cands, (1.0 - f) * model_ms).map_err(unreachable)?;
            if measured_here {
                // the plan measured as a whole, beside the model: savings measured one merge at a
                // time, the largest of noisy figures chosen, can promise more than they give
                // together (growing the plan by the shortfall was tried: it chased the noise)
                let mut measure =
                    crate::latency::merge_measure(cx.runtime, cx.threads, vec![], rounds);
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
                return Err(Error::Budget(format!(
                    "no merge saves latency within damage={d}: {}",
                    if least.is_finite() {
                        format!("the least damaging merge that pays has damage {least:.4}")
                    } else {
                        "no merge is faster than the segment it replaces".to_string()
                    }
                )));
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
    apply_merges(ridge, model, &segs, &chosen, summary, &fit_spec, &reference)
}

/// Applies the chosen segments (`summary.merged`, in the same order as `chosen`), refits the
/// merged layers that are not exact, measures the damage of the whole, and summarises.
fn apply_merges(
    ridge: f64,
    model: &Model,
    segs: &[merge::Segment],
    chosen: &[usize],
    mut summary: MergeSummary,
    fit_spec: &whittle_calib::CaptureSpec,
    reference: &Reference,
) -> Result<(Model, MergeSummary), Error> {
    let refit_opts = RefitOptions {
        ridge,
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
fn merge_job(merged: &Model, seg: &merge::Segment) -> Result<RefitJob, Error> {
    let last = seg.convs.last().expect("segments have two convs or more");
    let n = merged
        .graph()
        .node
        .iter()
        .find(|n| n.name() == last)
        .ok_or_else(|| fail(format!("the merged conv {last} is missing")))?;
    let w = merged
        .initializer(&n.input[1])
        .ok_or_else(|| fail(format!("the merged conv {last} has no weight")))?;
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
