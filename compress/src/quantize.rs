//! INT8 quantization as QuantizeLinear / DequantizeLinear (QDQ) pairs, calibrated on data,
//! repaired without training.
//!
//! Weights of Conv, Gemm and MatMul (constant weights) become int8, symmetric, one scale per
//! output channel (a DequantizeLinear with `axis`), their biases int32 at the input scale times
//! the weight scale, as ONNX Runtime's QDQ fusion and TensorRT's explicit quantization want.
//! Activations become uint8 per tensor: every float input of a quantized op (Conv, Gemm,
//! MatMul, Add, Mul, Concat, AveragePool, GlobalAveragePool) and its output get a Q/DQ pair; an
//! output read only by a Relu or a Clip is quantized after it, over a range the activation makes
//! redundant (ONNX Runtime then drops it); MaxPool, the shape ops (Reshape, Flatten,
//! Transpose, Squeeze, Unsqueeze, Slice) and zero padding pass their input's quantization on
//! unchanged, so they run on int8 data. A Gemm or MatMul whose output only float ops read keeps a float output (ONNX
//! Runtime's QGemm / MatMulIntegerToFloat), which keeps the logits' precision. Every other op
//! stays float and is listed in the report; float ops keep reading the float tensors. Only
//! float tensors are quantized.
//!
//! Float on purpose: by default an image's stem (a Conv reading a graph input of at most 4
//! channels, and that input), then up to two of the activations whose quantization alone costs
//! most, each group kept where the model measures no slower than all-int8; with `--float-stem`
//! the stem whatever it costs; with `--keep-float N`, the N activations whose quantization alone
//! costs most (measured) and the layers that read them; in a model with
//! transformer blocks (or `--layers-only`), everything but the layers' inputs and weights.
//! `--qdq-for tensorrt` writes TensorRT's explicit-quantization form instead: symmetric int8
//! activations (zero point 0) and float biases.
//!
//! Ranges: a histogram of every quantized activation over the calibration items; min-max,
//! percentile, MSE or entropy (`ranges.rs`). By default each calibrator is tried on the whole
//! model and the one with the least output damage on held-out calibration items is kept.
//! Repair: weights are rounded with GPTQ's error feedback (`gptq.rs`) through the second moments
//! of each layer's inputs (refit's statistics: Conv with group 1, Gemm, MatMul; depthwise and
//! grouped Convs round to nearest); then the mean shift each layer's own rounding and its own
//! input's quantization cause, `W E[x] − Wq E[q(x)]`, measured on the float model's inputs, is
//! taken out of its bias.
//!
//! Declines: an already quantized model (Q/DQ or QLinear / integer ops), a model whose opset is
//! below 13 and cannot be raised (named operators), a model with nothing to quantize.
//! Guarantees: graph inputs and outputs keep their names, types and shapes.
//!
//! As a pipeline method: `--quantize int8 [--calibrate C]`, `[[step]] method = "quantize"` with
//! `precision = "int8"`; the plan holds the calibrator, every activation's scale and zero point,
//! the activations kept float and the bias corrections; a replay recomputes the GPTQ rounding
//! from the calibration data.
//!
//! After writing, ONNX Runtime is asked for its optimised graph: the report lists the int8
//! kernels it chose and the DequantizeLinear it left unfused (what runs in float).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use whittle_calib::capture;
use whittle_core::Model;
use whittle_core::attr::{self, Attrs, node_label};
use whittle_core::edit;
use whittle_core::onnx::NodeProto;
use whittle_core::tensor::{from_f32, from_i8, from_i32, from_u8, to_f32};

use crate::Error;
use crate::gptq;
use crate::latency::SLOWER;
use crate::pipeline::{Context, Method, Reference};
use crate::ranges::{Calibrator, Histogram, QParams};
use crate::refit::{self, LayerRef, RefitOptions};

/// The opset per-channel quantization needs.
const OPSET: i64 = 13;
/// Calibration items held out to choose the calibrator.
const JUDGE_ITEMS: usize = 32;
/// The fraction of values the percentile calibrator keeps by default.
const PERCENTILE: f64 = 0.99999;

fn fail(reason: impl Into<String>) -> Error {
    Error::Pass {
        pass: "quantize".into(),
        reason: reason.into(),
    }
}

/// The precision asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// int8 weights, uint8 activations.
    Int8,
}

/// Which runtime's QDQ rules to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QdqFor {
    /// ONNX Runtime's CPU provider: uint8 activations, int32 biases.
    #[default]
    Ort,
    /// TensorRT's explicit quantization: int8 activations with zero point 0, float biases.
    Tensorrt,
}

/// What a recipe's steps before a quantize step round kept channel counts and ranks to, unless
/// they set `round_to`: int8 kernels want whole blocks of 16 channels. Measured on this project's
/// 2-core x86 machine (ONNX Runtime's CPU provider, 1 thread): EfficientNet-Lite0 pruned to 80% of
/// its MACs ran int8 0.83x as fast as the unpruned int8 model with unrounded counts (a 1x1 Conv
/// with 77 output channels took 5x as long), 1.01x rounded to 8, 1.17x rounded to 16.
pub const INT8_ROUND_TO: usize = 16;

/// INT8 quantization as a pipeline method.
pub struct Quantize;

/// `--quantize int8 [--calibrate C] [--percentile P] [--no-bias-correction]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantizeOptions {
    /// Quantize weights (int8, per output channel) and activations (uint8, per tensor) as
    /// QuantizeLinear / DequantizeLinear pairs that ONNX Runtime runs with int8 kernels; normally
    /// the last step.
    #[arg(id = "quantize", long = "quantize", value_name = "TYPE", value_enum)]
    pub precision: Option<Precision>,
    /// Activation ranges by this calibrator (default: each is tried and the one with the least
    /// damage on held-out calibration items is kept).
    #[arg(
        id = "quant_calibrate",
        long = "calibrate",
        value_name = "METHOD",
        value_enum
    )]
    pub calibrate: Option<Calibrator>,
    /// The fraction of values `--calibrate percentile` keeps [default: 0.99999].
    #[arg(id = "quant_percentile", long = "percentile", value_name = "P")]
    pub percentile: Option<f64>,
    /// Do not correct the biases for the mean shift quantization causes.
    #[arg(id = "quant_no_bias_correction", long = "no-bias-correction")]
    pub no_bias_correction: bool,
    /// Round weights to the nearest code instead of with GPTQ's error feedback.
    #[arg(id = "quant_no_gptq", long = "no-gptq")]
    pub no_gptq: bool,
    /// Mixed precision: keep in float the N activations (with the layers that read them) whose
    /// quantization costs the most, each measured on held-out calibration items as the damage
    /// saved by keeping it alone in float (one model run per activation). Default: an image's
    /// stem, then the costliest, up to 3 in all, chosen by measurement: the most that leave the
    /// model no slower than with all int8 on the checking runtime (not for transformers or large
    /// inputs); 0 turns it off.
    #[arg(id = "quant_keep_float", long = "keep-float", value_name = "N")]
    pub keep_float: Option<usize>,
    /// The runtime whose QDQ rules to follow: `ort` (uint8 activations, int32 biases) or
    /// `tensorrt` (symmetric int8 activations, float biases) [default: tensorrt when checking on
    /// ort-tensorrt, else ort].
    #[arg(
        id = "quant_qdq_for",
        long = "qdq-for",
        value_name = "RUNTIME",
        value_enum
    )]
    pub qdq_for: Option<QdqFor>,
    /// Quantize only the inputs and weights of Conv, Gemm and MatMul, their outputs float (ONNX
    /// Runtime's MatMulIntegerToFloat): for transformers, whose residual sums and
    /// normalisations do not survive 8 bits.
    #[arg(id = "quant_layers_only", long = "layers-only")]
    pub layers_only: bool,
    /// Keep an image's stem float whatever it costs: a Conv that reads a graph input of at most 4
    /// channels, and that input (8 bits lose most there). By default it is tried first and kept
    /// where the model measures no slower (faster on ResNet-8 at 1 thread, a tie on
    /// EfficientNet-Lite0, 25% slower on ResNet-56 at 2 threads).
    #[arg(id = "quant_float_stem", long = "float-stem")]
    pub float_stem: bool,
}

