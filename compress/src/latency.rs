//! Per-layer latency tables (`whittle profile`) and the latency model behind `--target latency=`.
//!
//! A table holds, for every Conv, Gemm and MatMul whose weight is an initializer, the latency of
//! that layer alone (a one-node model with the layer's input shape) measured at a grid of widths:
//! the weight's first two axes each kept at [`FRACTIONS`] of their size. Depthwise and grouped
//! convolutions lose input and output channels together, so they are measured along that
//! diagonal only. The whole model is measured too; what the layers alone do not account for
//! (activations, pooling, copies) is `other_ms`, taken as constant under pruning. That is
//! conservative: pruning shrinks those ops too, so real savings are at least the predicted ones
//! for them.
//!
//! Each measurement has the runtime's fixed cost of one run (measured on a one-op model)
//! subtracted. Measured latencies are noisy; each layer's grid is made monotone (a narrower layer is never
//! predicted slower than a wider one) and interpolated bilinearly between grid points. Widths
//! below the smallest fraction are predicted at the smallest fraction's latency.
//!
//! With `whittle profile --merge` a table also holds every depth-merging candidate's latency in
//! the model, merged and not ([`crate::merge::SegmentLatency`], measured side by side by
//! [`local_pair_measure`]).
//!
//! Accepts any model; layers whose input shape is not known are left to `other_ms`.
//! Guarantees: the table names the runtime and threads it was measured with, and
//! [`LatencyTable::check`] refuses a table measured on a different model.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use whittle_core::Model;
use whittle_core::attr::Attrs;
use whittle_core::onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, ValueInfoProto};
use whittle_core::tensor::from_f32;
use whittle_core::{cost, shape};
use whittle_runtime::{BenchConfig, RuntimeKind, RuntimeOptions};

use crate::Error;

/// Fractions of each weight axis at which a layer is measured.
pub const FRACTIONS: [f64; 4] = [0.1, 0.4, 0.7, 1.0];

/// Latency of every weighted layer at several widths, and of the whole model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyTable {
    /// The runtime it was measured on (`ort-cpu`, `tract`, ...).
    pub runtime: String,
    /// Intra-op threads asked for (`None`: the runtime's default).
    pub threads: Option<usize>,
    /// The fractions of the grid ([`FRACTIONS`] when measured by this version).
    pub fractions: Vec<f64>,
    /// Latency of the whole model, ms (the smaller of two measurements, before and after the
    /// layers).
    pub model_ms: f64,
    /// Latency of one call of a one-op model on a single number: the runtime's fixed cost
    /// per run, subtracted from every layer's measurements (a layer inside the model does not
    /// pay it).
    pub call_ms: f64,
    /// One entry per weighted layer, in graph order.
    pub layers: Vec<LayerLatency>,
    /// Depth-merging candidates measured in the model, merged and not (`whittle profile
    /// --merge`; empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merges: Vec<crate::merge::SegmentLatency>,
}

/// One layer's latencies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerLatency {
    /// Node name.
    pub node: String,
    /// Op type.
    pub op: String,
    /// Weight initializer name.
    pub weight: String,
    /// Weight dims.
    pub weight_dims: Vec<i64>,
    /// The data input's shape it was measured with.
    pub input_shape: Vec<i64>,
    /// MACs at full width.
    pub macs: u64,
    /// Measured along the diagonal only (depthwise and grouped convolutions).
    pub diagonal: bool,
    /// Latency in ms, `ms[i][j]` with weight axis 0 kept at `fractions[i]` and axis 1 at
    /// `fractions[j]` (diagonal layers: one column, both axes at `fractions[i]`).
    pub ms: Vec<Vec<f64>>,
}

impl LayerLatency {
    /// Latency at full width.
    pub fn full_ms(&self) -> f64 {
        self.ms
            .last()
            .and_then(|r| r.last())
            .copied()
            .unwrap_or(0.0)
    }

