//! Transformer block discovery: the residual blocks of an encoder transformer found on the ONNX
//! graph alone, as exporters write them (a flat list of MatMul, Add, Reshape, Transpose, Softmax,
//! LayerNormalization or its decomposition, Erf / Tanh GELU).
//!
//! A *residual Add* adds a tensor `h` (the skip) and a branch computed from `h`. Its branch is an
//! **attention** sub-block when it holds a Softmax, a **feed-forward** sub-block when it holds two
//! or more MatMul / Gemm with constant weights and no Softmax. A **block** is an attention
//! sub-block followed by a feed-forward sub-block that reads its output:
//!
//! - post-norm (BERT): `h1 = Norm(h + Attn(h))`, `out = Norm(h1 + Ffn(h1))`;
//! - pre-norm (ViT): `h1 = h + Attn(Norm(h))`, `out = h1 + Ffn(Norm(h1))`.
//!
//! A norm is a fused `LayerNormalization` or its decomposition `ReduceMean`, `Sub`, `Pow` (or
//! `Mul` by itself), `ReduceMean`, `Add` ε, `Sqrt`, `Div`, with an optional `Mul` γ and `Add` β.
//! The head count is read from the Softmax's input shape `[batch, heads, seq, seq]` (shape
//! inference carries the Reshape shape constants there); the hidden size from the block input;
//! the FFN size from the first weight of the feed-forward branch.
//!
//! Accepts any model; declines nothing silently: when no block is found, the error says which
//! pattern failed and where. Changes nothing.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use whittle_core::Model;
use whittle_core::edit;
use whittle_core::onnx::{GraphProto, NodeProto};
use whittle_core::shape::{self, Dim};

use crate::Error;
use crate::index::Index;

/// Where the norms sit relative to the residual Adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// `Norm(h + f(h))` (BERT).
    PostNorm,
    /// `h + f(Norm(h))` (ViT, GPT).
    PreNorm,
}

/// One residual sub-block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubBlock {
    /// The tensor entering it (the skip of its residual Add).
    pub input: String,
    /// The tensor leaving it: the norm's output (post-norm) or the residual Add's (pre-norm).
    pub output: String,
    /// The residual Add node.
    pub add: String,
    /// The nodes of the branch (from the input to the Add, Add and post-norm included), in graph
    /// order.
    pub nodes: Vec<String>,
    /// Whether the norm is one `LayerNormalization` node (else decomposed).
    pub fused_norm: bool,
}

/// One transformer block: attention then feed-forward.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Block {
    /// Position among the blocks, from 0.
    pub index: usize,
    /// The hidden state entering the block.
    pub input: String,
    /// The hidden state leaving it.
    pub output: String,
    /// Norm placement.
    pub layout: Layout,
    /// Attention heads, when the Softmax's input shape holds them.
    pub heads: Option<usize>,
    /// Hidden size, when known.
    pub hidden: Option<usize>,
    /// Feed-forward inner size, when its first weight is a constant.
    pub ffn: Option<usize>,
    /// Weights (initializer elements) of the block.
    pub params: u64,
    /// The attention sub-block.
    pub attention: SubBlock,
    /// The feed-forward sub-block.
    pub feed_forward: SubBlock,
}

/// A recognised norm: input, output, its nodes.
struct Norm {
    output: String,
    nodes: Vec<usize>,
    fused: bool,
}

fn fail(reason: String) -> Error {
    Error::Pass {
        pass: "transformer blocks".into(),
        reason,
    }
}

