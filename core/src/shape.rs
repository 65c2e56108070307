//! Static shape inference with symbolic dimensions.
//!
//! Every tensor gets an element type and, where the rules know it, a shape whose dimensions are
//! numbers or symbols (`N`, `seq`, or a product such as `N*seq`). Small integer tensors computed
//! from shapes (`Shape → Gather → Concat → Reshape`, as transformer exports do) are evaluated
//! symbolically so that the reshapes they drive get shapes too. An op without a rule leaves its
//! outputs unknown and is listed in [`ShapeInfo::unknown_ops`]; it is never an error. A clear
//! contradiction between known dimensions (a Conv whose weight does not fit its input, a MatMul
//! with different inner sizes) is an error naming the node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::Serialize;

use crate::attr::{Attrs, node_label};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::onnx::tensor_proto::DataType;
use crate::onnx::{NodeProto, TensorProto, ValueInfoProto, tensor_shape_proto, type_proto};
use crate::tensor;

/// One dimension: a number, or a symbol (possibly a product of symbols and a factor).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Dim {
    /// A known size.
    Known(i64),
    /// A size known only by name, e.g. `N` or `N*seq`.
    Sym(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(v) => write!(f, "{v}"),
            Dim::Sym(s) => write!(f, "{s}"),
        }
    }
}

impl Dim {
    /// The size, if known.
    pub fn known(&self) -> Option<i64> {
        match self {
            Dim::Known(v) => Some(*v),
            Dim::Sym(_) => None,
        }
    }

    /// The size with every symbol taken as `sym` (used to count MACs per item).
    pub fn value_or(&self, sym: i64) -> i64 {
        match self {
            Dim::Known(v) => *v,
            Dim::Sym(s) => monomial(&Dim::Sym(s.clone())).0 * sym,
        }
    }
}

/// Split a dim into (numeric factor, sorted symbol factors).
fn monomial(d: &Dim) -> (i64, Vec<String>) {
    match d {
        Dim::Known(v) => (*v, vec![]),
        Dim::Sym(s) => {
            let mut k = 1i64;
            let mut syms = vec![];
            for part in s.split('*') {
                match part.parse::<i64>() {
                    Ok(v) => k = k.saturating_mul(v),
                    Err(_) => syms.push(part.to_string()),
                }
            }
            syms.sort();
            (k, syms)
        }
    }
}

fn from_monomial(k: i64, mut syms: Vec<String>) -> Dim {
    if syms.is_empty() {
        return Dim::Known(k);
    }
    syms.sort();
    let mut s = syms.join("*");
    if k != 1 {
        s = format!("{k}*{s}");
    }
    Dim::Sym(s)
}

fn dim_mul(a: &Dim, b: &Dim) -> Dim {
    let (ka, mut sa) = monomial(a);
    let (kb, sb) = monomial(b);
    sa.extend(sb);
    from_monomial(ka.saturating_mul(kb), sa)
}

/// a / b when it divides exactly (symbols cancel), else None.
fn dim_div(a: &Dim, b: &Dim) -> Option<Dim> {
    let (ka, mut sa) = monomial(a);
    let (kb, sb) = monomial(b);
    if ka.checked_rem(kb)? != 0 {
        return None;
    }
    for s in sb {
        let pos = sa.iter().position(|x| *x == s)?;
        sa.remove(pos);
    }
    Some(from_monomial(ka.checked_div(kb)?, sa))
}

fn dims_product(ds: &[Dim]) -> Dim {
    ds.iter().fold(Dim::Known(1), |acc, d| dim_mul(&acc, d))
}

/// An element type and, when known, a shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorType {
    /// ONNX element type (`TensorProto.DataType` value).
    pub dtype: i32,
    /// The dims, or `None` when not even the rank is known.
    pub shape: Option<Vec<Dim>>,
}

impl TensorType {
    /// `float [N,3,32,32]`-style text.
    pub fn describe(&self) -> String {
        format!(
            "{} {}",
            tensor::dtype_name(self.dtype),
            describe_shape(self.shape.as_deref())
        )
    }
}

/// `[N,3,32,32]`, or `[?]` when unknown.
pub fn describe_shape(shape: Option<&[Dim]>) -> String {
    match shape {
        Some(s) => format!(
            "[{}]",
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        None => "[?]".into(),
    }
}

/// The result of shape inference over a model.
#[derive(Debug, Clone, Default)]
pub struct ShapeInfo {
    /// Type and shape of every tensor name the rules reached.
    pub types: HashMap<String, TensorType>,
    /// Op types (with domain when not the default one) that have no shape rule.
    pub unknown_ops: BTreeSet<String>,
    /// Every symbolic dim of the graph inputs as declared (before binding), in input and axis
    /// order; a symbol shared by several inputs or axes is listed at each place.
    pub input_dims: Vec<InputDim>,
    /// The sizes the bindings gave to input symbols (`N = 4`, `x_dim2 = 48`).
    pub bound: BTreeMap<String, i64>,
}

impl ShapeInfo {
    /// The shape of a tensor, if known.
    pub fn shape(&self, name: &str) -> Option<&[Dim]> {
        self.types.get(name).and_then(|t| t.shape.as_deref())
    }

    /// Input symbols no binding fixed, each once, in the order of [`ShapeInfo::input_dims`].
    pub fn unbound_symbols(&self) -> Vec<&InputDim> {
        let mut seen = BTreeSet::new();
        self.input_dims
            .iter()
            .filter(|d| !self.bound.contains_key(&d.symbol) && seen.insert(d.symbol.as_str()))
            .collect()
    }

    /// The symbols that are batch axes: each appears only at axis 0 of inputs of rank 2 or more
    /// (never at another axis) and is not bound. Costs take them as 1, i.e. per item.
    pub fn batch_symbols(&self) -> BTreeSet<&str> {
        let elsewhere: BTreeSet<&str> = self
            .input_dims
            .iter()
            .filter(|d| d.axis != 0 || d.rank < 2)
            .map(|d| d.symbol.as_str())
            .collect();
        self.input_dims
            .iter()
            .filter(|d| d.axis == 0 && d.rank >= 2)
            .map(|d| d.symbol.as_str())
            .filter(|s| !elsewhere.contains(s) && !self.bound.contains_key(*s))
            .collect()
    }

    /// The shape of each graph input as inferred (after binding; a symbol where still unknown):
    /// what a cost is counted at.
    pub fn input_shapes(&self, model: &Model) -> Vec<(String, Vec<Dim>)> {
        model
            .inputs()
            .iter()
            .filter_map(|v| Some((v.name().to_string(), self.shape(v.name())?.to_vec())))
            .collect()
    }
}

/// A symbolic dim of a graph input: the symbol and where it is declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputDim {
    /// The symbol (`N`, or `x_dim2` for a dim declared as -1, 0 or without a name).
    pub symbol: String,
    /// The graph input.
    pub input: String,
    /// The axis.
    pub axis: usize,
    /// The input's rank.
    pub rank: usize,
}

impl fmt::Display for InputDim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (input {} axis {})",
            self.symbol, self.input, self.axis
        )
    }
}