/// What quantization decided: enough to replay it without data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantizePlan {
    /// The calibrator the ranges came from.
    pub calibrator: Calibrator,
    /// Scale and zero point of every activation quantized.
    pub activations: BTreeMap<String, QParams>,
    /// Per layer (node name), what was added to its float bias.
    pub bias_correction: BTreeMap<String, Vec<f32>>,
    /// Activations kept in float (`--keep-float`), with the layers that read them.
    #[serde(default)]
    pub float: Vec<String>,
    /// The runtime whose QDQ rules the model follows.
    #[serde(default)]
    pub qdq_for: QdqFor,
}

/// What quantization did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    /// The calibrator used.
    pub calibrator: Calibrator,
    /// Each calibrator tried, with its damage on the held-out calibration items.
    pub damage: BTreeMap<String, f64>,
    /// Nodes that run on int8 data, by op.
    pub quantized: BTreeMap<String, usize>,
    /// Nodes left in float, by op (Relu / Clip made redundant by a quantization not counted).
    pub kept_float: BTreeMap<String, usize>,
    /// Activations quantized (each a Q/DQ pair).
    pub activations: usize,
    /// Weight tensors quantized.
    pub weights: usize,
    /// Layers whose bias was corrected.
    pub bias_corrected: usize,
    /// Layers whose weights were rounded with GPTQ's error feedback (the others: to nearest).
    pub gptq: usize,
    /// Activations kept in float (an image's stem, then `--keep-float`'s) and the damage each
    /// saves alone (NaN for a stem whose saving was too small to list).
    pub float_activations: Vec<(String, f64)>,
    /// Mixed precision chosen by measurement: the speed of the model with the first 1, 2, ...
    /// groups in float (an image's stem first, then the most damaging activations), each beside
    /// the all-int8 model (the most kept that is not slower is chosen).
    pub float_speed: Vec<f64>,
    /// The runtime whose QDQ rules the model follows.
    pub qdq_for: QdqFor,
    /// Only layer inputs and weights were quantized.
    pub layers_only: bool,
    /// The model has transformer blocks (then only the layers are quantized).
    pub transformer: bool,
    /// The opset the model had, when it was raised to 13.
    pub opset_raised_from: Option<i64>,
    /// Calibration items the ranges came from.
    pub items: usize,
    /// The operators ONNX Runtime's CPU provider runs after fusing the Q/DQ groups, by op type
    /// (empty when ONNX Runtime could not be asked).
    pub ort_kernels: BTreeMap<String, usize>,
    /// Weights and activations ONNX Runtime left as DequantizeLinear: those parts run in float.
    pub unfused: usize,
}

impl Method for Quantize {
    const NAME: &'static str = "quantize";
    type Options = QuantizeOptions;
    type Plan = QuantizePlan;
    type Report = QuantizeReport;

    fn requested(o: &QuantizeOptions) -> bool {
        o.precision.is_some()
    }

    fn validate(o: &QuantizeOptions) -> Result<(), Error> {
        if o.precision.is_none() {
            return Err(fail("a quantize step needs precision = \"int8\""));
        }
        if let Some(p) = o.percentile
            && !(p > 0.5 && p <= 1.0)
        {
            return Err(fail(format!(
                "--percentile {p}: the kept fraction is in (0.5, 1]"
            )));
        }
        Ok(())
    }

    fn needs_data(_: &QuantizeOptions) -> Option<&'static str> {
        Some("activation ranges are calibrated on data")
    }

    fn run(
        o: &QuantizeOptions,
        model: &mut Model,
        cx: &Context,
        replay: Option<QuantizePlan>,
    ) -> Result<(QuantizePlan, QuantizeReport), Error> {
        refuse_quantized(model)?;
        let raised = whittle_core::opset::upgrade(model, OPSET).map_err(|e| fail(e.to_string()))?;
        // transformer blocks: only the layers (their residual sums do not survive 8 bits)
        let transformer = crate::blocks::find_blocks(model).is_ok_and(|b| !b.is_empty());
        let sites = Sites::find(model, o.layers_only || transformer)?;
        let c = cx.data(Quantize::NAME)?;
        let (judge, fit) = if o.calibrate.is_none() || o.keep_float != Some(0) {
            Context::judge_split(c, JUDGE_ITEMS)
        } else {
            (&[][..], c.fit.as_slice())
        };
        let codes = weight_codes(o, model, &sites, cx, fit)?;
        let keep = match o.keep_float {
            Some(0) => Keep::None,
            Some(k) => Keep::Exactly(k),
            // a transformer's layers are few and cheap to keep; a large input's sensitivity
            // runs are too slow
            None if o.layers_only || transformer || cx.scale < 1.0 => Keep::None,
            None => Keep::Measured(AUTO_FLOAT_MAX),
        };
        let Calibrated {
            plan,
            damage,
            saved,
            measured,
        } = match replay {
            Some(plan) => Calibrated {
                plan,
                damage: BTreeMap::new(),
                saved: Vec::new(),
                measured: Vec::new(),
            },
            None => calibrate(o, keep, model, &sites, &codes, cx, judge, fit)?,
        };
        let mut report = apply(model, &sites, &plan, &codes)?;
        report.float_activations = plan
            .float
            .iter()
            .map(|t| {
                (
                    t.clone(),
                    saved.iter().find(|(u, _)| u == t).map_or(f64::NAN, |s| s.1),
                )
            })
            .collect();
        report.float_speed = measured;
        report.calibrator = plan.calibrator;
        report.damage = damage;
        report.opset_raised_from = raised;
        report.layers_only = o.layers_only || transformer;
        report.transformer = transformer;
        report.items = fit.len();
        // what ONNX Runtime makes of it: int8 kernels, or Q/DQ pairs it could not fuse
        if let Ok(k) = whittle_runtime::ort_cpu_kernels(&model.to_bytes()) {
            report.unfused = k.get("DequantizeLinear").copied().unwrap_or(0);
            report.ort_kernels = k;
        }
        Ok((plan, report))
    }

    fn describe(r: &QuantizeReport) -> Vec<String> {
        let list = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut lines = vec![format!(
            "int8: {} weights, {} activations ({}), runs int8: {}",
            r.weights,
            r.activations,
            r.calibrator.name(),
            list(&r.quantized)
        )];
        if !r.damage.is_empty() {
            let tried: Vec<String> = r
                .damage
                .iter()
                .map(|(k, d)| format!("{k} {d:.4}"))
                .collect();
            lines.push(format!(
                "calibrators (damage on held-out calibration items): {}",
                tried.join(", ")
            ));
        }
        if !r.kept_float.is_empty() {
            lines.push(format!("kept in float: {}", list(&r.kept_float)));
        }
        let int8_kernels: BTreeMap<String, usize> = r
            .ort_kernels
            .iter()
            .filter(|(k, _)| {
                k.starts_with("QLinear") || k.starts_with("QGemm") || k.contains("Integer")
            })
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if !r.ort_kernels.is_empty() {
            lines.push(format!(
                "ONNX Runtime (CPU) runs int8 kernels: {}",
                list(&int8_kernels)
            ));
        }
        if r.qdq_for == QdqFor::Tensorrt {
            lines.push(
                "TensorRT's explicit-quantization form (int8 activations with zero point 0, float \
                 biases): for TensorRT; ONNX Runtime's CPU provider runs much of it in float"
                    .into(),
            );
        } else if r.unfused > 0 {
            lines.push(format!(
                "warning: ONNX Runtime left {} DequantizeLinear unfused: those ops run in float",
                r.unfused
            ));
        }
        if !r.float_activations.is_empty() {
            let kept: Vec<String> = r
                .float_activations
                .iter()
                .map(|(t, d)| {
                    if d.is_nan() {
                        format!("{t} (an image's stem)")
                    } else {
                        format!("{t} (saves {d:.4})")
                    }
                })
                .collect();
            lines.push(format!("activations kept in float: {}", kept.join(", ")));
        }
        if !r.float_speed.is_empty() {
            let speeds: Vec<String> = r
                .float_speed
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{} {v:.2}x", i + 1))
                .collect();
            lines.push(format!(
                "mixed precision, the first 1, 2, ... of them in float beside all-int8: {}",
                speeds.join(", ")
            ));
        }
        if r.transformer {
            lines.push(
                "transformer blocks found: only the layers' inputs and weights quantized \
                 (residual sums, normalisations and attention stay float)"
                    .into(),
            );
        }
        if r.gptq > 0 {
            lines.push(format!(
                "weights rounded with error feedback (GPTQ) in {} of {} layers",
                r.gptq, r.weights
            ));
        }
        if r.bias_corrected > 0 {
            lines.push(format!("bias corrected in {} layers", r.bias_corrected));
        }
        if let Some(from) = r.opset_raised_from {
            lines.push(format!("opset raised from {from} to {OPSET}"));
        }
        lines
    }
}

