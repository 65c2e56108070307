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

mod plot;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use whittle_calib::Dataset;
use whittle_core::{cost, shape};
use whittle_deploy::protocol::pb;
use whittle_deploy::serial::Serial;
use whittle_deploy::target::{Target, Transport};
use whittle_deploy::transport::{Emulated, Local, Ssh, Transport as RunnerTransport};
use whittle_export::VerifyOptions;
use whittle_runtime::{BenchConfig, RuntimeKind};

use super::bench::BenchReport;
use crate::Outcome;
use crate::progress::bar;
use crate::table::{Table, pct, si};

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
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    model: String,
    variant: String,
    params: u64,
    macs: u64,
    bench: BenchReport,
    /// p50 of the original on the same runtime divided by this row's p50.
    speedup: Option<f64>,
    /// Top-1 agreement with the original on the held-apart items (compressed variants).
    agreement: Option<f64>,
    accuracy: Option<f64>,
    items: usize,
    /// Peak resident memory of the runner while it served this row's model (where known).
    peak_rss_bytes: Option<u64>,
    /// The runner's output checksums for its synthetic inputs (compare across boards).
    outputs: Vec<OutputSum>,
    /// Milliseconds to create the session in the runner (with TensorRT and no cached engine: the
    /// engine build) and of its first run, apart from the timed runs.
    load_ms: Option<f64>,
    first_run_ms: Option<f64>,
}

/// One output checksum from the runner (see `whittle_deploy::protocol::output_checksum`).
#[derive(Serialize)]
struct OutputSum {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    sum: f64,
    sum_squares: f64,
}

#[derive(Serialize)]
struct Results {
    target: String,
    triple: String,
    transport: String,
    started: String,
    /// Set when the latencies cannot stand for the board's (measured under emulation).
    #[serde(skip_serializing_if = "Option::is_none")]
    timing_note: Option<String>,
    /// The compression of the main job, when it ran.
    compression: Option<super::compress::Summary>,
    /// What happened to the link (serial: drops, reopenings, resumed uploads), one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    link_events: Vec<String>,
    /// False while rows are still being measured: `results.json` is rewritten (atomically) after
    /// each row, so an interrupted or failed run keeps the rows it finished.
    complete: bool,
    rows: Vec<Row>,
    /// Models the board could not run (the board's error text), while the others went on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    failures: Vec<Failure>,
}

/// A model and runtime that failed on the board or in the check against the original.
#[derive(Serialize)]
struct Failure {
    model: String,
    runtime: String,
    error: String,
}

/// The plot in the report folder.
const PLOT_FILE: &str = "plot.svg";