/// Parse `name=1x3x224x224` into an override.
pub fn parse_override(s: &str) -> Result<(String, Vec<i64>)> {
    let (name, dims) = s.split_once('=').ok_or_else(|| {
        Error::Override(format!("'{s}' is not NAME=DxDxD (e.g. input=1x3x224x224)"))
    })?;
    let dims = dims
        .split(['x', 'X', ','])
        .map(|d| {
            d.trim()
                .parse::<i64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| Error::Override(format!("'{d}' in '{s}' is not a positive size")))
        })
        .collect::<Result<Vec<_>>>()?;
    if name.is_empty() {
        return Err(Error::Override(format!("'{s}' names no input")));
    }
    Ok((name.to_string(), dims))
}

/// The symbol whittle gives a dynamic dim that has no name (declared as -1, 0 or empty) at `axis`
/// of the tensor `tensor`: `x_dim2`.
pub fn unnamed_dim(tensor: &str, axis: usize) -> String {
    format!("{tensor}_dim{axis}")
}

/// The declared type of a graph input/output/value_info. A dim declared as -1 or 0 (how exporters
/// write a dynamic size) or left empty is a symbol named by [`unnamed_dim`], never a size.
pub fn value_info_type(v: &ValueInfoProto) -> Option<TensorType> {
    let t = match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t,
        _ => return None,
    };
    let shape = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .enumerate()
            .map(|(i, d)| match &d.value {
                // exporters write -1 (and some 0) for a dynamic size: never a real size of an input
                Some(tensor_shape_proto::dimension::Value::DimValue(v)) if *v > 0 => Dim::Known(*v),
                Some(tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                    Dim::Sym(p.clone())
                }
                _ => Dim::Sym(unnamed_dim(v.name(), i)),
            })
            .collect()
    });
    Some(TensorType {
        dtype: t.elem_type(),
        shape,
    })
}

/// Infer types and shapes for every tensor of the model, with input-shape bindings.
///
/// A binding (`("x", [1, 3, 48, 320])`) gives an input its concrete shape: it must have the
/// declared rank and agree with every fixed dim; each symbolic dim it covers (`N`, or `x_dim2` for
/// a dim declared as -1 or 0) takes its size everywhere that symbol appears, in the other inputs
/// too. One symbol given two sizes is an error. With no bindings every symbol stays symbolic;
/// [`ShapeInfo::unbound_symbols`] and `cost::count` say which remain.
pub fn infer(model: &Model, overrides: &[(String, Vec<i64>)]) -> Result<ShapeInfo> {
    let mut cx = Cx {
        info: ShapeInfo::default(),
        vals: HashMap::new(),
        floats: HashMap::new(),
        opset: model.opset("").unwrap_or(13),
    };
    let inputs = model.inputs();
    let mut given: BTreeSet<&str> = BTreeSet::new();
    for (name, _) in overrides {
        if !inputs.iter().any(|v| v.name() == name) {
            let names: Vec<&str> = inputs.iter().map(|v| v.name()).collect();
            return Err(Error::Override(format!(
                "the model has no input '{name}' (inputs: {})",
                names.join(", ")
            )));
        }
        if !given.insert(name) {
            return Err(Error::Override(format!("input '{name}' is given twice")));
        }
    }
    let declared: Vec<TensorType> = inputs
        .iter()
        .map(|v| {
            value_info_type(v).unwrap_or(TensorType {
                dtype: DataType::Float as i32,
                shape: None,
            })
        })
        .collect();
    for (v, ty) in inputs.iter().zip(&declared) {
        for (axis, d) in ty.shape.iter().flatten().enumerate() {
            if let Dim::Sym(s) = d {
                cx.info.input_dims.push(InputDim {
                    symbol: s.clone(),
                    input: v.name().to_string(),
                    axis,
                    rank: ty.shape.as_ref().map_or(0, Vec::len),
                });
            }
        }
    }
    let mut bound_by: BTreeMap<String, (i64, String)> = BTreeMap::new();
    for (v, ty) in inputs.iter().zip(&declared) {
        let Some((_, dims)) = overrides.iter().find(|(n, _)| n == v.name()) else {
            continue;
        };
        let Some(decl) = &ty.shape else { continue };
        if decl.len() != dims.len() {
            return Err(Error::Override(format!(
                "input '{}' has rank {} {}, the override gives {} dims",
                v.name(),
                decl.len(),
                describe_shape(Some(decl)),
                dims.len()
            )));
        }
        for (i, (d, &o)) in decl.iter().zip(dims).enumerate() {
            match d {
                Dim::Known(k) if *k != o => {
                    return Err(Error::Override(format!(
                        "input '{}' has fixed size {k} at axis {i}; the override gives {o}",
                        v.name()
                    )));
                }
                Dim::Known(_) => {}
                Dim::Sym(s) => match bound_by.get(s) {
                    Some((prev, from)) if *prev != o => {
                        return Err(Error::Override(format!(
                            "input '{}' sets {s}={o} at axis {i}, but input '{from}' sets {s}={prev}",
                            v.name()
                        )));
                    }
                    Some(_) => {}
                    None => {
                        bound_by.insert(s.clone(), (o, v.name().to_string()));
                    }
                },
            }
        }
    }
    cx.info.bound = bound_by.into_iter().map(|(s, (v, _))| (s, v)).collect();
    for (v, mut ty) in inputs.iter().zip(declared) {
        if let Some((_, dims)) = overrides.iter().find(|(n, _)| n == v.name()) {
            ty.shape = Some(known_shape(dims));
        } else if let Some(shape) = &mut ty.shape {
            for d in shape.iter_mut() {
                if let Dim::Sym(s) = d
                    && let Some(&k) = cx.info.bound.get(s)
                {
                    *d = Dim::Known(k);
                }
            }
        }
        cx.info.types.insert(v.name().to_string(), ty);
    }
    for t in &model.graph().initializer {
        cx.add_initializer(t);
    }
    for n in &model.graph().node {
        cx.node(n)?;
    }
    Ok(cx.info)
}

/// Write bindings into the model itself: each bound input's declared shape becomes its concrete
/// shape, and every symbol a binding fixed becomes that size wherever the graph's inputs, outputs
/// and value_info declare it. Then `infer(model, &[])` (as passes call it) sees the bound shapes.
/// Checks the bindings as [`infer`] does. Keep a copy of the declared shapes to restore them
/// (for instance with [`declared_io`] and [`restore_io`]) before writing a model meant to stay
/// dynamic.
pub fn bind_inputs(model: &mut Model, overrides: &[(String, Vec<i64>)]) -> Result<()> {
    let info = infer(model, overrides)?;
    bind_symbols(model, &info.bound);
    Ok(())
}

/// Give each symbol of `sizes` (`N`, `x_dim2`) its size wherever the graph's inputs, outputs and
/// value_info declare it; other dims stay as they are. The sizes are not checked: take them from
/// [`infer`]'s `bound` (or a part of it, leaving a batch axis symbolic).
pub fn bind_symbols(model: &mut Model, sizes: &BTreeMap<String, i64>) {
    use tensor_shape_proto::dimension::Value as D;
    let fix = |v: &mut ValueInfoProto| {
        let name = v.name().to_string();
        let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            return;
        };
        let Some(shape) = t.shape.as_mut() else {
            return;
        };
        for (i, d) in shape.dim.iter_mut().enumerate() {
            let sym = match &d.value {
                Some(D::DimValue(k)) if *k > 0 => continue,
                Some(D::DimParam(p)) if !p.is_empty() => p.clone(),
                _ => unnamed_dim(&name, i),
            };
            if let Some(&k) = sizes.get(&sym) {
                d.value = Some(D::DimValue(k));
            }
        }
    };
    let g = model.graph_mut();
    for v in g
        .input
        .iter_mut()
        .chain(g.output.iter_mut())
        .chain(g.value_info.iter_mut())
    {
        fix(v);
    }
}