/// Refuse a model that is quantized already.
fn refuse_quantized(model: &Model) -> Result<(), Error> {
    let mut found: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &model.graph().node {
        let op = n.op_type();
        if matches!(
            op,
            "QuantizeLinear"
                | "DequantizeLinear"
                | "DynamicQuantizeLinear"
                | "MatMulInteger"
                | "ConvInteger"
                | "QGemm"
                | "DynamicQuantizeMatMul"
                | "MatMulIntegerToFloat"
        ) || op.starts_with("QLinear")
        {
            *found.entry(op).or_default() += 1;
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = found.iter().map(|(k, v)| format!("{k} {v}")).collect();
    Err(fail(format!(
        "the model is quantized already ({}); quantize its float original",
        list.join(", ")
    )))
}

/// A layer with constant weights: its weight becomes int8 per output channel.
#[derive(Debug, Clone)]
struct Layer {
    node: String,
    op: String,
    input: String,
    output: String,
    weight: String,
    /// The weight's output-channel axis.
    axis: usize,
    bias: Option<String>,
}

/// Where quantization goes in a model.
#[derive(Debug, Default)]
struct Sites {
    layers: Vec<Layer>,
    /// Activations with their own range, in graph order.
    calibrated: Vec<String>,
    /// Activations that take another's quantization (a shape op's output: its input).
    shared: Vec<(String, String)>,
    /// Activations right after a Relu / Clip, and the activation's upper bound.
    bounded: HashMap<String, f32>,
    /// Constant inputs of Add / Mul quantized per tensor: (node, input slot).
    constants: Vec<(String, usize)>,
    quantized: BTreeMap<String, usize>,
    kept_float: BTreeMap<String, usize>,
    /// The nodes that run on int8 data: only they read the dequantized activations (a float
    /// op keeps reading the float tensor).
    int8: HashSet<String>,
}

impl Sites {
    fn find(model: &Model, layers_only: bool) -> Result<Sites, Error> {
        let g = model.graph();
        let consts: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
        let outputs: HashSet<&str> = g.output.iter().map(|v| v.name()).collect();
        let mut readers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
        for n in &g.node {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                readers.entry(i.as_str()).or_default().push(n);
            }
        }
        let is_const = |x: &str| consts.contains(x);
        let mut s = Sites::default();
        let mut quantized: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let add = |t: &str, q: &mut Vec<String>, seen: &mut HashSet<String>| {
            if seen.insert(t.to_string()) {
                q.push(t.to_string());
            }
        };
        let mut absorbed: HashSet<String> = HashSet::new();
        let mut int8: HashSet<String> = HashSet::new();
        // which outputs some quantized op reads: Gemm / MatMul outputs get a Q only then
        let kind = |n: &NodeProto| {
            kind(n, &is_const).filter(|k| !layers_only || matches!(k, Kind::Layer { .. }))
        };
        let quantizable = |n: &NodeProto| kind(n).is_some();
        // only float tensors are quantized (a mask's Unsqueeze or Reshape is int64)
        let types = whittle_core::shape::infer(model, &[]).ok();
        let float = |t: &str| {
            types
                .as_ref()
                .and_then(|s| s.types.get(t))
                .is_none_or(|tt| {
                    tt.dtype == whittle_core::onnx::tensor_proto::DataType::Float as i32
                })
        };
        for n in &g.node {
            let Some(k) = kind(n) else {
                continue;
            };
            let data = match k {
                Kind::Shared => &n.input[..1],
                _ => &n.input[..],
            };
            if !data
                .iter()
                .chain(&n.output[..1])
                .all(|t| t.is_empty() || float(t))
            {
                continue;
            }
            let name = node_label(n);
            let y = n.output[0].clone();
            match k {
                Kind::Shared => {
                    let x = &n.input[0];
                    if !seen.contains(x) || outputs.contains(y.as_str()) {
                        continue;
                    }
                    s.shared.push((y.clone(), x.clone()));
                    add(&y, &mut quantized, &mut seen);
                    int8.insert(name);
                    continue;
                }
                Kind::Layer { axis } => {
                    s.layers.push(Layer {
                        node: name.clone(),
                        op: n.op_type().into(),
                        input: n.input[0].clone(),
                        output: y.clone(),
                        weight: n.input[1].clone(),
                        axis,
                        bias: n.input.get(2).filter(|b| !b.is_empty()).cloned(),
                    });
                    add(&n.input[0], &mut quantized, &mut seen);
                }
                Kind::Binary => {
                    for (slot, x) in n.input.iter().enumerate() {
                        if is_const(x) {
                            s.constants.push((name.clone(), slot));
                        } else {
                            add(x, &mut quantized, &mut seen);
                        }
                    }
                }
                Kind::Activations => {
                    for x in &n.input {
                        add(x, &mut quantized, &mut seen);
                    }
                }
            }
            int8.insert(name.clone());
            // the output: after a Relu / Clip that reads it alone, else itself
            let rs = readers.get(y.as_str()).map_or(&[][..], |v| v.as_slice());
            let mut site = y.clone();
            let mut bound = None;
            if let [r] = rs
                && !outputs.contains(y.as_str())
                && !outputs.contains(r.output[0].as_str())
                && let Some(b) = redundant_bound(model, r)
            {
                site = r.output[0].clone();
                bound = Some(b);
                absorbed.insert(node_label(r));
            }
            if outputs.contains(site.as_str()) {
                continue;
            }
            let float_output = (layers_only || matches!(n.op_type(), "Gemm" | "MatMul"))
                && !readers
                    .get(site.as_str())
                    .is_some_and(|v| v.iter().any(|r| quantizable(r)));
            if float_output {
                if bound.is_some() {
                    absorbed.remove(&node_label(rs[0]));
                }
                continue;
            }
            if let Some(b) = bound {
                s.bounded.insert(site.clone(), b);
            }
            add(&site, &mut quantized, &mut seen);
        }
        if s.layers.is_empty() {
            return Err(fail(
                "nothing to quantize: no Conv, Gemm or MatMul with constant weights",
            ));
        }
        let shared: HashSet<&String> = s.shared.iter().map(|(y, _)| y).collect();
        s.calibrated = quantized
            .iter()
            .filter(|t| !shared.contains(t))
            .cloned()
            .collect();
        for n in &g.node {
            let name = node_label(n);
            if int8.contains(&name) {
                s.int8.insert(name.clone());
                *s.quantized.entry(n.op_type().into()).or_default() += 1;
            } else if !absorbed.contains(&name) {
                *s.kept_float.entry(n.op_type().into()).or_default() += 1;
            }
        }
        Ok(s)
    }

    /// Every quantized activation's parameters: the calibrated ones from `own`, shared ones from
    /// their source.
    fn resolve(&self, own: &BTreeMap<String, QParams>) -> Result<BTreeMap<String, QParams>, Error> {
        let mut all = own.clone();
        for (y, x) in &self.shared {
            let p = *all
                .get(x)
                .ok_or_else(|| fail(format!("no quantization for '{x}' (read by '{y}')")))?;
            all.insert(y.clone(), p);
        }
        for t in &self.calibrated {
            if !all.contains_key(t) {
                return Err(fail(format!("no quantization for activation '{t}'")));
            }
        }
        Ok(all)
    }

    /// The activations `plan` keeps in float, with the shape ops' outputs that share them.
    fn float<'a>(&'a self, plan: &'a QuantizePlan) -> HashSet<&'a str> {
        let mut float: HashSet<&str> = plan.float.iter().map(String::as_str).collect();
        for (y, x) in &self.shared {
            if float.contains(x.as_str()) {
                float.insert(y);
            }
        }
        float
    }
}

enum Kind {
    /// Conv / Gemm / MatMul with a constant weight (its output-channel axis).
    Layer { axis: usize },
    /// Add / Mul: activations, or a constant quantized per tensor.
    Binary,
    /// Ops whose inputs are all activations (Concat, pools).
    Activations,
    /// Ops that move data without changing it: the output takes the input's quantization.
    Shared,
}

fn kind(n: &NodeProto, is_const: &dyn Fn(&str) -> bool) -> Option<Kind> {
    if !n.domain().is_empty() && n.domain() != "ai.onnx" {
        return None;
    }
    let inputs: Vec<&str> = n.input.iter().map(String::as_str).collect();
    let all_activations =
        !inputs.is_empty() && inputs.iter().all(|x| !x.is_empty() && !is_const(x));
    match n.op_type() {
        "Conv" => {
            let ok = inputs.len() >= 2
                && !is_const(inputs[0])
                && is_const(inputs[1])
                && inputs.get(2).is_none_or(|b| b.is_empty() || is_const(b));
            ok.then_some(Kind::Layer { axis: 0 })
        }
        "Gemm" => {
            let ok = inputs.len() >= 2
                && !is_const(inputs[0])
                && is_const(inputs[1])
                && n.attr_int("transA").unwrap_or(0) == 0
                && n.attr_float("alpha").unwrap_or(1.0) == 1.0
                && inputs.get(2).is_none_or(|b| b.is_empty() || is_const(b));
            let axis = if n.attr_int("transB").unwrap_or(0) == 1 {
                0
            } else {
                1
            };
            ok.then_some(Kind::Layer { axis })
        }
        "MatMul" => {
            let ok = inputs.len() == 2 && !is_const(inputs[0]) && is_const(inputs[1]);
            ok.then_some(Kind::Layer { axis: 1 })
        }
        "Add" | "Mul" => {
            let acts = inputs.iter().filter(|x| !is_const(x)).count();
            (inputs.len() == 2 && acts >= 1).then_some(Kind::Binary)
        }
        "Concat" | "AveragePool" | "GlobalAveragePool" => {
            all_activations.then_some(Kind::Activations)
        }
        "MaxPool" if n.output.len() == 1 => all_activations.then_some(Kind::Shared),
        "Reshape" | "Flatten" | "Transpose" | "Squeeze" | "Unsqueeze" | "Slice" => {
            (!is_const(inputs[0])).then_some(Kind::Shared)
        }
        // zero padding: 0 is a code of every range (a ResNet's shortcut pads its channels)
        "Pad" => {
            let constant = n.attr_str("mode").is_none_or(|m| m == "constant");
            let zero = inputs.get(2).is_none_or(|v| v.is_empty())
                && n.attr_float("value").is_none_or(|v| v == 0.0);
            (constant && zero && !is_const(inputs[0])).then_some(Kind::Shared)
        }
        _ => None,
    }
}

/// When `r` is a Relu, or a Clip from 0 with constant bounds, the upper bound of its output.
fn redundant_bound(model: &Model, r: &NodeProto) -> Option<f32> {
    match r.op_type() {
        "Relu" => Some(f32::INFINITY),
        "Clip" => {
            let value = |i: usize| -> Option<Option<f32>> {
                match r.input.get(i).filter(|s| !s.is_empty()) {
                    None => Some(None),
                    Some(name) => {
                        let t = model.initializer(name)?;
                        to_f32(t).ok()?.first().copied().map(Some)
                    }
                }
            };
            let lo = value(1)?.unwrap_or(f32::NEG_INFINITY);
            let hi = value(2)?.unwrap_or(f32::INFINITY);
            (lo == 0.0).then_some(hi)
        }
        _ => None,
    }
}

/// Ranges from a histogram of every calibrated activation, the calibrator with the least damage
/// (or the one asked for), and the bias corrections.
#[allow(clippy::too_many_arguments)]
fn calibrate(
    o: &QuantizeOptions,
    keep: Keep,
    model: &Model,
    sites: &Sites,
    codes: &BTreeMap<String, Codes>,
    cx: &Context,
    judge: &[usize],
    fit: &[usize],
) -> Result<Calibrated, Error> {
    let candidates: Vec<Calibrator> = match o.calibrate {
        Some(k) => vec![k],
        None => Calibrator::ALL.to_vec(),
    };
    let hists = histograms(model, &sites.calibrated, cx, fit)?;
    let percentile = o.percentile.unwrap_or(PERCENTILE);
    let signed = style(o, cx) == QdqFor::Tensorrt;
    let ranges = |k: Calibrator| -> BTreeMap<String, QParams> {
        hists
            .iter()
            .map(|(t, h)| {
                let (lo, hi) = h.range(k, percentile);
                let mut p = QParams::new(lo, hi, signed);
                if let Some(&b) = sites.bounded.get(t) {
                    p = QParams::new(lo, hi.min(b), signed).within(b);
                }
                (t.clone(), p)
            })
            .collect()
    };
    let stem = stem_inputs(model, sites);
    // `--float-stem` keeps it float whatever it costs; by default it is tried first below
    let forced = if o.float_stem {
        stem.clone()
    } else {
        Vec::new()
    };
    let mut damage = BTreeMap::new();
    let mut best: Option<(f64, Calibrator)> = None;
    // the float model's outputs on the judge items, run once for every comparison
    let reference = if candidates.len() > 1 || keep != Keep::None {
        Some(cx.reference(model, judge)?)
    } else {
        None
    };
    if let (true, Some(reference)) = (candidates.len() > 1, &reference) {
        cx.start("quantize: calibrators", candidates.len());
        for (i, &k) in candidates.iter().enumerate() {
            let plan = QuantizePlan {
                calibrator: k,
                activations: ranges(k),
                bias_correction: BTreeMap::new(),
                float: forced.clone(),
                qdq_for: style(o, cx),
            };
            let mut q = model.clone();
            apply(&mut q, sites, &plan, codes)?;
            let d = reference.damage(&q)?;
            damage.insert(k.name().to_string(), d);
            if best.is_none_or(|(b, _)| d < b) {
                best = Some((d, k));
            }
            cx.progress.set(i + 1);
        }
        cx.progress.finish();
    }
    let chosen = best.map_or(candidates[0], |(_, k)| k);
    let mut plan = QuantizePlan {
        calibrator: chosen,
        activations: ranges(chosen),
        bias_correction: BTreeMap::new(),
        float: forced,
        qdq_for: style(o, cx),
    };
    let (mut saved, mut measured) = (Vec::new(), Vec::new());
    if let (Keep::Exactly(k) | Keep::Measured(k), Some(reference)) = (keep, &reference) {
        // the whole model's damage was measured when its calibrator was chosen
        let base = best.map(|(d, _)| d);
        saved = float_savings(model, sites, &plan, codes, cx, reference, base)?;
        // What is tried in float, a group at a time. Measured, an image's stem comes first
        // whatever its damage on the few judge items: int8 kernels are slow on its 3 channels
        // and 8 bits lose most on the raw input (ResNet-8: 1.07x faster than all-int8 and 0.7
        // points more agreement); it stays float only where that measures no slower.
        let stem_first =
            matches!(keep, Keep::Measured(_)) && !o.float_stem && !stem.is_empty() && k > 0;
        let mut groups: Vec<Vec<String>> = Vec::new();
        if stem_first {
            groups.push(stem.clone());
        }
        groups.extend(
            saved
                .iter()
                .filter(|(t, _)| !stem_first || !stem.contains(t))
                .map(|(t, _)| vec![t.clone()])
                .take(k - usize::from(stem_first)),
        );
        let n = match keep {
            Keep::Measured(_) => {
                measured = float_speeds(model, sites, &plan, codes, cx, &groups)?;
                kept_by_speed(&measured)
            }
            _ => groups.len(),
        };
        plan.float.extend(groups.into_iter().take(n).flatten());
    }
    if !o.no_bias_correction {
        plan.bias_correction = bias_correction(model, sites, &plan, codes, cx, fit)?;
    }
    Ok(Calibrated {
        plan,
        damage,
        saved,
        measured,
    })
}

/// What [`calibrate`] decided, with what it measured on the way.
struct Calibrated {
    plan: QuantizePlan,
    /// Each calibrator's damage.
    damage: BTreeMap<String, f64>,
    /// The damage keeping each activation float saves.
    saved: Savings,
    /// The speeds of mixed precision beside all-int8 ([`QuantizeReport::float_speed`]).
    measured: Vec<f64>,
}

/// How many activations to keep in float.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Keep {
    None,
    /// As many as asked for (`--keep-float N`).
    Exactly(usize),
    /// Up to this many, while the model stays no slower than all-int8.
    Measured(usize),
}

