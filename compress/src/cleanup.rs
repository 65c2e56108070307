//! Lossless cleanup passes: fold BatchNormalization into the Conv / Gemm before it, drop Identity
//! and Dropout, drop Reshapes that do not change the shape, name unnamed nodes.
//!
//! Accepts any model; changes only what it can prove exact (up to float rounding: folded weights
//! differ from the unfolded computation by rounding only). Guarantees the same graph outputs with
//! the same shapes and a graph that passes [`whittle_core::check::check_graph`].

use std::collections::HashSet;

use serde::Serialize;
use whittle_core::Model;
use whittle_core::attr::Attrs;
use whittle_core::onnx::NodeProto;
use whittle_core::shape;
use whittle_core::tensor::{from_f32, to_f32};

use crate::Error;
use crate::index::Index;

/// What cleanup changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CleanupReport {
    /// BatchNormalization nodes folded into the preceding Conv / Gemm.
    pub folded_batchnorms: usize,
    /// Identity / Dropout nodes removed.
    pub removed_identities: usize,
    /// Reshapes to the same shape removed.
    pub removed_reshapes: usize,
    /// Nodes that had no name and got one.
    pub named_nodes: usize,
}

/// Run every cleanup pass.
pub fn cleanup(model: &mut Model) -> Result<CleanupReport, Error> {
    let mut r = CleanupReport {
        named_nodes: name_nodes(model),
        ..Default::default()
    };
    r.removed_identities = drop_identities(model)?;
    r.removed_reshapes = drop_noop_reshapes(model)?;
    r.folded_batchnorms = fold_batch_norms(model)?;
    whittle_core::check::check_graph(model.graph()).map_err(|e| Error::Pass {
        pass: "cleanup".into(),
        reason: e.to_string(),
    })?;
    Ok(r)
}

/// Give every unnamed node a unique name (`<op>_<index>`), so plans and reports can name it.
pub fn name_nodes(model: &mut Model) -> usize {
    let g = model.graph_mut();
    let mut used: HashSet<String> = g.node.iter().map(|n| n.name().to_string()).collect();
    let mut count = 0;
    for (i, n) in g.node.iter_mut().enumerate() {
        if n.name().is_empty() {
            let mut name = format!("{}_{i}", n.op_type());
            while used.contains(&name) {
                name.push('_');
            }
            used.insert(name.clone());
            n.name = Some(name);
            count += 1;
        }
    }
    count
}

/// Replace every use of tensor `from` by `to` (node inputs only).
fn rewire(nodes: &mut [NodeProto], from: &str, to: &str) {
    for n in nodes {
        for x in &mut n.input {
            if x == from {
                *x = to.to_string();
            }
        }
    }
}

/// Remove every node for which `pass_through` holds, reading its first input where its first
/// output was read, unless that output is a graph output. Returns how many went.
fn remove_pass_throughs(model: &mut Model, pass_through: impl Fn(&NodeProto) -> bool) -> usize {
    let outputs: HashSet<String> = model
        .graph()
        .output
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    let g = model.graph_mut();
    let mut removed = 0;
    let mut i = 0;
    while i < g.node.len() {
        let n = &g.node[i];
        let removable = n.domain().is_empty()
            && !n.input.is_empty()
            && !n.output.is_empty()
            && !outputs.contains(&n.output[0])
            && pass_through(n);
        if removable {
            let (from, to) = (n.output[0].clone(), n.input[0].clone());
            g.node.remove(i);
            rewire(&mut g.node, &from, &to);
            removed += 1;
        } else {
            i += 1;
        }
    }
    removed
}

/// Remove single-input pass-through nodes (`Identity`, inference `Dropout`) unless their output
/// is a graph output.
fn drop_identities(model: &mut Model) -> Result<usize, Error> {
    Ok(remove_pass_throughs(model, |n| {
        n.op_type() == "Identity"
            || (n.op_type() == "Dropout"
                && n.input.len() == 1
                && n.output[1..].iter().all(|o| o.is_empty()))
    }))
}

/// Remove Reshapes whose output shape equals their input shape (at most one unknown dim).
fn drop_noop_reshapes(model: &mut Model) -> Result<usize, Error> {
    let shapes = shape::infer(model, &[])?;
    Ok(remove_pass_throughs(model, |n| {
        n.op_type() == "Reshape"
            && match (shapes.shape(&n.input[0]), shapes.shape(&n.output[0])) {
                (Some(a), Some(b)) => {
                    a == b && a.iter().filter(|d| d.known().is_none()).count() <= 1
                }
                _ => false,
            }
    }))
}

