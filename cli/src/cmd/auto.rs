//! `whittle auto`: search recipes for the fastest model that keeps a fidelity floor, measured on
//! this machine beside the original; write it with a recipe and plan that rebuild it, and the
//! search's report (results.json, report.md, plot.svg).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use whittle_calib::Dataset;
use whittle_compress::auto::{self, AutoJob, AutoReport};
use whittle_compress::job::Job;
use whittle_deploy::target::{Connection, Target};
use whittle_runtime::RuntimeKind;

use crate::Outcome;
use crate::progress::Bars;

/// Arguments of `whittle auto`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    files: super::Files,
    /// Calibration data (image folder, .npy, .npz): the methods fit on part of it and every
    /// candidate is judged on held-apart items of it.
    #[arg(long)]
    calib: PathBuf,
    /// The floor of the task metric on held-apart items (top-1 agreement, cosine, ...), 0..1.
    #[arg(long, value_name = "F")]
    min_agreement: f64,
    /// Time the compressions may take, e.g. `10m`, `90s` (a candidate is not started after it).
    #[arg(long, default_value = "10m", value_parser = seconds)]
    budget: f64,
    /// The target the candidates are timed on: a name from targets/ or a target TOML (`host`:
    /// this machine, in process; an ssh or serial board: through its runner, each candidate sent
    /// once; an emulated board needs --latencies measured on the real one).
    #[arg(long, default_value = "host")]
    target: String,
    /// Runtime the candidates are measured and checked on.
    #[arg(long, default_value = "ort-cpu")]
    runtime: RuntimeKind,
    /// Threads for ONNX Runtime.
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    data: super::DataArgs,
    /// What the outputs are for (classify, embed, dense, ctc); default: guessed per output.
    #[arg(long)]
    task: Option<whittle_export::Task>,
    /// Side-by-side rounds of the final measurement.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Latencies measured on another board, in ms, as a JSON object naming `original` and every
    /// candidate (`{"original": 12.0, "int8": 7.1, ...}`): used instead of measuring here.
    #[arg(long, value_name = "JSON")]
    latencies: Option<PathBuf>,
    /// Text encoders: judge each candidate by the STS Spearman correlation it keeps on these
    /// `score<TAB>sentence<TAB>sentence` pairs (with --tokenizer) instead of the task metric on
    /// held-apart items; --min-agreement is then the fraction of the original's Spearman kept.
    /// Use pairs the calibration sentences did not come from.
    #[arg(long, value_name = "TSV", requires = "tokenizer")]
    judge_pairs: Option<PathBuf>,
    /// The tokenizer.json (or a folder holding one) for --judge-pairs.
    #[arg(long, value_name = "DIR", requires = "judge_pairs")]
    tokenizer: Option<PathBuf>,
    /// Folder for recipe.toml, plan.json, results.json, report.md and plot.svg [default:
    /// OUTPUT with `.auto` in place of its extension].
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print one JSON object (the search's results) instead of the table.
    #[arg(long)]
    json: bool,
}