/// The norms of the graph, by their input tensor.
fn norms(g: &GraphProto, ix: &Index) -> HashMap<String, Norm> {
    let mut out = HashMap::new();
    let only = |t: &str, op: &str| -> Option<usize> {
        let r = ix.readers(t);
        r.iter()
            .map(|&(i, _)| i)
            .find(|&i| g.node[i].op_type() == op)
    };
    for (i, n) in g.node.iter().enumerate() {
        match n.op_type() {
            "LayerNormalization" if !n.input.is_empty() => {
                out.insert(
                    n.input[0].clone(),
                    Norm {
                        output: n.output[0].clone(),
                        nodes: vec![i],
                        fused: true,
                    },
                );
            }
            "ReduceMean" => {
                let x = &n.input[0];
                let mean = &n.output[0];
                // Sub(x, mean) → d; Pow(d, 2) | Mul(d, d) → ReduceMean → Add ε → Sqrt → Div(d, ·)
                let Some(sub) =
                    ix.readers(mean).iter().map(|&(j, _)| j).find(|&j| {
                        g.node[j].op_type() == "Sub" && g.node[j].input.first() == Some(x)
                    })
                else {
                    continue;
                };
                let d = &g.node[sub].output[0];
                let Some(sq) = ix.readers(d).iter().map(|&(j, _)| j).find(|&j| {
                    let m = &g.node[j];
                    m.op_type() == "Pow" || (m.op_type() == "Mul" && m.input[0] == m.input[1])
                }) else {
                    continue;
                };
                let Some(var) = only(&g.node[sq].output[0], "ReduceMean") else {
                    continue;
                };
                let Some(eps) = only(&g.node[var].output[0], "Add") else {
                    continue;
                };
                let Some(sqrt) = only(&g.node[eps].output[0], "Sqrt") else {
                    continue;
                };
                let Some(div) = only(&g.node[sqrt].output[0], "Div") else {
                    continue;
                };
                if g.node[div].input.first() != Some(d) {
                    continue;
                }
                let mut nodes = vec![i, sub, sq, var, eps, sqrt, div];
                let mut y = g.node[div].output[0].clone();
                // the affine part, when present
                for op in ["Mul", "Add"] {
                    let r = ix.readers(&y);
                    if r.len() == 1 && g.node[r[0].0].op_type() == op {
                        nodes.push(r[0].0);
                        y = g.node[r[0].0].output[0].clone();
                    } else {
                        break;
                    }
                }
                nodes.sort_unstable();
                out.insert(
                    x.clone(),
                    Norm {
                        output: y,
                        nodes,
                        fused: false,
                    },
                );
            }
            _ => {}
        }
    }
    out
}