/// The repository root: the current folder when it holds targets/, else the build's source tree.
fn repo_root() -> PathBuf {
    if Path::new("targets").is_dir() {
        return PathBuf::from(".");
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    let root = repo_root();
    let target = Target::load(&a.target, &root.join("targets"))?;
    let (mut runner, timing_note) = connect(&target)?;
    let started = now_stamp();
    let dir = a.reports.join(&target.name).join(&started);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let data = a.data.clone().unwrap_or_else(|| root.join("data/cifar10"));
    let ds = Dataset::open(&data)?;
    // the main job: compress the bundled model with the default recipe, calibrating on one half
    // of the data and judging on the other
    let (variants, compression, eval_idx) = if a.models.is_empty() {
        let original = root.join("models/resnet8_cifar10.onnx");
        let out = dir.join("resnet8_cifar10.pruned.onnx");
        let recipe = root.join("recipes/default.toml");
        let args = super::compress::with_recipe(&original, &out, &data, &recipe)?;
        let n = args.calib_items().min(ds.len());
        eprintln!(
            "compressing {} with {} ({n} calibration images)",
            original.display(),
            recipe.display()
        );
        let summary = super::compress::execute(&args)?.context("compression wrote nothing")?;
        // the same split compress made: judge on the images it did not calibrate on
        let (_, hold) = ds.split(n as f64 / ds.len() as f64, 0)?;
        let label = format!("pruned ({})", args.target());
        (
            vec![("original".to_string(), original.clone()), (label, out)],
            Some(summary),
            hold,
        )
    } else {
        let v = a
            .models
            .iter()
            .map(|m| ("given".to_string(), m.clone()))
            .collect();
        (v, None, (0..ds.len()).collect())
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
        transport: format!("{:?}", target.transport).to_lowercase(),
        started: started.clone(),
        timing_note: timing_note.clone(),
        compression,
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
        let c = cost::count(&m, &shape::infer(&m, &[])?);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = m.to_bytes();
        let reference_bytes = super::load_model(&reference)?.to_bytes();
        for &rt in &target.runtimes {
            eprintln!("measuring {name} on {} ({rt})", target.name);
            let vopts = VerifyOptions {
                runtime: rt,
                threads: target.threads,
                ..Default::default()
            };
            // a model the board cannot run is a failure of its own: the others go on
            let measured = measure_in_runner(runner.as_mut(), path, &name, rt, &target, &cfg)
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
            });
            results.link_events = runner.link_events();
            save(&results)?;
        }
    }
    runner.close()?;
    results.complete = true;
    let table = render(&results);
    save(&results)?;
    let note = timing_note
        .as_ref()
        .map(|n| format!("**Note: {n}.**\n\n"))
        .unwrap_or_default();
    let points: Vec<plot::Point> = results
        .rows
        .iter()
        .filter_map(|r| {
            Some(plot::Point {
                variant: r.variant.clone(),
                runtime: r.bench.runtime.to_string(),
                agreement: r.agreement?,
                p50_ms: r.bench.stats.p50_ms,
            })
        })
        .collect();
    let unplotted = results.rows.len() - points.len();
    let svg = plot::svg(
        &format!("whittle deploy: {} ({})", results.target, results.started),
        &points,
    )
    .context("drawing the plot")?;
    whittle_export::write_atomic(&dir.join(PLOT_FILE), svg.as_bytes())?;
    let link = if results.link_events.is_empty() {
        String::new()
    } else {
        let lines: Vec<String> = results
            .link_events
            .iter()
            .map(|e| format!("- {e}\n"))
            .collect();
        format!("\nThe link:\n\n{}", lines.concat())
    };
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let startup_rows: Vec<String> = results
        .rows
        .iter()
        .map(|r| {
            format!(
                "| {} | {} | {} | {} | {} |\n",
                r.model,
                r.bench.runtime,
                r.bench.provider.actual,
                ms(r.load_ms),
                ms(r.first_run_ms)
            )
        })
        .collect();
    let startup = format!(
        "\nStartup, apart from the timed runs: session creation (with TensorRT and no cached engine, the engine build) and the first run.\n\n| model | runtime | EP | session ms | first run ms |\n|---|---|---|---|---|\n{}",
        startup_rows.concat()
    );
    let unplotted = if unplotted > 0 {
        format!(" ({unplotted} rows without an agreement are not plotted)")
    } else {
        String::new()
    };
    let md = format!(
        "# whittle deploy: {} ({})\n\nstarted {}\n\n{note}Accuracy and agreement with the original are measured on {} held-apart images.\n\n```\n{}```\n{startup}{link}\n![p50 latency against top-1 agreement, one point per variant and runtime]({PLOT_FILE}){unplotted}\n",
        results.target,
        results.triple,
        results.started,
        eval_idx.len(),
        table
    );
    let failed: Vec<String> = results
        .failures
        .iter()
        .map(|f| format!("- {} on {}: {}\n", f.model, f.runtime, f.error))
        .collect();
    let md = if failed.is_empty() {
        md
    } else {
        format!(
            "{md}\nFailed on the board (the other rows were measured):\n\n{}",
            failed.concat()
        )
    };
    whittle_export::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    if a.json {
        outln!("{}", serde_json::to_string(&results)?);
    } else {
        out!("{table}");
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

/// The transport the target names, and a note for the report when its timings are emulated.
fn connect(target: &Target) -> Result<(Box<dyn RunnerTransport>, Option<String>)> {
    match target.transport {
        Transport::Local => Ok((Box::new(Local::from_env()?), None)),
        Transport::Emulated => {
            let emulated = Emulated::for_target(target)?;
            eprintln!("runner: {}", emulated.command_line());
            let note = format!(
                "timings are emulated ({} on this machine): they are not meaningful for a real {} board",
                target.qemu.as_deref().unwrap_or("qemu-user"),
                target.triple
            );
            Ok((Box::new(emulated), Some(note)))
        }
        Transport::Ssh => {
            let mut ssh = Ssh::for_target(target)?;
            // Reach the board now (copy the runner, start it): a board that cannot be reached
            // fails here, with one line, before any compression or report folder.
            ssh.start()?;
            eprintln!("runner: {}", ssh.command_line());
            Ok((Box::new(ssh), None))
        }
        Transport::Serial => {
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
) -> Result<Measured> {
    let count = |what: &str, n: usize| {
        u32::try_from(n).with_context(|| format!("{what} {n} is too large for the runner"))
    };
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let upload = bar("upload", len as usize);
    let model = runner.send_file_with_progress(path, &mut |done, _| upload.set_position(done));
    upload.finish_and_clear();
    let model = model?;
    let req = pb::Request {
        id: 1,
        name: name.to_string(),
        model: Some(pb::request::Model::ModelPath(model.display().to_string())),
        runtime: runtime.name().to_string(),
        threads: target.threads.map(|n| count("threads", n)).transpose()?,
        warmup: count("warmup", cfg.warmup)?,
        iters: count("iters", cfg.iters)?,
        max_seconds: cfg.max_seconds,
        input_shapes: Vec::new(),
        allow_fallback: target.allow_fallback,
        ort_library: target
            .ort_library
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        tensorrt_fp16: target.tensorrt_fp16,
        tensorrt_cache_dir: target.tensorrt_cache_dir.clone().unwrap_or_default(),
        tensorrt_workspace_bytes: target.tensorrt_workspace_bytes(),
    };
    let progress = bar(runtime.name(), cfg.warmup + cfg.iters);
    let result = runner.request(req, &mut |done, _| progress.set_position(done));
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

fn render(r: &Results) -> String {
    let mut t = Table::new(&[
        "model",
        "variant",
        "params",
        "MACs",
        "runtime",
        "EP",
        "p50 ms",
        "p90 ms",
        "fps",
        "speedup",
        "agreement",
        "accuracy",
    ]);
    let opt = |v: Option<f64>| v.map(pct).unwrap_or_else(|| "-".into());
    for row in &r.rows {
        let b = &row.bench;
        t.row(vec![
            row.model.clone(),
            row.variant.clone(),
            si(row.params),
            si(row.macs),
            b.runtime.to_string(),
            b.provider.actual.clone(),
            format!("{:.3}", b.stats.p50_ms),
            format!("{:.3}", b.stats.p90_ms),
            format!("{:.1}", b.stats.fps),
            row.speedup
                .map(|v| format!("{v:.2}x"))
                .unwrap_or_else(|| "-".into()),
            opt(row.agreement),
            opt(row.accuracy),
        ]);
    }
    t.render()
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