    /// Predicted latency with weight axis 0 kept at `f0` and axis 1 at `f1`.
    pub fn at(&self, fractions: &[f64], f0: f64, f1: f64) -> f64 {
        let (i, t) = segment(fractions, f0);
        let row = |r: &Vec<f64>| {
            if self.diagonal || r.len() == 1 {
                r[0]
            } else {
                let (j, u) = segment(fractions, f1);
                r[j] + u * (r[(j + 1).min(r.len() - 1)] - r[j])
            }
        };
        let a = row(&self.ms[i]);
        let b = row(&self.ms[(i + 1).min(self.ms.len() - 1)]);
        a + t * (b - a)
    }

    /// Make the grid monotone: never slower at a smaller width.
    fn make_monotone(&mut self) {
        for r in &mut self.ms {
            for j in 1..r.len() {
                r[j] = r[j].max(r[j - 1]);
            }
        }
        for i in 1..self.ms.len() {
            for j in 0..self.ms[i].len() {
                self.ms[i][j] = self.ms[i][j].max(self.ms[i - 1][j]);
            }
        }
    }
}

/// The grid segment holding `f` and the position in it (`f` clamped to the grid).
fn segment(fractions: &[f64], f: f64) -> (usize, f64) {
    let n = fractions.len();
    if n < 2 || f <= fractions[0] {
        return (0, 0.0);
    }
    for i in 0..n - 1 {
        if f <= fractions[i + 1] {
            return (i, (f - fractions[i]) / (fractions[i + 1] - fractions[i]));
        }
    }
    (n - 1, 0.0)
}