/// The graph's declared inputs, outputs and value_info, to put back with [`restore_io`].
pub fn declared_io(model: &Model) -> DeclaredIo {
    let g = model.graph();
    DeclaredIo {
        input: g.input.clone(),
        output: g.output.clone(),
        value_info: g.value_info.clone(),
    }
}

/// A copy of a graph's declared inputs, outputs and value_info (see [`declared_io`]).
#[derive(Debug, Clone)]
pub struct DeclaredIo {
    input: Vec<ValueInfoProto>,
    output: Vec<ValueInfoProto>,
    value_info: Vec<ValueInfoProto>,
}

/// Make dynamic again the dims that were dynamic in the declarations saved by [`declared_io`]
/// (matched by tensor name and axis, where the rank is unchanged); sizes a pass changed stay
/// changed, entries a pass removed stay removed and entries it added stay as they are.
pub fn restore_io(model: &mut Model, saved: &DeclaredIo) {
    use tensor_shape_proto::dimension::Value as D;
    fn dims(v: &mut ValueInfoProto) -> Option<&mut Vec<tensor_shape_proto::Dimension>> {
        match v.r#type.as_mut()?.value.as_mut()? {
            type_proto::Value::TensorType(t) => Some(&mut t.shape.as_mut()?.dim),
            _ => None,
        }
    }
    let put = |now: &mut Vec<ValueInfoProto>, old: &[ValueInfoProto]| {
        for v in now.iter_mut() {
            let Some(mut o) = old.iter().find(|o| o.name() == v.name()).cloned() else {
                continue;
            };
            let (Some(now_dims), Some(old_dims)) = (dims(v), dims(&mut o)) else {
                continue;
            };
            if now_dims.len() != old_dims.len() {
                continue;
            }
            for (n, o) in now_dims.iter_mut().zip(old_dims.iter()) {
                if !matches!(o.value, Some(D::DimValue(k)) if k > 0) {
                    *n = o.clone();
                }
            }
        }
    };
    let g = model.graph_mut();
    put(&mut g.input, &saved.input);
    put(&mut g.output, &saved.output);
    put(&mut g.value_info, &saved.value_info);
}

struct Cx {
    info: ShapeInfo,
    /// Values of small integer tensors (flattened), symbolic where they come from shapes.
    vals: HashMap<String, Vec<Dim>>,
    /// Values of small float initializers (Resize scales).
    floats: HashMap<String, Vec<f32>>,
    opset: i64,
}

const MAX_TRACKED: u64 = 64;

fn known_shape(dims: &[i64]) -> Vec<Dim> {
    dims.iter().map(|&d| Dim::Known(d)).collect()
}

impl Cx {
    fn add_initializer(&mut self, t: &TensorProto) {
        let name = t.name().to_string();
        self.info.types.insert(
            name.clone(),
            TensorType {
                dtype: t.data_type(),
                shape: Some(known_shape(&t.dims)),
            },
        );
        if tensor::element_count(t).is_ok_and(|n| n <= MAX_TRACKED) {
            let dt = t.data_type();
            let is_int = matches!(
                DataType::try_from(dt),
                Ok(DataType::Int64
                    | DataType::Int32
                    | DataType::Int16
                    | DataType::Int8
                    | DataType::Uint8
                    | DataType::Bool)
            );
            if is_int {
                if let Ok(v) = tensor::to_i64(t) {
                    self.vals
                        .insert(name, v.into_iter().map(Dim::Known).collect());
                }
            } else if let Ok(v) = tensor::to_f32(t) {
                self.floats.insert(name, v);
            }
        }
    }

    fn ty(&self, name: &str) -> Option<&TensorType> {
        if name.is_empty() {
            return None;
        }
        self.info.types.get(name)
    }

    fn shape(&self, n: &NodeProto, i: usize) -> Option<Vec<Dim>> {
        n.input
            .get(i)
            .and_then(|x| self.ty(x))
            .and_then(|t| t.shape.clone())
    }

    fn dtype(&self, n: &NodeProto, i: usize) -> i32 {
        n.input
            .get(i)
            .and_then(|x| self.ty(x))
            .map(|t| t.dtype)
            .unwrap_or(DataType::Float as i32)
    }

    fn val(&self, n: &NodeProto, i: usize) -> Option<&Vec<Dim>> {
        n.input
            .get(i)
            .filter(|x| !x.is_empty())
            .and_then(|x| self.vals.get(x))
    }

    fn known_val(&self, n: &NodeProto, i: usize) -> Option<Vec<i64>> {
        self.val(n, i)?.iter().map(|d| d.known()).collect()
    }

    fn set(&mut self, n: &NodeProto, i: usize, dtype: i32, shape: Option<Vec<Dim>>) {
        if let Some(o) = n.output.get(i).filter(|o| !o.is_empty()) {
            self.info
                .types
                .insert(o.clone(), TensorType { dtype, shape });
        }
    }

    fn set_val(&mut self, n: &NodeProto, v: Vec<Dim>) {
        if let Some(o) = n.output.first() {
            self.vals.insert(o.clone(), v);
        }
    }

    fn err(&self, n: &NodeProto, reason: String) -> Error {
        Error::Shape {
            node: node_label(n),
            op: n.op_type().to_string(),
            reason,
        }
    }

    /// Axes from the attribute (older opsets) or from input `i` (newer ones).
    fn axes(&self, n: &NodeProto, i: usize) -> Option<Vec<i64>> {
        if let Some(a) = n.attr_ints("axes") {
            return Some(a.to_vec());
        }
        self.known_val(n, i)
    }

