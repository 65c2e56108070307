//! `whittle verify`: compare a candidate with a reference on real data.

use std::path::PathBuf;

use anyhow::Result;
use whittle_calib::Dataset;
use whittle_export::{VerifyOptions, VerifyReport};
use whittle_runtime::RuntimeKind;

use crate::Outcome;
use crate::progress::bar;
use crate::table::{Table, pct};

/// Arguments of `whittle verify`.
#[derive(clap::Args)]
pub struct Args {
    /// The reference model.
    reference: PathBuf,
    /// The candidate model.
    candidate: PathBuf,
    /// Data: an image folder (class sub-folders give labels), a flat image folder, .npy, .npz;
    /// with --tokenizer, a .tsv of `score<TAB>sentence<TAB>sentence` pairs (STS benchmark).
    #[arg(long)]
    data: PathBuf,
    /// Text encoders: a tokenizer.json (or a folder holding one); --data is then a .tsv of STS
    /// pairs, and the report gives both models' Spearman correlation with the gold scores.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Preprocessing: a built-in profile name or a TOML file (default: `<model>.profile.toml`).
    #[arg(long)]
    profile: Option<String>,
    /// Runtime both models run in.
    #[arg(long, default_value = "ort-cpu")]
    runtime: RuntimeKind,
    /// Use at most this many items (a deterministic sample).
    #[arg(long)]
    limit: Option<usize>,
    /// Items per run (models with a symbolic batch axis).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Intra-op threads for ONNX Runtime.
    #[arg(long)]
    threads: Option<usize>,
    /// What the outputs are for, choosing the metric: classify (top-1 agreement), embed
    /// (cosine), dense (IoU of maps), ctc (decoded-sequence agreement). Default: guessed per
    /// output from its shape and last op, and the reason printed.
    #[arg(long)]
    task: Option<whittle_export::Task>,
    /// Exit with code 1 when the first output's task metric (top-1 agreement for a classifier)
    /// is below this fraction (0..1).
    #[arg(long)]
    min_agreement: Option<f64>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Run a verification (shared with `deploy`).
pub fn compare(
    reference: &std::path::Path,
    candidate: &std::path::Path,
    data: &std::path::Path,
    profile: Option<&str>,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    let pre = super::resolve_profile(profile, reference, data)?;
    let r = super::load_model(reference)?.to_bytes();
    let c = if candidate == reference {
        r.clone()
    } else {
        super::load_model(candidate)?.to_bytes()
    };
    let ds = Dataset::open(data)?;
    let total = opts.limit.map_or(ds.len(), |l| l.min(ds.len()));
    let pb = bar("verify", total);
    let rep = whittle_export::verify(&r, &c, &ds, &pre, opts, &mut |d, _| {
        pb.set_position(d as u64)
    });
    pb.finish_and_clear();
    Ok(rep?)
}

/// An STS evaluation of a text encoder (shared with the bench).
pub fn sts(
    reference: &std::path::Path,
    candidate: &std::path::Path,
    pairs: &std::path::Path,
    tokenizer: &std::path::Path,
    opts: &VerifyOptions,
) -> Result<whittle_export::sts::StsReport> {
    if !pairs
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"))
    {
        anyhow::bail!(
            "with --tokenizer, --data is a .tsv of score<TAB>sentence<TAB>sentence pairs, not {}",
            pairs.display()
        );
    }
    let r = super::load_model(reference)?.to_bytes();
    let c = super::load_model(candidate)?.to_bytes();
    let pb = bar("sts", 0);
    let rep = whittle_export::sts::sts(&r, &c, pairs, tokenizer, opts, &mut |d, t| {
        pb.set_length(t as u64);
        pb.set_position(d as u64)
    });
    pb.finish_and_clear();
    Ok(rep?)
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    if let Some(m) = a.min_agreement
        && !(0.0..=1.0).contains(&m)
    {
        anyhow::bail!("--min-agreement {m} is not a fraction between 0 and 1");
    }
    if a.limit == Some(0) || a.batch == 0 {
        anyhow::bail!("--limit and --batch must be at least 1");
    }
    let opts = VerifyOptions {
        runtime: a.runtime,
        batch: a.batch,
        limit: a.limit,
        threads: a.threads,
        task: a.task,
    };
    if let Some(tok) = &a.tokenizer {
        if a.min_agreement.is_some() || a.task.is_some() {
            anyhow::bail!(
                "--min-agreement and --task are for --data items; STS pairs give a Spearman correlation"
            );
        }
        let rep = sts(&a.reference, &a.candidate, &a.data, tok, &opts)?;
        if a.json {
            outln!("{}", serde_json::to_string(&rep)?);
        } else {
            outln!(
                "{} STS pairs, runtime {}, embeddings from {}\nSpearman with the gold scores: reference {:.4}, candidate {:.4} ({} kept)\nmean cosine of the two models' embeddings {:.4}",
                rep.pairs,
                rep.runtime,
                rep.embedding,
                rep.reference_spearman,
                rep.candidate_spearman,
                pct(rep.kept),
                rep.mean_cosine
            );
        }
        return Ok(Outcome::Ok);
    }
    let rep = compare(
        &a.reference,
        &a.candidate,
        &a.data,
        a.profile.as_deref(),
        &opts,
    )?;
    if a.json {
        outln!("{}", serde_json::to_string(&rep)?);
    } else {
        outln!("{} items, runtime {}", rep.items, rep.runtime);
        let mut t = Table::new(&[
            "output",
            "max |diff|",
            "mean cosine",
            "task",
            "metric",
            "ref accuracy",
            "cand accuracy",
        ]);
        let opt = |v: Option<f64>| v.map(pct).unwrap_or_else(|| "-".into());
        for o in &rep.outputs {
            t.row(vec![
                o.name.clone(),
                format!("{:.3e}", o.max_abs_diff),
                format!("{:.6}", o.mean_cosine),
                o.task.map_or("-".into(), |t| t.to_string()),
                match (o.task, o.metric) {
                    (Some(t), Some(v)) => format!("{} {}", t.metric_name(), pct(v)),
                    _ => "-".into(),
                },
                opt(o.reference_accuracy),
                opt(o.candidate_accuracy),
            ]);
        }
        out!("{}", t.render());
        for o in &rep.outputs {
            outln!(
                "output '{}': {}",
                o.name,
                match o.task {
                    Some(t) => format!("task {t}, {} ({})", t.metric_name(), o.task_reason),
                    None => format!("no task metric, cosine only ({})", o.task_reason),
                }
            );
        }
    }
    if let Some(min) = a.min_agreement {
        match rep.primary() {
            Some((output, task, v)) if v < min => {
                return Ok(Outcome::CheckFailed(format!(
                    "{} of output '{output}' is {}, below --min-agreement {}",
                    task.metric_name(),
                    pct(v),
                    pct(min)
                )));
            }
            None => {
                return Ok(Outcome::CheckFailed(
                    "--min-agreement was given but no output has a task metric (give --task)"
                        .into(),
                ));
            }
            _ => {}
        }
    }
    Ok(Outcome::Ok)
}