/// The most activations mixed precision keeps in float by default.
const AUTO_FLOAT_MAX: usize = 3;

/// How many to keep in float, given the speeds beside all-int8 with 1, 2, ... kept: the most
/// that is not slower (keeping a layer's input float without its output can be slower where
/// keeping both is not).
fn kept_by_speed(speeds: &[f64]) -> usize {
    speeds
        .iter()
        .rposition(|&v| v >= 1.0 / SLOWER)
        .map_or(0, |i| i + 1)
}

/// The speed, beside the all-int8 model, of the model with the first 1, 2, ... of `groups` in
/// float.
fn float_speeds(
    model: &Model,
    sites: &Sites,
    plan: &QuantizePlan,
    codes: &BTreeMap<String, Codes>,
    cx: &Context,
    groups: &[Vec<String>],
) -> Result<Vec<f64>, Error> {
    let mut all_int8 = model.clone();
    apply(&mut all_int8, sites, plan, codes)?;
    let mut models = vec![all_int8];
    for k in 1..=groups.len() {
        let mut p = plan.clone();
        p.float.extend(groups[..k].iter().flatten().cloned());
        let mut q = model.clone();
        apply(&mut q, sites, &p, codes)?;
        models.push(q);
    }
    // one side-by-side measurement of all of them: each candidate under the same load
    cx.start("quantize: mixed precision, measured", 1);
    let refs: Vec<&Model> = models.iter().collect();
    let speeds =
        crate::latency::compare_many(&refs, cx.runtime, cx.threads, crate::latency::SPEED_ROUNDS);
    cx.progress.finish();
    Ok(speeds?.iter().skip(1).map(|b| b.speedup).collect())
}