    fn node(&mut self, n: &NodeProto) -> Result<()> {
        if !n.domain().is_empty() && n.domain() != "ai.onnx" {
            self.info
                .unknown_ops
                .insert(format!("{}:{}", n.domain(), n.op_type()));
            return Ok(());
        }
        let op = n.op_type();
        let dt0 = self.dtype(n, 0);
        let s0 = self.shape(n, 0);
        match op {
            "Relu"
            | "LeakyRelu"
            | "Clip"
            | "Sigmoid"
            | "HardSigmoid"
            | "HardSwish"
            | "Tanh"
            | "Erf"
            | "Sqrt"
            | "Exp"
            | "Log"
            | "Neg"
            | "Abs"
            | "Identity"
            | "Softmax"
            | "LogSoftmax"
            | "Elu"
            | "Selu"
            | "Celu"
            | "Softplus"
            | "Softsign"
            | "Reciprocal"
            | "Floor"
            | "Ceil"
            | "Round"
            | "Sign"
            | "Sin"
            | "Cos"
            | "Gelu"
            | "Mish"
            | "ThresholdedRelu"
            | "Hardmax"
            | "CumSum"
            | "Trilu"
            | "LRN"
            | "InstanceNormalization"
            | "BatchNormalization"
            | "LayerNormalization"
            | "GroupNormalization"
            | "Dropout"
            | "Not"
            | "PRelu" => {
                if op == "PRelu" {
                    let s1 = self.shape(n, 1);
                    let out = self.broadcast(n, &[s0.clone(), s1])?;
                    self.set(n, 0, dt0, out);
                } else {
                    self.set(n, 0, dt0, s0.clone());
                }
                if op == "Dropout" {
                    self.set(n, 1, DataType::Bool as i32, s0.clone());
                }
                if op == "Identity"
                    && let Some(v) = self.val(n, 0).cloned()
                {
                    self.set_val(n, v);
                }
            }
            "IsNaN" | "IsInf" => self.set(n, 0, DataType::Bool as i32, s0),
            "QuantizeLinear" => {
                // the zero point's type, uint8 without one
                let dt = if n.input.get(2).is_some_and(|z| !z.is_empty()) {
                    self.dtype(n, 2)
                } else {
                    DataType::Uint8 as i32
                };
                self.set(n, 0, dt, s0);
            }
            "DequantizeLinear" => self.set(n, 0, self.dtype(n, 1), s0),
            "Cast" => {
                let to = n.attr_int("to").unwrap_or(1) as i32;
                self.set(n, 0, to, s0);
                if let Some(v) = self.val(n, 0).cloned() {
                    self.set_val(n, v);
                }
            }
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Sum" | "Mean" | "Mod"
            | "BitShift" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual"
            | "And" | "Or" | "Xor" | "Where" => {
                let shapes: Vec<_> = (0..n.input.len()).map(|i| self.shape(n, i)).collect();
                let out = self.broadcast(n, &shapes)?;
                let dt = match op {
                    "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And"
                    | "Or" | "Xor" => DataType::Bool as i32,
                    "Where" => self.dtype(n, 1),
                    _ => dt0,
                };
                self.set(n, 0, dt, out);
                self.eval_arith(n);
            }
            "Conv" | "ConvInteger" => self.conv(n, s0, dt0)?,
            "ConvTranspose" => self.conv_transpose(n, s0, dt0)?,
            "MaxPool" | "AveragePool" | "LpPool" => {
                let out = s0.and_then(|s| {
                    let k = n.attr_ints("kernel_shape")?.to_vec();
                    let mut out = s[..2.min(s.len())].to_vec();
                    out.extend(self.spatial(n, &s, &k));
                    Some(out)
                });
                self.set(n, 0, dt0, out.clone());
                self.set(n, 1, DataType::Int64 as i32, out);
            }
            "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
                let out = s0.map(|s| {
                    s.iter()
                        .enumerate()
                        .map(|(i, d)| if i < 2 { d.clone() } else { Dim::Known(1) })
                        .collect()
                });
                self.set(n, 0, dt0, out);
            }
            "Gemm" => {
                let a = s0;
                let b = self.shape(n, 1);
                let out = match (a, b) {
                    (Some(a), Some(b)) if a.len() == 2 && b.len() == 2 => {
                        let ta = n.attr_int("transA").unwrap_or(0) != 0;
                        let tb = n.attr_int("transB").unwrap_or(0) != 0;
                        let (m, ka) = if ta { (&a[1], &a[0]) } else { (&a[0], &a[1]) };
                        let (kb, nn) = if tb { (&b[1], &b[0]) } else { (&b[0], &b[1]) };
                        if let (Dim::Known(x), Dim::Known(y)) = (ka, kb)
                            && x != y
                        {
                            return Err(self.err(
                                n,
                                format!(
                                    "A {} and B {} have inner sizes {x} and {y}",
                                    describe_shape(Some(&a)),
                                    describe_shape(Some(&b))
                                ),
                            ));
                        }
                        Some(vec![m.clone(), nn.clone()])
                    }
                    _ => None,
                };
                self.set(n, 0, dt0, out);
            }
            "MatMul" | "MatMulInteger" => {
                let out = match (s0, self.shape(n, 1)) {
                    (Some(a), Some(b)) => self.matmul(n, a, b)?,
                    _ => None,
                };
                let dt = if op == "MatMulInteger" {
                    DataType::Int32 as i32
                } else {
                    dt0
                };
                self.set(n, 0, dt, out);
            }
            "Concat" => self.concat(n, dt0)?,
            "Split" => self.split(n, s0, dt0),
            "Slice" => self.slice(n, s0, dt0),
            "Reshape" => self.reshape(n, s0, dt0)?,
            "Transpose" => {
                let out = s0.map(|s| {
                    let perm: Vec<i64> = n
                        .attr_ints("perm")
                        .map(|p| p.to_vec())
                        .unwrap_or_else(|| (0..s.len() as i64).rev().collect());
                    perm.iter()
                        .map(|&p| s.get(p as usize).cloned().unwrap_or(Dim::Known(1)))
                        .collect()
                });
                self.set(n, 0, dt0, out);
            }
            "Flatten" => {
                let out = s0.map(|s| {
                    let r = s.len() as i64;
                    let mut axis = n.attr_int("axis").unwrap_or(1);
                    if axis < 0 {
                        axis += r;
                    }
                    let axis = axis.clamp(0, r) as usize;
                    vec![dims_product(&s[..axis]), dims_product(&s[axis..])]
                });
                self.set(n, 0, dt0, out);
            }
            "Squeeze" => {
                let axes = if self.opset >= 13 {
                    self.known_val(n, 1)
                } else {
                    n.attr_ints("axes").map(|a| a.to_vec())
                };
                let out = s0.map(|s| {
                    let r = s.len() as i64;
                    let axes: Vec<usize> = match &axes {
                        Some(a) => a
                            .iter()
                            .map(|&x| if x < 0 { x + r } else { x } as usize)
                            .collect(),
                        None => (0..s.len()).filter(|&i| s[i] == Dim::Known(1)).collect(),
                    };
                    s.iter()
                        .enumerate()
                        .filter(|(i, _)| !axes.contains(i))
                        .map(|(_, d)| d.clone())
                        .collect::<Vec<_>>()
                });
                self.set(n, 0, dt0, out);
                if let Some(v) = self.val(n, 0).cloned() {
                    self.set_val(n, v);
                }
            }
            "Unsqueeze" => {
                let axes = self.axes(n, 1);
                let out = match (s0, axes) {
                    (Some(s), Some(axes)) => {
                        let r = (s.len() + axes.len()) as i64;
                        let mut axes: Vec<usize> = axes
                            .iter()
                            .map(|&x| if x < 0 { x + r } else { x } as usize)
                            .collect();
                        axes.sort();
                        let mut out = s.clone();
                        for a in axes {
                            out.insert(a.min(out.len()), Dim::Known(1));
                        }
                        Some(out)
                    }
                    _ => None,
                };
                self.set(n, 0, dt0, out);
                if let Some(v) = self.val(n, 0).cloned() {
                    self.set_val(n, v);
                }
            }
            "Shape" => {
                if let Some(s) = s0 {
                    let r = s.len() as i64;
                    let norm = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                    let start = norm(n.attr_int("start").unwrap_or(0));
                    let end = norm(n.attr_int("end").unwrap_or(r));
                    let v: Vec<Dim> = s[start..end.max(start)].to_vec();
                    self.set(
                        n,
                        0,
                        DataType::Int64 as i32,
                        Some(vec![Dim::Known(v.len() as i64)]),
                    );
                    self.set_val(n, v);
                } else {
                    self.set(n, 0, DataType::Int64 as i32, None);
                }
            }
            "Size" => {
                self.set(n, 0, DataType::Int64 as i32, Some(vec![]));
                if let Some(s) = s0 {
                    self.set_val(n, vec![dims_product(&s)]);
                }
            }
            "Gather" => self.gather(n, s0, dt0),
            "ConstantOfShape" => {
                let dt = n
                    .attr_tensor("value")
                    .map(|t| t.data_type())
                    .unwrap_or(DataType::Float as i32);
                let out = self.val(n, 0).cloned();
                if let (Some(shape), Some(t)) = (&out, n.attr_tensor("value"))
                    && shape.iter().all(|d| d.known().is_some())
                    && dims_product(shape)
                        .known()
                        .is_some_and(|c| c as u64 <= MAX_TRACKED)
                    && let Ok(v) = tensor::to_i64(t)
                    && let Some(&fill) = v.first()
                {
                    let count = dims_product(shape).known().unwrap_or(0) as usize;
                    self.set_val(n, vec![Dim::Known(fill); count]);
                }
                self.set(n, 0, dt, out);
            }
            "Constant" => {
                let t = n.attr_tensor("value");
                let shape = t.map(|t| known_shape(&t.dims)).or(Some(vec![]));
                let dt = t.map(|t| t.data_type()).unwrap_or(DataType::Float as i32);
                self.set(n, 0, dt, shape);
                if let Some(t) = t
                    && let Ok(v) = tensor::to_i64(t)
                    && v.len() as u64 <= MAX_TRACKED
                {
                    self.set_val(n, v.into_iter().map(Dim::Known).collect());
                }
            }
            "Range" => {
                let len = match (
                    self.known_val(n, 0),
                    self.known_val(n, 1),
                    self.known_val(n, 2),
                ) {
                    (Some(a), Some(b), Some(c))
                        if a.len() == 1 && b.len() == 1 && c.len() == 1 && c[0] != 0 =>
                    {
                        // in f64: `limit - start` may not fit in i64; the cast saturates
                        Dim::Known(
                            ((b[0] as f64 - a[0] as f64) / c[0] as f64).ceil().max(0.0) as i64
                        )
                    }
                    _ => match (self.known_val(n, 0), self.val(n, 1), self.known_val(n, 2)) {
                        (Some(a), Some(b), Some(c)) if a == [0] && c == [1] && b.len() == 1 => {
                            b[0].clone()
                        }
                        _ => Dim::Sym(format!("{}_len", node_label(n))),
                    },
                };
                self.set(n, 0, dt0, Some(vec![len]));
            }
            "Expand" => {
                let target = self.val(n, 1).cloned();
                let out = match target {
                    Some(t) => self.broadcast(n, &[s0, Some(t)])?,
                    None => None,
                };
                self.set(n, 0, dt0, out);
            }
            "Tile" => {
                let out = match (s0, self.known_val(n, 1)) {
                    (Some(s), Some(r)) if r.len() == s.len() => Some(
                        s.iter()
                            .zip(&r)
                            .map(|(d, &k)| dim_mul(d, &Dim::Known(k)))
                            .collect(),
                    ),
                    _ => None,
                };
                self.set(n, 0, dt0, out);
            }
            "Pad" => {
                let pads = if self.opset >= 11 {
                    self.known_val(n, 1)
                } else {
                    n.attr_ints("pads").map(|p| p.to_vec())
                };
                let out = match (s0, pads) {
                    (Some(s), Some(p)) if p.len() == 2 * s.len() => {
                        let r = s.len();
                        Some(
                            s.iter()
                                .enumerate()
                                .map(|(i, d)| {
                                    let total = p[i].saturating_add(p[i + r]);
                                    match d {
                                        Dim::Known(v) => Dim::Known(v.saturating_add(total)),
                                        other if total == 0 => other.clone(),
                                        _ => Dim::Sym(format!("{d}+{total}")),
                                    }
                                })
                                .collect(),
                        )
                    }
                    _ => None,
                };
                self.set(n, 0, dt0, out);
            }
            "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1"
            | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare" | "ArgMax"
            | "ArgMin" => {
                let keep = n.attr_int("keepdims").unwrap_or(1) != 0;
                let axes: Option<Vec<i64>> = if op.starts_with("Arg") {
                    Some(vec![n.attr_int("axis").unwrap_or(0)])
                } else {
                    self.axes(n, 1)
                };
                let noop = n.attr_int("noop_with_empty_axes").unwrap_or(0) != 0;
                let has_axes_input = n.input.len() > 1 && !n.input[1].is_empty();
                let out = s0.and_then(|s| {
                    let r = s.len() as i64;
                    let axes: Vec<usize> = match axes {
                        Some(a) if !a.is_empty() => a
                            .iter()
                            .map(|&x| if x < 0 { x + r } else { x } as usize)
                            .collect(),
                        _ if has_axes_input => return None,
                        _ if noop => return Some(s.clone()),
                        _ => (0..s.len()).collect(),
                    };
                    Some(
                        s.iter()
                            .enumerate()
                            .filter_map(|(i, d)| match (axes.contains(&i), keep) {
                                (false, _) => Some(d.clone()),
                                (true, true) => Some(Dim::Known(1)),
                                (true, false) => None,
                            })
                            .collect(),
                    )
                });
                let dt = if op.starts_with("Arg") {
                    DataType::Int64 as i32
                } else {
                    dt0
                };
                self.set(n, 0, dt, out);
            }
            "Resize" | "Upsample" => {
                let out = s0.and_then(|s| {
                    let sizes_i = if op == "Resize" { 3 } else { usize::MAX };
                    let scales_i = if op == "Upsample" {
                        1
                    } else if self.opset >= 11 {
                        2
                    } else {
                        1
                    };
                    if let Some(sz) = self.known_val(n, sizes_i).filter(|v| v.len() == s.len()) {
                        return Some(known_shape(&sz));
                    }
                    let scales = n
                        .input
                        .get(scales_i)
                        .and_then(|x| self.floats.get(x))
                        .cloned()
                        .or_else(|| n.attr_floats("scales").map(|f| f.to_vec()))?;
                    if scales.len() != s.len() {
                        return None;
                    }
                    Some(
                        s.iter()
                            .zip(&scales)
                            .map(|(d, &k)| match d {
                                Dim::Known(v) => Dim::Known((*v as f64 * k as f64).floor() as i64),
                                other if k == 1.0 => other.clone(),
                                other => Dim::Sym(format!("{other}*{k}")),
                            })
                            .collect(),
                    )
                });
                self.set(n, 0, dt0, out);
            }
            "TopK" => {
                let k = self.known_val(n, 1).and_then(|v| v.first().copied());
                let out = s0.and_then(|mut s| {
                    let r = s.len() as i64;
                    let mut axis = n.attr_int("axis").unwrap_or(-1);
                    if axis < 0 {
                        axis += r;
                    }
                    *s.get_mut(axis as usize)? = Dim::Known(k?);
                    Some(s)
                });
                self.set(n, 0, dt0, out.clone());
                self.set(n, 1, DataType::Int64 as i32, out);
            }
            _ => {
                self.info.unknown_ops.insert(op.to_string());
            }
        }
        Ok(())
    }

    fn broadcast(&self, n: &NodeProto, shapes: &[Option<Vec<Dim>>]) -> Result<Option<Vec<Dim>>> {
        let mut out: Vec<Dim> = vec![];
        for s in shapes {
            let Some(s) = s else { return Ok(None) };
            let r = out.len().max(s.len());
            let mut next = Vec::with_capacity(r);
            for i in 0..r {
                let a = (i + out.len()).checked_sub(r).map(|j| &out[j]);
                let b = (i + s.len()).checked_sub(r).map(|j| &s[j]);
                next.push(match (a, b) {
                    (Some(a), None) => a.clone(),
                    (None, Some(b)) => b.clone(),
                    (Some(a), Some(b)) => match (a, b) {
                        (Dim::Known(1), x) | (x, Dim::Known(1)) => x.clone(),
                        (Dim::Known(x), Dim::Known(y)) if x != y => {
                            let list: Vec<String> = shapes
                                .iter()
                                .map(|s| describe_shape(s.as_deref()))
                                .collect();
                            return Err(self.err(
                                n,
                                format!("shapes {} do not broadcast", list.join(" and ")),
                            ));
                        }
                        (Dim::Known(_), _) => a.clone(),
                        (_, Dim::Known(_)) => b.clone(),
                        _ => a.clone(),
                    },
                    (None, None) => Dim::Known(1),
                });
            }
            out = next;
        }
        Ok(Some(out))
    }

    /// Evaluate elementwise arithmetic on tracked integer values (shape computations).
    fn eval_arith(&mut self, n: &NodeProto) {
        let op = n.op_type();
        if !matches!(op, "Add" | "Sub" | "Mul" | "Div" | "Equal" | "Where") {
            return;
        }
        if op == "Where" {
            if let (Some(c), Some(a), Some(b)) =
                (self.known_val(n, 0), self.val(n, 1), self.val(n, 2))
            {
                let len = c.len().max(a.len()).max(b.len());
                let pick =
                    |v: &Vec<Dim>, i: usize| v.get(if v.len() == 1 { 0 } else { i }).cloned();
                let out: Option<Vec<Dim>> = (0..len)
                    .map(|i| {
                        let ci = *c.get(if c.len() == 1 { 0 } else { i })?;
                        if ci != 0 { pick(a, i) } else { pick(b, i) }
                    })
                    .collect();
                if let Some(out) = out {
                    self.set_val(n, out);
                }
            }
            return;
        }
        let (Some(a), Some(b)) = (self.val(n, 0), self.val(n, 1)) else {
            return;
        };
        let len = a.len().max(b.len());
        let get = |v: &Vec<Dim>, i: usize| v.get(if v.len() == 1 { 0 } else { i }).cloned();
        let out: Option<Vec<Dim>> = (0..len)
            .map(|i| {
                let (x, y) = (get(a, i)?, get(b, i)?);
                match (op, &x, &y) {
                    ("Add", Dim::Known(p), Dim::Known(q)) => p.checked_add(*q).map(Dim::Known),
                    ("Sub", Dim::Known(p), Dim::Known(q)) => p.checked_sub(*q).map(Dim::Known),
                    ("Mul", _, _) => Some(dim_mul(&x, &y)),
                    ("Div", Dim::Known(p), Dim::Known(q)) if *q != 0 => {
                        p.checked_div(*q).map(Dim::Known)
                    }
                    ("Div", _, _) => dim_div(&x, &y),
                    ("Equal", _, _) if x.known().is_some() && y.known().is_some() => {
                        Some(Dim::Known((x == y) as i64))
                    }
                    // a size is never negative: `shape == -1` is false for a symbolic size
                    ("Equal", Dim::Sym(_), Dim::Known(k))
                    | ("Equal", Dim::Known(k), Dim::Sym(_))
                        if *k < 0 =>
                    {
                        Some(Dim::Known(0))
                    }
                    _ => None,
                }
            })
            .collect();
        if let Some(out) = out {
            self.set_val(n, out);
        }
    }

    fn spatial(&self, n: &NodeProto, s: &[Dim], k: &[i64]) -> Vec<Dim> {
        let nsp = k.len();
        let strides = n.attr_ints_or("strides", 1, nsp);
        let dil = n.attr_ints_or("dilations", 1, nsp);
        let pads = n.attr_ints_or("pads", 0, 2 * nsp);
        let auto = n.attr_str("auto_pad").unwrap_or_default();
        let ceil = n.attr_int("ceil_mode").unwrap_or(0) != 0;
        (0..nsp)
            .map(|i| {
                let d = s.get(i + 2).cloned().unwrap_or(Dim::Known(1));
                let st = *strides.get(i).unwrap_or(&1).max(&1);
                let dl = *dil.get(i).unwrap_or(&1);
                let Dim::Known(x) = d else {
                    if st != 1 {
                        return Dim::Sym(format!("{d}/{st}"));
                    }
                    if auto.starts_with("SAME") {
                        return d;
                    }
                    // stride 1: the size changes by the padding less the dilated kernel's reach
                    let (pb, pe) = if auto == "VALID" {
                        (0, 0)
                    } else {
                        (*pads.get(i).unwrap_or(&0), *pads.get(i + nsp).unwrap_or(&0))
                    };
                    let delta = pb
                        .saturating_add(pe)
                        .saturating_sub(dl.saturating_mul(k[i].saturating_sub(1)));
                    return match delta {
                        0 => d,
                        n if n > 0 => Dim::Sym(format!("{d}+{n}")),
                        n => Dim::Sym(format!("{d}-{}", n.saturating_neg())),
                    };
                };
                match auto.as_str() {
                    "SAME_UPPER" | "SAME_LOWER" => Dim::Known(x.saturating_add(st - 1) / st),
                    _ => {
                        let (pb, pe) = if auto == "VALID" {
                            (0, 0)
                        } else {
                            (*pads.get(i).unwrap_or(&0), *pads.get(i + nsp).unwrap_or(&0))
                        };
                        let span = x
                            .saturating_add(pb)
                            .saturating_add(pe)
                            .saturating_sub(dl.saturating_mul(k[i].saturating_sub(1)))
                            .saturating_sub(1);
                        let o = if ceil {
                            let o = span.saturating_add(st - 1).div_euclid(st).saturating_add(1);
                            // the last window must start inside the input or left padding
                            if (o.saturating_sub(1)).saturating_mul(st) >= x.saturating_add(pb) {
                                o.saturating_sub(1)
                            } else {
                                o
                            }
                        } else {
                            span.div_euclid(st).saturating_add(1)
                        };
                        Dim::Known(o)
                    }
                }
            })
            .collect()
    }

    fn conv(&mut self, n: &NodeProto, s0: Option<Vec<Dim>>, dt: i32) -> Result<()> {
        let w = self.shape(n, 1);
        let out = match (s0, w) {
            (Some(x), Some(w)) if x.len() >= 3 && w.len() == x.len() => {
                let g = n.attr_int("group").unwrap_or(1);
                if let (Dim::Known(c), Dim::Known(wc)) = (&x[1], &w[1])
                    && *c != wc.saturating_mul(g)
                {
                    return Err(self.err(
                        n,
                        format!(
                            "input {} has {c} channels but weight {} with group {g} expects {}",
                            describe_shape(Some(&x)),
                            describe_shape(Some(&w)),
                            wc.saturating_mul(g)
                        ),
                    ));
                }
                let k: Vec<i64> = match n.attr_ints("kernel_shape") {
                    Some(k) => k.to_vec(),
                    None => w[2..].iter().map(|d| d.known().unwrap_or(1)).collect(),
                };
                let mut out = vec![x[0].clone(), w[0].clone()];
                out.extend(self.spatial(n, &x, &k));
                Some(out)
            }
            _ => None,
        };
        self.set(n, 0, dt, out);
        Ok(())
    }

    fn conv_transpose(&mut self, n: &NodeProto, s0: Option<Vec<Dim>>, dt: i32) -> Result<()> {
        let w = self.shape(n, 1);
        let out = match (s0, w) {
            (Some(x), Some(w)) if x.len() >= 3 && w.len() == x.len() => {
                let g = n.attr_int("group").unwrap_or(1);
                let nsp = x.len() - 2;
                let mut out = vec![x[0].clone(), dim_mul(&w[1], &Dim::Known(g))];
                if let Some(os) = n.attr_ints("output_shape") {
                    out.extend(os.iter().rev().take(nsp).rev().map(|&v| Dim::Known(v)));
                } else {
                    let k: Vec<i64> = match n.attr_ints("kernel_shape") {
                        Some(k) => k.to_vec(),
                        None => w[2..].iter().map(|d| d.known().unwrap_or(1)).collect(),
                    };
                    let st = n.attr_ints_or("strides", 1, nsp);
                    let dl = n.attr_ints_or("dilations", 1, nsp);
                    let pads = n.attr_ints_or("pads", 0, 2 * nsp);
                    let op = n.attr_ints_or("output_padding", 0, nsp);
                    let auto = n.attr_str("auto_pad").unwrap_or_default();
                    for i in 0..nsp {
                        let s = st.get(i).copied().unwrap_or(1);
                        out.push(match &x[i + 2] {
                            Dim::Known(v) if auto.starts_with("SAME") => {
                                Dim::Known(v.saturating_mul(s))
                            }
                            Dim::Known(v) => Dim::Known(
                                s.saturating_mul(v - 1)
                                    .saturating_add(op.get(i).copied().unwrap_or(0))
                                    .saturating_add(
                                        (k.get(i).copied().unwrap_or(1) - 1)
                                            .saturating_mul(dl.get(i).copied().unwrap_or(1)),
                                    )
                                    .saturating_add(1)
                                    .saturating_sub(pads.get(i).copied().unwrap_or(0))
                                    .saturating_sub(pads.get(i + nsp).copied().unwrap_or(0)),
                            ),
                            d => Dim::Sym(format!("{d}*{s}")),
                        });
                    }
                }
                Some(out)
            }
            _ => None,
        };
        self.set(n, 0, dt, out);
        Ok(())
    }

    fn matmul(&self, n: &NodeProto, a: Vec<Dim>, b: Vec<Dim>) -> Result<Option<Vec<Dim>>> {
        if a.is_empty() || b.is_empty() {
            return Ok(None);
        }
        let (a2, drop_m) = if a.len() == 1 {
            (vec![Dim::Known(1), a[0].clone()], true)
        } else {
            (a.clone(), false)
        };
        let (b2, drop_n) = if b.len() == 1 {
            (vec![b[0].clone(), Dim::Known(1)], true)
        } else {
            (b.clone(), false)
        };
        let ka = &a2[a2.len() - 1];
        let kb = &b2[b2.len() - 2];
        if let (Dim::Known(x), Dim::Known(y)) = (ka, kb)
            && x != y
        {
            return Err(self.err(
                n,
                format!(
                    "{} x {}: inner sizes {x} and {y} differ",
                    describe_shape(Some(&a)),
                    describe_shape(Some(&b))
                ),
            ));
        }
        let batch = self.broadcast(
            n,
            &[
                Some(a2[..a2.len() - 2].to_vec()),
                Some(b2[..b2.len() - 2].to_vec()),
            ],
        )?;
        let Some(mut out) = batch else {
            return Ok(None);
        };
        if !drop_m {
            out.push(a2[a2.len() - 2].clone());
        }
        if !drop_n {
            out.push(b2[b2.len() - 1].clone());
        }
        Ok(Some(out))
    }

    fn concat(&mut self, n: &NodeProto, dt: i32) -> Result<()> {
        let shapes: Option<Vec<Vec<Dim>>> = (0..n.input.len()).map(|i| self.shape(n, i)).collect();
        let out = match shapes {
            Some(shapes) if !shapes.is_empty() => {
                let r = shapes[0].len() as i64;
                let mut axis = n.attr_int("axis").unwrap_or(0);
                if axis < 0 {
                    axis += r;
                }
                let axis = axis as usize;
                let mut out = shapes[0].clone();
                if axis >= out.len() {
                    return Err(self.err(n, format!("axis {axis} is out of range for rank {r}")));
                }
                for s in &shapes[1..] {
                    if s.len() != out.len() {
                        return Err(self.err(
                            n,
                            format!("inputs have ranks {} and {}", out.len(), s.len()),
                        ));
                    }
                    for i in 0..s.len() {
                        if i == axis {
                            out[i] = match (&out[i], &s[i]) {
                                (Dim::Known(a), Dim::Known(b)) => Dim::Known(a.saturating_add(*b)),
                                (a, b) => Dim::Sym(format!("{a}+{b}")),
                            };
                        } else if let (Dim::Known(a), Dim::Known(b)) = (&out[i], &s[i])
                            && a != b
                        {
                            return Err(self.err(
                                n,
                                format!("inputs differ at axis {i} ({a} and {b}) outside the concat axis {axis}"),
                            ));
                        }
                    }
                }
                Some(out)
            }
            _ => None,
        };
        self.set(n, 0, dt, out);
        let vals: Option<Vec<Dim>> = (0..n.input.len())
            .map(|i| self.val(n, i).cloned())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        if let Some(v) = vals {
            self.set_val(n, v);
        }
        Ok(())
    }

    fn split(&mut self, n: &NodeProto, s0: Option<Vec<Dim>>, dt: i32) {
        let outs = n.output.len();
        let Some(s) = s0 else {
            for i in 0..outs {
                self.set(n, i, dt, None);
            }
            return;
        };
        let r = s.len() as i64;
        let mut axis = n.attr_int("axis").unwrap_or(0);
        if axis < 0 {
            axis += r;
        }
        let axis = axis.clamp(0, (r - 1).max(0)) as usize;
        let sizes: Option<Vec<i64>> = n
            .attr_ints("split")
            .map(|v| v.to_vec())
            .or_else(|| self.known_val(n, 1))
            .or_else(|| {
                let total = s.get(axis)?.known()?;
                let k = outs as i64;
                let chunk = total.saturating_add(k - 1) / k;
                Some(
                    (0..k)
                        .map(|i| {
                            chunk
                                .min(total.saturating_sub(chunk.saturating_mul(i)))
                                .max(0)
                        })
                        .collect(),
                )
            });
        for i in 0..outs {
            let shape = sizes.as_ref().and_then(|sz| {
                let mut o = s.clone();
                *o.get_mut(axis)? = Dim::Known(*sz.get(i)?);
                Some(o)
            });
            self.set(n, i, dt, shape);
        }
    }

    fn slice(&mut self, n: &NodeProto, s0: Option<Vec<Dim>>, dt: i32) {
        let ints = |v: Option<&[i64]>| v.map(known_shape);
        let (starts, ends, axes, steps) = if self.opset >= 10 {
            (
                self.val(n, 1).cloned(),
                self.val(n, 2).cloned(),
                self.known_val(n, 3),
                self.known_val(n, 4),
            )
        } else {
            (
                ints(n.attr_ints("starts")),
                ints(n.attr_ints("ends")),
                n.attr_ints("axes").map(|v| v.to_vec()),
                None,
            )
        };
        let has_axes = if self.opset >= 10 {
            n.input.get(3).is_some_and(|x| !x.is_empty())
        } else {
            n.attr("axes").is_some()
        };
        let has_steps = self.opset >= 10 && n.input.get(4).is_some_and(|x| !x.is_empty());
        let out = (|| {
            let s = s0.clone()?;
            let (starts, ends) = (starts.clone()?, ends.clone()?);
            let r = s.len() as i64;
            let axes = match axes {
                Some(a) => a,
                None if has_axes => return None,
                None => (0..starts.len() as i64).collect(),
            };
            let steps = match steps {
                Some(st) => st,
                None if has_steps => return None,
                None => vec![1; starts.len()],
            };
            let mut out = s.clone();
            for (j, &a) in axes.iter().enumerate() {
                let a = if a < 0 { a + r } else { a } as usize;
                let step = *steps.get(j)?;
                if step == 0 || a >= out.len() {
                    return None;
                }
                out[a] = match (&s[a], starts.get(j)?, ends.get(j)?) {
                    (Dim::Known(d), Dim::Known(st), Dim::Known(en)) => {
                        Dim::Known(slice_len(*d, *st, *en, step))
                    }
                    (sym, Dim::Known(0), Dim::Known(en)) if *en >= i32::MAX as i64 && step == 1 => {
                        sym.clone()
                    }
                    // x[0:k] with a symbolic k (position ids cut to the sequence length)
                    (_, Dim::Known(0), en @ Dim::Sym(_)) if step == 1 => en.clone(),
                    (sym, st, en) => Dim::Sym(format!("{sym}[{st}:{en}:{step}]")),
                };
            }
            Some(out)
        })();
        self.set(n, 0, dt, out);
        if let (Some(v), Some(st), Some(en)) = (
            self.val(n, 0).cloned(),
            n_first(self.known_val(n, 1)),
            n_first(self.known_val(n, 2)),
        ) && self.opset >= 10
        {
            let len = v.len() as i64;
            let norm = |x: i64| (if x < 0 { x + len } else { x }).clamp(0, len) as usize;
            let (a, b) = (norm(st), norm(en));
            if a <= b && self.known_val(n, 4).is_none_or(|s| s == [1]) {
                self.set_val(n, v[a..b].to_vec());
            }
        }
    }

    fn reshape(&mut self, n: &NodeProto, s0: Option<Vec<Dim>>, dt: i32) -> Result<()> {
        let target: Option<Vec<Dim>> = if self.opset >= 5 {
            self.val(n, 1).cloned()
        } else {
            n.attr_ints("shape").map(known_shape)
        };
        let allowzero = n.attr_int("allowzero").unwrap_or(0) != 0;
        let out = match (s0.clone(), target) {
            (Some(s), Some(t)) => {
                let mut out: Vec<Dim> = t
                    .iter()
                    .enumerate()
                    .map(|(i, d)| match d {
                        Dim::Known(0) if !allowzero => s.get(i).cloned().unwrap_or(Dim::Known(0)),
                        other => other.clone(),
                    })
                    .collect();
                let total = dims_product(&s);
                if let Some(pos) = out.iter().position(|d| *d == Dim::Known(-1)) {
                    let rest: Vec<Dim> = out
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != pos)
                        .map(|(_, d)| d.clone())
                        .collect();
                    out[pos] = dim_div(&total, &dims_product(&rest))
                        .unwrap_or_else(|| Dim::Sym(format!("{}_reshape", node_label(n))));
                } else if let (Dim::Known(a), Dim::Known(b)) = (&total, &dims_product(&out))
                    && a != b
                {
                    return Err(self.err(
                        n,
                        format!(
                            "cannot reshape {} ({a} elements) to {} ({b} elements)",
                            describe_shape(Some(&s)),
                            describe_shape(Some(&out))
                        ),
                    ));
                }
                Some(out)
            }
            _ => None,
        };
        self.set(n, 0, dt, out);
        if let Some(v) = self.val(n, 0).cloned() {
            self.set_val(n, v);
        }
        Ok(())
    }

    fn gather(&mut self, n: &NodeProto, s0: Option<Vec<Dim>>, dt: i32) {
        let idx = self.shape(n, 1);
        let r = s0.as_ref().map(|s| s.len() as i64).unwrap_or(0);
        let mut axis = n.attr_int("axis").unwrap_or(0);
        if axis < 0 {
            axis += r;
        }
        let axis = axis.max(0) as usize;
        let out = match (&s0, &idx) {
            (Some(s), Some(i)) if axis < s.len() => {
                let mut o = s[..axis].to_vec();
                o.extend(i.iter().cloned());
                o.extend(s[axis + 1..].iter().cloned());
                Some(o)
            }
            _ => None,
        };
        self.set(n, 0, dt, out);
        if axis == 0
            && r <= 1
            && let (Some(v), Some(ix)) = (self.val(n, 0).cloned(), self.known_val(n, 1))
        {
            let len = v.len() as i64;
            let picked: Option<Vec<Dim>> = ix
                .iter()
                .map(|&i| v.get(if i < 0 { i + len } else { i } as usize).cloned())
                .collect();
            if let Some(p) = picked {
                self.set_val(n, p);
            }
        }
    }
}

