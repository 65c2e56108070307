//! `whittle deploy`: measure models on a target and write one report.
//!
//! Latency is measured in `whittle-runner`, the program that runs on a board, reached through the
//! target's transport: for `local` targets (`host`) a child process of this one, talking frames on
//! its stdin and stdout; for `emulated` targets (`qemu-aarch64`) the runner cross-built for the
//! target's triple, started under qemu-user the same way (its timings are not meaningful); for `ssh`
//! targets the runner built for the board's triple, copied to the board with scp together with
//! each model and started through ssh; for `serial` targets a runner already listening on the
//! board's serial port (`whittle-runner --serial`), to which each model is uploaded in acknowledged
//! chunks, resumed after a dropped link. Agreement and accuracy are checked in this process. The
//! report folder holds `results.json`, `report.md` and `plot.svg` (p50 latency against agreement).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use whittle_calib::Dataset;
use whittle_compress::auto::{self, AutoJob, AutoReport};
use whittle_compress::job::Job;
use whittle_core::Model;
use whittle_core::{cost, shape};
use whittle_deploy::report::{self, Failure, OutputSum, Row};
use whittle_deploy::serial::Serial;
use whittle_deploy::target::{Connection, Target};
use whittle_deploy::transport::{
    Emulated, Local, ModelSource, RunRequest, Ssh, Transport as RunnerTransport,
};
use whittle_export::VerifyOptions;
use whittle_runtime::{BenchConfig, BenchReport, RuntimeKind};

use super::compress::Summary;
use crate::Outcome;
use crate::progress::{Bars, bar};

