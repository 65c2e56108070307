//! Parameters and multiply-accumulates per node.
//!
//! Params are the elements of initializers; each initializer is counted once, at the first node
//! that reads it (an initializer no node reads is counted in the model total only). MACs are
//! counted for Conv, ConvTranspose, Gemm and MatMul (the layers that dominate compute).
//!
//! MACs are exact at the shapes inference reached, with one convention: a batch symbol (a symbol
//! found only at axis 0 of graph inputs, see `ShapeInfo::batch_symbols`) counts as 1, so such a
//! count is per item ([`ModelCost::per_item`]). Any other dim a count depends on that no binding
//! fixed (a symbolic height, a sequence length, a tensor without a shape) is never guessed into an
//! exact-looking figure: it is listed in [`ModelCost::unknown_dims`] and [`ModelCost::exact_macs`]
//! refuses to give a number.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::attr::{Attrs, node_label};
use crate::error::{Error, Result};
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
    /// Multiply-accumulates of one run; a placeholder (unknown dims as 1, or 0 without a shape)
    /// when `unknown_dims` is not empty.
    pub macs: u64,
    /// The names of the unknown dims `macs` depends on (empty: `macs` is exact).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_dims: Vec<String>,
}

/// A dim a MAC count depends on that no binding fixed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UnknownDim {
    /// A symbolic dim of a graph input (first place it is declared).
    Input {
        /// The symbol (`x_dim2` for a dim declared as -1 or 0).
        name: String,
        /// The graph input.
        input: String,
        /// The axis.
        axis: usize,
    },
    /// A size the graph computes that inference could not evaluate (no input symbol in it).
    Computed {
        /// The size as inference wrote it.
        name: String,
    },
    /// A tensor whose shape inference did not reach (after an op without a shape rule).
    NoShape {
        /// The tensor.
        name: String,
    },
}

impl UnknownDim {
    /// The symbol, expression or tensor name.
    pub fn name(&self) -> &str {
        match self {
            UnknownDim::Input { name, .. }
            | UnknownDim::Computed { name }
            | UnknownDim::NoShape { name } => name,
        }
    }
}

impl fmt::Display for UnknownDim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnknownDim::Input { name, input, axis } => {
                write!(f, "{name} (input {input} axis {axis})")
            }
            UnknownDim::Computed { name } => write!(f, "{name} (computed in the graph)"),
            UnknownDim::NoShape { name } => write!(f, "the shape of '{name}' (not inferred)"),
        }
    }
}

/// Costs of the whole model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCost {
    /// Elements of all initializers.
    pub params: u64,
    /// Sum of node MACs: exact when `unknown_dims` is empty (per item when `per_item` is not
    /// empty), else a placeholder that must not be used as a count (see [`ModelCost::exact_macs`]).
    pub macs: u64,
    /// Per node, in graph order.
    pub nodes: Vec<NodeCost>,
    /// The dims the MAC count depends on that no binding fixed, each once; empty when `macs` is
    /// exact.
    pub unknown_dims: Vec<UnknownDim>,
    /// Batch symbols counted as 1: `macs` is per item.
    pub per_item: Vec<String>,
    /// Each graph input's shape as counted (`[("x", [1,3,48,320])]`; a symbol where unknown).
    pub costed_at: Vec<(String, Vec<Dim>)>,
}

impl ModelCost {
    /// Whether `macs` is a count (every dim it depends on is known or a batch axis).
    pub fn is_exact(&self) -> bool {
        self.unknown_dims.is_empty()
    }

    /// The MACs, or an error naming the unknown dims and how to bind them.
    pub fn exact_macs(&self) -> Result<u64> {
        if self.is_exact() {
            return Ok(self.macs);
        }
        Err(Error::UnknownDims {
            dims: self.unknown_dims.clone(),
            hint: self.binding_hint(),
        })
    }