fn n_first(v: Option<Vec<i64>>) -> Option<i64> {
    v.filter(|v| v.len() == 1).map(|v| v[0])
}

/// Length of `start:end:step` on an axis of size `d`, with ONNX clamping rules.
fn slice_len(d: i64, start: i64, end: i64, step: i64) -> i64 {
    let clamp = |x: i64, lo: i64, hi: i64| x.max(lo).min(hi);
    let norm = |x: i64| if x < 0 { x.saturating_add(d) } else { x };
    let (s, e) = if step > 0 {
        (clamp(norm(start), 0, d), clamp(norm(end), 0, d))
    } else {
        (
            clamp(norm(start), -1, d.saturating_sub(1)),
            clamp(norm(end), -1, d.saturating_sub(1)),
        )
    };
    // s and e are clamped to [-1, d], so only the step can overflow: widen to i128.
    let (s, e, step) = (i128::from(s), i128::from(e), i128::from(step));
    let len = if step > 0 {
        (e - s + step - 1) / step
    } else {
        (s - e - step - 1) / -step
    };
    len.clamp(0, i128::from(i64::MAX)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monomials_cancel() {
        let a = dim_mul(&Dim::Sym("N".into()), &Dim::Known(384));
        assert_eq!(a, Dim::Sym("384*N".into()));
        assert_eq!(dim_div(&a, &Dim::Known(12)), Some(Dim::Sym("32*N".into())));
        assert_eq!(dim_div(&a, &Dim::Sym("N".into())), Some(Dim::Known(384)));
        assert_eq!(Dim::Sym("32*N".into()).value_or(1), 32);
    }

    #[test]
    fn slice_lengths_follow_onnx() {
        assert_eq!(slice_len(10, 0, i64::MAX, 1), 10);
        assert_eq!(slice_len(10, 1, -1, 2), 4);
        assert_eq!(slice_len(10, -1, i64::MIN, -1), 10);
        assert_eq!(slice_len(32, 0, 32, 2), 16);
    }

    #[test]
    fn overrides_parse() {
        assert_eq!(
            parse_override("x=1x3x224x224").unwrap(),
            ("x".into(), vec![1, 3, 224, 224])
        );
        assert!(parse_override("x=1xax3").is_err());
        assert!(parse_override("1x3").is_err());
    }
}
