//! `whittle auto`: the fastest model that keeps a fidelity floor on held-apart items, searched
//! over recipes of every method that applies and measured side by side with the original.
//!
//! Candidates are recipes ([`candidates`]): INT8 alone, channel pruning at several budgets
//! followed by INT8 (its kept counts rounded for int8 kernels), and pruning alone, which pays on
//! runtimes without fast int8 kernels (tract); for transformers, INT8 of the layers, block removal
//! with a linear replacement, and the two together. Each runs as one compression job
//! ([`crate::job::run`], the calibration split and held-apart items of `whittle compress`) and is
//! judged on the held-apart items; candidates are tried in order, cheap first, while the time
//! budget lasts. Then every candidate that compressed is measured with the original in one
//! interleaved measurement ([`latency::compare_many`]): each candidate's speedup is the median of
//! its per-round ratios, and its spread the smallest and largest of them. The choice is the
//! fastest that meets the floor; candidates whose spreads overlap it are reported as ties, never as
//! slower. The Pareto front of (latency, fidelity) is reported with every candidate.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use whittle_core::Model;

use crate::Error;
use crate::job::{self, Job, Summary};
use crate::latency::{self, Beside};
use crate::pipeline::{self, Progress};

/// One recipe to try.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// A short name (`prune macs=0.8 + int8`).
    pub name: String,
    /// The recipe's `[[step]]` tables.
    pub steps: String,
}

fn candidate(name: &str, steps: &[&str]) -> Candidate {
    Candidate {
        name: name.to_string(),
        steps: steps.join("\n"),
    }
}

const INT8: &str = "[[step]]\nmethod = \"quantize\"\nprecision = \"int8\"\n";

const INT8_STEM_FLOAT: &str =
    "[[step]]\nmethod = \"quantize\"\nprecision = \"int8\"\nfloat_stem = true\n";

fn prune(keep: f64) -> String {
    format!("[[step]]\nmethod = \"prune_channels\"\ntarget = \"macs={keep}\"\n")
}

fn drop_blocks(count: usize) -> String {
    format!("[[step]]\nmethod = \"drop_blocks\"\ncount = {count}\nlinear_replace = true\n")
}

/// The candidates for `model`, cheapest to judge first: for a transformer (blocks found) INT8 of
/// its layers, one and two blocks removed with a linear replacement, those with INT8, and three
/// removed with INT8; else
/// INT8 alone (as its default decides, and with an image's stem float), pruning to 90%, 80% and
/// 70% of the MACs followed by INT8, and pruning alone to 90% and 75%.
pub fn candidates(model: &Model) -> Vec<Candidate> {
    let transformer = crate::blocks::find_blocks(model).is_ok_and(|b| !b.is_empty());
    if transformer {
        let (d1, d2, d3) = (drop_blocks(1), drop_blocks(2), drop_blocks(3));
        return vec![
            candidate("int8", &[INT8]),
            candidate("drop 1 block", &[&d1]),
            candidate("drop 1 block + int8", &[&d1, INT8]),
            candidate("drop 2 blocks", &[&d2]),
            candidate("drop 2 blocks + int8", &[&d2, INT8]),
            candidate("drop 3 blocks + int8", &[&d3, INT8]),
        ];
    }
    let (p9, p8, p7, p75) = (prune(0.9), prune(0.8), prune(0.7), prune(0.75));
    vec![
        candidate("int8", &[INT8]),
        // INT8 tries an image's stem in float and keeps it where that measures no slower on
        // this machine; this one keeps it float whatever the timing (a board may differ)
        candidate("int8, stem float", &[INT8_STEM_FLOAT]),
        candidate("prune macs=0.9 + int8", &[&p9, INT8]),
        candidate("prune macs=0.8 + int8", &[&p8, INT8]),
        candidate("prune macs=0.7 + int8", &[&p7, INT8]),
        candidate("prune macs=0.9", &[&p9]),
        candidate("prune macs=0.75", &[&p75]),
    ]
}

