//! Lossless cleanup passes, in this order:
//!
//! 1. name unnamed nodes;
//! 2. drop Identity and inference Dropout;
//! 3. fold constants (`fold_constants`): nodes of the default domain whose inputs are all
//!    constants (initializers that are not also graph inputs, or outputs of other folded nodes)
//!    are evaluated once in ONNX Runtime (CPU) and their outputs still read by the rest of the
//!    graph become initializers. Declined: random ops (`RandomNormal`, `RandomUniform`, their
//!    `*Like` forms, `Multinomial`, `Bernoulli`, `Dropout`), nodes with subgraphs (`If`, `Loop`,
//!    `Scan`), sequence / optional ops, `QuantizeLinear` / `DequantizeLinear` (folding would turn
//!    quantized weights into float ones and break the Q/DQ patterns runtimes fuse), nodes that
//!    produce a graph output, outputs whose element type whittle cannot carry (only float, int64,
//!    int32 and bool are), and outputs of over 1M elements that are larger than the constants
//!    they come from (an `Expand`, `Tile` or `ConstantOfShape` stays, its small inputs are folded
//!    instead). ONNX Runtime is loaded only when there is something to fold; when it cannot
//!    load or run the constant nodes, nothing is folded and
//!    [`CleanupReport::constant_folding_skipped`] says why (never an error);
//! 4. drop Reshapes that do not change the shape;
//! 5. fold BatchNormalization into the Conv / Gemm before it (`fold_batch_norms`);
//! 6. fold the BatchNormalizations left into the Conv / Gemm after them
//!    (`fold_batch_norms_forward`; only where the Conv has no padding, see there).
//!
//! No pass removes or renames a tensor that a subgraph (an If / Loop / Scan body) reads from the
//! main graph.
//!
//! Accepts any model; changes only what it can prove exact (up to float rounding: folded weights
//! differ from the unfolded computation by rounding only). Guarantees the same graph outputs with
//! the same shapes and a graph that passes [`whittle_core::check::check_graph`].

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use whittle_core::attr::Attrs;
use whittle_core::edit;
use whittle_core::onnx::tensor_proto::DataType;
use whittle_core::onnx::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use whittle_core::shape;
use whittle_core::tensor::{dtype_size, element_count, from_f32, from_i64, to_f32};
use whittle_core::{Model, Value};
use whittle_runtime::{RuntimeKind, RuntimeOptions};

use crate::Error;
use crate::index::Index;

/// What cleanup changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CleanupReport {
    /// BatchNormalization nodes folded into the preceding Conv / Gemm.
    pub folded_batchnorms: usize,
    /// BatchNormalization nodes folded into the following Conv / Gemm.
    pub folded_batchnorms_forward: usize,
    /// Nodes computed from constants only, replaced by the initializers they produce.
    pub folded_constants: usize,
    /// Why constant folding folded nothing although some nodes could be folded (ONNX Runtime
    /// could not load or run them); `None` otherwise.
    pub constant_folding_skipped: Option<String>,
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
    let folded = fold_constants(model)?;
    r.folded_constants = folded.nodes;
    r.constant_folding_skipped = folded.skipped;
    r.removed_reshapes = drop_noop_reshapes(model)?;
    r.folded_batchnorms = fold_batch_norms(model)?;
    r.folded_batchnorms_forward = fold_batch_norms_forward(model)?;
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

