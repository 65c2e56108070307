//! `whittle inspect`: inputs, outputs, op histogram, params, MACs, per-layer table.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;
use whittle_core::cost::{self, NodeCost, UnknownDim};
use whittle_core::shape::{self, describe_shape, value_info_type};
use whittle_core::tensor::dtype_name;

use crate::Outcome;
use crate::table::{Table, si};

/// Arguments of `whittle inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model.
    model: PathBuf,
    /// Give an input its shape, e.g. `input=1x3x224x224` (repeatable): binds its symbolic dims
    /// (declared -1 or 0 too) everywhere they appear. Without it a batch axis counts as 1 (MACs
    /// per item) and other symbolic dims are reported as unknown.
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    inputs: Vec<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Leave out the per-layer table.
    #[arg(long)]
    brief: bool,
}

#[derive(Serialize)]
struct Io {
    name: String,
    dtype: String,
    shape: String,
}

#[derive(Serialize)]
struct Report {
    model: String,
    ir_version: i64,
    opset: Option<i64>,
    producer: String,
    inputs: Vec<Io>,
    outputs: Vec<Io>,
    params: u64,
    /// Null when a dim the count depends on is unknown (`unknown_dims`).
    macs: Option<u64>,
    /// The batch symbols counted as 1 (MACs per item).
    per_item: Vec<String>,
    /// The dims the MAC count needs that no `--input` bound.
    unknown_dims: Vec<UnknownDim>,
    /// The input shapes the MACs were counted at, `x=1x3x48x320`.
    costed_at: String,
    nodes: usize,
    ops: BTreeMap<String, usize>,
    unknown_ops: Vec<String>,
    layers: Vec<Layer>,
    /// The transformer blocks found (empty when none is recognised).
    transformer_blocks: Vec<BlockRow>,
}

/// One node's cost as `inspect` lists it.
#[derive(Serialize)]
struct Layer {
    name: String,
    op: String,
    output_shape: String,
    params: u64,
    /// Null when it depends on an unknown dim (named in `unknown_dims`).
    macs: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unknown_dims: Vec<String>,
}

impl From<&NodeCost> for Layer {
    fn from(c: &NodeCost) -> Layer {
        Layer {
            name: c.name.clone(),
            op: c.op.clone(),
            output_shape: c.output_shape.clone(),
            params: c.params,
            macs: c.unknown_dims.is_empty().then_some(c.macs),
            unknown_dims: c.unknown_dims.clone(),
        }
    }
}

/// One transformer block as `inspect` lists it.
#[derive(Serialize)]
struct BlockRow {
    index: usize,
    layout: whittle_compress::blocks::Layout,
    heads: Option<usize>,
    hidden: Option<usize>,
    ffn: Option<usize>,
    params: u64,
    norm: &'static str,
    input: String,
    output: String,
}

