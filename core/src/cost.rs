//! Parameters and multiply-accumulates per node.
//!
//! Params are the elements of initializers; each initializer is counted once, at the first node
//! that reads it (an initializer no node reads is counted in the model total only). MACs are
//! counted for Conv, ConvTranspose, Gemm and MatMul (the layers that dominate compute); symbolic
//! dimensions count as 1, so MACs are per item unless an input override fixes the batch.

use std::collections::HashSet;

use serde::Serialize;

use crate::attr::{Attrs, node_label};
use crate::model::Model;
use crate::shape::{Dim, ShapeInfo, describe_shape};
use crate::tensor::element_count;

/// The cost of one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeCost {
    /// Node name (or first output).
    pub name: String,
    /// Op type.
    pub op: String,
    /// Output shape, as text.
    pub output_shape: String,
    /// Weight elements first read by this node.
    pub params: u64,
    /// Multiply-accumulates of one run.
    pub macs: u64,
}

/// Costs of the whole model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCost {
    /// Elements of all initializers.
    pub params: u64,
    /// Sum of node MACs.
    pub macs: u64,
    /// Per node, in graph order.
    pub nodes: Vec<NodeCost>,
}

fn prod(ds: &[Dim]) -> u64 {
    ds.iter()
        .map(|d| d.value_or(1).max(0) as u64)
        .fold(1u64, |a, b| a.saturating_mul(b))
}

/// Count params and MACs with the given inferred shapes.
pub fn count(model: &Model, shapes: &ShapeInfo) -> ModelCost {
    let inits = model.initializer_map();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut nodes = Vec::with_capacity(model.graph().node.len());
    for n in &model.graph().node {
        let mut params = 0u64;
        for x in &n.input {
            if let Some(t) = inits.get(x.as_str())
                && seen.insert(x.as_str())
            {
                params += element_count(t).unwrap_or(0);
            }
        }
        let out = n.output.first().and_then(|o| shapes.shape(o));
        let macs = node_macs(n, shapes, out).unwrap_or(0);
        nodes.push(NodeCost {
            name: node_label(n),
            op: n.op_type().to_string(),
            output_shape: describe_shape(out),
            params,
            macs,
        });
    }
    let params = model
        .graph()
        .initializer
        .iter()
        .map(|t| element_count(t).unwrap_or(0))
        .sum();
    let macs = nodes
        .iter()
        .map(|n| n.macs)
        .fold(0u64, |a, b| a.saturating_add(b));
    ModelCost {
        params,
        macs,
        nodes,
    }
}

fn node_macs(n: &crate::onnx::NodeProto, shapes: &ShapeInfo, out: Option<&[Dim]>) -> Option<u64> {
    let input = |i: usize| n.input.get(i).and_then(|x| shapes.shape(x));
    match n.op_type() {
        "Conv" => {
            let w = input(1)?;
            // out elements x (Cin/group x k...) per output element
            Some(prod(out?).saturating_mul(prod(w.get(1..)?)))
        }
        "ConvTranspose" => {
            let x = input(0)?;
            let w = input(1)?;
            // every input element scatters into (Cout/group x k...) outputs
            Some(prod(x).saturating_mul(prod(w.get(1..)?)))
        }
        "Gemm" => {
            let a = input(0)?;
            let ta = n.attr_int("transA").unwrap_or(0) != 0;
            let k = if ta { a.first()? } else { a.get(1)? };
            Some(prod(out?).saturating_mul(k.value_or(1).max(0) as u64))
        }
        "MatMul" => {
            let a = input(0)?;
            let k = a.last()?;
            Some(prod(out?).saturating_mul(k.value_or(1).max(0) as u64))
        }
        _ => None,
    }
}