impl LatencyTable {
    /// Read a table written by `whittle profile`.
    pub fn read(path: &std::path::Path) -> Result<LatencyTable, Error> {
        let fail =
            |reason: String| Error::Budget(format!("latency table {}: {reason}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        serde_json::from_str(&text)
            .map_err(|e| fail(format!("not a table written by `whittle profile` ({e})")))
    }

    /// Latency the layers alone do not account for (never negative).
    pub fn other_ms(&self) -> f64 {
        (self.model_ms - self.layers_ms()).max(0.0)
    }

    /// Sum of the layers at full width.
    pub fn layers_ms(&self) -> f64 {
        self.layers.iter().map(LayerLatency::full_ms).sum()
    }

    /// The predicted latency at full width: `other_ms` plus the layers.
    pub fn total_ms(&self) -> f64 {
        self.other_ms() + self.layers_ms()
    }

    /// Check that this table was measured on `model` (the same weighted layers, weight and input
    /// shapes) and return its layer index by weight initializer name.
    pub fn check(&self, model: &Model) -> Result<HashMap<String, usize>, Error> {
        let fail = |why: String| {
            Error::Budget(format!(
                "the latency table does not fit this model: {why}; measure it with `whittle profile` on this model"
            ))
        };
        if self.fractions.len() < 2 || self.fractions.windows(2).any(|w| w[0] >= w[1]) {
            return Err(fail("its fractions are not an increasing grid".into()));
        }
        let specs = layer_specs(model)?;
        if specs.len() != self.layers.len() {
            return Err(fail(format!(
                "it has {} weighted layers, the model {}",
                self.layers.len(),
                specs.len()
            )));
        }
        let mut by_weight = HashMap::new();
        for (i, (spec, l)) in specs.iter().zip(&self.layers).enumerate() {
            if spec.node != l.node
                || spec.weight_dims != l.weight_dims
                || spec.input_shape != l.input_shape
            {
                return Err(fail(format!(
                    "layer {i} is {} (weight {:?}, input {:?}) in the table and {} (weight {:?}, input {:?}) in the model",
                    l.node,
                    l.weight_dims,
                    l.input_shape,
                    spec.node,
                    spec.weight_dims,
                    spec.input_shape
                )));
            }
            let rows = self.fractions.len();
            let cols = if l.diagonal { 1 } else { rows };
            if l.ms.len() != rows
                || l.ms.iter().any(|r| r.len() != cols)
                || l.ms.iter().flatten().any(|v| !(v.is_finite() && *v >= 0.0))
            {
                return Err(fail(format!(
                    "layer {} does not hold a {rows}x{cols} grid of latencies",
                    l.node
                )));
            }
            by_weight.insert(l.weight.clone(), i);
        }
        Ok(by_weight)
    }
}

/// A weighted layer found in a model.
struct LayerSpec {
    index: usize,
    node: String,
    weight: String,
    weight_dims: Vec<i64>,
    input_shape: Vec<i64>,
    macs: u64,
    diagonal: bool,
}

/// Every Conv / Gemm / MatMul with MACs, an initializer weight (2-D for MatMul) and a known
/// input shape (symbols taken as 1).
fn layer_specs(model: &Model) -> Result<Vec<LayerSpec>, Error> {
    let shapes = shape::infer(model, &[])?;
    let costs = cost::count(model, &shapes);
    let g = model.graph();
    let mut out = vec![];
    for (index, (node, nc)) in g.node.iter().zip(&costs.nodes).enumerate() {
        let op = node.op_type();
        if nc.macs == 0 || !matches!(op, "Conv" | "Gemm" | "MatMul") {
            continue;
        }
        let Some(w) = node.input.get(1).and_then(|w| model.initializer(w)) else {
            continue;
        };
        if w.dims.len() < 2 || (op == "MatMul" && w.dims.len() != 2) {
            continue;
        }
        let Some(x) = node.input.first().and_then(|x| shapes.shape(x)) else {
            continue;
        };
        out.push(LayerSpec {
            index,
            node: whittle_core::attr::node_label(node),
            weight: node.input[1].clone(),
            weight_dims: w.dims.clone(),
            input_shape: x.iter().map(|d| d.value_or(1)).collect(),
            macs: nc.macs,
            diagonal: op == "Conv" && node.attr_int("group").unwrap_or(1) > 1,
        });
    }
    Ok(out)
}

fn scaled(n: i64, f: f64) -> i64 {
    ((n as f64 * f).round() as i64).max(1)
}

fn probe(name: &str, dims: &[i64]) -> whittle_core::onnx::TensorProto {
    let n: i64 = dims.iter().product();
    let v: Vec<f32> = (0..n.max(0) as usize)
        .map(|i| ((i % 251) as f32 / 251.0 - 0.5) * 0.02)
        .collect();
    from_f32(name, dims, &v)
}

fn tensor_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    let s: Vec<String> = dims.iter().map(i64::to_string).collect();
    let s: Vec<&str> = s.iter().map(String::as_str).collect();
    whittle_core::model::float_value_info(name, &s)
}

/// The one-node model of a layer with weight axis 0 kept at `f0` and axis 1 at `f1` (diagonal
/// layers: both at `f0`).
fn layer_model(model: &Model, spec: &LayerSpec, f0: f64, f1: f64) -> Result<Model, Error> {
    let node = &model.graph().node[spec.index];
    let w = &spec.weight_dims;
    let mut x = spec.input_shape.clone();
    let mut wd = w.clone();
    let mut attrs: Vec<AttributeProto> = node.attribute.clone();
    let mut out_features = None;
    let unfit = |why: &str| Error::Pass {
        pass: "profile".into(),
        reason: format!("{}: {why}", spec.node),
    };
    match node.op_type() {
        "Conv" => {
            if x.len() < 2 {
                return Err(unfit("input rank below 2"));
            }
            let g = node.attr_int("group").unwrap_or(1).max(1);
            if g == 1 {
                wd[0] = scaled(w[0], f0);
                wd[1] = scaled(w[1], f1);
                x[1] = wd[1];
            } else {
                let groups = scaled(g, f0);
                wd[0] = groups * (w[0] / g).max(1);
                x[1] = groups * w[1];
                for a in &mut attrs {
                    if a.name() == "group" {
                        a.i = Some(groups);
                    }
                }
            }
            out_features = Some(wd[0]);
        }
        "Gemm" => {
            let trans_b = node.attr_int("transB").unwrap_or(0) != 0;
            let trans_a = node.attr_int("transA").unwrap_or(0) != 0;
            wd[0] = scaled(w[0], f0);
            wd[1] = scaled(w[1], f1);
            let (k, n) = if trans_b {
                (wd[1], wd[0])
            } else {
                (wd[0], wd[1])
            };
            let ka = if trans_a {
                0
            } else {
                x.len().saturating_sub(1)
            };
            *x.get_mut(ka).ok_or_else(|| unfit("scalar input"))? = k;
            out_features = Some(n);
        }
        _ => {
            wd[0] = scaled(w[0], f0);
            wd[1] = scaled(w[1], f1);
            *x.last_mut().ok_or_else(|| unfit("scalar input"))? = wd[0];
        }
    }
    let mut inits = vec![probe("w", &wd)];
    let mut inputs = vec!["x".to_string(), "w".to_string()];
    if let Some(b) = node
        .input
        .get(2)
        .filter(|b| !b.is_empty())
        .and_then(|b| model.initializer(b))
    {
        let full_n = match node.op_type() {
            "Gemm" if node.attr_int("transB").unwrap_or(0) != 0 => w[0],
            "Gemm" => w[1],
            _ => w[0],
        };
        let mut bd = b.dims.clone();
        if let (Some(last), Some(n)) = (bd.last_mut(), out_features)
            && *last == full_n
        {
            *last = n;
        }
        inits.push(probe("b", &bd));
        inputs.push("b".into());
    }
    let graph = GraphProto {
        name: Some("layer".into()),
        node: vec![NodeProto {
            input: inputs,
            output: vec!["y".into()],
            name: Some("layer".into()),
            op_type: node.op_type.clone(),
            domain: node.domain.clone(),
            attribute: attrs,
            ..Default::default()
        }],
        initializer: inits,
        input: vec![tensor_info("x", &x)],
        output: vec![],
        ..Default::default()
    };
    let mut m = with_opsets_of(model, graph);
    // declare the output's shape (tract wants it)
    let y: Option<Vec<i64>> = shape::infer(&m, &[])?
        .shape("y")
        .and_then(|d| d.iter().map(shape::Dim::known).collect());
    m.graph_mut().output = vec![tensor_info(
        "y",
        &y.ok_or_else(|| unfit("output shape unknown"))?,
    )];
    Ok(m)
}

/// A model of one Relu on a single number: what a run costs beyond the work.
fn call_model(model: &Model) -> Model {
    let graph = GraphProto {
        name: Some("call".into()),
        node: vec![NodeProto {
            input: vec!["x".into()],
            output: vec!["y".into()],
            name: Some("call".into()),
            op_type: Some("Relu".into()),
            ..Default::default()
        }],
        input: vec![tensor_info("x", &[1])],
        output: vec![tensor_info("y", &[1])],
        ..Default::default()
    };
    with_opsets_of(model, graph)
}

/// A model of `graph` with `model`'s IR version and opsets.
fn with_opsets_of(model: &Model, graph: GraphProto) -> Model {
    Model {
        proto: ModelProto {
            ir_version: model.proto.ir_version,
            opset_import: model.proto.opset_import.clone(),
            producer_name: Some("whittle profile".into()),
            graph: Some(graph),
            ..Default::default()
        },
    }
}

/// Measures one model's latency in ms.
pub type Measure<'a> = dyn FnMut(&Model) -> Result<f64, Error> + 'a;

/// Measure the model and each weighted layer at every grid width. `progress(done, total)` is
/// called after each measurement.
pub fn profile(
    model: &Model,
    runtime: &str,
    threads: Option<usize>,
    measure: &mut Measure,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LatencyTable, Error> {
    let specs = layer_specs(model)?;
    let n = FRACTIONS.len();
    let total = 3 + specs
        .iter()
        .map(|s| if s.diagonal { n } else { n * n })
        .sum::<usize>();
    let first_ms = measure(model)?;
    let call_ms = measure(&call_model(model))?;
    let mut done = 2;
    progress(done, total);
    let mut layers = Vec::with_capacity(specs.len());
    for spec in &specs {
        let cols: &[f64] = if spec.diagonal { &[1.0] } else { &FRACTIONS };
        let mut ms = vec![];
        for &f0 in &FRACTIONS {
            let mut row = vec![];
            for &f1 in cols {
                row.push((measure(&layer_model(model, spec, f0, f1)?)? - call_ms).max(0.0));
                done += 1;
                progress(done, total);
            }
            ms.push(row);
        }
        let mut l = LayerLatency {
            node: spec.node.clone(),
            op: model.graph().node[spec.index].op_type().to_string(),
            weight: spec.weight.clone(),
            weight_dims: spec.weight_dims.clone(),
            input_shape: spec.input_shape.clone(),
            macs: spec.macs,
            diagonal: spec.diagonal,
            ms,
        };
        l.make_monotone();
        layers.push(l);
    }
    // the machine's load may change while the layers are measured: measure the model again
    let model_ms = first_ms.min(measure(model)?);
    progress(total, total);
    Ok(LatencyTable {
        runtime: runtime.to_string(),
        threads,
        fractions: FRACTIONS.to_vec(),
        model_ms,
        call_ms,
        layers,
        merges: vec![],
    })
}

/// A [`Measure`] on this machine: loads each model in `runtime` and returns its fastest of up
/// to `cfg.iters` timed runs (at most about `cfg.max_seconds`) after `cfg.warmup` untimed ones.
/// The fastest run, not the median: on a shared machine other work only adds time, so the
/// minimum is the steadiest estimate of what the model itself costs. `input_shapes`
/// fixes the shapes of graph inputs by name where a model has them (the whole model); the
/// one-layer models have fixed shapes.
pub fn local_measure(
    runtime: RuntimeKind,
    threads: Option<usize>,
    input_shapes: Vec<(String, Vec<usize>)>,
    cfg: BenchConfig,
) -> impl FnMut(&Model) -> Result<f64, Error> {
    move |m: &Model| {
        let opts = runtime_options(m, threads, &input_shapes);
        let fail = |e| measure_failed(runtime, m, e);
        let mut s = whittle_runtime::load(runtime, &m.to_bytes(), &opts).map_err(fail)?;
        let inputs =
            whittle_runtime::synthetic_inputs(s.inputs(), &opts.input_shapes).map_err(fail)?;
        let stats =
            whittle_runtime::bench(s.as_mut(), &inputs, &cfg, &mut |_, _| {}).map_err(fail)?;
        Ok(stats.min_ms)
    }
}

/// Session options for measuring `m`: the threads, and those of `input_shapes` that name its
/// inputs.
fn runtime_options(
    m: &Model,
    threads: Option<usize>,
    input_shapes: &[(String, Vec<usize>)],
) -> RuntimeOptions {
    let names: Vec<&str> = m.inputs().iter().map(|i| i.name()).collect();
    RuntimeOptions {
        threads,
        input_shapes: input_shapes
            .iter()
            .filter(|(n, _)| names.contains(&n.as_str()))
            .cloned()
            .collect(),
        ..Default::default()
    }
}

fn measure_failed(runtime: RuntimeKind, m: &Model, e: whittle_runtime::Error) -> Error {
    Error::Pass {
        pass: "profile".into(),
        reason: format!("{} in {}: {e}", runtime.name(), m.graph().name()),
    }
}

/// Measures two models' latencies side by side, in ms.
pub type PairMeasure<'a> = dyn FnMut(&Model, &Model) -> Result<(f64, f64), Error> + 'a;

/// A [`PairMeasure`] on this machine: runs both models in `runtime` in `rounds` alternating
/// rounds (the one going first alternating too), each round `cfg`'s timed runs after its
/// warmup. Returns the median over rounds of the first model's median run, and that less the
/// median over rounds of the paired differences (first − second): interleaving puts both under
/// the same load, and medians of paired differences shrug off the slow rounds a shared machine
/// has (the fastest run was tried first and swung by 20% from one measurement to the next).
///
/// ONNX Runtime sessions are loaded afresh for each turn and dropped after it, with the same
/// options a deployment uses: two live sessions take turns badly (the idle one's spinning
/// thread pool steals the cores the other runs on), and with spinning off every op pays a
/// thread wake-up, which overstates what removing ops saves. tract (one thread) keeps both.
pub fn local_pair_measure(
    runtime: RuntimeKind,
    threads: Option<usize>,
    input_shapes: Vec<(String, Vec<usize>)>,
    rounds: usize,
    cfg: BenchConfig,
) -> impl FnMut(&Model, &Model) -> Result<(f64, f64), Error> {
    move |a: &Model, b: &Model| {
        let p = rounds_p50(&[a, b], runtime, threads, &input_shapes, rounds, &cfg)?;
        let mut pa: Vec<f64> = p.iter().map(|r| r[0].0).collect();
        let mut diffs: Vec<f64> = p.iter().map(|r| r[0].0 - r[1].0).collect();
        let before = median(&mut pa);
        Ok((before, before - median(&mut diffs)))
    }
}

/// One round of a side-by-side measurement: each model's p50 ms and its CPU ms per run.
type Round = Vec<(f64, Option<f64>)>;

/// The p50 latency of each of `models` in each of `rounds` interleaved rounds (rounds x models),
/// with the calling thread's CPU ms per run, each round `cfg`'s timed runs after its warmup, the
/// model going first rotating from round to round. ONNX Runtime sessions are loaded afresh for
/// each turn (see [`local_pair_measure`]); tract keeps them.
fn rounds_p50(
    models: &[&Model],
    runtime: RuntimeKind,
    threads: Option<usize>,
    input_shapes: &[(String, Vec<usize>)],
    rounds: usize,
    cfg: &BenchConfig,
) -> Result<Vec<Round>, Error> {
    let Some(first) = models.first() else {
        return Ok(vec![]);
    };
    let opts = runtime_options(first, threads, input_shapes);
    let fail = |m: &Model, e| measure_failed(runtime, m, e);
    let bytes: Vec<Vec<u8>> = models.iter().map(|m| m.to_bytes()).collect();
    let load =
        |k: usize| whittle_runtime::load(runtime, &bytes[k], &opts).map_err(|e| fail(models[k], e));
    let mut live = Vec::with_capacity(models.len());
    for k in 0..models.len() {
        live.push(if runtime == RuntimeKind::Tract {
            Some(load(k)?)
        } else {
            None
        });
    }
    let n = models.len();
    let mut inputs = None;
    let mut out = Vec::with_capacity(rounds.max(1));
    for r in 0..rounds.max(1) {
        let mut p = vec![(0.0, None); n];
        for j in 0..n {
            let k = (r + j) % n;
            let mut fresh = None;
            let s = match live[k].as_mut() {
                Some(s) => s,
                None => fresh.insert(load(k)?),
            };
            if inputs.is_none() {
                inputs = Some(
                    whittle_runtime::synthetic_inputs(s.inputs(), &opts.input_shapes)
                        .map_err(|e| fail(first, e))?,
                );
            }
            let x = inputs.as_ref().expect("set above");
            let b = whittle_runtime::bench(s.as_mut(), x, cfg, &mut |_, _| {})
                .map_err(|e| fail(models[k], e))?;
            p[k] = (b.p50_ms, b.cpu_ms);
        }
        out.push(p);
    }
    Ok(out)
}

/// One model's latency beside the first of a side-by-side measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Beside {
    /// Median over rounds of its p50, ms.
    pub p50_ms: f64,
    /// Median over rounds of the first model's p50 over its own in that round (> 1: faster).
    pub speedup: f64,
    /// The smallest and largest of those per-round ratios: a difference inside them is a tie.
    pub spread: (f64, f64),
    /// With one thread, the calling thread's CPU ms per run (median over rounds): the model's
    /// own compute, beside the wall time a busy machine inflates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<f64>,
    /// The median per-round ratio of the first model's CPU time over this one's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_speedup: Option<f64>,
}

impl Beside {
    /// Whether `self` is faster than `other` beyond both spreads (not a tie).
    pub fn faster_than(&self, other: &Beside) -> bool {
        self.spread.0 > other.spread.1
    }
}

/// Measure `models` side by side on one item in `rounds` interleaved rounds: each one's p50 and
/// its per-round speedup over the first (`models[0]`, the reference, gets 1).
pub fn compare_many(
    models: &[&Model],
    runtime: RuntimeKind,
    threads: Option<usize>,
    rounds: usize,
) -> Result<Vec<Beside>, Error> {
    let cfg = BenchConfig {
        warmup: 2,
        iters: 40,
        max_seconds: Some(0.15),
    };
    let p = rounds_p50(models, runtime, threads, &[], rounds, &cfg)?;
    let wall: Vec<Vec<f64>> = p.iter().map(|r| r.iter().map(|x| x.0).collect()).collect();
    let mut out = beside_from_rounds(&wall);
    // CPU time stands for the run only when the run is on the calling thread alone
    if threads == Some(1) || runtime == RuntimeKind::Tract {
        for (k, b) in out.iter_mut().enumerate() {
            let cpu: Option<Vec<(f64, f64)>> = p.iter().map(|r| r[0].1.zip(r[k].1)).collect();
            if let Some(cpu) = cpu.filter(|c| !c.is_empty()) {
                let mut ms: Vec<f64> = cpu.iter().map(|c| c.1).collect();
                let mut ratio: Vec<f64> = cpu.iter().map(|c| c.0 / c.1.max(1e-9)).collect();
                b.cpu_ms = Some(median(&mut ms));
                b.cpu_speedup = Some(median(&mut ratio));
            }
        }
    }
    Ok(out)
}

/// Each model's p50 (median over the rounds) and speedup over the first (the median of the
/// per-round ratios, with their smallest and largest), from `p[round][model]` p50s in ms.
pub fn beside_from_rounds(p: &[Vec<f64>]) -> Vec<Beside> {
    let n = p.first().map_or(0, Vec::len);
    (0..n)
        .map(|k| {
            let mut ms: Vec<f64> = p.iter().map(|r| r[k]).collect();
            let mut ratio: Vec<f64> = p.iter().map(|r| r[0] / r[k].max(1e-9)).collect();
            let spread = ratio.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
            Beside {
                p50_ms: median(&mut ms),
                speedup: median(&mut ratio),
                spread,
                cpu_ms: None,
                cpu_speedup: None,
            }
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The speed of a compressed model beside its original, measured side by side.
#[derive(Debug, Clone, Serialize)]
pub struct SpeedCheck {
    /// The runtime both ran in.
    pub runtime: String,
    /// The original's median run, ms (one item).
    pub original_ms: f64,
    /// The result's, ms.
    pub result_ms: f64,
    /// `original_ms / result_ms`.
    pub speedup: f64,
    /// Side-by-side rounds.
    pub rounds: usize,
}

impl SpeedCheck {
    /// Slower than the original by more than a shared machine's noise (5%).
    pub fn slower(&self) -> bool {
        self.speedup < 1.0 / SLOWER
    }
}

/// Measure `result` beside `original` on one item: [`SPEED_ROUNDS`] interleaved rounds, each a
/// short benchmark of both (see [`local_pair_measure`]). A second or two for a small model.
pub fn compare_speed(
    original: &Model,
    result: &Model,
    runtime: RuntimeKind,
    threads: Option<usize>,
) -> Result<SpeedCheck, Error> {
    let cfg = BenchConfig {
        warmup: 2,
        iters: 40,
        max_seconds: Some(0.15),
    };
    let mut pair = local_pair_measure(runtime, threads, vec![], SPEED_ROUNDS, cfg);
    let (before, after) = pair(original, result)?;
    Ok(SpeedCheck {
        runtime: runtime.to_string(),
        original_ms: before,
        result_ms: after,
        speedup: before / after.max(1e-9),
        rounds: SPEED_ROUNDS,
    })
}

/// A result slower than the original by more than this factor (beyond the noise of
/// [`compare_speed`]) is slower.
pub const SLOWER: f64 = 1.05;

/// Rounds of [`compare_speed`].
pub const SPEED_ROUNDS: usize = 5;

/// Rounds of the side-by-side measurement of a merge candidate, by default.
pub const MERGE_ROUNDS: usize = 11;

/// Measure the latency table of a model as `whittle compress` sees it (after the lossless
/// cleanup, so that layer names and weights match); with `merge_rounds`, every depth-merging
/// candidate too.
pub fn measure_table(
    model: &Model,
    runtime: RuntimeKind,
    threads: Option<usize>,
    input_shapes: Vec<(String, Vec<usize>)>,
    merge_rounds: Option<usize>,
    progress: &dyn crate::pipeline::Progress,
) -> Result<LatencyTable, Error> {
    let cfg = BenchConfig {
        warmup: 3,
        iters: 40,
        max_seconds: Some(0.15),
    };
    let mut measure = local_measure(runtime, threads, input_shapes.clone(), cfg);
    progress.start("profile", 1);
    let t = profile(model, runtime.name(), threads, &mut measure, &mut |d, n| {
        progress.start("profile", n);
        progress.set(d);
    });
    progress.finish();
    let mut t = t?;
    if let Some(rounds) = merge_rounds {
        t.merges = measure_merges(model, runtime, threads, input_shapes, rounds, progress)?.1;
    }
    Ok(t)
}

/// How merge candidates and plans are measured beside the model: `rounds` side-by-side rounds
/// of a few runs each.
pub fn merge_measure(
    runtime: RuntimeKind,
    threads: Option<usize>,
    input_shapes: Vec<(String, Vec<usize>)>,
    rounds: usize,
) -> impl FnMut(&Model, &Model) -> Result<(f64, f64), Error> {
    let cfg = BenchConfig {
        warmup: 2,
        iters: 20,
        max_seconds: Some(0.05),
    };
    local_pair_measure(runtime, threads, input_shapes, rounds, cfg)
}

/// Each depth-merging candidate's latency in the model, merged and not (side by side, see
/// [`crate::merge::SegmentLatency`]), and the model's latency: the median of its measurements.
pub fn measure_merges(
    model: &Model,
    runtime: RuntimeKind,
    threads: Option<usize>,
    input_shapes: Vec<(String, Vec<usize>)>,
    rounds: usize,
    progress: &dyn crate::pipeline::Progress,
) -> Result<(f64, Vec<crate::merge::SegmentLatency>), Error> {
    let segs = crate::merge::segments(model);
    if segs.is_empty() {
        return Err(Error::Pass {
            pass: "merge".into(),
            reason: crate::merge::NOTHING_TO_MERGE.into(),
        });
    }
    let mut measure = merge_measure(runtime, threads, input_shapes, rounds.max(1));
    progress.start("merges", segs.len());
    let t = crate::merge::measure_segments(model, &segs, &mut measure, &mut |d, _| progress.set(d));
    progress.finish();
    let t = t?;
    let mut all: Vec<f64> = t.iter().map(|s| s.before_ms).collect();
    all.sort_by(f64::total_cmp);
    let model_ms = all[all.len() / 2];
    Ok((model_ms, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(ms: Vec<Vec<f64>>, diagonal: bool) -> LayerLatency {
        LayerLatency {
            node: "n".into(),
            op: "Conv".into(),
            weight: "w".into(),
            weight_dims: vec![8, 8, 3, 3],
            input_shape: vec![1, 8, 4, 4],
            macs: 1,
            diagonal,
            ms,
        }
    }

    #[test]
    fn interpolates_bilinearly_and_clamps() {
        let f = [0.5, 1.0];
        let l = layer(vec![vec![1.0, 2.0], vec![3.0, 4.0]], false);
        assert_eq!(l.at(&f, 1.0, 1.0), 4.0);
        assert_eq!(l.at(&f, 0.5, 0.5), 1.0);
        assert_eq!(
            l.at(&f, 0.1, 0.1),
            1.0,
            "below the grid: the smallest width"
        );
        assert!((l.at(&f, 0.75, 0.75) - 2.5).abs() < 1e-12);
        assert!((l.at(&f, 1.0, 0.75) - 3.5).abs() < 1e-12);
        let d = layer(vec![vec![1.0], vec![3.0]], true);
        assert!((d.at(&f, 0.75, 0.2) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn monotone_grid() {
        let mut l = layer(vec![vec![2.0, 1.0], vec![1.5, 3.0]], false);
        l.make_monotone();
        assert_eq!(l.ms, vec![vec![2.0, 2.0], vec![2.0, 3.0]]);
    }
}