/// The graph inputs that only stem Convs read: Convs of at most 4 input channels (an image's).
fn stem_inputs(model: &Model, sites: &Sites) -> Vec<String> {
    let g = model.graph();
    let inputs: HashSet<&str> = model.inputs().iter().map(|v| v.name()).collect();
    sites
        .calibrated
        .iter()
        .filter(|t| inputs.contains(t.as_str()))
        .filter(|t| {
            let mut readers = g.node.iter().filter(|n| n.input.iter().any(|x| x == *t));
            readers.all(|n| {
                n.op_type() == "Conv"
                    && model.initializer(&n.input[1]).is_some_and(|w| {
                        let group = n.attr_int("group").unwrap_or(1);
                        w.dims.len() > 1 && w.dims[1] * group <= 4
                    })
            })
        })
        .cloned()
        .collect()
}

/// The QDQ rules asked for, else those of the runtime the result is checked on.
fn style(o: &QuantizeOptions, cx: &Context) -> QdqFor {
    o.qdq_for
        .unwrap_or(if cx.runtime == whittle_runtime::RuntimeKind::OrtTensorRt {
            QdqFor::Tensorrt
        } else {
            QdqFor::Ort
        })
}

/// Activations with the damage keeping each alone in float saves.
type Savings = Vec<(String, f64)>;

/// Each calibrated activation with the damage (on `reference`'s items) that keeping it alone in
/// float saves, most first (those saving at least 2% of the whole model's damage).
fn float_savings(
    model: &Model,
    sites: &Sites,
    plan: &QuantizePlan,
    codes: &BTreeMap<String, Codes>,
    cx: &Context,
    reference: &Reference,
    base: Option<f64>,
) -> Result<Savings, Error> {
    let base = match base {
        Some(d) => d,
        None => {
            let mut q = model.clone();
            apply(&mut q, sites, plan, codes)?;
            reference.damage(&q)?
        }
    };
    cx.start(
        "quantize: sensitivity (--keep-float)",
        sites.calibrated.len(),
    );
    let mut out = Vec::with_capacity(sites.calibrated.len());
    for (i, t) in sites.calibrated.iter().enumerate() {
        if plan.float.contains(t) {
            continue;
        }
        let mut one = plan.clone();
        one.float.push(t.clone());
        let mut q = model.clone();
        apply(&mut q, sites, &one, codes)?;
        out.push((t.clone(), base - reference.damage(&q)?));
        cx.progress.set(i + 1);
    }
    cx.progress.finish();
    // an activation that saves less than 2% of the damage is not worth a float layer
    out.retain(|(_, d)| *d > 0.02 * base);
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(out)
}