/// What a search is given: the compression job's settings (its `steps` and `floor` are the
/// search's own), the floor, the time budget and the candidates.
pub struct AutoJob<'a> {
    /// Data, runtime, items and task, as for `whittle compress`.
    pub base: Job<'a>,
    /// The fidelity floor on held-apart items (the task metric: top-1 agreement, cosine, ...).
    pub floor: f64,
    /// Seconds the compressions may take; a candidate is not started once they are spent.
    pub budget_s: f64,
    /// The recipes to try, in order.
    pub candidates: Vec<Candidate>,
    /// Side-by-side rounds of the final measurement.
    pub rounds: usize,
    /// Latencies measured elsewhere (another board), ms, by candidate name and `original`,
    /// with where they come from: used instead of measuring here.
    pub latencies: Option<(String, BTreeMap<String, f64>)>,
    /// Where the candidates are measured when not in this process (and no table is given).
    pub board: Option<Board<'a>>,
    /// A judge of fidelity in place of the task metric on held-apart items: its metric's name
    /// and the candidate's value (e.g. the STS Spearman a text encoder keeps on sentence pairs).
    pub judge: Option<Judge<'a>>,
}

/// Latencies measured by the caller (a board, through its runner) instead of in this process.
pub struct Board<'a> {
    /// The board and runtime, as the report names them (`pi5 (ssh), ort-cpu`).
    pub name: String,
    /// `p[round][model]`: each model's p50 in ms in each of `rounds` interleaved rounds, the
    /// first model being the original.
    pub measure: &'a Measure<'a>,
}

/// What a [`Board`] measures with.
pub type Measure<'a> = dyn Fn(&[&Model], usize) -> Result<Vec<Vec<f64>>, Error> + 'a;

/// A fidelity judge: the metric's name, what it judges on, and its value for a candidate model.
pub struct Judge<'a> {
    /// The metric's name (`sts_spearman_kept`).
    pub metric: String,
    /// What it is measured on (`the pairs of judge.tsv`).
    pub on: String,
    /// The candidate's value, 0..1 where the original scores 1.
    pub value: &'a dyn Fn(&Model) -> Result<f64, Error>,
}

/// One candidate's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    /// Its name.
    pub name: String,
    /// Its recipe's steps.
    pub recipe: String,
    /// The task metric on the held-apart items (or the judge's).
    pub fidelity: Option<f64>,
    /// Fraction of the original's MACs kept.
    pub macs_kept: Option<f64>,
    /// Seconds its compression took.
    pub seconds: Option<f64>,
    /// Its latency beside the original's.
    pub latency: Option<Beside>,
    /// Side-by-side rounds that latency comes from (the screening's, or the decision's for a
    /// contender).
    pub rounds: Option<usize>,
    /// Why it has no result: failed, does not apply, or not started within the budget.
    pub error: Option<String>,
    /// Whether it meets the floor.
    pub meets_floor: bool,
    /// Whether no other measured candidate is both faster and more faithful.
    pub on_front: bool,
}

/// What the search found.
#[derive(Debug, Clone, Serialize)]
pub struct AutoReport {
    /// The model searched.
    pub input: String,
    /// The runtime the latencies are measured on.
    pub runtime: String,
    /// The floor.
    pub floor: f64,
    /// The task metric's name (`top1_agreement`, `cosine`, ...).
    pub metric: String,
    /// What the metric is measured on (`held-apart items`, or a judge's data).
    pub judged_on: String,
    /// The original's latency (median p50 over the rounds, ms).
    pub original_ms: f64,
    /// Side-by-side rounds.
    pub rounds: usize,
    /// Every candidate, in the order tried.
    pub candidates: Vec<Tried>,
    /// The chosen candidate's index.
    pub chosen: usize,
    /// Candidates meeting the floor whose speed is a tie with the chosen one's (inside both
    /// spreads), by name.
    pub ties: Vec<String>,
    /// The time budget of the compressions, seconds.
    pub budget_s: f64,
    /// Wall time of the whole search.
    pub seconds: f64,
    /// What a user should know about the choice (not faster than the original beyond the
    /// spread of the measurement): a line each.
    pub warnings: Vec<String>,
}