/// Nodes (indices) that `t` depends on.
fn ancestors(g: &GraphProto, ix: &Index, t: &str) -> HashSet<usize> {
    let mut seen = HashSet::new();
    let mut stack = vec![t.to_string()];
    while let Some(t) = stack.pop() {
        if let Some(&(p, _)) = ix.producer.get(&t)
            && seen.insert(p)
        {
            stack.extend(g.node[p].input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    seen
}

/// Nodes (indices) that depend on `t`.
fn descendants(g: &GraphProto, ix: &Index, t: &str) -> HashSet<usize> {
    let mut seen = HashSet::new();
    let mut stack = vec![t.to_string()];
    while let Some(t) = stack.pop() {
        for &(c, _) in ix.readers(&t) {
            if seen.insert(c) {
                stack.extend(g.node[c].output.iter().cloned());
            }
        }
    }
    seen
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Attention,
    FeedForward,
}

/// A residual sub-block found at one Add, with its kind and the node (index) order key.
struct Found {
    kind: Kind,
    sub: SubBlock,
    at: usize,
    branch: Vec<usize>,
}

fn weighted(model: &Model, n: &NodeProto) -> bool {
    matches!(n.op_type(), "MatMul" | "Gemm") && n.input.iter().any(|t| is_const(model, t))
}

fn is_const(model: &Model, t: &str) -> bool {
    model.initializer(t).is_some()
}

/// Finds the transformer blocks of `model`, in graph order.
pub fn find_blocks(model: &Model) -> Result<Vec<Block>, Error> {
    let g = model.graph();
    let ix = Index::new(g);
    let norms = norms(g, &ix);
    let produced_by_const = |t: &str| {
        is_const(model, t)
            || ix
                .producer
                .get(t)
                .is_some_and(|&(p, _)| g.node[p].op_type() == "Constant")
    };
    let info = shape::infer(model, &[]).ok();
    let mut residual = 0usize;
    let mut found: Vec<Found> = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        if n.op_type() != "Add" || n.input.len() != 2 {
            continue;
        }
        let (a, b) = (&n.input[0], &n.input[1]);
        if produced_by_const(a) || produced_by_const(b) {
            continue;
        }
        // the skip is the operand the other depends on
        let (skip, branch_out) = if depends_on(g, &ix, b, a) {
            (a, b)
        } else if depends_on(g, &ix, a, b) {
            (b, a)
        } else {
            continue;
        };
        // a residual adds two tensors of one shape (an attention mask added to the scores is
        // not one, though the scores depend on it through the blocks before)
        if let Some(info) = &info
            && let (Some(sa), Some(sb)) = (info.shape(skip), info.shape(branch_out))
            && sa != sb
        {
            continue;
        }
        residual += 1;
        let up = ancestors(g, &ix, branch_out);
        let down = descendants(g, &ix, skip);
        let mut branch: Vec<usize> = up.intersection(&down).copied().collect();
        branch.sort_unstable();
        // one attention per branch: a branch holding two spans more than one sub-block
        let softmax = branch
            .iter()
            .filter(|&&j| g.node[j].op_type() == "Softmax")
            .count();
        if softmax > 1 {
            continue;
        }
        let weights = branch
            .iter()
            .filter(|&&j| weighted(model, &g.node[j]))
            .count();
        let kind = if softmax == 1 {
            Kind::Attention
        } else if weights >= 2 {
            Kind::FeedForward
        } else {
            continue;
        };
        let mut nodes = branch.clone();
        nodes.push(i);
        // pre-norm when the branch starts with a norm of the skip; else post-norm when only a
        // norm reads the sum
        let pre = norms
            .get(skip.as_str())
            .is_some_and(|norm| norm.nodes.iter().all(|j| branch.binary_search(j).is_ok()));
        let post = norms.get(&n.output[0]).filter(|norm| {
            !pre && ix
                .readers(&n.output[0])
                .iter()
                .all(|(r, _)| norm.nodes.contains(r))
        });
        let (output, fused) = match post {
            Some(norm) => {
                nodes.extend(&norm.nodes);
                (norm.output.clone(), norm.fused)
            }
            None => {
                // pre-norm: the branch starts with the norm of the skip
                let fused = norms.get(skip.as_str()).is_none_or(|m| m.fused);
                (n.output[0].clone(), fused)
            }
        };
        nodes.sort_unstable();
        nodes.dedup();
        found.push(Found {
            kind,
            at: i,
            branch,
            sub: SubBlock {
                input: skip.clone(),
                output,
                add: n.name().to_string(),
                nodes: nodes
                    .iter()
                    .map(|&j| g.node[j].name().to_string())
                    .collect(),
                fused_norm: fused,
            },
        });
    }
    if residual == 0 {
        return Err(fail(
            "no residual Add (an Add of a tensor and a branch computed from it) in the graph"
                .into(),
        ));
    }
    let attn: Vec<&Found> = found.iter().filter(|f| f.kind == Kind::Attention).collect();
    if attn.is_empty() {
        return Err(fail(format!(
            "{residual} residual Adds found, none whose branch holds a Softmax (attention)"
        )));
    }
    let known = |t: &str, axis: isize| -> Option<usize> {
        let s = info.as_ref()?.shape(t)?;
        let k = if axis < 0 {
            s.len().checked_sub(axis.unsigned_abs())?
        } else {
            axis as usize
        };
        match s.get(k)? {
            Dim::Known(v) if *v > 0 => Some(*v as usize),
            _ => None,
        }
    };
    let mut blocks = Vec::new();
    for a in &attn {
        let Some(f) = found
            .iter()
            .find(|f| f.kind == Kind::FeedForward && f.sub.input == a.sub.output && f.at > a.at)
        else {
            return Err(fail(format!(
                "the attention ending at '{}' is not followed by a feed-forward residual (MatMul, activation, MatMul, Add) reading its output '{}'",
                a.sub.add, a.sub.output
            )));
        };
        let layout = if a.sub.output == g.node[a.at].output[0] {
            Layout::PreNorm
        } else {
            Layout::PostNorm
        };
        let heads = a
            .branch
            .iter()
            .find(|&&j| g.node[j].op_type() == "Softmax")
            .and_then(|&j| {
                let s = info.as_ref()?.shape(&g.node[j].input[0])?;
                (s.len() == 4).then_some(())?;
                known(&g.node[j].input[0], 1)
            });
        let ffn = f
            .branch
            .iter()
            .find(|&&j| weighted(model, &g.node[j]))
            .and_then(|&j| {
                let w = g.node[j].input.iter().find_map(|t| model.initializer(t))?;
                let trans = g.node[j]
                    .attribute
                    .iter()
                    .any(|x| x.name() == "transB" && x.i() != 0);
                let d = if trans { w.dims.first() } else { w.dims.last() };
                d.map(|&v| v as usize)
            });
        let mut inits: HashSet<&str> = HashSet::new();
        for &j in a.branch.iter().chain(&f.branch) {
            for t in &g.node[j].input {
                if model.initializer(t).is_some() {
                    inits.insert(t);
                }
            }
        }
        let params = inits
            .iter()
            .filter_map(|t| model.initializer(t))
            .map(|t| t.dims.iter().product::<i64>().max(0) as u64)
            .sum();
        blocks.push(Block {
            index: blocks.len(),
            input: a.sub.input.clone(),
            output: f.sub.output.clone(),
            layout,
            heads,
            hidden: known(&a.sub.input, -1),
            ffn,
            params,
            attention: a.sub.clone(),
            feed_forward: f.sub.clone(),
        });
    }
    Ok(blocks)
}

/// Whether tensor `t` depends on tensor `on`.
fn depends_on(g: &GraphProto, ix: &Index, t: &str, on: &str) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![t.to_string()];
    while let Some(t) = stack.pop() {
        if t == on {
            return true;
        }
        if let Some(&(p, _)) = ix.producer.get(&t)
            && seen.insert(p)
        {
            stack.extend(g.node[p].input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    false
}

/// The runs of blocks where each block reads the one before it: spans of blocks can be removed
/// only inside one run. Returns `(first, len)` per run.
pub fn chains(blocks: &[Block]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        match out.last_mut() {
            Some((s, len)) if blocks[*s + *len - 1].output == b.input => *len += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// The model's attention-mask input: an integer or bool graph input whose name holds `mask`.
pub fn mask_input(model: &Model) -> Option<String> {
    let info = shape::infer(model, &[]).ok()?;
    model
        .inputs()
        .iter()
        .map(|v| v.name())
        .find(|n| {
            n.to_ascii_lowercase().contains("mask")
                && info.types.get(*n).is_some_and(|t| {
                    matches!(
                        whittle_core::tensor::dtype_name(t.dtype),
                        "int64" | "int32" | "bool"
                    )
                })
        })
        .map(str::to_string)
}

/// The flat row indices (item · positions + position) of the real tokens in a captured batch of
/// `shape` (`[batch, ..., features]`): items past `count` pad a fixed batch, positions whose
/// `mask` (`[batch, positions]`, as f32) is 0 are padding tokens.
pub fn real_tokens(
    shape: &[usize],
    mask: Option<&ndarray::ArrayD<f32>>,
    count: usize,
) -> Result<Vec<usize>, whittle_calib::Error> {
    if shape.len() < 2 {
        return Err(whittle_calib::Error::Capture(format!(
            "a hidden state of shape {shape:?} has no feature axis"
        )));
    }
    let per_item: usize = shape[1..shape.len() - 1].iter().product();
    if let Some(m) = mask
        && m.len() != shape[0] * per_item
    {
        return Err(whittle_calib::Error::Capture(format!(
            "the attention mask is {:?}, the hidden state {shape:?}",
            m.shape()
        )));
    }
    let mask = mask.map(|m| m.iter().copied().collect::<Vec<f32>>());
    Ok((0..count.min(shape[0]) * per_item)
        .filter(|&r| mask.as_ref().is_none_or(|m| m[r] > 0.5))
        .collect())
}

/// A dense layer as exporters write it: `MatMul(x, W)` with `W` a 2-D initializer `[in, out]`,
/// then optionally `Add` of a 1-D initializer `[out]` read by nothing else.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The MatMul node.
    pub matmul: String,
    /// Its input.
    pub input: String,
    /// The weight initializer, `[inputs, outputs]`.
    pub weight: String,
    /// The bias initializer, when an Add of one follows.
    pub bias: Option<String>,
    /// The bias Add node.
    pub bias_add: Option<String>,
    /// The layer's output (the bias Add's, else the MatMul's).
    pub output: String,
    /// Input and output features.
    pub dims: (usize, usize),
}

/// The [`Linear`] at MatMul node `i`, if it is one.
pub fn linear_at(model: &Model, ix: &Index, i: usize) -> Option<Linear> {
    let g = model.graph();
    let n = &g.node[i];
    if n.op_type() != "MatMul" || n.input.len() != 2 {
        return None;
    }
    let w = model.initializer(&n.input[1])?;
    if w.dims.len() != 2 {
        return None;
    }
    let dims = (w.dims[0] as usize, w.dims[1] as usize);
    let mut out = Linear {
        matmul: n.name().to_string(),
        input: n.input[0].clone(),
        weight: n.input[1].clone(),
        bias: None,
        bias_add: None,
        output: n.output[0].clone(),
        dims,
    };
    let r = ix.readers(&n.output[0]);
    if let [(j, _)] = r
        && g.node[*j].op_type() == "Add"
        && !ix.is_output(&n.output[0])
    {
        let add = &g.node[*j];
        let other = add.input.iter().find(|t| **t != n.output[0])?;
        if let Some(b) = model.initializer(other)
            && b.dims.iter().product::<i64>() == dims.1 as i64
            && b.dims.len() == 1
        {
            out.bias = Some(other.clone());
            out.bias_add = Some(add.name().to_string());
            out.output = add.output[0].clone();
        }
    }
    Some(out)
}

/// The weighted MatMul layers among `nodes` (names), in graph order.
pub fn linears(model: &Model, nodes: &[String]) -> Vec<Linear> {
    let g = model.graph();
    let ix = Index::new(g);
    let set: HashSet<&str> = nodes.iter().map(String::as_str).collect();
    (0..g.node.len())
        .filter(|&i| set.contains(g.node[i].name()))
        .filter_map(|i| linear_at(model, &ix, i))
        .collect()
}

/// Writes `values` (`dims`) as initializer `name`, or as a fresh copy when other nodes than
/// `owners` read `name` too; points `owners`' inputs at it. Returns the name written.
pub fn write_weight(
    model: &mut Model,
    name: &str,
    dims: &[i64],
    values: &[f32],
    owners: &[&str],
) -> String {
    let shared = model
        .graph()
        .node
        .iter()
        .any(|n| !owners.contains(&n.name()) && n.input.iter().any(|t| t == name));
    let target = if shared {
        edit::unique_name(model.graph(), &format!("{name}.pruned"))
    } else {
        name.to_string()
    };
    let g = model.graph_mut();
    if shared {
        let nodes = g.node.iter_mut().filter(|n| owners.contains(&n.name()));
        edit::replace_uses(nodes, name, &target);
    }
    edit::set_initializer(g, whittle_core::tensor::from_f32(&target, dims, values));
    target
}