/// A histogram of each tensor over the items `fit`: one capture for the ranges, one for the
/// counts.
fn histograms(
    model: &Model,
    tensors: &[String],
    cx: &Context,
    fit: &[usize],
) -> Result<BTreeMap<String, Histogram>, Error> {
    let c = cx.data(Quantize::NAME)?;
    let spec = cx.spec(c, fit);
    let capture_err = |e: whittle_calib::Error| fail(format!("capture: {e}"));
    let mut lim = vec![(f32::INFINITY, f32::NEG_INFINITY); tensors.len()];
    cx.start("quantize: activation ranges", 2);
    capture(model, tensors, &spec, &mut |v, n| {
        for (l, a) in lim.iter_mut().zip(v) {
            for &x in real(a, n) {
                if x.is_finite() {
                    l.0 = l.0.min(x);
                    l.1 = l.1.max(x);
                }
            }
        }
        Ok(())
    })
    .map_err(capture_err)?;
    cx.progress.set(1);
    let mut hists: Vec<Histogram> = lim
        .iter()
        .map(|&(lo, hi)| {
            if lo > hi {
                Histogram::new(0.0, 0.0)
            } else {
                Histogram::new(lo, hi)
            }
        })
        .collect();
    capture(model, tensors, &spec, &mut |v, n| {
        for (h, a) in hists.iter_mut().zip(v) {
            h.add(real(a, n));
        }
        Ok(())
    })
    .map_err(capture_err)?;
    cx.progress.finish();
    Ok(tensors.iter().cloned().zip(hists).collect())
}

/// The real items' values of a captured batch (the first `n` along the batch axis).
fn real(a: &ndarray::ArrayD<f32>, n: usize) -> &[f32] {
    let all = a.as_slice().expect("captured arrays are contiguous");
    let per = all.len() / a.shape().first().copied().unwrap_or(1).max(1);
    &all[..(per * n).min(all.len())]
}

/// Per layer, the mean shift quantization causes in its output, from the layer's own rounding
/// and its own input's quantization: `W E[x] − Wq E[q(x)]` per output channel, with `E[x]` and
/// `E[q(x)]` each input channel's mean in the float model over the items `fit`, as is and
/// through its Q/DQ pair (Nagel et al., 2019, measured instead of modelled). Each layer's shift
/// is its own (upstream layers are float in the measurement), so every correction holds with
/// all of them applied.
fn bias_correction(
    model: &Model,
    sites: &Sites,
    plan: &QuantizePlan,
    codes: &BTreeMap<String, Codes>,
    cx: &Context,
    fit: &[usize],
) -> Result<BTreeMap<String, Vec<f32>>, Error> {
    let params = sites.resolve(&plan.activations)?;
    let float = sites.float(plan);
    let layers: Vec<&Layer> = sites
        .layers
        .iter()
        .filter(|l| l.op != "MatMul" && !float.contains(l.input.as_str()))
        .collect();
    let inputs: Vec<String> = layers.iter().map(|l| l.input.clone()).collect();
    let axes: Vec<bool> = layers.iter().map(|l| l.op == "Conv").collect();
    let quant: Vec<Option<QParams>> = layers
        .iter()
        .map(|l| params.get(&l.input).copied())
        .collect();
    cx.start("quantize: bias correction", 1);
    let means = channel_means(model, &inputs, &axes, &quant, cx, fit)?;
    cx.progress.finish();
    let mut out = BTreeMap::new();
    for (l, (mx, mq)) in layers.iter().zip(&means) {
        let w_init = model
            .initializer(&l.weight)
            .ok_or_else(|| fail(format!("layer '{}': no weight '{}'", l.node, l.weight)))?;
        let dims: Vec<usize> = w_init.dims.iter().map(|&d| d as usize).collect();
        let w = to_f32(w_init)?;
        let Some(Codes { q, scale, .. }) = codes.get(&l.node) else {
            continue;
        };
        let inner: usize = dims[l.axis + 1..].iter().product();
        let wq: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, &c)| c as f32 * scale[(i / inner) % dims[l.axis]])
            .collect();
        let (Some(a), Some(b)) = (
            contract(&l.op, &dims, l.axis, &w, mx),
            contract(&l.op, &dims, l.axis, &wq, mq),
        ) else {
            continue;
        };
        out.insert(
            l.node.clone(),
            a.iter().zip(&b).map(|(x, y)| (x - y) as f32).collect(),
        );
    }
    Ok(out)
}

/// A layer's weight `w` applied to one value per input channel `m` (a Conv's kernel summed over
/// its positions): one value per output channel. `None` for a layout it does not know.
fn contract(op: &str, dims: &[usize], axis: usize, w: &[f32], m: &[f64]) -> Option<Vec<f64>> {
    let at = |k: usize| m.get(k).copied().unwrap_or(0.0);
    match (op, dims) {
        ("Conv", [o, cpg, ..]) => {
            let k: usize = dims[2..].iter().product();
            let groups = (m.len() / (*cpg).max(1)).max(1);
            let opg = (o / groups).max(1);
            Some(
                (0..*o)
                    .map(|oc| {
                        let first = (oc / opg) * cpg;
                        (0..*cpg)
                            .map(|ci| {
                                let sum: f32 = w[(oc * cpg + ci) * k..][..k].iter().sum();
                                sum as f64 * at(first + ci)
                            })
                            .sum()
                    })
                    .collect(),
            )
        }
        (_, [a, b]) if axis == 0 => Some(
            (0..*a)
                .map(|n| (0..*b).map(|k| w[n * b + k] as f64 * at(k)).sum())
                .collect(),
        ),
        (_, [a, b]) => Some(
            (0..*b)
                .map(|n| (0..*a).map(|k| w[k * b + n] as f64 * at(k)).sum())
                .collect(),
        ),
        _ => None,
    }
}

/// Each channel's mean as is, and through the tensor's quantization.
type Means = (Vec<f64>, Vec<f64>);

/// The mean of each channel of each tensor (axis 1 where `channels_first`, the last axis
/// otherwise) over the items `fit`, as is and through the tensor's quantization (when it has
/// one; else as is).
fn channel_means(
    model: &Model,
    tensors: &[String],
    channels_first: &[bool],
    quant: &[Option<QParams>],
    cx: &Context,
    fit: &[usize],
) -> Result<Vec<Means>, Error> {
    let c = cx.data(Quantize::NAME)?;
    let spec = cx.spec(c, fit);
    let mut sums: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); tensors.len()];
    let mut counts = vec![0f64; tensors.len()];
    capture(model, tensors, &spec, &mut |v, n| {
        for (k, a) in v.iter().enumerate() {
            let shape = a.shape();
            let axis = if channels_first[k] {
                1
            } else {
                shape.len().saturating_sub(1)
            };
            let ch = shape.get(axis).copied().unwrap_or(1).max(1);
            let inner: usize = shape.get(axis + 1..).map_or(1, |s| s.iter().product());
            let (sx, sq) = &mut sums[k];
            if sx.len() != ch {
                *sx = vec![0.0; ch];
                *sq = vec![0.0; ch];
            }
            let x = real(a, n);
            for (i, &val) in x.iter().enumerate() {
                let c = (i / inner.max(1)) % ch;
                sx[c] += val as f64;
                sq[c] += quant[k].map_or(val, |p| p.fake(val)) as f64;
            }
            counts[k] += (x.len() / ch) as f64;
        }
        Ok(())
    })
    .map_err(|e| fail(format!("capture: {e}")))?;
    let mean = |v: Vec<f64>, n: f64| v.into_iter().map(|s| s / n.max(1.0)).collect();
    Ok(sums
        .into_iter()
        .zip(counts)
        .map(|((sx, sq), n)| (mean(sx, n), mean(sq, n)))
        .collect())
}

