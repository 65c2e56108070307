//! Raising a model's default-domain opset where its operators allow it.
//!
//! Per-channel quantization needs opset 13 (`axis` on QuantizeLinear / DequantizeLinear); models
//! exported at opset 7-12 are common. An operator whose signature changed on the way (an
//! attribute that became an input) is rewritten to the new form; one whose meaning changed in a
//! way that cannot be carried over, or that is not known to be unchanged, refuses the upgrade and
//! is named. Nothing is changed on a refusal.

use std::collections::BTreeSet;

use crate::attr::Attrs;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::onnx::{AttributeProto, NodeProto, TensorProto};
use crate::tensor::{from_f32, from_i64};

/// Operators whose signature and meaning are the same from opset 7 to 13 (for the attributes
/// and inputs they are used with).
const UNCHANGED: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "AveragePool",
    "Cast",
    "Ceil",
    "Concat",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Cos",
    "CumSum",
    "DepthToSpace",
    "Div",
    "Einsum",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "HardSigmoid",
    "Identity",
    "InstanceNormalization",
    "LeakyRelu",
    "Less",
    "Log",
    "LRN",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mul",
    "Neg",
    "NonZero",
    "Not",
    "Or",
    "Pow",
    "PRelu",
    "Range",
    "Reciprocal",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "Relu",
    "Reshape",
    "Resize",
    "Round",
    "ScatterND",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Size",
    "Softplus",
    "SpaceToDepth",
    "Sqrt",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "Transpose",
    "Where",
];

/// Raise the default-domain opset to `to` (at least 7 is needed to start from). Returns the
/// version it had when it was raised, `None` when it was already `to` or later.
pub fn upgrade(model: &mut Model, to: i64) -> Result<Option<i64>> {
    let from = model.opset("").unwrap_or(1);
    if from >= to {
        return Ok(None);
    }
    let refuse = |reason: String| Error::Opset { from, to, reason };
    if from < 7 {
        return Err(refuse("it is older than opset 7".into()));
    }
    let ranks = crate::shape::infer(model, &[]).ok();
    let mut next = model.clone();
    let mut added: Vec<TensorProto> = Vec::new();
    let mut blocked = BTreeSet::new();
    let g = next.graph_mut();
    for (i, n) in g.node.iter_mut().enumerate() {
        if !n.domain().is_empty() && n.domain() != "ai.onnx" {
            continue;
        }
        let op = n.op_type().to_string();
        let base = format!("{}_opset{to}_{i}", crate::attr::node_label(n));
        let moved = match op.as_str() {
            "Clip" if from < 11 => {
                let lo = take(n, "min").and_then(|a| a.f);
                let hi = take(n, "max").and_then(|a| a.f);
                let mut names = vec![String::new(), String::new()];
                for (k, v) in [lo, hi].into_iter().enumerate() {
                    if let Some(v) = v {
                        names[k] = format!("{base}_{}", ["min", "max"][k]);
                        added.push(from_f32(&names[k], &[], &[v]));
                    }
                }
                n.input.truncate(1);
                n.input.extend(names);
                while n.input.last().is_some_and(|s| s.is_empty()) {
                    n.input.pop();
                }
                true
            }
            "Pad" if from < 11 => {
                let pads = take(n, "pads").map(|a| a.ints).unwrap_or_default();
                let value = take(n, "value").and_then(|a| a.f).unwrap_or(0.0);
                let p = format!("{base}_pads");
                let v = format!("{base}_value");
                added.push(from_i64(&p, &[pads.len() as i64], &pads));
                added.push(from_f32(&v, &[], &[value]));
                n.input.truncate(1);
                n.input.extend([p, v]);
                true
            }
            "Slice" if from < 10 => {
                let starts = take(n, "starts").map(|a| a.ints).unwrap_or_default();
                let ends = take(n, "ends").map(|a| a.ints).unwrap_or_default();
                let axes = take(n, "axes").map(|a| a.ints);
                n.input.truncate(1);
                for (k, v) in [Some(starts), Some(ends), axes].into_iter().enumerate() {
                    if let Some(v) = v {
                        let name = format!("{base}_{}", ["starts", "ends", "axes"][k]);
                        added.push(from_i64(&name, &[v.len() as i64], &v));
                        n.input.push(name);
                    }
                }
                true
            }
            "TopK" if from < 10 => {
                let k = take(n, "k").and_then(|a| a.i).unwrap_or(1);
                let name = format!("{base}_k");
                added.push(from_i64(&name, &[1], &[k]));
                n.input.truncate(1);
                n.input.push(name);
                true
            }
            "Dropout" => {
                // inference: the ratio is ignored; the attribute became an input in opset 12
                take(n, "ratio");
                take(n, "is_test");
                true
            }
            "BatchNormalization" => {
                if take(n, "spatial").and_then(|a| a.i).is_some_and(|s| s != 1) {
                    blocked.insert("BatchNormalization (spatial = 0)".to_string());
                }
                take(n, "is_test");
                take(n, "consumed_inputs");
                true
            }
            "Squeeze" | "Unsqueeze" | "ReduceSum" | "Split" if from < 13 => {
                let key = if op == "Split" { "split" } else { "axes" };
                if let Some(v) = take(n, key).map(|a| a.ints) {
                    let name = format!("{base}_{key}");
                    added.push(from_i64(&name, &[v.len() as i64], &v));
                    n.input.truncate(1);
                    n.input.push(name);
                }
                true
            }
            "Softmax" | "LogSoftmax" | "Hardmax" if from < 13 => {
                // before 13 the input was flattened to 2-D at `axis`: the same only on the last axis
                let axis = n.attr_int("axis").unwrap_or(1);
                let rank = ranks
                    .as_ref()
                    .and_then(|r| r.shape(&n.input[0]))
                    .map(|s| s.len() as i64);
                match rank {
                    Some(r) if axis == -1 || axis == r - 1 => true,
                    _ => {
                        blocked.insert(format!("{op} over axis {axis} (not the last axis)"));
                        true
                    }
                }
            }
            _ => UNCHANGED.contains(&op.as_str()),
        };
        if !moved {
            blocked.insert(op);
        }
    }
    if !blocked.is_empty() {
        let list: Vec<String> = blocked.into_iter().collect();
        return Err(refuse(format!(
            "these operators changed meaning or are not known to be unchanged: {}",
            list.join(", ")
        )));
    }
    g.initializer.extend(added);
    for o in next.proto.opset_import.iter_mut() {
        if o.domain().is_empty() || o.domain() == "ai.onnx" {
            o.version = Some(to);
        }
    }
    if next.proto.ir_version() < 7 {
        next.proto.ir_version = Some(7);
    }
    *model = next;
    Ok(Some(from))
}

/// Remove the attribute `name` from `n`, returning it.
fn take(n: &mut NodeProto, name: &str) -> Option<AttributeProto> {
    let i = n.attribute.iter().position(|a| a.name() == name)?;
    Some(n.attribute.remove(i))
}