    /// The inputs' shapes as counted, `x=1x3x48x320, mask=1x128`: batch axes as 1, unknown
    /// dims as `?`.
    pub fn costed_at_text(&self) -> String {
        self.costed_at
            .iter()
            .map(|(name, dims)| self.input_text(name, dims))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `x=1x3x?x?` for every input with an unknown dim (batch axes as 1): what a binding must give.
    /// Empty when no input binding can fix the unknown dims (they come from inside the graph).
    pub fn binding_hint(&self) -> String {
        self.costed_at
            .iter()
            .filter(|(_, dims)| {
                dims.iter().any(|d| {
                    self.unknown_dims
                        .iter()
                        .any(|u| matches!(u, UnknownDim::Input { .. }) && d.to_string() == u.name())
                })
            })
            .map(|(name, dims)| self.input_text(name, dims))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn input_text(&self, name: &str, dims: &[Dim]) -> String {
        let text: Vec<String> = dims
            .iter()
            .map(|d| match d {
                Dim::Known(v) => v.to_string(),
                Dim::Sym(s) if self.per_item.contains(s) => "1".into(),
                Dim::Sym(_) => "?".into(),
            })
            .collect();
        format!("{name}={}", text.join("x"))
    }
}

/// The dims the model's MAC count depends on that `shapes` leaves unknown (batch axes aside),
/// each once: empty when [`count`] is exact. Same as `count(model, shapes).unknown_dims`.
pub fn unknown_dims(model: &Model, shapes: &ShapeInfo) -> Vec<UnknownDim> {
    count(model, shapes).unknown_dims
}

/// Sizes of dims for counting: batch symbols as 1, anything else unknown is recorded.
struct Sizes<'a> {
    batch: BTreeSet<&'a str>,
    /// Unbound input symbols and where they are first declared.
    inputs: BTreeMap<&'a str, (&'a str, usize)>,
}

impl Sizes<'_> {
    fn dim(&self, d: &Dim, unknown: &mut BTreeSet<UnknownDim>) -> u64 {
        let Dim::Sym(s) = d else {
            return d.value_or(1).max(0) as u64;
        };
        let mut k = 1u64;
        let mut per_item = true;
        for part in s.split('*') {
            match part.parse::<i64>() {
                Ok(v) => k = k.saturating_mul(v.max(0) as u64),
                Err(_) if self.batch.contains(part) => {}
                Err(_) => per_item = false,
            }
        }
        if per_item {
            return k;
        }
        let mut named = false;
        for (sym, (input, axis)) in &self.inputs {
            if mentions(s, sym) {
                named = true;
                unknown.insert(UnknownDim::Input {
                    name: sym.to_string(),
                    input: input.to_string(),
                    axis: *axis,
                });
            }
        }
        if !named {
            unknown.insert(UnknownDim::Computed { name: s.clone() });
        }
        d.value_or(1).max(0) as u64
    }

    fn prod(&self, ds: &[Dim], unknown: &mut BTreeSet<UnknownDim>) -> u64 {
        ds.iter()
            .map(|d| self.dim(d, unknown))
            .fold(1u64, |a, b| a.saturating_mul(b))
    }
}

/// Whether the size expression `expr` (`x_dim2/2+1`, as shape inference writes them) uses the
/// symbol `sym`.
fn mentions(expr: &str, sym: &str) -> bool {
    let sep = |c: Option<char>| c.is_none_or(|c| "*/+-[]:".contains(c));
    expr.match_indices(sym).any(|(i, _)| {
        sep(expr[..i].chars().next_back()) && sep(expr[i + sym.len()..].chars().next())
    })
}

/// Count params and MACs with the given inferred shapes (see the module doc for what is exact).
pub fn count(model: &Model, shapes: &ShapeInfo) -> ModelCost {
    let inits = model.initializer_map();
    let batch = shapes.batch_symbols();
    let mut inputs = BTreeMap::new();
    for d in shapes.unbound_symbols() {
        inputs.insert(d.symbol.as_str(), (d.input.as_str(), d.axis));
    }
    let sizes = Sizes { batch, inputs };
    let mut seen: HashSet<&str> = HashSet::new();
    let mut all_unknown = BTreeSet::new();
    // a quantized weight (a DequantizeLinear of an initializer) counts at the node that reads
    // the DequantizeLinear's output; scales and zero points are not params
    let mut dequantized: HashMap<&str, &str> = HashMap::new();
    let mut qparams: HashSet<&str> = HashSet::new();
    for n in &model.graph().node {
        if matches!(n.op_type(), "DequantizeLinear" | "QuantizeLinear") {
            qparams.extend(n.input.iter().skip(1).map(String::as_str));
            if n.op_type() == "DequantizeLinear"
                && let (Some(x), Some(y)) = (n.input.first(), n.output.first())
                && inits.contains_key(x.as_str())
            {
                dequantized.insert(y.as_str(), x.as_str());
            }
        }
    }
    let mut nodes = Vec::with_capacity(model.graph().node.len());
    for n in &model.graph().node {
        let mut params = 0u64;
        let own = n.op_type() != "DequantizeLinear"
            || n.output
                .first()
                .is_none_or(|o| !dequantized.contains_key(o.as_str()));
        for x in n.input.iter().filter(|_| own) {
            let x = dequantized.get(x.as_str()).copied().unwrap_or(x.as_str());
            if let Some(t) = inits.get(x)
                && !qparams.contains(x)
                && seen.insert(x)
            {
                params += element_count(t).unwrap_or(0);
            }
        }
        let out = n.output.first().and_then(|o| shapes.shape(o));
        let mut unknown = BTreeSet::new();
        let macs = node_macs(n, shapes, out, &sizes, &mut unknown);
        nodes.push(NodeCost {
            name: node_label(n),
            op: n.op_type().to_string(),
            output_shape: describe_shape(out),
            params,
            macs,
            unknown_dims: unknown.iter().map(|u| u.name().to_string()).collect(),
        });
        all_unknown.extend(unknown);
    }
    let params = model
        .graph()
        .initializer
        .iter()
        .filter(|t| !qparams.contains(t.name()))
        .map(|t| element_count(t).unwrap_or(0))
        .sum();
    let macs = nodes
        .iter()
        .map(|n| n.macs)
        .fold(0u64, |a, b| a.saturating_add(b));
    // input symbols first, in declaration order; then computed sizes and unshaped tensors
    let order: Vec<&str> = shapes
        .unbound_symbols()
        .iter()
        .map(|d| d.symbol.as_str())
        .collect();
    let mut unknown_dims: Vec<UnknownDim> = all_unknown.into_iter().collect();
    unknown_dims.sort_by_key(|u| match u {
        UnknownDim::Input { name, .. } => (0, order.iter().position(|s| s == name).unwrap_or(0)),
        UnknownDim::Computed { .. } => (1, 0),
        UnknownDim::NoShape { .. } => (2, 0),
    });
    ModelCost {
        params,
        macs,
        nodes,
        unknown_dims,
        per_item: sizes.batch.iter().map(|s| s.to_string()).collect(),
        costed_at: shapes.input_shapes(model),
    }
}