impl AutoReport {
    /// The chosen candidate.
    pub fn best(&self) -> &Tried {
        &self.candidates[self.chosen]
    }
}

/// Search: the chosen model, its compression summary, and the report. `log` gets a line as each
/// candidate starts and ends, and before the measurement.
pub fn run(
    job: &AutoJob,
    input: &str,
    progress: &dyn Progress,
    log: &mut dyn FnMut(String),
) -> Result<(Model, Summary, AutoReport), Error> {
    let started = Instant::now();
    if !(0.0..=1.0).contains(&job.floor) {
        return Err(Error::Recipe(format!(
            "the floor {} is not a fraction between 0 and 1",
            job.floor
        )));
    }
    if job.candidates.is_empty() {
        return Err(Error::Recipe("no candidate recipes to try".into()));
    }
    if let Some((from, table)) = &job.latencies {
        let names =
            std::iter::once("original").chain(job.candidates.iter().map(|c| c.name.as_str()));
        let missing: Vec<&str> = names.filter(|n| !table.contains_key(*n)).collect();
        if let Some(bad) = table.iter().find(|(_, ms)| !(ms.is_finite() && **ms > 0.0)) {
            return Err(Error::Recipe(format!(
                "latency table {from}: '{}' has {} ms",
                bad.0, bad.1
            )));
        }
        if !missing.is_empty() {
            return Err(Error::Recipe(format!(
                "latency table {from} lacks {} (it needs 'original' and every candidate)",
                missing
                    .iter()
                    .map(|m| format!("'{m}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let judged_on = job
        .judge
        .as_ref()
        .map_or_else(|| "held-apart items".to_string(), |j| j.on.clone());
    let mut tried = Vec::new();
    let mut results: Vec<Option<(Model, Summary)>> = Vec::new();
    let mut metric = None;
    let n = job.candidates.len();
    for (k, c) in job.candidates.iter().enumerate() {
        let mut t = Tried {
            name: c.name.clone(),
            recipe: c.steps.clone(),
            fidelity: None,
            macs_kept: None,
            seconds: None,
            latency: None,
            rounds: None,
            error: None,
            meets_floor: false,
            on_front: false,
        };
        if started.elapsed().as_secs_f64() >= job.budget_s {
            t.error = Some(format!(
                "not started: the time budget ({:.0} s) was spent",
                job.budget_s
            ));
            log(format!(
                "auto: '{}' ({} of {n}) {}",
                c.name,
                k + 1,
                t.error.as_deref().unwrap_or_default()
            ));
            tried.push(t);
            results.push(None);
            continue;
        }
        log(format!("auto: compressing '{}' ({} of {n})", c.name, k + 1));
        let outcome =
            pipeline::parse_recipe(&c.steps, std::path::Path::new("auto.toml")).and_then(|r| {
                let j = Job {
                    steps: &r.steps,
                    floor: Some(job.floor),
                    speed_check: false,
                    ..job.base.clone()
                };
                job::run(&j, input, progress)
            });
        match outcome {
            Ok((model, summary)) => {
                let judged = match &job.judge {
                    Some(j) => (j.value)(&model).map(|v| (j.metric.clone(), v)),
                    None => summary
                        .fidelity
                        .as_ref()
                        .and_then(|f| f.primary())
                        .map(|(_, task, value)| (task.metric_name().to_string(), value))
                        .ok_or_else(|| {
                            Error::Recipe("no task metric on the held-apart items".into())
                        }),
                };
                match judged {
                    Ok((name, value)) => {
                        metric.get_or_insert(name);
                        t.fidelity = Some(value);
                        t.meets_floor = value >= job.floor;
                    }
                    Err(e) => t.error = Some(e.to_string()),
                }
                t.macs_kept = Some(summary.macs_kept);
                t.seconds = Some(summary.seconds);
                results.push(Some((model, summary)));
            }
            Err(e) => {
                t.error = Some(e.to_string());
                results.push(None);
            }
        }
        log(match (&t.error, t.fidelity) {
            (Some(e), _) => format!("auto: '{}': {e}", c.name),
            (None, f) => format!(
                "auto: '{}': {:.3} on {judged_on}, {}",
                c.name,
                f.unwrap_or(f64::NAN),
                if t.meets_floor {
                    "meets the floor"
                } else {
                    "under the floor"
                }
            ),
        });
        tried.push(t);
    }
    let Some(metric) = metric else {
        // each distinct reason once, with the first candidate that gave it
        let mut why: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for t in &tried {
            if let Some(e) = t.error.as_deref().filter(|e| seen.insert(e.to_string())) {
                why.push(format!("'{}': {e}", t.name));
            }
        }
        return Err(Error::Recipe(format!(
            "no method applies to this model or none could be judged: {}",
            why.join("; ")
        )));
    };
    // one side-by-side measurement: the original first, then every candidate with a result
    let measured: Vec<usize> = (0..tried.len())
        .filter(|&i| results[i].is_some() && tried[i].fidelity.is_some())
        .collect();
    let mut models: Vec<&Model> = vec![job.base.original];
    models.extend(
        measured
            .iter()
            .map(|&i| &results[i].as_ref().expect("kept").0),
    );
    let on = job
        .board
        .as_ref()
        .map_or_else(|| job.base.runtime.to_string(), |b| b.name.clone());
    let measure = |models: &[&Model], rounds: usize| -> Result<Vec<Beside>, Error> {
        progress.start("auto: measuring side by side", 1);
        let speeds = match &job.board {
            Some(b) => (b.measure)(models, rounds).map(|p| latency::beside_from_rounds(&p)),
            None => latency::compare_many(models, job.base.runtime, job.base.threads, rounds),
        };
        progress.finish();
        speeds
    };
    let original_ms = match &job.latencies {
        Some((from, table)) => {
            log(format!("auto: latencies from {from}"));
            let original = table["original"];
            for &i in &measured {
                let ms = table[&tried[i].name];
                tried[i].latency = Some(Beside {
                    p50_ms: ms,
                    speedup: original / ms,
                    spread: (original / ms, original / ms),
                    cpu_ms: None,
                    cpu_speedup: None,
                });
            }
            original
        }
        None => {
            // successive halving: every judged candidate for a few rounds, then the contenders
            // (over the floor: the faster half, and any the best's spread does not beat) again
            // with the original for all the rounds the decision gets
            let screen = SCREEN_ROUNDS.min(job.rounds);
            log(format!(
                "auto: measuring the original and {} candidates side by side ({screen} rounds on {on})",
                measured.len(),
            ));
            let speeds = measure(&models, screen)?;
            for (&i, b) in measured.iter().zip(&speeds[1..]) {
                tried[i].latency = Some(b.clone());
                tried[i].rounds = Some(screen);
            }
            let contenders = contenders(&tried, &measured);
            if contenders.is_empty() || job.rounds <= screen {
                speeds[0].p50_ms
            } else {
                log(format!(
                    "auto: measuring the original and {} contenders again ({} rounds on {on}): {}",
                    contenders.len(),
                    job.rounds,
                    contenders
                        .iter()
                        .map(|&i| format!("'{}'", tried[i].name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                let mut again: Vec<&Model> = vec![job.base.original];
                again.extend(
                    contenders
                        .iter()
                        .map(|&i| &results[i].as_ref().expect("kept").0),
                );
                let speeds = measure(&again, job.rounds)?;
                for (&i, b) in contenders.iter().zip(&speeds[1..]) {
                    tried[i].latency = Some(b.clone());
                    tried[i].rounds = Some(job.rounds);
                }
                speeds[0].p50_ms
            }
        }
    };
    mark_front(&mut tried);
    let chosen = choose(&tried).ok_or_else(|| {
        let best = measured
            .iter()
            .max_by(|&&a, &&b| {
                let f = |i: usize| tried[i].fidelity.unwrap_or(f64::NEG_INFINITY);
                f(a).total_cmp(&f(b))
            })
            .map(|&i| &tried[i]);
        Error::Budget(match best {
            Some(t) => format!(
                "no candidate reaches the floor {:.3}: the most faithful is '{}' at {:.3} ({:.2}x the original's speed)",
                job.floor,
                t.name,
                t.fidelity.unwrap_or(f64::NAN),
                t.latency.as_ref().map_or(f64::NAN, |b| b.speedup)
            ),
            None => format!("no candidate reaches the floor {:.3}", job.floor),
        })
    })?;
    let best = tried[chosen].latency.clone().expect("measured");
    let ties = tried
        .iter()
        .enumerate()
        .filter(|&(i, t)| i != chosen && t.meets_floor)
        .filter(|(_, t)| t.latency.as_ref().is_some_and(|b| !best.faster_than(b)))
        .map(|(_, t)| t.name.clone())
        .collect();
    let mut warnings = Vec::new();
    if best.spread.0 <= 1.0 {
        warnings.push(format!(
            "'{}' is not faster than the original beyond the spread of the measurement ({:.2}x, per-round {:.2}-{:.2}x on {})",
            tried[chosen].name, best.speedup, best.spread.0, best.spread.1, job.base.runtime
        ));
    }
    let (model, summary) = results[chosen].take().expect("measured");
    let report = AutoReport {
        input: input.to_string(),
        runtime: match (&job.latencies, &job.board) {
            (Some((from, _)), _) => format!("the latency table {from}"),
            (None, Some(b)) => b.name.clone(),
            (None, None) => job.base.runtime.to_string(),
        },
        floor: job.floor,
        metric,
        judged_on,
        original_ms,
        rounds: job.rounds,
        candidates: tried,
        chosen,
        ties,
        budget_s: job.budget_s,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    };
    Ok((model, summary, report))
}

/// Rounds of the screening measurement of every judged candidate.
const SCREEN_ROUNDS: usize = 3;

/// The candidates measured again: over the floor, the faster half by the screening's median
/// (at least two), and any whose spread the fastest one's does not beat.
fn contenders(tried: &[Tried], measured: &[usize]) -> Vec<usize> {
    let mut over: Vec<usize> = measured
        .iter()
        .copied()
        .filter(|&i| tried[i].meets_floor && tried[i].latency.is_some())
        .collect();
    let speed = |i: usize| tried[i].latency.as_ref().map_or(0.0, |b| b.speedup);
    over.sort_by(|&a, &b| speed(b).total_cmp(&speed(a)));
    let Some(&best) = over.first() else {
        return Vec::new();
    };
    let best = tried[best].latency.clone().expect("measured");
    let keep = over.len().div_ceil(2).max(2);
    let mut out: Vec<usize> = over
        .iter()
        .enumerate()
        .filter(|&(rank, &i)| {
            rank < keep || !best.faster_than(tried[i].latency.as_ref().expect("measured"))
        })
        .map(|(_, &i)| i)
        .collect();
    out.sort_unstable();
    out
}

/// The choice among the candidates meeting the floor that were measured for the most rounds (the
/// contenders, after a screening): the fastest by median speedup, unless others tie with it
/// (their spreads overlap): then the most faithful of the tie, a faster median deciding only
/// between equal fidelities.
fn choose(tried: &[Tried]) -> Option<usize> {
    let most = tried
        .iter()
        .filter(|t| t.meets_floor && t.latency.is_some())
        .map(|t| t.rounds)
        .max()?;
    let pool: Vec<(usize, &Beside)> = tried
        .iter()
        .enumerate()
        .filter(|(_, t)| t.meets_floor && t.rounds == most)
        .filter_map(|(i, t)| Some((i, t.latency.as_ref()?)))
        .collect();
    let fastest = pool
        .iter()
        .max_by(|a, b| a.1.speedup.total_cmp(&b.1.speedup))?
        .1;
    pool.iter()
        .filter(|(_, b)| !fastest.faster_than(b))
        .max_by(|a, b| {
            let f = |i: usize| tried[i].fidelity.unwrap_or(f64::NEG_INFINITY);
            f(a.0)
                .total_cmp(&f(b.0))
                .then(a.1.speedup.total_cmp(&b.1.speedup))
        })
        .map(|(i, _)| *i)
}

/// Marks the measured candidates that no other is both at least as fast and at least as
/// faithful as, and strictly better in one.
fn mark_front(tried: &mut [Tried]) {
    let points: Vec<Option<(f64, f64)>> = tried
        .iter()
        .map(|t| Some((t.latency.as_ref()?.speedup, t.fidelity?)))
        .collect();
    for (i, t) in tried.iter_mut().enumerate() {
        let Some((s, f)) = points[i] else { continue };
        t.on_front = !points
            .iter()
            .flatten()
            .any(|&(s2, f2)| s2 >= s && f2 >= f && (s2 > s || f2 > f));
    }
}

/// A recipe that runs the chosen candidate again: its steps, the floor as `[checks]`, and the
/// calibration item counts the search was given.
pub fn recipe(r: &AutoReport, items: Option<usize>, holdout: Option<usize>) -> String {
    let best = r.best();
    format!(
        "# whittle auto's choice for {}: {} ({} {:.3} on {}, {:.2}x on {}).\n# `whittle compress MODEL --calib DATA --recipe recipe.toml -o OUT` runs it again (mixed\n# precision is chosen by timing); `--apply-plan plan.json` rebuilds it exactly.\n\n[calibration]\n{}{}\n[checks]\nmin_agreement = {}\n\n{}",
        r.input,
        best.name,
        r.metric,
        best.fidelity.unwrap_or(f64::NAN),
        r.judged_on,
        best.latency.as_ref().map_or(f64::NAN, |l| l.speedup),
        r.runtime,
        items.map_or(String::new(), |n| format!("items = {n}\n")),
        holdout.map_or(String::new(), |n| format!("holdout = {n}\n")),
        r.floor,
        best.recipe
    )
}

/// The report as Markdown: the choice, then every candidate (front marked).
pub fn markdown(r: &AutoReport) -> String {
    let b = r.best();
    let lat = b.latency.as_ref().expect("the chosen one is measured");
    let mut out = format!(
        "# whittle auto: {}\n\nChosen: **{}**, {} {:.3} on {} (floor {:.3}), {:.2}x the original's speed on {} (per-round ratios {:.2}-{:.2}, {} interleaved rounds; original {:.3} ms).\n",
        r.input,
        b.name,
        r.metric,
        b.fidelity.unwrap_or(f64::NAN),
        r.judged_on,
        r.floor,
        lat.speedup,
        r.runtime,
        lat.spread.0,
        lat.spread.1,
        r.rounds,
        r.original_ms
    );
    for w in &r.warnings {
        out += &format!("\nWarning: {w}.\n");
    }
    if !r.ties.is_empty() {
        out += &format!(
            "\nA tie within the spread of the measurement: {}.\n",
            r.ties.join(", ")
        );
    }
    if let (Some(cpu), Some(s)) = (lat.cpu_ms, lat.cpu_speedup) {
        out += &format!(
            "\nBy the thread's CPU time (one thread, what waiting for the CPU does not inflate): {cpu:.3} ms per run, {s:.2}x the original's.\n"
        );
    }
    out += "\n| candidate | fidelity | meets floor | speedup | spread | rounds | p50 ms | CPU ms | MACs kept | front | compress s | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (i, t) in r.candidates.iter().enumerate() {
        let l = t.latency.as_ref();
        let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
        out += &format!(
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            t.name,
            if i == r.chosen { " (chosen)" } else { "" },
            f(t.fidelity, 3),
            if t.meets_floor { "yes" } else { "no" },
            l.map_or("-".into(), |l| format!("{:.2}x", l.speedup)),
            l.map_or("-".into(), |l| format!(
                "{:.2}-{:.2}",
                l.spread.0, l.spread.1
            )),
            t.rounds.map_or("-".into(), |r| r.to_string()),
            f(l.map(|l| l.p50_ms), 3),
            f(l.and_then(|l| l.cpu_ms), 3),
            t.macs_kept
                .map_or("-".into(), |m| format!("{:.1}%", m * 100.0)),
            if t.on_front { "yes" } else { "" },
            f(t.seconds, 1),
            t.error.as_deref().unwrap_or("")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tried(name: &str, speedup: f64, spread: (f64, f64), fidelity: f64, floor: f64) -> Tried {
        Tried {
            name: name.into(),
            recipe: String::new(),
            fidelity: Some(fidelity),
            macs_kept: None,
            seconds: None,
            latency: Some(Beside {
                p50_ms: 1.0 / speedup,
                speedup,
                spread,
                cpu_ms: None,
                cpu_speedup: None,
            }),
            rounds: Some(3),
            error: None,
            meets_floor: fidelity >= floor,
            on_front: false,
        }
    }

    #[test]
    fn contenders_are_the_faster_half_over_the_floor_and_any_tie_with_the_best() {
        let t = vec![
            tried("a", 1.5, (1.45, 1.55), 0.99, 0.97),
            tried("b", 2.0, (1.9, 2.1), 0.98, 0.97),
            tried("under", 3.0, (2.9, 3.1), 0.90, 0.97),
            tried("c", 1.95, (1.85, 2.05), 0.975, 0.97),
            tried("d", 1.4, (1.35, 1.45), 0.99, 0.97),
            // slow by its median, but its spread reaches the best's: not beaten
            tried("wide", 1.3, (1.0, 1.95), 0.99, 0.97),
            tried("e", 1.0, (0.95, 1.05), 1.0, 0.97),
        ];
        let all: Vec<usize> = (0..t.len()).collect();
        let names = |v: Vec<usize>| v.iter().map(|&i| t[i].name.clone()).collect::<Vec<_>>();
        // 6 over the floor: the faster 3 (b, c, a), and wide; d and e are beaten, "under" is out
        assert_eq!(names(contenders(&t, &all)), ["a", "b", "c", "wide"]);
        // one over the floor: it alone; none: none
        assert_eq!(names(contenders(&t, &[0, 2])), ["a"]);
        assert!(contenders(&t, &[2]).is_empty());
    }

    #[test]
    fn the_fastest_over_the_floor_is_chosen_and_the_front_is_marked() {
        let mut t = vec![
            tried("a", 1.8, (1.7, 1.9), 0.99, 0.97),
            tried("b", 2.2, (2.1, 2.3), 0.96, 0.97),
            tried("c", 1.9, (1.85, 1.95), 0.98, 0.97),
            tried("d", 1.5, (1.4, 1.6), 0.97, 0.97),
        ];
        mark_front(&mut t);
        let front: Vec<&str> = t
            .iter()
            .filter(|t| t.on_front)
            .map(|t| t.name.as_str())
            .collect();
        // d is slower and less faithful than a: not on the front
        assert_eq!(front, ["a", "b", "c"]);
        // b is fastest but under the floor; c is the fastest over it, but its spread overlaps
        // a's: a tie, not a win, and a is more faithful
        let c = t[2].latency.as_ref().unwrap();
        assert!(!c.faster_than(t[0].latency.as_ref().unwrap()));
        assert!(c.faster_than(t[3].latency.as_ref().unwrap()));
        assert_eq!(choose(&t), Some(0));
        // as faithful as a: then the faster median decides
        t[2].fidelity = Some(0.99);
        assert_eq!(choose(&t), Some(2));
        // beyond the tie, speed wins over fidelity
        t[2].fidelity = Some(0.98);
        t[2].latency.as_mut().unwrap().spread = (1.95, 2.0);
        assert_eq!(choose(&t), Some(2));
        // nothing over the floor: no choice
        for x in &mut t {
            x.meets_floor = false;
        }
        assert_eq!(choose(&t), None);
    }
}