/// Remove every node for which `pass_through` holds, reading its first input where its first
/// output was read, unless that output is a graph output. Returns how many went.
fn remove_pass_throughs(model: &mut Model, pass_through: impl Fn(&NodeProto) -> bool) -> usize {
    let outputs: HashSet<String> = model
        .graph()
        .output
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    let sub_reads = edit::subgraph_reads(model.graph());
    let g = model.graph_mut();
    let mut removed = 0;
    let mut i = 0;
    while i < g.node.len() {
        let n = &g.node[i];
        let removable = n.domain().is_empty()
            && !n.input.is_empty()
            && !n.output.is_empty()
            && !outputs.contains(&n.output[0])
            && !sub_reads.contains(&n.output[0])
            && pass_through(n);
        if removable {
            let (from, to) = (n.output[0].clone(), n.input[0].clone());
            g.node.remove(i);
            edit::replace_uses(&mut g.node, &from, &to);
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

/// Whether a node carries a subgraph (If / Loop / Scan).
fn has_subgraph(n: &NodeProto) -> bool {
    n.attribute
        .iter()
        .any(|a| a.g.is_some() || !a.graphs.is_empty())
}

/// What the BatchNormalization folds need to know about the graph.
struct BnCx<'a> {
    ix: Index,
    inits: HashMap<&'a str, &'a TensorProto>,
    /// Names listed as graph inputs: an initializer among them can be overridden at run time.
    graph_inputs: HashSet<&'a str>,
    sub_reads: HashSet<String>,
}

impl<'a> BnCx<'a> {
    fn new(model: &'a Model) -> BnCx<'a> {
        let g = model.graph();
        BnCx {
            ix: Index::new(g),
            inits: model.initializer_map(),
            graph_inputs: g.input.iter().map(|v| v.name()).collect(),
            sub_reads: edit::subgraph_reads(g),
        }
    }

    /// A constant only one node reads: an initializer, not a graph input or output, not read
    /// from a subgraph, read once.
    fn private_const(&self, name: &str) -> bool {
        self.inits.contains_key(name)
            && !self.graph_inputs.contains(name)
            && !self.sub_reads.contains(name)
            && !self.ix.is_output(name)
            && self.ix.readers(name).len() == 1
    }

    /// A float initializer that only its one reader reads.
    fn private_float(&self, name: &str) -> bool {
        self.private_const(name) && self.inits[name].data_type() == DataType::Float as i32
    }

    /// Whether `bn` is an inference BatchNormalization whose parameters are constants.
    fn simple_bn(&self, bn: &NodeProto) -> bool {
        bn.op_type() == "BatchNormalization"
            && bn.domain().is_empty()
            && bn.input.len() >= 5
            && !bn.output.iter().skip(1).any(|o| !o.is_empty())
            && bn.attr_int("training_mode").unwrap_or(0) == 0
            && bn.input[1..5].iter().all(|x| {
                self.inits.contains_key(x.as_str()) && !self.graph_inputs.contains(x.as_str())
            })
    }

    /// The Conv / Gemm before `bn` that it folds into: the producer of its input, read only by
    /// `bn`, with a float weight (and bias) that only the producer reads.
    fn backward_producer(&self, model: &Model, bn: &NodeProto) -> Option<usize> {
        if !self.simple_bn(bn) {
            return None;
        }
        let x = &bn.input[0];
        let &(pi, _) = self.ix.producer.get(x)?;
        let p = &model.graph().node[pi];
        let foldable_op = p.domain().is_empty()
            && match p.op_type() {
                "Conv" => true,
                "Gemm" => {
                    p.attr_float("alpha").unwrap_or(1.0) == 1.0
                        && p.attr_float("beta").unwrap_or(1.0) == 1.0
                        && p.attr_int("transA").unwrap_or(0) == 0
                }
                _ => false,
            };
        let ok = foldable_op
            && p.output.len() == 1
            && self.ix.readers(x).len() == 1
            && !self.ix.is_output(x)
            && !self.sub_reads.contains(x)
            && !self.sub_reads.contains(&bn.output[0])
            && p.input.get(1).is_some_and(|w| self.private_float(w))
            && p.input
                .get(2)
                .is_none_or(|b| b.is_empty() || self.private_float(b));
        ok.then_some(pi)
    }
}

/// Fold `BatchNormalization(Conv(x))` (and after Gemm with a [N, F] output) into the producer when
/// the producer's output feeds only the BatchNormalization, all BN inputs are initializers and the
/// producer's float weight (and bias) are read by it alone.
fn fold_batch_norms(model: &mut Model) -> Result<usize, Error> {
    let mut folded = 0;
    loop {
        let job = {
            let cx = BnCx::new(model);
            model
                .graph()
                .node
                .iter()
                .enumerate()
                .find_map(|(bi, bn)| cx.backward_producer(model, bn).map(|pi| (pi, bi)))
        };
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
        None => edit::unique_name(model.graph(), &format!("{}_bias", p.name())),
    };
    let bn_out = bn.output[0].clone();
    let bn_inputs: Vec<String> = bn.input[1..5].to_vec();
    let g = model.graph_mut();
    edit::set_initializer(g, from_f32(&w_name, &wt.dims, &w));
    edit::set_initializer(g, from_f32(&b_name, &[c as i64], &b));
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

/// A BatchNormalization to fold into the Conv / Gemm after it, with the new weight and bias.
struct ForwardFold {
    bn: usize,
    consumer: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// Whether a Conv reads every input element it multiplies, never padding: `group` 1 and no
/// padding (`pads` all 0 with `auto_pad` NOTSET, `auto_pad` VALID, or `SAME_*` with a kernel of
/// ones, which pads nothing).
fn conv_unpadded(c: &NodeProto, kernel: &[usize]) -> bool {
    if c.attr_int("group").unwrap_or(1) != 1 {
        return false;
    }
    let pads_zero = c
        .attr_ints("pads")
        .is_none_or(|p| p.iter().all(|&v| v == 0));
    match c.attr_str("auto_pad").as_deref().unwrap_or("NOTSET") {
        "NOTSET" | "" => pads_zero,
        "VALID" => true,
        "SAME_UPPER" | "SAME_LOWER" => kernel.iter().all(|&k| k == 1),
        _ => false,
    }
}

/// The forward fold of the BatchNormalization at `bi`, when it has one (see
/// [`fold_batch_norms_forward`]).
fn forward_fold(cx: &BnCx, model: &Model, bi: usize) -> Option<ForwardFold> {
    let g = model.graph();
    let bn = &g.node[bi];
    if !cx.simple_bn(bn) || cx.backward_producer(model, bn).is_some() {
        return None;
    }
    let y = &bn.output[0];
    if cx.ix.is_output(y) || cx.sub_reads.contains(y) {
        return None;
    }
    let &[(ci, 0)] = cx.ix.readers(y) else {
        return None;
    };
    let c = &g.node[ci];
    if !c.domain().is_empty() || c.input.len() < 2 || !cx.private_float(&c.input[1]) {
        return None;
    }
    let bias_in = c.input.get(2).filter(|b| !b.is_empty());
    if bias_in.is_some_and(|b| !cx.private_float(b)) {
        return None;
    }
    let wt = cx.inits[c.input[1].as_str()];
    let dims: Vec<usize> = wt
        .dims
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    // outputs, inputs (= BN channels), elements per (output, input) pair, and the strides of
    // the output and input index: W[o, i, k] is at o * o_stride + i * i_stride + k
    let (out, cin, per, o_stride, i_stride) = match c.op_type() {
        "Conv" if dims.len() >= 3 && conv_unpadded(c, &dims[2..]) => {
            let per = dims[2..].iter().product::<usize>();
            (dims[0], dims[1], per, dims[1] * per, per)
        }
        "Gemm"
            if dims.len() == 2
                && c.attr_float("alpha").unwrap_or(1.0) == 1.0
                && c.attr_float("beta").unwrap_or(1.0) == 1.0
                && c.attr_int("transA").unwrap_or(0) == 0 =>
        {
            if c.attr_int("transB").unwrap_or(0) != 0 {
                // [O, F]
                (dims[0], dims[1], 1, dims[1], 1)
            } else {
                // [F, O]
                (dims[1], dims[0], 1, 1, dims[1])
            }
        }
        _ => return None,
    };
    let param = |k: usize| {
        to_f32(cx.inits[bn.input[k].as_str()])
            .ok()
            .filter(|v| v.len() == cin)
    };
    let (scale, beta, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
    let old_bias = match bias_in {
        Some(b) => {
            let t = cx.inits[b.as_str()];
            // Conv: [M]; Gemm: anything that broadcasts to [N, M] per output column alone
            let shape_ok = match c.op_type() {
                "Conv" => t.dims == [out as i64],
                _ => {
                    t.dims.iter().rev().skip(1).all(|&d| d == 1)
                        && t.dims.last().is_none_or(|&d| d == 1 || d == out as i64)
                        && t.dims.len() <= 2
                }
            };
            let v = to_f32(t).ok().filter(|_| shape_ok)?;
            match v.len() {
                1 => vec![v[0]; out],
                n if n == out => v,
                _ => return None,
            }
        }
        None => vec![0.0; out],
    };
    let w = to_f32(wt).ok().filter(|w| w.len() == out * cin * per)?;
    let eps = bn.attr_float("epsilon").unwrap_or(1e-5);
    let a: Vec<f32> = (0..cin).map(|i| scale[i] / (var[i] + eps).sqrt()).collect();
    let b: Vec<f64> = (0..cin)
        .map(|i| beta[i] as f64 - mean[i] as f64 * a[i] as f64)
        .collect();
    let mut weight = w.clone();
    let mut bias: Vec<f64> = old_bias.iter().map(|&v| v as f64).collect();
    for (o, acc) in bias.iter_mut().enumerate() {
        for i in 0..cin {
            for k in 0..per {
                let j = o * o_stride + i * i_stride + k;
                *acc += w[j] as f64 * b[i];
                weight[j] = w[j] * a[i];
            }
        }
    }
    Some(ForwardFold {
        bn: bi,
        consumer: ci,
        weight,
        bias: bias.into_iter().map(|v| v as f32).collect(),
    })
}

/// Fold `Conv(BatchNormalization(x))` (and `Gemm(BatchNormalization(x))` over `[N, F]`, with
/// `alpha` = `beta` = 1, `transA` = 0, either `transB`) into the Conv / Gemm.
///
/// With `BN(x) = a*x + b` per channel (`a = scale / sqrt(var + eps)`, `b = beta - mean*a`), the
/// consumer's weight becomes `W'[o, c, ..] = W[o, c, ..] * a[c]` and its bias
/// `bias'[o] = bias[o] + sum_{c, k} W[o, c, k] * b[c]`.
///
/// Accepts a BatchNormalization that does not fold backwards (`fold_batch_norms` runs first and
/// keeps priority), whose output is read only by the one Conv / Gemm (as its data input) and is
/// not a graph output, whose parameters are initializers, and whose consumer has a float weight
/// (and bias) that only it reads, and `group` 1.
///
/// Declines a Conv that pads its input (`pads` not all 0, or `auto_pad` SAME with a kernel
/// larger than 1): the padding adds zeros *after* the BatchNormalization, so the original conv
/// sees 0 at the border where the folded one would see `a*0 + b = b`, which is not exact.
fn fold_batch_norms_forward(model: &mut Model) -> Result<usize, Error> {
    let mut folded = 0;
    loop {
        let job = {
            let cx = BnCx::new(model);
            (0..model.graph().node.len()).find_map(|bi| forward_fold(&cx, model, bi))
        };
        let Some(f) = job else { break };
        let g = model.graph();
        let bn = g.node[f.bn].clone();
        let c = g.node[f.consumer].clone();
        let w_name = c.input[1].clone();
        let w_dims = model
            .initializer(&w_name)
            .map(|t| t.dims.clone())
            .unwrap_or_default();
        let b_name = match c.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => b.clone(),
            None => edit::unique_name(model.graph(), &format!("{}_bias", c.name())),
        };
        let g = model.graph_mut();
        edit::set_initializer(g, from_f32(&w_name, &w_dims, &f.weight));
        edit::set_initializer(g, from_f32(&b_name, &[f.bias.len() as i64], &f.bias));
        let consumer = &mut g.node[f.consumer];
        consumer.input[0] = bn.input[0].clone();
        if consumer.input.len() < 3 {
            consumer.input.resize(3, String::new());
        }
        consumer.input[2] = b_name;
        g.node.remove(f.bn);
        let still_read = edit::reads(g, &g.node);
        g.initializer.retain(|t| {
            !bn.input[1..5].iter().any(|x| x == t.name()) || still_read.contains(t.name())
        });
        g.value_info.retain(|v| v.name() != bn.output[0]);
        folded += 1;
    }
    Ok(folded)
}

/// Ops never folded even with constant inputs: random ones (a fold would freeze one draw), ops
/// over sequences / optionals (not tensors), and quantization ops (folding `DequantizeLinear`
/// would store quantized weights as floats and break the Q/DQ patterns runtimes fuse).
fn never_folded(op: &str) -> bool {
    matches!(
        op,
        "RandomNormal"
            | "RandomUniform"
            | "RandomNormalLike"
            | "RandomUniformLike"
            | "Multinomial"
            | "Bernoulli"
            | "Dropout"
            | "QuantizeLinear"
            | "DequantizeLinear"
            | "DynamicQuantizeLinear"
            | "SplitToSequence"
            | "ConcatFromSequence"
    ) || op.starts_with("Sequence")
        || op.starts_with("Optional")
}

/// A folded tensor larger than this many elements is kept as a node unless it is no larger than
/// the constants it is computed from.
const FOLD_MAX_ELEMENTS: u64 = 1_000_000;

/// Element types a folded tensor may have (what [`Value`] carries).
fn foldable_dtype(dtype: i32) -> bool {
    [
        DataType::Float,
        DataType::Int64,
        DataType::Int32,
        DataType::Bool,
    ]
    .iter()
    .any(|&d| d as i32 == dtype)
}

/// What constant folding did.
struct Folded {
    /// Nodes folded.
    nodes: usize,
    /// Why nothing was folded although something could be.
    skipped: Option<String>,
}

/// Constant nodes to fold: `nodes` (indices, in an order that evaluates), and the outputs of
/// theirs still read by the rest of the graph (`needed`, each with its producer).
struct FoldPlan {
    nodes: Vec<usize>,
    needed: Vec<(String, usize)>,
}

/// The nodes that can be folded, leaving out `blocked` ones and what depends on them.
fn plan_fold(g: &GraphProto, blocked: &HashSet<usize>) -> FoldPlan {
    let graph_inputs: HashSet<&str> = g.input.iter().map(|v| v.name()).collect();
    let outputs: HashSet<&str> = g.output.iter().map(|v| v.name()).collect();
    let mut constant: HashSet<&str> = g
        .initializer
        .iter()
        .map(|t| t.name())
        .filter(|n| !graph_inputs.contains(n))
        .collect();
    let mut in_plan = vec![false; g.node.len()];
    let mut nodes = Vec::new();
    loop {
        let before = nodes.len();
        for (i, n) in g.node.iter().enumerate() {
            let foldable = !in_plan[i]
                && !blocked.contains(&i)
                && (n.domain().is_empty() || n.domain() == "ai.onnx")
                && !never_folded(n.op_type())
                && (!n.input.is_empty() || n.op_type() == "Constant")
                && !has_subgraph(n)
                && n.output.iter().any(|o| !o.is_empty())
                && n.output.iter().all(|o| !outputs.contains(o.as_str()))
                && n.input
                    .iter()
                    .all(|x| x.is_empty() || constant.contains(x.as_str()));
            if foldable {
                in_plan[i] = true;
                nodes.push(i);
                constant.extend(
                    n.output
                        .iter()
                        .filter(|o| !o.is_empty())
                        .map(|o| o.as_str()),
                );
            }
        }
        if nodes.len() == before {
            break;
        }
    }
    let rest: Vec<NodeProto> = g
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| !in_plan[*i])
        .map(|(_, n)| n.clone())
        .collect();
    let read = edit::reads(g, &rest);
    let needed = nodes
        .iter()
        .flat_map(|&i| {
            g.node[i]
                .output
                .iter()
                .filter(|o| !o.is_empty() && read.contains(o.as_str()))
                .map(move |o| (o.clone(), i))
        })
        .collect();
    FoldPlan { nodes, needed }
}

/// Bytes of the initializers `t` is computed from through the plan's nodes.
fn source_bytes(g: &GraphProto, plan: &FoldPlan, t: &str) -> u64 {
    let producer: HashMap<&str, usize> = plan
        .nodes
        .iter()
        .flat_map(|&i| g.node[i].output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let inits: HashMap<&str, &TensorProto> = g.initializer.iter().map(|t| (t.name(), t)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut stack = vec![t];
    let mut bytes = 0u64;
    while let Some(x) = stack.pop() {
        if x.is_empty() || !seen.insert(x) {
            continue;
        }
        if let Some(&i) = producer.get(x) {
            stack.extend(g.node[i].input.iter().map(|s| s.as_str()));
        } else if let Some(init) = inits.get(x) {
            let n = element_count(init).unwrap_or(u64::MAX);
            let size = dtype_size(init.data_type()).unwrap_or(1) as u64;
            bytes = bytes.saturating_add(n.saturating_mul(size));
        }
    }
    bytes
}

/// Whether a folded tensor of `elements` elements of `dtype` bloats the model.
fn bloats(g: &GraphProto, plan: &FoldPlan, t: &str, elements: u64, dtype: i32) -> bool {
    let size = dtype_size(dtype).unwrap_or(1) as u64;
    elements > FOLD_MAX_ELEMENTS && elements.saturating_mul(size) > source_bytes(g, plan, t)
}

/// Why an evaluation gave no values.
enum EvalFailed {
    /// These nodes produce outputs that cannot be folded: leave them out and try again.
    Block(Vec<usize>),
    /// ONNX Runtime failed: fold nothing.
    Skip(String),
}

/// A tensor initializer holding a runtime value.
fn value_tensor(name: &str, v: &Value) -> TensorProto {
    let dims: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
    match v {
        Value::F32(a) => from_f32(name, &dims, &a.iter().copied().collect::<Vec<_>>()),
        Value::I64(a) => from_i64(name, &dims, &a.iter().copied().collect::<Vec<_>>()),
        Value::I32(a) => TensorProto {
            name: Some(name.to_string()),
            dims,
            data_type: Some(DataType::Int32 as i32),
            raw_data: Some(a.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        },
        Value::Bool(a) => TensorProto {
            name: Some(name.to_string()),
            dims,
            data_type: Some(DataType::Bool as i32),
            raw_data: Some(a.iter().map(|&v| v as u8).collect()),
            ..Default::default()
        },
    }
}

/// Run the plan's nodes in ONNX Runtime (CPU) on their constants and return the needed tensors.
fn evaluate(model: &Model, plan: &FoldPlan) -> Result<Vec<Value>, EvalFailed> {
    let g = model.graph();
    let node: Vec<NodeProto> = plan.nodes.iter().map(|&i| g.node[i].clone()).collect();
    let reads: HashSet<&str> = node
        .iter()
        .flat_map(|n| n.input.iter().map(|s| s.as_str()))
        .collect();
    let initializer: Vec<TensorProto> = g
        .initializer
        .iter()
        .filter(|t| reads.contains(t.name()))
        .cloned()
        .collect();
    // outputs without a declared type: ONNX Runtime infers them (a type from whittle's shape
    // rules could only add a way to disagree)
    let output = plan
        .needed
        .iter()
        .map(|(t, _)| ValueInfoProto {
            name: Some(t.clone()),
            ..Default::default()
        })
        .collect();
    let sub = Model {
        proto: ModelProto {
            ir_version: model.proto.ir_version,
            opset_import: model.proto.opset_import.clone(),
            graph: Some(GraphProto {
                name: Some("whittle_constant_folding".into()),
                node,
                initializer,
                output,
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    let skip = |what: &str, e: whittle_runtime::Error| {
        EvalFailed::Skip(format!(
            "ONNX Runtime could not {what} the {} constant nodes: {e}",
            plan.nodes.len()
        ))
    };
    let mut s = whittle_runtime::load(
        RuntimeKind::OrtCpu,
        &sub.to_bytes(),
        &RuntimeOptions::default(),
    )
    .map_err(|e| skip("load", e))?;
    let bad: Vec<usize> = s
        .outputs()
        .iter()
        .zip(&plan.needed)
        .filter(|(o, _)| !matches!(o.dtype.as_str(), "float" | "int64" | "int32" | "bool"))
        .map(|(_, (_, p))| *p)
        .collect();
    if !bad.is_empty() {
        return Err(EvalFailed::Block(bad));
    }
    if !s.inputs().is_empty() || s.outputs().len() != plan.needed.len() {
        return Err(EvalFailed::Skip(format!(
            "ONNX Runtime sees {} inputs and {} outputs in the constant subgraph ({} expected)",
            s.inputs().len(),
            s.outputs().len(),
            plan.needed.len()
        )));
    }
    s.run(&[]).map_err(|e| skip("run", e))
}

/// Fold constants: see the module documentation. ONNX Runtime is loaded only when some node
/// output still read by the graph is computed from constants alone.
fn fold_constants(model: &mut Model) -> Result<Folded, Error> {
    let shapes = shape::infer(model, &[]).ok();
    let mut blocked: HashSet<usize> = HashSet::new();
    let mut evaluations = 0;
    loop {
        let g = model.graph();
        let plan = plan_fold(g, &blocked);
        if plan.nodes.is_empty() {
            return Ok(Folded {
                nodes: 0,
                skipped: None,
            });
        }
        // leave out what shape inference already says cannot be folded, before running anything
        let predicted: Vec<usize> = plan
            .needed
            .iter()
            .filter(|(t, _)| {
                shapes
                    .as_ref()
                    .and_then(|s| s.types.get(t))
                    .is_some_and(|ty| {
                        !foldable_dtype(ty.dtype)
                            || ty
                                .shape
                                .as_ref()
                                .and_then(|d| {
                                    d.iter().try_fold(1u64, |n, d| {
                                        n.checked_mul(u64::try_from(d.known()?).ok()?)
                                    })
                                })
                                .is_some_and(|n| bloats(g, &plan, t, n, ty.dtype))
                    })
            })
            .map(|(_, p)| *p)
            .collect();
        if !predicted.is_empty() {
            blocked.extend(predicted);
            continue;
        }
        let values = if plan.needed.is_empty() {
            Vec::new()
        } else {
            if evaluations == 4 {
                return Ok(Folded {
                    nodes: 0,
                    skipped: Some("the constant subgraph kept changing after 4 evaluations".into()),
                });
            }
            evaluations += 1;
            match evaluate(model, &plan) {
                Ok(v) => v,
                Err(EvalFailed::Block(nodes)) => {
                    blocked.extend(nodes);
                    continue;
                }
                Err(EvalFailed::Skip(reason)) => {
                    return Ok(Folded {
                        nodes: 0,
                        skipped: Some(reason),
                    });
                }
            }
        };
        let too_big: Vec<usize> = plan
            .needed
            .iter()
            .zip(&values)
            .filter(|((t, _), v)| {
                let dtype = match v {
                    Value::F32(_) => DataType::Float,
                    Value::I64(_) => DataType::Int64,
                    Value::I32(_) => DataType::Int32,
                    Value::Bool(_) => DataType::Bool,
                };
                let n = v.shape().iter().map(|&d| d as u64).product::<u64>();
                bloats(g, &plan, t, n, dtype as i32)
            })
            .map(|((_, p), _)| *p)
            .collect();
        if !too_big.is_empty() {
            blocked.extend(too_big);
            continue;
        }
        apply_fold(model, &plan, &values);
        return Ok(Folded {
            nodes: plan.nodes.len(),
            skipped: None,
        });
    }
}

/// Replace the plan's needed tensors by initializers holding `values`, remove its nodes and the
/// initializers only they read.
fn apply_fold(model: &mut Model, plan: &FoldPlan, values: &[Value]) {
    let g = model.graph_mut();
    let folded: HashSet<usize> = plan.nodes.iter().copied().collect();
    let mut consumed: HashSet<String> = HashSet::new();
    let mut produced: HashSet<String> = HashSet::new();
    for &i in &plan.nodes {
        consumed.extend(g.node[i].input.iter().cloned());
        produced.extend(g.node[i].output.iter().cloned());
    }
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !folded.contains(&(i - 1))
    });
    for ((t, _), v) in plan.needed.iter().zip(values) {
        edit::set_initializer(g, value_tensor(t, v));
    }
    let still_read = edit::reads(g, &g.node);
    g.initializer
        .retain(|t| !consumed.contains(t.name()) || still_read.contains(t.name()));
    g.value_info.retain(|v| !produced.contains(v.name()));
}