/// `10m`, `90s`, `1h` or plain seconds.
pub fn seconds(s: &str) -> Result<f64, String> {
    let (n, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let v: f64 = n
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (10m, 90s, 1h)"))?;
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        _ => return Err(format!("'{s}': the unit is s, m or h")),
    };
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("'{s}' is not a positive duration"));
    }
    Ok(v * scale)
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    if !(0.0..=1.0).contains(&a.min_agreement) {
        bail!(
            "--min-agreement {} is not a fraction between 0 and 1",
            a.min_agreement
        );
    }
    super::not_the_input(&a.files.output, &a.files.model)?;
    let dir = a
        .report
        .clone()
        .unwrap_or_else(|| a.files.output.with_extension("auto"));
    let latencies = match &a.latencies {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("latency table {}: {e}", p.display()))?;
            let table: std::collections::BTreeMap<String, f64> = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("latency table {}: {e}", p.display()))?;
            Some((p.display().to_string(), table))
        }
        None => None,
    };
    let pre = super::resolve_profile(a.data.profile.as_deref(), &a.files.model, &a.calib)?;
    let inputs = super::parse_overrides(&a.data.inputs)?;
    let data = Dataset::open(&a.calib)?;
    let original = super::load_model(&a.files.model)?;
    // the board: reached now (an unreachable one fails here, before any compression)
    let target = Target::load(&a.target, &super::deploy::repo_root().join("targets"))?;
    if !target.runtimes.contains(&a.runtime) {
        bail!(
            "--runtime {}: target {} runs {}",
            a.runtime,
            target.name,
            target
                .runtimes
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let on_board = match &target.connection {
        Connection::Local(_) => false,
        Connection::Emulated(_) if latencies.is_none() => bail!(
            "--target {}: timings under emulation mean nothing, so auto cannot rank candidates there; give --latencies measured on the real board",
            target.name
        ),
        Connection::Emulated(_) => false,
        _ => latencies.is_none(),
    };
    let mut runner = if on_board {
        Some(super::deploy::connect(&target)?.0)
    } else {
        None
    };
    let threads = a.threads.or(target.threads);
    // the input shapes a board's runner binds (serialising a large model only when needed)
    let shapes = if on_board {
        super::deploy::one_item_shapes(&original.to_bytes(), &data, &pre)?
    } else {
        Vec::new()
    };
    let runner_cell = std::cell::RefCell::new(runner.as_deref_mut());
    let measure = |models: &[&whittle_core::Model], rounds: usize| {
        let mut r = runner_cell.borrow_mut();
        let r = r.as_deref_mut().expect("a board's runner");
        super::deploy::measure_on_board(r, models, rounds, &target, a.runtime, &shapes)
            .map_err(|e| whittle_compress::Error::Measure(format!("{e:#}")))
    };
    let job = AutoJob {
        base: Job {
            original: &original,
            steps: &[],
            replay: None,
            data: Some((&data, &pre)),
            inputs: &inputs,
            items: a.data.calib_items,
            holdout: a.data.holdout_items,
            floor: Some(a.min_agreement),
            strict: false,
            runtime: a.runtime,
            threads,
            task: a.task,
            speed_check: false,
        },
        floor: a.min_agreement,
        budget_s: a.budget,
        candidates: auto::candidates(&original),
        rounds: a.rounds,
        latencies,
        board: on_board.then(|| auto::Board {
            name: format!(
                "{} ({}), {}",
                target.name,
                target.transport().name(),
                a.runtime
            ),
            measure: &measure,
        }),
        judge: None,
    };
    let original_bytes = original.to_bytes();
    let sts_on = |m: &whittle_core::Model, limit: Option<usize>| {
        let (pairs, tok) = (
            a.judge_pairs.as_deref().expect("judge set"),
            a.tokenizer.as_deref().expect("clap requires it"),
        );
        let opts = whittle_export::VerifyOptions {
            runtime: a.runtime,
            threads: a.threads,
            limit,
            ..Default::default()
        };
        whittle_export::sts::sts(
            &original_bytes,
            &m.to_bytes(),
            pairs,
            tok,
            &opts,
            &mut |_, _| {},
        )
        .map(|r| r.kept)
        .map_err(|e| whittle_compress::Error::Check(format!("STS pairs: {e}")))
    };
    let sts = |m: &whittle_core::Model| sts_on(m, None);
    if let Some(p) = &a.judge_pairs {
        // refused before any compression: pairs that cannot be read, a tokenizer that fails, a
        // model that cannot embed them (two pairs are enough to find out)
        sts_on(&original, Some(2))
            .map_err(|e| anyhow::anyhow!("--judge-pairs {}: {e}", p.display()))?;
    }
    let job = AutoJob {
        judge: a.judge_pairs.as_ref().map(|p| auto::Judge {
            metric: "sts_spearman_kept".into(),
            on: format!("the STS pairs of {}", p.display()),
            value: &sts,
        }),
        ..job
    };
    let input = a.files.model.display().to_string();
    let (model, summary, report) =
        auto::run(&job, &input, &Bars::default(), &mut |l| eprintln!("{l}"))?;
    drop(job);
    if let Some(r) = runner_cell.into_inner() {
        r.close()?;
    }
    write_report(
        &dir,
        &report,
        &summary,
        a.data.calib_items,
        a.data.holdout_items,
    )?;
    whittle_export::save_model(&model, &a.files.output, Some(&a.files.model), false)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if a.json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!("{}", auto::markdown(&report));
        outln!(
            "wrote {} and {}/ (recipe.toml, plan.json, results.json, report.md, plot.svg)",
            a.files.output.display(),
            dir.display()
        );
    }
    Ok(Outcome::Ok)
}

/// The report folder: the recipe and plan that rebuild the choice (with the calibration item
/// counts the search was given), the results, Markdown, plot.
pub fn write_report(
    dir: &Path,
    r: &AutoReport,
    summary: &whittle_compress::job::Summary,
    items: Option<usize>,
    holdout: Option<usize>,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let recipe = auto::recipe(r, items, holdout);
    let write =
        |name: &str, text: &str| whittle_export::write_atomic(&dir.join(name), text.as_bytes());
    write("recipe.toml", &recipe)?;
    write("plan.json", &serde_json::to_string_pretty(&summary.plan())?)?;
    write("results.json", &serde_json::to_string_pretty(r)?)?;
    write("report.md", &auto::markdown(r))?;
    let point = |t: &auto::Tried| Some((t.fidelity?, t.latency.as_ref()?.p50_ms));
    let mut points = vec![whittle_deploy::plot::Point {
        variant: "original".into(),
        runtime: "original".into(),
        agreement: 1.0,
        p50_ms: r.original_ms,
    }];
    points.extend(r.candidates.iter().filter_map(|t| {
        let (f, ms) = point(t)?;
        Some(whittle_deploy::plot::Point {
            variant: t.name.clone(),
            runtime: if t.meets_floor {
                "meets the floor"
            } else {
                "under the floor"
            }
            .into(),
            agreement: f,
            p50_ms: ms,
        })
    }));
    let front: Vec<(f64, f64)> = r
        .candidates
        .iter()
        .filter(|t| t.on_front)
        .filter_map(point)
        .collect();
    let svg = whittle_deploy::plot::front_svg(
        &format!(
            "whittle auto on {}: latency against {}",
            r.runtime, r.metric
        ),
        &points,
        &front,
        point(r.best()),
    )?;
    write("plot.svg", &svg)?;
    Ok(())
}
