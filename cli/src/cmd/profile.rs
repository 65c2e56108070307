//! `whittle profile`: per-layer latency table of a model on one runtime, for `--target latency=`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use whittle_compress::latency;
use whittle_compress::{cleanup, merge};
use whittle_core::{cost, shape};
use whittle_runtime::RuntimeKind;

use crate::Outcome;
use crate::progress::Bars;
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
    /// Give an input its shape, e.g. `input=1x3x224x224` (repeatable): binds its symbolic dims
    /// (declared -1 or 0 too). A batch axis left symbolic runs as 1; any other symbolic dim a layer
    /// needs must be bound.
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
    #[arg(long, default_value_t = latency::MERGE_ROUNDS)]
    merge_rounds: usize,
    /// Print the table as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    let overrides = super::parse_overrides(&a.inputs)?;
    let mut model = super::load_model(&a.model)?;
    cleanup::cleanup(&mut model).context("cleanup")?;
    // The layers are measured at the model's declared shapes: write the bindings into it.
    shape::bind_inputs(&mut model, &overrides)?;
    let c = cost::count(&model, &shape::infer(&model, &[])?);
    if !c.is_exact() {
        bail!(
            "cannot profile the layers: {}",
            super::unknown_dims_text(&c)
        );
    }
    if a.merge && merge::segments(&model).is_empty() {
        bail!(merge::NOTHING_TO_MERGE);
    }
    let table = latency::measure_table(
        &model,
        a.runtime,
        a.threads,
        super::runtime_shapes(&overrides),
        a.merge.then_some(a.merge_rounds),
        &Bars::default(),
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