fn block_rows(m: &whittle_core::Model) -> Vec<BlockRow> {
    let Ok(blocks) = whittle_compress::blocks::find_blocks(m) else {
        return vec![];
    };
    blocks
        .into_iter()
        .map(|b| BlockRow {
            index: b.index,
            layout: b.layout,
            heads: b.heads,
            hidden: b.hidden,
            ffn: b.ffn,
            params: b.params,
            norm: if b.attention.fused_norm && b.feed_forward.fused_norm {
                "fused"
            } else {
                "decomposed"
            },
            input: b.input,
            output: b.output,
        })
        .collect()
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    let overrides = super::parse_overrides(&a.inputs)?;
    let m = super::load_model(&a.model)?;
    let shapes = shape::infer(&m, &overrides)?;
    let c = cost::count(&m, &shapes);
    let io = |v: &whittle_core::onnx::ValueInfoProto| {
        let t = shapes
            .types
            .get(v.name())
            .cloned()
            .or_else(|| value_info_type(v));
        Io {
            name: v.name().to_string(),
            dtype: t
                .as_ref()
                .map(|t| dtype_name(t.dtype))
                .unwrap_or("?")
                .to_string(),
            shape: describe_shape(t.as_ref().and_then(|t| t.shape.as_deref())),
        }
    };
    let mut ops = BTreeMap::new();
    for n in &m.graph().node {
        let key = if n.domain().is_empty() {
            n.op_type().to_string()
        } else {
            format!("{}:{}", n.domain(), n.op_type())
        };
        *ops.entry(key).or_insert(0) += 1;
    }
    let report = Report {
        model: a.model.display().to_string(),
        ir_version: m.proto.ir_version(),
        opset: m.opset(""),
        producer: format!("{} {}", m.proto.producer_name(), m.proto.producer_version())
            .trim()
            .to_string(),
        inputs: m.inputs().into_iter().map(io).collect(),
        outputs: m.graph().output.iter().map(io).collect(),
        params: c.params,
        macs: c.is_exact().then_some(c.macs),
        per_item: c.per_item.clone(),
        unknown_dims: c.unknown_dims.clone(),
        costed_at: c.costed_at_text(),
        nodes: m.graph().node.len(),
        ops,
        unknown_ops: shapes.unknown_ops.iter().cloned().collect(),
        layers: c.nodes.iter().map(Layer::from).collect(),
        transformer_blocks: block_rows(&m),
    };
    if a.json {
        outln!("{}", serde_json::to_string(&report)?);
        return Ok(Outcome::Ok);
    }
    let mut out = String::new();
    out += &format!(
        "{}  (IR {}, opset {}, {})\n",
        report.model,
        report.ir_version,
        report.opset.map(|v| v.to_string()).unwrap_or("?".into()),
        if report.producer.is_empty() {
            "unknown producer"
        } else {
            &report.producer
        }
    );
    for (title, list) in [("input ", &report.inputs), ("output", &report.outputs)] {
        for i in list {
            out += &format!("{title}  {}  {} {}\n", i.name, i.dtype, i.shape);
        }
    }
    let macs = match report.macs {
        Some(m) if report.per_item.is_empty() => {
            format!("{m} ({}) at {}", si(m), report.costed_at)
        }
        Some(m) => format!(
            "{m} ({}) per item ({} as 1) at {}",
            si(m),
            report.per_item.join(", "),
            report.costed_at
        ),
        None => format!("unknown: {}", super::unknown_dims_text(&c)),
    };
    out += &format!(
        "params  {} ({})\nMACs    {macs}\nnodes   {}\nops     {}\n",
        report.params,
        si(report.params),
        report.nodes,
        report
            .ops
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !report.unknown_ops.is_empty() {
        out += &format!(
            "unknown ops (no shape rule; kept as they are): {}\n",
            report.unknown_ops.join(", ")
        );
    }
    out!("{out}");
    if !report.transformer_blocks.is_empty() {
        let opt = |v: Option<usize>| v.map_or("?".into(), |v| v.to_string());
        let mut t = Table::new(&[
            "block", "layout", "heads", "hidden", "ffn", "norm", "params", "output",
        ]);
        for b in &report.transformer_blocks {
            t.row(vec![
                b.index.to_string(),
                match b.layout {
                    whittle_compress::blocks::Layout::PostNorm => "post-norm".into(),
                    whittle_compress::blocks::Layout::PreNorm => "pre-norm".into(),
                },
                opt(b.heads),
                opt(b.hidden),
                opt(b.ffn),
                b.norm.to_string(),
                si(b.params),
                b.output.clone(),
            ]);
        }
        outln!(
            "\n{} transformer blocks (input {})",
            report.transformer_blocks.len(),
            report.transformer_blocks[0].input
        );
        out!("{}", t.render());
    }
    if !a.brief {
        let mut t = Table::new(&["#", "layer", "op", "output", "params", "MACs"]);
        for (i, l) in report.layers.iter().enumerate() {
            if l.params == 0 && l.macs == Some(0) {
                continue;
            }
            t.row(vec![
                i.to_string(),
                l.name.clone(),
                l.op.clone(),
                l.output_shape.clone(),
                l.params.to_string(),
                match l.macs {
                    Some(m) => m.to_string(),
                    None => format!("? ({})", l.unknown_dims.join(", ")),
                },
            ]);
        }
        outln!();
        out!("{}", t.render());
    }
    Ok(Outcome::Ok)
}