/// Write the QDQ model: weights int8 per channel, biases int32, every activation a Q/DQ pair.
fn apply(
    model: &mut Model,
    sites: &Sites,
    plan: &QuantizePlan,
    codes: &BTreeMap<String, Codes>,
) -> Result<QuantizeReport, Error> {
    let float = sites.float(plan);
    let mut params = sites.resolve(&plan.activations)?;
    params.retain(|t, _| !float.contains(t.as_str()));
    let mut added: Vec<NodeProto> = Vec::new();
    // activations: Q then DQ, every reader rewired to the DQ's output
    let mut dq_of: HashMap<String, String> = HashMap::new();
    for (t, p) in &params {
        let (s, z) = (
            edit::unique_name(model.graph(), &format!("{t}_scale")),
            edit::unique_name(model.graph(), &format!("{t}_zero_point")),
        );
        let g = model.graph_mut();
        edit::set_initializer(g, from_f32(&s, &[], &[p.scale]));
        edit::set_initializer(g, zero_point(&z, &[], &[p.zero_point], p.signed));
        let (tq, tdq) = (format!("{t}_quantized"), format!("{t}_dequantized"));
        added.push(attr::node(
            "QuantizeLinear",
            &format!("{t}_QuantizeLinear"),
            &[t, &s, &z],
            &[&tq],
            vec![],
        ));
        added.push(attr::node(
            "DequantizeLinear",
            &format!("{t}_DequantizeLinear"),
            &[&tq, &s, &z],
            &[&tdq],
            vec![],
        ));
        dq_of.insert(t.clone(), tdq);
    }
    for n in model.graph_mut().node.iter_mut() {
        if !sites.int8.contains(&node_label(n)) {
            continue;
        }
        for x in n.input.iter_mut() {
            if let Some(d) = dq_of.get(x.as_str()) {
                *x = d.clone();
            }
        }
    }
    // weights and biases
    let (mut weights, mut gptq) = (0, 0);
    let mut bias_corrected = 0;
    let (mut quantized, mut kept_float) = (sites.quantized.clone(), sites.kept_float.clone());
    for l in &sites.layers {
        if float.contains(l.input.as_str()) {
            if let Some(c) = quantized.get_mut(&l.op) {
                *c = c.saturating_sub(1);
            }
            *kept_float.entry(l.op.clone()).or_default() += 1;
            continue;
        }
        let Some(px) = params.get(&l.input) else {
            return Err(fail(format!(
                "layer '{}': its input is not quantized",
                l.node
            )));
        };
        let w_init = model
            .initializer(&l.weight)
            .ok_or_else(|| fail(format!("layer '{}': no weight '{}'", l.node, l.weight)))?;
        let dims = w_init.dims.clone();
        let Codes {
            q: wq, scale: ws, ..
        } = codes
            .get(&l.node)
            .ok_or_else(|| fail(format!("layer '{}': no weight codes", l.node)))?;
        let out_channels = dims[l.axis] as usize;
        let idx = model
            .graph()
            .node
            .iter()
            .position(|n| node_label(n) == l.node)
            .ok_or_else(|| fail(format!("no node '{}'", l.node)))?;
        let base = l.weight.clone();
        let (wn, sn, zn) = (
            edit::unique_name(model.graph(), &format!("{base}_quantized")),
            edit::unique_name(model.graph(), &format!("{base}_scale")),
            edit::unique_name(model.graph(), &format!("{base}_zero_point")),
        );
        let wdq = edit::unique_name(model.graph(), &format!("{base}_dequantized"));
        let axis_attr = vec![attr::int("axis", l.axis as i64)];
        let g = model.graph_mut();
        edit::set_initializer(g, from_i8(&wn, &dims, wq));
        edit::set_initializer(g, from_f32(&sn, &[out_channels as i64], ws));
        edit::set_initializer(
            g,
            from_i8(&zn, &[out_channels as i64], &vec![0; out_channels]),
        );
        added.push(attr::node(
            "DequantizeLinear",
            &format!("{base}_DequantizeLinear"),
            &[&wn, &sn, &zn],
            &[&wdq],
            axis_attr.clone(),
        ));
        g.node[idx].input[1] = wdq;
        weights += 1;
        gptq += usize::from(codes.get(&l.node).is_some_and(|c| c.gptq));
        // the bias: float, corrected, then int32 at the input scale times the weight scale
        let correction = plan.bias_correction.get(&l.node);
        // a MatMul has no bias input to correct
        if l.op == "MatMul" || (l.bias.is_none() && correction.is_none()) {
            continue;
        }
        let mut b = match &l.bias {
            Some(name) => {
                let t = model
                    .initializer(name)
                    .ok_or_else(|| fail(format!("layer '{}': no bias '{name}'", l.node)))?;
                to_f32(t)?
            }
            None => vec![0.0; out_channels],
        };
        if b.len() != out_channels {
            return Err(fail(format!(
                "layer '{}': bias of {} values for {out_channels} channels",
                l.node,
                b.len()
            )));
        }
        if l.op == "Gemm" {
            let g = model.graph_mut();
            let beta = g.node[idx].attr_float("beta").unwrap_or(1.0);
            b.iter_mut().for_each(|v| *v *= beta);
            g.node[idx].attribute.retain(|a| a.name() != "beta");
        }
        if let Some(c) = correction.filter(|c| c.len() == out_channels) {
            b.iter_mut().zip(c).for_each(|(v, d)| *v += d);
            bias_corrected += 1;
        }
        let bias = if plan.qdq_for == QdqFor::Tensorrt {
            // TensorRT takes no int32 DequantizeLinear: the bias stays float
            let bn = edit::unique_name(model.graph(), &format!("{}_bias", l.node));
            edit::set_initializer(model.graph_mut(), from_f32(&bn, &[out_channels as i64], &b));
            bn
        } else {
            let bs: Vec<f32> = ws.iter().map(|s| s * px.scale).collect();
            let bq: Vec<i32> = b
                .iter()
                .zip(&bs)
                .map(|(v, s)| {
                    (*v as f64 / *s as f64)
                        .round()
                        .clamp(i32::MIN as f64, i32::MAX as f64) as i32
                })
                .collect();
            let bbase = l.bias.clone().unwrap_or_else(|| format!("{}_bias", l.node));
            let (bn, bsn, bzn) = (
                edit::unique_name(model.graph(), &format!("{bbase}_quantized")),
                edit::unique_name(model.graph(), &format!("{bbase}_scale")),
                edit::unique_name(model.graph(), &format!("{bbase}_zero_point")),
            );
            let bdq = edit::unique_name(model.graph(), &format!("{bbase}_dequantized"));
            let g = model.graph_mut();
            let c = out_channels as i64;
            edit::set_initializer(g, from_i32(&bn, &[c], &bq));
            edit::set_initializer(g, from_f32(&bsn, &[c], &bs));
            edit::set_initializer(g, from_i32(&bzn, &[c], &vec![0; out_channels]));
            added.push(attr::node(
                "DequantizeLinear",
                &format!("{bbase}_DequantizeLinear"),
                &[&bn, &bsn, &bzn],
                &[&bdq],
                vec![attr::int("axis", 0)],
            ));
            bdq
        };
        let n = &mut model.graph_mut().node[idx];
        if n.input.len() < 3 {
            n.input.resize(3, String::new());
        }
        n.input[2] = bias;
    }
    // constant inputs of Add / Mul: per tensor
    for (node, slot) in &sites.constants {
        let idx = model
            .graph()
            .node
            .iter()
            .position(|n| node_label(n) == *node)
            .ok_or_else(|| fail(format!("no node '{node}'")))?;
        let name = model.graph().node[idx].input[*slot].clone();
        let t = model
            .initializer(&name)
            .ok_or_else(|| fail(format!("no constant '{name}'")))?;
        let (dims, v) = (t.dims.clone(), to_f32(t)?);
        let (lo, hi) = v
            .iter()
            .fold((0f32, 0f32), |(a, b), &x| (a.min(x), b.max(x)));
        let p = QParams::new(lo, hi, plan.qdq_for == QdqFor::Tensorrt);
        let q: Vec<i32> = v.iter().map(|&x| p.code(x)).collect();
        let (qn, sn, zn) = (
            edit::unique_name(model.graph(), &format!("{name}_quantized")),
            edit::unique_name(model.graph(), &format!("{name}_scale")),
            edit::unique_name(model.graph(), &format!("{name}_zero_point")),
        );
        let out = edit::unique_name(model.graph(), &format!("{name}_dequantized"));
        let g = model.graph_mut();
        edit::set_initializer(g, zero_point(&qn, &dims, &q, p.signed));
        edit::set_initializer(g, from_f32(&sn, &[], &[p.scale]));
        edit::set_initializer(g, zero_point(&zn, &[], &[p.zero_point as i32], p.signed));
        added.push(attr::node(
            "DequantizeLinear",
            &format!("{name}_DequantizeLinear"),
            &[&qn, &sn, &zn],
            &[&out],
            vec![],
        ));
        g.node[idx].input[*slot] = out;
    }
    model.graph_mut().node.extend(added);
    whittle_core::check::topo_sort(model.graph_mut())?;
    edit::remove_dead(model.graph_mut());
    Ok(QuantizeReport {
        calibrator: plan.calibrator,
        damage: BTreeMap::new(),
        quantized,
        kept_float,
        activations: params.len(),
        weights,
        bias_corrected,
        gptq,
        float_activations: Vec::new(),
        float_speed: Vec::new(),
        qdq_for: plan.qdq_for,
        layers_only: false,
        transformer: false,
        opset_raised_from: None,
        items: 0,
        ort_kernels: BTreeMap::new(),
        unfused: 0,
    })
}