/// Arguments of `whittle deploy`.
#[derive(clap::Args)]
pub struct Args {
    /// A target name from targets/ (e.g. `host`) or a path to a target TOML file.
    #[arg(long, default_value = "host")]
    target: String,
    /// Models to measure (default: the bundled ResNet-8).
    models: Vec<PathBuf>,
    /// Labelled data to check accuracy on (default: the bundled CIFAR-10 images).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Preprocessing profile (default: `<model>.profile.toml`).
    #[arg(long)]
    profile: Option<String>,
    /// Timed runs per model and runtime.
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Folder for reports (a `<target>/<timestamp>/` folder is made inside).
    #[arg(long, default_value = "reports")]
    reports: PathBuf,
    /// The main job: the agreement floor of its search (`whittle auto`) on the held-apart images.
    #[arg(long, default_value_t = 0.97, value_name = "F")]
    min_agreement: f64,
    /// The main job: time its search's compressions may take (`2m`, `90s`).
    #[arg(long, default_value = "2m", value_parser = super::auto::seconds)]
    budget: f64,
    /// The main job: measure the default recipe (channel pruning) and INT8 instead of searching.
    #[arg(long, conflicts_with = "recipe")]
    no_auto: bool,
    /// The main job: compress with this recipe instead of searching (one pinned point).
    #[arg(long, value_name = "TOML")]
    recipe: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The report's results, with the summary of the main job's compression.
type Results = report::Results<super::compress::Summary, AutoReport>;

/// The repository root: the current folder when it holds targets/, else the build's source tree.
pub fn repo_root() -> PathBuf {
    if Path::new("targets").is_dir() {
        return PathBuf::from(".");
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    if !(0.0..=1.0).contains(&a.min_agreement) {
        anyhow::bail!(
            "--min-agreement {} is not a fraction between 0 and 1",
            a.min_agreement
        );
    }
    if let Some(r) = a.recipe.as_deref().filter(|r| !r.is_file()) {
        anyhow::bail!("--recipe {}: no such file", r.display());
    }
    let root = repo_root();
    let target = Target::load(&a.target, &root.join("targets"))?;
    let (mut runner, timing_note) = connect(&target)?;
    let started = now_stamp();
    let dir = a.reports.join(&target.name).join(&started);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let data = a.data.clone().unwrap_or_else(|| root.join("data/cifar10"));
    let ds = Dataset::open(&data)?;
    let MainJob {
        variants,
        compression,
        quantization,
        auto,
        eval_idx,
    } = if a.models.is_empty() {
        // a main job that fails (an unreachable floor) leaves no report folder behind
        main_job(&a, &root, &dir, (&data, &ds), &target, runner.as_mut()).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?
    } else {
        MainJob {
            variants: a
                .models
                .iter()
                .map(|m| ("given".to_string(), m.clone()))
                .collect(),
            compression: None,
            quantization: None,
            auto: None,
            eval_idx: (0..ds.len()).collect(),
        }
    };
    let reference = variants[0].1.clone();
    let pre = super::resolve_profile(a.profile.as_deref(), &reference, &data)?;
    let cfg = BenchConfig {
        warmup: a.warmup,
        iters: a.iters,
        max_seconds: None,
    };
    let mut results = Results {
        target: target.name.clone(),
        triple: target.triple.clone(),
        transport: target.transport().name().to_string(),
        started: started.clone(),
        timing_note: timing_note.clone(),
        compression,
        quantization,
        auto,
        link_events: Vec::new(),
        complete: false,
        rows: Vec::new(),
        failures: Vec::new(),
    };
    let save = |results: &Results| -> Result<()> {
        whittle_export::write_atomic(
            &dir.join("results.json"),
            serde_json::to_string_pretty(results)?.as_bytes(),
        )?;
        Ok(())
    };
    for (variant, path) in &variants {
        let m = super::load_model(path)?;
        // symbolic dims (a -1 height and width) run and are costed at the data's item shape
        let mut bound = m.clone();
        whittle_compress::pipeline::bind_shapes(&mut bound, &[], Some((&ds, &pre)))?;
        let c = cost::count(&bound, &shape::infer(&bound, &[])?);
        let bytes = m.to_bytes();
        let shapes = one_item_shapes(&bytes, &ds, &pre)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let reference_bytes = super::load_model(&reference)?.to_bytes();
        for &rt in &target.runtimes {
            eprintln!("measuring {name} on {} ({rt})", target.name);
            let vopts = VerifyOptions {
                runtime: rt,
                threads: target.threads,
                ..Default::default()
            };
            // a model the board cannot run is a failure of its own: the others go on
            let measured =
                measure_in_runner(runner.as_mut(), path, &name, rt, &target, &cfg, &shapes)
                    .and_then(|m| {
                        let v = whittle_export::verify::verify_items(
                            &reference_bytes,
                            &bytes,
                            &ds,
                            &eval_idx,
                            &pre,
                            &vopts,
                            &mut |_, _| {},
                        )
                        .with_context(|| {
                            format!("checking against the original on {}", data.display())
                        })?;
                        Ok((m, v))
                    });
            let ((bench, peak_rss_bytes, outputs, (load_ms, first_run_ms)), v) = match measured {
                Ok(x) => x,
                Err(e) => {
                    let error = format!("{e:#}");
                    eprintln!("error: {name} on {rt}: {error}");
                    results.failures.push(Failure {
                        model: name.clone(),
                        runtime: rt.to_string(),
                        error,
                    });
                    results.link_events = runner.link_events();
                    save(&results)?;
                    continue;
                }
            };
            let out = v.outputs.first();
            let speedup = results
                .rows
                .iter()
                .find(|r| r.bench.runtime == rt && r.variant == variants[0].0)
                .map(|r| r.bench.stats.p50_ms / bench.stats.p50_ms);
            results.rows.push(Row {
                model: name.clone(),
                variant: variant.clone(),
                params: c.params,
                macs: c.macs,
                speedup: speedup.or((path == &reference).then_some(1.0)),
                agreement: out.and_then(|o| o.top1_agreement),
                accuracy: out.and_then(|o| o.candidate_accuracy),
                items: v.items,
                peak_rss_bytes,
                outputs,
                bench,
                load_ms,
                first_run_ms,
                runs_in_float: whittle_runtime::runs_in_float(rt, &bytes),
            });
            results.link_events = runner.link_events();
            save(&results)?;
        }
    }
    runner.close()?;
    results.complete = true;
    let rendered = report::render(&results, eval_idx.len()).context("drawing the plot")?;
    let table = rendered.table;
    save(&results)?;
    whittle_export::write_atomic(&dir.join(report::PLOT_FILE), rendered.svg.as_bytes())?;
    whittle_export::write_atomic(
        &dir.join(report::MARKDOWN_FILE),
        rendered.markdown.as_bytes(),
    )?;
    if a.json {
        outln!("{}", serde_json::to_string(&results)?);
    } else {
        out!("{table}");
        for r in &results.rows {
            if let Some(why) = &r.runs_in_float {
                eprintln!("note: {} on {}: {why}", r.model, r.bench.runtime);
            }
        }
        if let Some(n) = &timing_note {
            eprintln!("note: {n}");
        }
        eprintln!("report: {}", dir.display());
    }
    if let Some(f) = results.failures.first() {
        anyhow::bail!(
            "{} of {} measurements failed (the others are in {}); first: {} on {}: {}",
            results.failures.len(),
            results.failures.len() + results.rows.len(),
            dir.display(),
            f.model,
            f.runtime,
            f.error
        );
    }
    Ok(Outcome::Ok)
}

/// The shapes the model's inputs take for one item of `ds` (symbolic dims bound by the data).
pub fn one_item_shapes(
    bytes: &[u8],
    ds: &Dataset,
    pre: &whittle_calib::Preprocess,
) -> Result<Vec<(String, Vec<usize>)>> {
    let declared = whittle_runtime::declared_inputs(bytes)?;
    let (specs, bs) = whittle_calib::input_specs(&declared, 1, Some((ds, pre)))?;
    Ok(specs
        .into_iter()
        .map(|s| (s.name, std::iter::once(bs).chain(s.item_shape).collect()))
        .collect())
}

/// What the main job measures: the variants (label, file), what made them, and the images to
/// judge them on (those no compression calibrated on).
struct MainJob {
    variants: Vec<(String, PathBuf)>,
    compression: Option<Summary>,
    quantization: Option<Summary>,
    auto: Option<AutoReport>,
    eval_idx: Vec<usize>,
}

/// The main job on the bundled ResNet-8, calibrating on one part of the data and judging on the
/// rest: `whittle auto`'s choice at the floor (candidates timed in this process, or on an ssh
/// board through its runner), one pinned recipe (`--recipe`), or the default recipe and INT8
/// (`--no-auto`, and emulated and serial targets).
fn main_job(
    a: &Args,
    root: &Path,
    dir: &Path,
    (data, ds): (&Path, &Dataset),
    target: &Target,
    runner: &mut dyn RunnerTransport,
) -> Result<MainJob> {
    let original = root.join("models/resnet8_cifar10.onnx");
    let variant = |label: &str, out: PathBuf| {
        vec![
            ("original".to_string(), original.clone()),
            (label.to_string(), out),
        ]
    };
    let compress = |recipe: &Path, out: &Path, what: &str| -> Result<Summary> {
        eprintln!("{what} {} with {}", original.display(), recipe.display());
        let args = super::compress::with_recipe(&original, out, data, recipe)?;
        let summary = super::compress::execute(&args)?.context("compression wrote nothing")?;
        for w in &summary.warnings {
            eprintln!("warning: {w}");
        }
        Ok(summary)
    };
    if let Some(recipe) = &a.recipe {
        let out = dir.join("resnet8_cifar10.recipe.onnx");
        let summary = compress(recipe, &out, "compressing")?;
        let label = format!(
            "recipe ({})",
            recipe
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        );
        return Ok(MainJob {
            variants: variant(&label, out),
            eval_idx: summary.held_apart.clone(),
            compression: Some(summary),
            quantization: None,
            auto: None,
        });
    }
    // the search times candidates in this process (host) or on an ssh board through its runner;
    // emulated timings mean nothing, and a serial link uploads each candidate slowly
    let searchable = matches!(target.connection, Connection::Local(_) | Connection::Ssh(_));
    if !a.no_auto && !searchable {
        eprintln!(
            "note: the search times candidates here or on an ssh board only so far: on {} ({}) the default recipe and INT8 are measured (--no-auto)",
            target.name,
            target.transport().name()
        );
    }
    if a.no_auto || !searchable {
        let out = dir.join("resnet8_cifar10.pruned.onnx");
        let summary = compress(&root.join("recipes/default.toml"), &out, "compressing")?;
        // INT8 alone, calibrated on the same split
        let int8_out = dir.join("resnet8_cifar10.int8.onnx");
        let int8 = compress(&root.join("recipes/int8.toml"), &int8_out, "quantizing")?;
        anyhow::ensure!(
            int8.held_apart == summary.held_apart,
            "the two compressions split the data differently"
        );
        let label = format!("pruned ({})", summary.target().unwrap_or("recipe"));
        let mut variants = variant(&label, out);
        variants.push(("int8".to_string(), int8_out));
        return Ok(MainJob {
            variants,
            eval_idx: summary.held_apart.clone(),
            compression: Some(summary),
            quantization: Some(int8),
            auto: None,
        });
    }
    // the search, on the target's first runtime and its threads, with the recipes' split
    let model = super::load_model(&original)?;
    let pre = super::resolve_profile(a.profile.as_deref(), &original, data)?;
    let runtime = *target
        .runtimes
        .first()
        .context("the target names no runtime")?;
    let job = AutoJob {
        base: Job {
            original: &model,
            steps: &[],
            replay: None,
            data: Some((ds, &pre)),
            inputs: &[],
            items: Some(MAIN_JOB_ITEMS),
            holdout: Some(MAIN_JOB_ITEMS),
            floor: Some(a.min_agreement),
            strict: false,
            runtime,
            threads: target.threads,
            task: None,
            speed_check: false,
        },
        floor: a.min_agreement,
        budget_s: a.budget,
        candidates: auto::candidates(&model),
        rounds: AUTO_ROUNDS,
        latencies: None,
        board: None,
        judge: None,
    };
    // on a board, every candidate is sent once and timed there in interleaved rounds
    let runner = std::cell::RefCell::new(runner);
    let shapes = one_item_shapes(&model.to_bytes(), ds, &pre)?;
    let measure = |models: &[&Model], rounds: usize| {
        measure_on_board(
            &mut **runner.borrow_mut(),
            models,
            rounds,
            target,
            runtime,
            &shapes,
        )
        .map_err(|e| whittle_compress::Error::Measure(format!("{e:#}")))
    };
    let job = AutoJob {
        board: matches!(target.connection, Connection::Ssh(_)).then(|| auto::Board {
            name: format!("{} ({}), {runtime}", target.name, target.transport().name()),
            measure: &measure,
        }),
        ..job
    };
    eprintln!(
        "searching for the fastest model of {} on {} ({runtime}) that keeps {:.1}% top-1 agreement (whittle auto)",
        original.display(),
        target.name,
        a.min_agreement * 100.0
    );
    let input = original.display().to_string();
    let (chosen, summary, report) =
        auto::run(&job, &input, &Bars::default(), &mut |l| eprintln!("{l}"))?;
    for w in &report.warnings {
        eprintln!("warning: auto: {w}");
    }
    super::auto::write_report(
        &dir.join(report::AUTO_DIR),
        &report,
        &summary,
        Some(MAIN_JOB_ITEMS),
        Some(MAIN_JOB_ITEMS),
    )?;
    if !a.json {
        outln!("{}", auto::markdown(&report));
    }
    let out = dir.join("resnet8_cifar10.auto.onnx");
    whittle_export::save_model(&chosen, &out, Some(&original), false)?;
    Ok(MainJob {
        variants: variant(&format!("auto: {}", report.best().name), out),
        eval_idx: summary.held_apart.clone(),
        compression: Some(summary),
        quantization: None,
        auto: Some(report),
    })
}

/// `p[round][model]`: each model's p50 on the board in `rounds` interleaved rounds (the first
/// model of a round rotating), each model written to a temporary file and sent once.
pub fn measure_on_board(
    runner: &mut dyn RunnerTransport,
    models: &[&Model],
    rounds: usize,
    target: &Target,
    runtime: RuntimeKind,
    shapes: &[(String, Vec<usize>)],
) -> Result<Vec<Vec<f64>>> {
    let tmp = tempfile::tempdir()?;
    let mut files = Vec::with_capacity(models.len());
    for (k, m) in models.iter().enumerate() {
        let f = tmp.path().join(format!("candidate-{k}.onnx"));
        whittle_export::write_atomic(&f, &m.to_bytes())?;
        files.push(f);
    }
    let bench = BenchConfig {
        warmup: 5,
        iters: 50,
        max_seconds: Some(0.5),
    };
    Ok(whittle_deploy::transport::interleaved_p50(
        runner, &files, rounds, target, runtime, shapes, &bench,
    )?)
}

/// Calibration items (and as many held-apart ones for the search's judging) of the main job's
/// search: those of recipes/default.toml, so every mode judges on the same images.
const MAIN_JOB_ITEMS: usize = 128;

/// Side-by-side rounds of the main job's search.
const AUTO_ROUNDS: usize = 7;

/// The transport the target names, and a note for the report when its timings are emulated.
pub fn connect(target: &Target) -> Result<(Box<dyn RunnerTransport>, Option<String>)> {
    match &target.connection {
        Connection::Local(_) => Ok((Box::new(Local::from_env()?), None)),
        Connection::Emulated(link) => {
            let emulated = Emulated::for_target(target)?;
            eprintln!("runner: {}", emulated.command_line());
            let note = format!(
                "timings are emulated ({} on this machine): they are not meaningful for a real {} board",
                link.qemu, target.triple
            );
            Ok((Box::new(emulated), Some(note)))
        }
        Connection::Ssh(_) => {
            let mut ssh = Ssh::for_target(target)?;
            // Reach the board now (copy the runner, start it): a board that cannot be reached
            // fails here, with one line, before any compression or report folder.
            ssh.start()?;
            eprintln!("runner: {}", ssh.command_line());
            Ok((Box::new(ssh), None))
        }
        Connection::Serial(_) => {
            let mut serial = Serial::for_target(target)?;
            // Open the port and ping the runner now: a missing device or a silent board fails
            // here, with one line, before any compression or report folder.
            serial.start()?;
            eprintln!("runner: {}", serial.describe());
            Ok((Box::new(serial), None))
        }
    }
}

/// What [`measure_in_runner`] brings back: the report, the runner's peak RSS for this request, its
/// output checksums, and the milliseconds of session creation and first run.
type Measured = (
    BenchReport,
    Option<u64>,
    Vec<OutputSum>,
    (Option<f64>, Option<f64>),
);

/// Benchmarks the model at `path` in the target's runner (one request; the runner keeps running
/// for the next).
fn measure_in_runner(
    runner: &mut dyn RunnerTransport,
    path: &Path,
    name: &str,
    runtime: RuntimeKind,
    target: &Target,
    cfg: &BenchConfig,
    input_shapes: &[(String, Vec<usize>)],
) -> Result<Measured> {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let upload = bar("upload", len as usize);
    let model = runner.send_file_with_progress(path, &mut |done, _| upload.set_position(done));
    upload.finish_and_clear();
    let model = model?;
    let mut req = RunRequest {
        bench: cfg.clone(),
        ..RunRequest::for_target(target, 1, name, ModelSource::Path(model), runtime)
    };
    req.options.input_shapes = input_shapes.to_vec();
    let progress = bar(runtime.name(), cfg.warmup + cfg.iters);
    let result = runner.request(&req, &mut |done, _| progress.set_position(done));
    progress.finish_and_clear();
    let result = result?;
    let report = BenchReport {
        model: name.to_string(),
        runtime,
        provider: result.provider_info(),
        input_shapes: result.shapes(),
        stats: result.stats(),
    };
    let outputs = result
        .outputs
        .iter()
        .map(|o| OutputSum {
            name: o.name.clone(),
            dtype: o.dtype.clone(),
            shape: o.shape.clone(),
            sum: o.sum,
            sum_squares: o.sum_squares,
        })
        .collect();
    Ok((
        report,
        result.peak_rss_bytes,
        outputs,
        (result.load_ms, result.first_run_ms),
    ))
}

/// UTC time as `YYYYMMDD-HHMMSS` (folder names sort by time).
fn now_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_786), (2026, 11, 29));
    }
}