/// MACs of one node; the unknown dims they depend on go to `unknown`.
fn node_macs(
    n: &crate::onnx::NodeProto,
    shapes: &ShapeInfo,
    out: Option<&[Dim]>,
    sizes: &Sizes,
    unknown: &mut BTreeSet<UnknownDim>,
) -> u64 {
    let op = n.op_type();
    if !matches!(op, "Conv" | "ConvTranspose" | "Gemm" | "MatMul") {
        return 0;
    }
    let mut shape = |i: Option<usize>| -> Option<&[Dim]> {
        let (name, s) = match i {
            Some(i) => {
                let name = n.input.get(i)?;
                (name, shapes.shape(name))
            }
            None => (n.output.first()?, out),
        };
        if s.is_none() {
            unknown.insert(UnknownDim::NoShape { name: name.clone() });
        }
        s
    };
    let mut u = BTreeSet::new();
    let macs = match op {
        "Conv" => {
            // out elements x (Cin/group x k...) per output element
            match (shape(None), shape(Some(1))) {
                (Some(o), Some(w)) => sizes
                    .prod(o, &mut u)
                    .saturating_mul(sizes.prod(w.get(1..).unwrap_or(&[]), &mut u)),
                _ => 0,
            }
        }
        "ConvTranspose" => {
            // every input element scatters into (Cout/group x k...) outputs
            match (shape(Some(0)), shape(Some(1))) {
                (Some(x), Some(w)) => sizes
                    .prod(x, &mut u)
                    .saturating_mul(sizes.prod(w.get(1..).unwrap_or(&[]), &mut u)),
                _ => 0,
            }
        }
        "Gemm" => match (shape(None), shape(Some(0))) {
            (Some(o), Some(a)) => {
                let ta = n.attr_int("transA").unwrap_or(0) != 0;
                let k = if ta { a.first() } else { a.get(1) };
                let k = k.map_or(0, |k| sizes.dim(k, &mut u));
                sizes.prod(o, &mut u).saturating_mul(k)
            }
            _ => 0,
        },
        _ => match (shape(None), shape(Some(0))) {
            (Some(o), Some(a)) => {
                let k = a.last().map_or(0, |k| sizes.dim(k, &mut u));
                sizes.prod(o, &mut u).saturating_mul(k)
            }
            _ => 0,
        },
    };
    unknown.extend(u);
    macs
}

#[cfg(test)]
mod tests {
    use super::mentions;

    #[test]
    fn expressions_mention_whole_symbols() {
        assert!(mentions("x_dim2", "x_dim2"));
        assert!(mentions("x_dim2/2/2+2", "x_dim2"));
        assert!(mentions("3*N*seq", "seq"));
        assert!(mentions("H[0:W:1]", "W"));
        assert!(!mentions("x_dim23/2", "x_dim2"));
        assert!(!mentions("seq_len", "seq"));
        assert!(!mentions("H", "W"));
    }
}
