//! What a compression changed, layer by layer: channels, params and MACs of every Conv, Gemm and
//! MatMul before and after (a factorised layer counts both its factors).

use std::collections::HashMap;

use serde::Serialize;
use whittle_core::{Model, cost, shape};

use crate::Error;

/// One layer before and after.
#[derive(Debug, Clone, Serialize)]
pub struct LayerChange {
    /// The layer's name.
    pub name: String,
    /// Its op.
    pub op: String,
    /// Output channels before.
    pub channels_before: usize,
    /// Output channels after.
    pub channels_after: usize,
    /// Params before.
    pub params_before: u64,
    /// Params after.
    pub params_after: u64,
    /// MACs before.
    pub macs_before: u64,
    /// MACs after.
    pub macs_after: u64,
}

fn out_channels(m: &Model, n: &whittle_core::onnx::NodeProto) -> usize {
    let Some(w) = n.input.get(1).and_then(|w| m.stored_weight(w)) else {
        return 0;
    };
    let trans_b = n
        .attribute
        .iter()
        .any(|a| a.name() == "transB" && a.i == Some(1));
    match n.op_type() {
        "Gemm" if !trans_b => w.dims.get(1).copied().unwrap_or(0) as usize,
        "MatMul" => w.dims.get(1).copied().unwrap_or(0) as usize,
        _ => w.dims.first().copied().unwrap_or(0) as usize,
    }
}

/// Every weighted layer of `before` that `after` still has, before and after.
pub fn layer_changes(before: &Model, after: &Model) -> Result<Vec<LayerChange>, Error> {
    let cb = cost::count(before, &shape::infer(before, &[])?);
    let ca = cost::count(after, &shape::infer(after, &[])?);
    // by name: a factorised layer keeps its name for the second factor, the first is
    // `<name>/lowrank_a`
    let after_by_name: HashMap<&str, (usize, &cost::NodeCost)> = after
        .graph()
        .node
        .iter()
        .zip(&ca.nodes)
        .enumerate()
        .map(|(i, (n, c))| (n.name(), (i, c)))
        .collect();
    let mut rows = Vec::new();
    for (nb, b) in before.graph().node.iter().zip(&cb.nodes) {
        if !matches!(nb.op_type(), "Conv" | "Gemm" | "MatMul" | "ConvTranspose") {
            continue;
        }
        let Some(&(ia, a)) = after_by_name.get(nb.name()) else {
            continue;
        };
        let first = after_by_name.get(format!("{}/lowrank_a", nb.name()).as_str());
        rows.push(LayerChange {
            name: b.name.clone(),
            op: b.op.clone(),
            channels_before: out_channels(before, nb),
            channels_after: out_channels(after, &after.graph().node[ia]),
            params_before: b.params,
            params_after: a.params + first.map_or(0, |f| f.1.params),
            macs_before: b.macs,
            macs_after: a.macs + first.map_or(0, |f| f.1.macs),
        });
    }
    Ok(rows)
}