/// 8-bit codes (a zero point, or constant data): int8 when `signed`, else uint8.
fn zero_point<T: Copy + Into<i32>>(
    name: &str,
    dims: &[i64],
    v: &[T],
    signed: bool,
) -> whittle_core::onnx::TensorProto {
    if signed {
        let c: Vec<i8> = v.iter().map(|&x| x.into().clamp(-128, 127) as i8).collect();
        from_i8(name, dims, &c)
    } else {
        let c: Vec<u8> = v.iter().map(|&x| x.into().clamp(0, 255) as u8).collect();
        from_u8(name, dims, &c)
    }
}

/// A layer's int8 weight: codes in the weight's own layout, one scale per output channel.
struct Codes {
    q: Vec<i8>,
    scale: Vec<f32>,
    /// Rounded with GPTQ's error feedback (else to nearest).
    gptq: bool,
}

/// Every layer's int8 weight: rounded with GPTQ's error feedback where refit's statistics cover
/// the layer (Conv with group 1, Gemm, MatMul: the second moments of its inputs over `fit`),
/// to nearest elsewhere (depthwise and grouped Convs) or with `--no-gptq`.
fn weight_codes(
    o: &QuantizeOptions,
    model: &Model,
    sites: &Sites,
    cx: &Context,
    fit: &[usize],
) -> Result<BTreeMap<String, Codes>, Error> {
    let stats = if o.no_gptq {
        None
    } else {
        let c = cx.data(Quantize::NAME)?;
        let layers: Vec<LayerRef> = sites
            .layers
            .iter()
            .map(|l| LayerRef {
                node: l.node.clone(),
                input: l.input.clone(),
                output: l.output.clone(),
            })
            .collect();
        cx.start("quantize: input statistics (GPTQ)", 1);
        let s = refit::collect(model, &layers, &cx.spec(c, fit), &RefitOptions::default())
            .map_err(|e| fail(e.to_string()))?;
        cx.progress.finish();
        Some(s)
    };
    cx.start("quantize: weights", sites.layers.len());
    let mut out = BTreeMap::new();
    for (i, l) in sites.layers.iter().enumerate() {
        let w_init = model
            .initializer(&l.weight)
            .ok_or_else(|| fail(format!("layer '{}': no weight '{}'", l.node, l.weight)))?;
        let dims = w_init.dims.clone();
        let w = to_f32(w_init)?;
        let (nearest, scale) = per_channel(&w, &dims, l.axis);
        let gram = stats.as_ref().and_then(|s| s.gram(&l.node)).map(|(g, _)| g);
        let rounded = gram.and_then(|g| {
            // rows: output channels, columns: the inputs in the order of refit's statistics
            let rows = dims[l.axis] as usize;
            let cols = w.len() / rows.max(1);
            if l.axis == 0 {
                gptq::round(&w, rows, cols, &scale, g)
            } else {
                let t: Vec<f32> = (0..rows * cols)
                    .map(|k| w[(k % cols) * rows + k / cols])
                    .collect();
                let q = gptq::round(&t, rows, cols, &scale, g)?;
                Some(
                    (0..rows * cols)
                        .map(|k| q[(k % rows) * cols + k / rows])
                        .collect(),
                )
            }
        });
        let gptq = rounded.is_some();
        out.insert(
            l.node.clone(),
            Codes {
                q: rounded.unwrap_or(nearest),
                scale,
                gptq,
            },
        );
        cx.progress.set(i + 1);
    }
    cx.progress.finish();
    Ok(out)
}

/// Symmetric int8 per channel along `axis`: the codes (in `-127..=127`) and each channel's scale.
fn per_channel(w: &[f32], dims: &[i64], axis: usize) -> (Vec<i8>, Vec<f32>) {
    let ch = dims[axis] as usize;
    let inner: usize = dims[axis + 1..].iter().product::<i64>() as usize;
    let chan = |i: usize| (i / inner) % ch;
    let mut max = vec![0f32; ch];
    for (i, &v) in w.iter().enumerate() {
        max[chan(i)] = max[chan(i)].max(v.abs());
    }
    let scale: Vec<f32> = max
        .iter()
        .map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / scale[chan(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, scale)
}

#[cfg(test)]
mod tests {
    use super::kept_by_speed;

    #[test]
    fn mixed_precision_keeps_the_most_that_are_not_slower() {
        assert_eq!(kept_by_speed(&[]), 0);
        assert_eq!(kept_by_speed(&[0.8, 0.9, 0.7]), 0);
        assert_eq!(
            kept_by_speed(&[1.01, 0.97, 0.9]),
            2,
            "a tie within the noise counts"
        );
        assert_eq!(
            kept_by_speed(&[0.9, 1.03, 0.8]),
            2,
            "the input float alone is slower"
        );
        assert_eq!(kept_by_speed(&[1.0, 1.1, 1.2]), 3);
    }
}
