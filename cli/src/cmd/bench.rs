//! `whittle bench`: latency of a model in one runtime.

use std::path::PathBuf;

use anyhow::Result;
use whittle_runtime::{BenchConfig, BenchReport, RuntimeKind, RuntimeOptions};

use crate::Outcome;
use crate::progress::bar;
use crate::table::Table;

/// Arguments of `whittle bench`.
#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model.
    model: PathBuf,
    /// ort-cpu, ort-cuda, ort-tensorrt or tract.
    #[arg(long, default_value = "ort-cpu")]
    runtime: RuntimeKind,
    /// Untimed runs first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 100)]
    iters: usize,
    /// Stop timed runs after this many seconds (at least one run is made).
    #[arg(long)]
    max_seconds: Option<f64>,
    /// Intra-op threads (ONNX Runtime); its default is one per core.
    #[arg(long)]
    threads: Option<usize>,
    /// Fix an input's shape, e.g. `input=1x3x224x224` (repeatable); other symbolic dims are 1.
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    inputs: Vec<String>,
    /// Run on CPU when the requested execution provider is missing (and say so) instead of failing.
    #[arg(long)]
    allow_fallback: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Load and benchmark one model in this process.
pub fn measure(
    model_bytes: &[u8],
    model_name: &str,
    runtime: RuntimeKind,
    opts: &RuntimeOptions,
    cfg: &BenchConfig,
) -> Result<BenchReport> {
    let mut s = whittle_runtime::load(runtime, model_bytes, opts)?;
    let inputs = whittle_runtime::synthetic_inputs(s.inputs(), &opts.input_shapes)?;
    let input_shapes = s
        .inputs()
        .iter()
        .zip(&inputs)
        .map(|(io, v)| (io.name.clone(), v.shape().to_vec()))
        .collect();
    let pb = bar(runtime.name(), cfg.warmup + cfg.iters);
    let stats = whittle_runtime::bench(s.as_mut(), &inputs, cfg, &mut |d, _| {
        pb.set_position(d as u64)
    });
    pb.finish_and_clear();
    Ok(BenchReport {
        model: model_name.to_string(),
        runtime,
        provider: s.provider().clone(),
        input_shapes,
        stats: stats?,
    })
}

/// Table columns shared by bench and deploy.
pub fn row(r: &BenchReport) -> Vec<String> {
    let ep = if r.provider.fallback {
        format!("{} (fallback)", r.provider.actual)
    } else {
        r.provider.actual.clone()
    };
    vec![
        r.runtime.to_string(),
        ep,
        format!("{:.3}", r.stats.p50_ms),
        format!("{:.3}", r.stats.p90_ms),
        format!("{:.3}", r.stats.p99_ms),
        format!("{:.3}", r.stats.mean_ms),
        format!("{:.1}", r.stats.fps),
    ]
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    let overrides = super::parse_overrides(&a.inputs)?;
    let m = super::load_model(&a.model)?;
    let opts = RuntimeOptions {
        threads: a.threads,
        allow_fallback: a.allow_fallback,
        input_shapes: super::runtime_shapes(&overrides),
        ..Default::default()
    };
    let cfg = BenchConfig {
        warmup: a.warmup,
        iters: a.iters,
        max_seconds: a.max_seconds,
    };
    let r = measure(
        &m.to_bytes(),
        &a.model.display().to_string(),
        a.runtime,
        &opts,
        &cfg,
    )?;
    if a.json {
        outln!("{}", serde_json::to_string(&r)?);
    } else {
        let mut t = Table::new(&[
            "runtime", "EP", "p50 ms", "p90 ms", "p99 ms", "mean ms", "fps",
        ]);
        t.row(row(&r));
        out!("{}", t.render());
        if let Some(reason) = &r.provider.reason {
            eprintln!(
                "note: {} fell back to {}: {reason}",
                r.provider.requested, r.provider.actual
            );
        }
    }
    Ok(Outcome::Ok)
}
