//! `whittle profile`: per-layer latency table of a model on one runtime, for `--target latency=`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use whittle_compress::latency::{self, LatencyTable};
use whittle_compress::{cleanup, merge};
use whittle_core::Model;
use whittle_runtime::{BenchConfig, RuntimeKind};

use crate::Outcome;
use crate::progress::bar;
use crate::table::{Table, si};

/// Arguments of `whittle profile`.
#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model.
    model: PathBuf,
    /// ort-cpu, ort-cuda, ort-tensorrt or tract.
    #[arg(long, default_value = "ort-cpu")]
    runtime: RuntimeKind,
    /// Intra-op threads (ONNX Runtime); its default is one per core.
    #[arg(long)]
    threads: Option<usize>,
    /// Fix an input's shape, e.g. `input=1x3x224x224` (repeatable); other symbolic dims are 1.
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    inputs: Vec<String>,
    /// Write the table as JSON here (atomically), for `whittle compress --latency-table`.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Also measure every depth-merging candidate in the model, merged and not (for `whittle
    /// compress --merge --latency-table`).
    #[arg(long)]
    merge: bool,
    /// Rounds of the side-by-side measurement of each merge candidate (more: steadier on a busy
    /// machine, slower).
    #[arg(long, default_value_t = MERGE_ROUNDS)]
    merge_rounds: usize,
    /// Print the table as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Measure the latency table of a model as `whittle compress` sees it (after the lossless
/// cleanup, so that layer names and weights match).
pub fn measure_table(
    model: &Model,
    runtime: RuntimeKind,
    threads: Option<usize>,
    input_shapes: Vec<(String, Vec<usize>)>,
    merge_rounds: Option<usize>,
) -> Result<LatencyTable> {
    let cfg = BenchConfig {
        warmup: 3,
        iters: 40,
        max_seconds: Some(0.15),
    };
    let mut measure = latency::local_measure(runtime, threads, input_shapes.clone(), cfg);
    let pb = bar("profile", 1);
    let t = latency::profile(model, runtime.name(), threads, &mut measure, &mut |d, n| {
        pb.set_length(n as u64);
        pb.set_position(d as u64);
    });
    pb.finish_and_clear();
    let mut t = t?;
    if let Some(rounds) = merge_rounds {
        t.merges = measure_merges(model, runtime, threads, input_shapes, rounds)?.1;
    }
    Ok(t)
}

/// Rounds of the side-by-side measurement of a merge candidate, by default.
pub const MERGE_ROUNDS: usize = 11;

/// How merge candidates and plans are measured beside the model: `rounds` side-by-side rounds
/// of a few runs each.
pub fn merge_measure(
    runtime: RuntimeKind,
    threads: Option<usize>,
    input_shapes: Vec<(String, Vec<usize>)>,
    rounds: usize,
) -> impl FnMut(&Model, &Model) -> Result<(f64, f64), whittle_compress::Error> {
    let cfg = BenchConfig {
        warmup: 2,
        iters: 20,
        max_seconds: Some(0.05),
    };
    latency::local_pair_measure(runtime, threads, input_shapes, rounds, cfg)
}

/// Each depth-merging candidate's latency in the model, merged and not (side by side, see
/// `merge::SegmentLatency`), and the model's latency: the median of its measurements.
pub fn measure_merges(
    model: &Model,
    runtime: RuntimeKind,
    threads: Option<usize>,
    input_shapes: Vec<(String, Vec<usize>)>,
    rounds: usize,
) -> Result<(f64, Vec<merge::SegmentLatency>)> {
    let segs = merge::segments(model);
    if segs.is_empty() {
        bail!(merge::NOTHING_TO_MERGE);
    }
    let mut measure = merge_measure(runtime, threads, input_shapes, rounds);
    let pb = bar("merges", segs.len());
    let t = merge::measure_segments(model, &segs, &mut measure, &mut |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    let mut all: Vec<f64> = t.iter().map(|s| s.before_ms).collect();
    all.sort_by(f64::total_cmp);
    let model_ms = all[all.len() / 2];
    Ok((model_ms, t))
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    let overrides = super::parse_overrides(&a.inputs)?;
    let mut model = super::load_model(&a.model)?;
    cleanup::cleanup(&mut model).context("cleanup")?;
    if a.merge && merge::segments(&model).is_empty() {
        bail!(merge::NOTHING_TO_MERGE);
    }
    let table = measure_table(
        &model,
        a.runtime,
        a.threads,
        super::runtime_shapes(&overrides),
        a.merge.then_some(a.merge_rounds),
    )?;
    if let Some(out) = &a.output {
        whittle_export::write_atomic(out, serde_json::to_string_pretty(&table)?.as_bytes())?;
    }
    if a.json {
        outln!("{}", serde_json::to_string(&table)?);
        return Ok(Outcome::Ok);
    }
    let total = table.total_ms();
    let mut t = Table::new(&[
        "layer",
        "op",
        "weight",
        "MACs",
        "ms",
        "share",
        "ms at 0.4",
        "ms at 0.1",
    ]);
    let at = |l: &latency::LayerLatency, f: f64| l.at(&table.fractions, f, f);
    for l in &table.layers {
        let dims: Vec<String> = l.weight_dims.iter().map(i64::to_string).collect();
        t.row(vec![
            l.node.clone(),
            l.op.clone(),
            dims.join("x"),
            si(l.macs),
            format!("{:.4}", l.full_ms()),
            format!("{:.1}%", 100.0 * l.full_ms() / total.max(1e-12)),
            format!("{:.4}", at(l, 0.4)),
            format!("{:.4}", at(l, 0.1)),
        ]);
    }
    out!("{}", t.render());
    outln!(
        "{}: model {:.3} ms; the {} layers alone {:.3} ms; other ops and overhead {:.3} ms (fastest runs)",
        table.runtime,
        table.model_ms,
        table.layers.len(),
        table.layers_ms(),
        table.other_ms()
    );
    if !table.merges.is_empty() {
        let mut t = Table::new(&["merge", "ms as is", "ms merged", "saved"]);
        for m in &table.merges {
            t.row(vec![
                m.convs.join(" + ") + if m.add.is_some() { " (+ residual)" } else { "" },
                format!("{:.4}", m.before_ms),
                format!("{:.4}", m.after_ms),
                format!("{:+.1}%", 100.0 * m.saved_ms() / table.model_ms.max(1e-12)),
            ]);
        }
        out!("{}", t.render());
        let paying = table.merges.iter().filter(|m| m.saved_ms() > 0.0).count();
        outln!(
            "{paying} of {} merge candidates are faster merged (saved: share of the model's latency)",
            table.merges.len()
        );
    }
    if let Some(out) = &a.output {
        outln!("wrote {}", out.display());
    }
    Ok(Outcome::Ok)
}