/// Fold `BatchNormalization(Conv(x))` (and after Gemm with a [N, F] output) into the producer when
/// the producer's output feeds only the BatchNormalization and all BN inputs are initializers.
fn fold_batch_norms(model: &mut Model) -> Result<usize, Error> {
    let mut folded = 0;
    loop {
        let ix = Index::new(model.graph());
        let inits = model.initializer_map();
        let mut job = None;
        for (bi, bn) in model.graph().node.iter().enumerate() {
            if bn.op_type() != "BatchNormalization" || !bn.domain().is_empty() || bn.input.len() < 5
            {
                continue;
            }
            if bn.output.iter().skip(1).any(|o| !o.is_empty())
                || bn.attr_int("training_mode").unwrap_or(0) != 0
            {
                continue;
            }
            let Some(&(pi, _)) = ix.producer.get(&bn.input[0]) else {
                continue;
            };
            let p = &model.graph().node[pi];
            let foldable_op = match p.op_type() {
                "Conv" => true,
                "Gemm" => {
                    p.attr_float("alpha").unwrap_or(1.0) == 1.0
                        && p.attr_float("beta").unwrap_or(1.0) == 1.0
                        && p.attr_int("transA").unwrap_or(0) == 0
                }
                _ => false,
            };
            if !foldable_op
                || ix.readers(&bn.input[0]).len() != 1
                || ix.is_output(&bn.input[0])
                || !bn.input[1..5]
                    .iter()
                    .all(|x| inits.contains_key(x.as_str()))
                || !p
                    .input
                    .get(1)
                    .is_some_and(|w| inits.contains_key(w.as_str()) && ix.readers(w).len() == 1)
                || p.input.get(2).is_some_and(|b| {
                    !b.is_empty() && (!inits.contains_key(b.as_str()) || ix.readers(b).len() != 1)
                })
            {
                continue;
            }
            job = Some((pi, bi));
            break;
        }
        let Some((pi, bi)) = job else { break };
        fold_one(model, pi, bi)?;
        folded += 1;
    }
    Ok(folded)
}

fn fold_one(model: &mut Model, pi: usize, bi: usize) -> Result<(), Error> {
    let g = model.graph();
    let bn = g.node[bi].clone();
    let p = g.node[pi].clone();
    let get = |name: &str| -> Result<Vec<f32>, Error> {
        let t = model.initializer(name).ok_or_else(|| Error::Pass {
            pass: "fold_batch_norm".into(),
            reason: format!("initializer {name} vanished"),
        })?;
        Ok(to_f32(t)?)
    };
    let eps = bn.attr_float("epsilon").unwrap_or(1e-5);
    let (scale, beta, mean, var) = (
        get(&bn.input[1])?,
        get(&bn.input[2])?,
        get(&bn.input[3])?,
        get(&bn.input[4])?,
    );
    let c = scale.len();
    let wt = model
        .initializer(&p.input[1])
        .cloned()
        .ok_or_else(|| Error::Pass {
            pass: "fold_batch_norm".into(),
            reason: format!("weight {} vanished", p.input[1]),
        })?;
    let mut w = to_f32(&wt)?;
    let s: Vec<f32> = (0..c).map(|i| scale[i] / (var[i] + eps).sqrt()).collect();
    let is_gemm = p.op_type() == "Gemm";
    let trans_b = p.attr_int("transB").unwrap_or(0) != 0;
    // output channel count of the producer and how its weight is laid out
    let out_c = if is_gemm {
        if trans_b { wt.dims[0] } else { wt.dims[1] }
    } else {
        wt.dims[0]
    } as usize;
    if out_c != c || [&beta, &mean, &var].iter().any(|v| v.len() != c) {
        return Err(Error::Pass {
            pass: "fold_batch_norm".into(),
            reason: format!(
                "node '{}': {} channels but BatchNormalization '{}' has {c}",
                p.name(),
                out_c,
                bn.name()
            ),
        });
    }
    if is_gemm && !trans_b {
        let cols = c;
        for (k, v) in w.iter_mut().enumerate() {
            *v *= s[k % cols];
        }
    } else {
        let per = w.len() / c;
        for (k, v) in w.iter_mut().enumerate() {
            *v *= s[k / per];
        }
    }
    let old_b = match p.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => {
            let v = get(b)?;
            if v.len() == 1 { vec![v[0]; c] } else { v }
        }
        None => vec![0.0; c],
    };
    if old_b.len() != c {
        return Err(Error::Pass {
            pass: "fold_batch_norm".into(),
            reason: format!(
                "node '{}': bias has {} values for {c} channels",
                p.name(),
                old_b.len()
            ),
        });
    }
    let b: Vec<f32> = (0..c)
        .map(|i| (old_b[i] - mean[i]) * s[i] + beta[i])
        .collect();
    let w_name = p.input[1].clone();
    let b_name = match p.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => b.clone(),
        None => unique_name(model, &format!("{}_bias", p.name())),
    };
    let bn_out = bn.output[0].clone();
    let bn_inputs: Vec<String> = bn.input[1..5].to_vec();
    let g = model.graph_mut();
    set_initializer(g, from_f32(&w_name, &wt.dims, &w));
    set_initializer(g, from_f32(&b_name, &[c as i64], &b));
    let prod = &mut g.node[pi];
    if prod.input.len() < 3 {
        prod.input.resize(3, String::new());
    }
    prod.input[2] = b_name;
    prod.output[0] = bn_out;
    g.node.remove(bi);
    // drop BN params nothing reads any more
    let still_read: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    g.initializer
        .retain(|t| !bn_inputs.iter().any(|x| x == t.name()) || still_read.contains(t.name()));
    g.value_info.clear();
    Ok(())
}

/// Insert or replace an initializer by name.
pub fn set_initializer(g: &mut whittle_core::onnx::GraphProto, t: whittle_core::onnx::TensorProto) {
    match g.initializer.iter_mut().find(|x| x.name() == t.name()) {
        Some(slot) => *slot = t,
        None => g.initializer.push(t),
    }
}

/// A tensor name not used in the model yet.
pub fn unique_name(model: &Model, base: &str) -> String {
    let g = model.graph();
    let used = |s: &str| {
        g.initializer.iter().any(|t| t.name() == s)
            || g.node
                .iter()
                .any(|n| n.output.iter().any(|o| o == s) || n.input.iter().any(|o| o == s))
            || g.input.iter().any(|v| v.name() == s)
    };
    let mut name = base.to_string();
    let mut k = 1;
    while used(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    name
}
