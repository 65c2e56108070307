//! Low-rank factorisation: the decompositions of Trained Rank Pruning, applied after training.
//!
//! A layer `y = W x + b` becomes two thinner layers:
//! - **channel-wise** (Conv, Gemm, MatMul): a kh×kw Conv from C to r channels with the original
//!   strides, pads and dilations, then a 1×1 Conv from r to N (dense layers: a MatMul to r
//!   features, then the original Gemm / MatMul from r);
//! - **spatial-wise** (2-D Conv with kh, kw > 1 and explicit pads): a kh×1 Conv from C to r
//!   (vertical stride, pads and dilation), then a 1×kw Conv from r to N (horizontal ones). Exact
//!   at full rank: zero padding is separable.
//!
//! Factors come from a truncated SVD, either of the weights (**plain**) or **data-aware**: with
//! `G` the second moment of the layer's inputs on calibration data (bias column included) and
//! `G = L Lᵀ`, the SVD of `[W b] L` truncated to rank r minimises the layer's output error on that
//! data; the factors are mapped back with `L⁻¹` and the bias moves into the first factor.
//! Data-aware factors are channel-wise (the spatial scheme keeps plain SVD).
//!
//! Ranks: one rank for every layer, a fraction of each layer's full rank, the smallest rank
//! keeping a share of each layer's energy, or a global budget (`macs=` / `params=`) allocated
//! greedily by the relative error a rank step adds (weight energy, or output energy on the
//! calibration data when data-aware) per MAC or param it saves. `auto` lets each layer take
//! whichever scheme is cheaper for the same error.
//!
//! **Accepts** Conv with a 2-D kernel and `group` 1, Gemm with `transA` 0 and `alpha` = `beta`
//! = 1, MatMul whose second input is a 2-D initializer; weights and biases must be float
//! initializers. **Declines** (listed as skipped, with the reason) every other layer, and every
//! rank that would not make the layer strictly cheaper in both MACs and params.
//! **Guarantees** the graph's inputs, outputs and the factorised node's output tensor name are
//! kept; a failed factorisation changes nothing.

use std::collections::HashSet;

use faer::{Mat, Side};
use serde::{Deserialize, Serialize};
use whittle_core::Model;
use whittle_core::attr::Attrs;
use whittle_core::attr::ints;
use whittle_core::edit;
use whittle_core::onnx::NodeProto;
use whittle_core::tensor::{from_f32, to_f32};
use whittle_core::{cost, shape};

use crate::Error;
use crate::prune::Budget;
use crate::refit::{LayerRef, RefitStats};

/// How a layer is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// C → r (same kernel), r → N (1×1).
    Channel,
    /// C → r (kh×1), r → N (1×kw).
    Spatial,
    /// Per layer, whichever is cheaper for the same error.
    Auto,
}

impl std::str::FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "channel" => Ok(Scheme::Channel),
            "spatial" => Ok(Scheme::Spatial),
            "auto" => Ok(Scheme::Auto),
            _ => Err(format!("unknown scheme '{s}' (channel, spatial, auto)")),
        }
    }
}

/// How ranks are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RankRule {
    /// A global budget, allocated by error per unit of cost saved (`macs=` or `params=`).
    Budget(Budget),
    /// Per layer, the smallest rank keeping this share of its energy.
    Energy(f64),
    /// Per layer, this fraction of its full rank.
    Fraction(f64),
    /// The same rank for every layer.
    Rank(usize),
}

/// Options of [`factorise`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LowRankOptions {
    /// How ranks are chosen.
    pub rule: RankRule,
    /// How layers are split.
    pub scheme: Scheme,
    /// Factorise against the calibration data's input statistics (channel-wise).
    pub data_aware: bool,
    /// Ranks are multiples of this.
    pub round_to: usize,
}

/// One factorised layer.
#[derive(Debug, Clone, Serialize)]
pub struct Factored {
    /// Node name (the second factor keeps it).
    pub node: String,
    /// The scheme used.
    pub scheme: Scheme,
    /// The rank kept.
    pub rank: usize,
    /// The largest rank the scheme allows for this layer.
    pub full_rank: usize,
    /// MACs before / after (per item, symbolic dims as 1).
    pub macs: (u64, u64),
    /// Params before / after.
    pub params: (u64, u64),
    /// Relative error of the truncation: weight energy lost (plain), or output energy lost on
    /// the calibration data relative to the output's variance (data-aware).
    pub rel_error: f64,
}

/// A layer left alone, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Node name.
    pub node: String,
    /// Why.
    pub reason: String,
}

/// What [`factorise`] did.
#[derive(Debug, Clone, Serialize)]
pub struct LowRankReport {
    /// Factorised layers, in graph order.
    pub factored: Vec<Factored>,
    /// Layers left alone.
    pub skipped: Vec<Skipped>,
    /// Whether factors were data-aware.
    pub data_aware: bool,
}

/// A layer as a matrix `y = M x + b`.
struct Layer {
    name: String,
    /// Output tensor, input tensor.
    output: String,
    input: String,
    op: Op,
    /// Outputs.
    o: usize,
    /// Inputs × kernel elements.
    d: usize,
    /// `o × d`, input index `c · kh · kw + i · kw + j` for a Conv.
    m: Mat<f64>,
    bias: Option<Vec<f64>>,
    macs: f64,
    params: f64,
}

#[derive(Clone, Copy)]
enum Op {
    Conv {
        c: usize,
        kh: usize,
        kw: usize,
        /// Output positions per item.
        positions: f64,
        /// For the spatial scheme: (output rows, input columns, output columns), when pads are
        /// explicit and kh, kw > 1.
        spatial: Option<(f64, f64, f64)>,
    },
    Dense {
        gemm: bool,
        /// Rows per item.
        rows: f64,
    },
}

impl Layer {
    /// The largest rank; `data_aware`: the bias is factorised too (one more input column).
    fn max_rank(&self, scheme: Scheme, data_aware: bool) -> usize {
        match (scheme, self.op) {
            (Scheme::Spatial, Op::Conv { c, kh, kw, .. }) => (c * kh).min(self.o * kw),
            _ => self.o.min(self.d + usize::from(data_aware)),
        }
    }

    /// (MACs, params) at rank r.
    fn cost(&self, scheme: Scheme, r: usize) -> (f64, f64) {
        let (r, o, d) = (r as f64, self.o as f64, self.d as f64);
        let b = if self.bias.is_some() { o } else { 0.0 };
        match (scheme, self.op) {
            (
                Scheme::Spatial,
                Op::Conv {
                    c,
                    kh,
                    kw,
                    spatial: Some((ho, wi, wo)),
                    ..
                },
            ) => {
                let (c, kh, kw) = (c as f64, kh as f64, kw as f64);
                (
                    r * c * kh * ho * wi + o * r * kw * ho * wo,
                    r * c * kh + o * r * kw + b,
                )
            }
            (_, Op::Conv { positions, .. }) => (positions * r * (d + o), r * (d + o) + b),
            (_, Op::Dense { rows, .. }) => (rows * r * (d + o), r * (d + o) + b),
        }
    }

    fn spatial_ok(&self) -> bool {
        matches!(
            self.op,
            Op::Conv {
                spatial: Some(_),
                ..
            }
        )
    }
}

fn float_init(model: &Model, name: &str) -> Option<Vec<f32>> {
    model
        .initializer(name)
        .filter(|t| t.data_type() == 1)
        .and_then(|t| to_f32(t).ok())
}

/// Read a node as a factorisable layer, or say why it is not one.
fn describe(
    model: &Model,
    shapes: &shape::ShapeInfo,
    node: &NodeProto,
    macs: u64,
) -> Result<Layer, String> {
    let w_name = node.input.get(1).ok_or("it has no weight input")?;
    let wt = model
        .initializer(w_name)
        .ok_or("its weight is not an initializer")?;
    let w = float_init(model, w_name).ok_or("its weight is not float")?;
    let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => Some(
            float_init(model, b)
                .ok_or("its bias is not a float initializer")?
                .into_iter()
                .map(f64::from)
                .collect::<Vec<f64>>(),
        ),
        None => None,
    };
    let dims: Vec<usize> = wt.dims.iter().map(|&v| v.max(0) as usize).collect();
    let known = |t: &str| -> Option<Vec<f64>> {
        shapes
            .shape(t)
            .map(|s| s.iter().map(|d| d.value_or(1) as f64).collect())
    };
    let (op, o, d, m) = match node.op_type() {
        "Conv" => {
            let g = node.attr_int("group").unwrap_or(1);
            if g != 1 {
                return Err(format!(
                    "it is a grouped Conv (group {g}); low rank needs group 1"
                ));
            }
            if dims.len() != 4 {
                return Err(format!(
                    "its kernel has rank {}; low rank handles 2-D Convs",
                    dims.len().saturating_sub(2)
                ));
            }
            let (o, c, kh, kw) = (dims[0], dims[1], dims[2], dims[3]);
            let d = c * kh * kw;
            let positions = macs as f64 / (o * d).max(1) as f64;
            let auto_pad = node.attr_str("auto_pad").unwrap_or_default();
            let explicit = auto_pad.is_empty() || auto_pad == "NOTSET" || auto_pad == "VALID";
            let spatial = match (known(&node.input[0]), known(&node.output[0])) {
                (Some(x), Some(y)) if explicit && kh > 1 && kw > 1 && x.len() == 4 => {
                    Some((y[2], x[3], y[3]))
                }
                _ => None,
            };
            let m = Mat::from_fn(o, d, |r, k| f64::from(w[r * d + k]));
            (
                Op::Conv {
                    c,
                    kh,
                    kw,
                    positions,
                    spatial,
                },
                o,
                d,
                m,
            )
        }
        "Gemm" | "MatMul" => {
            let gemm = node.op_type() == "Gemm";
            if gemm
                && (node.attr_int("transA").unwrap_or(0) != 0
                    || node.attr_float("alpha").unwrap_or(1.0) != 1.0
                    || node.attr_float("beta").unwrap_or(1.0) != 1.0)
            {
                return Err(
                    "Gemm with transA, alpha or beta set; low rank needs the plain form".into(),
                );
            }
            if dims.len() != 2 {
                return Err(format!("its weight has rank {}, not 2", dims.len()));
            }
            let trans_b = gemm && node.attr_int("transB").unwrap_or(0) != 0;
            let (o, d) = if trans_b {
                (dims[0], dims[1])
            } else {
                (dims[1], dims[0])
            };
            let m = if trans_b {
                Mat::from_fn(o, d, |r, k| f64::from(w[r * d + k]))
            } else {
                Mat::from_fn(o, d, |r, k| f64::from(w[k * o + r]))
            };
            let rows = macs as f64 / (o * d).max(1) as f64;
            (Op::Dense { gemm, rows }, o, d, m)
        }
        other => return Err(format!("op {other} is not factorised")),
    };
    if let Some(b) = &bias
        && b.len() != o
    {
        return Err(format!("its bias has {} values for {o} outputs", b.len()));
    }
    let params = (o * d) as f64 + bias.as_ref().map_or(0.0, |b| b.len() as f64);
    Ok(Layer {
        name: node.name().to_string(),
        output: node.output[0].clone(),
        input: node.input[0].clone(),
        op,
        o,
        d,
        m,
        bias,
        macs: macs as f64,
        params,
    })
}

/// Every Conv / Gemm / MatMul with MACs, as a layer or as a skip.
fn survey(model: &Model) -> Result<Vec<Result<Layer, Skipped>>, Error> {
    let shapes = shape::infer(model, &[])?;
    let costs = cost::count(model, &shapes);
    Ok(model
        .graph()
        .node
        .iter()
        .zip(&costs.nodes)
        .filter(|(n, c)| c.macs > 0 && matches!(n.op_type(), "Conv" | "Gemm" | "MatMul"))
        .map(|(n, c)| {
            describe(model, &shapes, n, c.macs).map_err(|reason| Skipped {
                node: n.name().to_string(),
                reason,
            })
        })
        .collect())
}

/// The layers [`factorise`] may change, for collecting their input statistics
/// ([`crate::refit::collect`]) when factorising data-aware.
pub fn layers(model: &Model) -> Result<Vec<LayerRef>, Error> {
    Ok(survey(model)?
        .into_iter()
        .filter_map(Result::ok)
        .map(|l| LayerRef {
            node: l.name,
            input: l.input,
            output: l.output,
        })
        .collect())
}

fn svd_fail(node: &str, e: impl std::fmt::Debug) -> Error {
    Error::Pass {
        pass: "low-rank".into(),
        reason: format!("{node}: the SVD failed ({e:?})"),
    }
}

/// The spatial matrix: rows (c, i), columns (o, j).
fn spatial_matrix(l: &Layer) -> Mat<f64> {
    let Op::Conv { c, kh, kw, .. } = l.op else {
        unreachable!("spatial scheme on a Conv only")
    };
    Mat::from_fn(c * kh, l.o * kw, |ci, oj| {
        let (ch, i) = (ci / kh, ci % kh);
        let (o, j) = (oj / kw, oj % kw);
        l.m[(o, ch * kh * kw + i * kw + j)]
    })
}

/// `(L, L⁻¹)` with `L Lᵀ = G` from the eigendecomposition (tiny eigenvalues clamped).
fn whitening(node: &str, g: &Mat<f64>) -> Result<(Mat<f64>, Mat<f64>), Error> {
    let eig = g
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| svd_fail(node, e))?;
    let (q, s) = (eig.U(), eig.S().column_vector());
    let n = g.nrows();
    let top = (0..n).map(|i| s[i]).fold(0.0f64, f64::max).max(1e-300);
    let lam: Vec<f64> = (0..n).map(|i| s[i].max(top * 1e-10)).collect();
    let l = Mat::from_fn(n, n, |i, j| q[(i, j)] * lam[j].sqrt());
    let linv = Mat::from_fn(n, n, |i, j| q[(j, i)] / lam[i].sqrt());
    Ok((l, linv))
}

/// Singular values and the factors of one layer under one scheme: `(A, B, σ, bias of the first
/// factor)` with `M ≈ A B` (`A` o × k, `B` k × d, k = min dims), balanced by `√σ`.
struct Factors {
    a: Mat<f64>,
    b: Mat<f64>,
    sigma: Vec<f64>,
    /// Data-aware: the first factor's bias per rank component (the last column of `B [· L⁻¹]`).
    b_bias: Option<Mat<f64>>,
    /// What the errors are relative to.
    norm: f64,
}

fn factors(l: &Layer, scheme: Scheme, gram: Option<(&Mat<f64>, usize)>) -> Result<Factors, Error> {
    let balanced = |u: faer::MatRef<f64>, s: &[f64], v: faer::MatRef<f64>| {
        let k = s.len();
        let a = Mat::from_fn(u.nrows(), k, |i, r| u[(i, r)] * s[r].sqrt());
        let b = Mat::from_fn(k, v.nrows(), |r, j| v[(j, r)] * s[r].sqrt());
        (a, b)
    };
    match (scheme, gram) {
        (Scheme::Spatial, _) => {
            let ms = spatial_matrix(l);
            let svd = ms.thin_svd().map_err(|e| svd_fail(&l.name, e))?;
            let k = ms.nrows().min(ms.ncols());
            let s: Vec<f64> = (0..k).map(|i| svd.S().column_vector()[i]).collect();
            // Mₛ = V1 H: V1 (c·kh) × k, H k × (o·kw)
            let (v1, h) = balanced(svd.U(), &s, svd.V());
            let norm = s.iter().map(|x| x * x).sum();
            Ok(Factors {
                a: v1,
                b: h,
                sigma: s,
                b_bias: None,
                norm,
            })
        }
        (_, None) => {
            let svd = l.m.thin_svd().map_err(|e| svd_fail(&l.name, e))?;
            let k = l.o.min(l.d);
            let s: Vec<f64> = (0..k).map(|i| svd.S().column_vector()[i]).collect();
            let (a, b) = balanced(svd.U(), &s, svd.V());
            let norm = s.iter().map(|x| x * x).sum();
            Ok(Factors {
                a,
                b,
                sigma: s,
                b_bias: None,
                norm,
            })
        }
        (_, Some((g, rows))) => {
            let n = l.d + 1;
            if g.nrows() != n {
                return Err(Error::Pass {
                    pass: "low-rank".into(),
                    reason: format!(
                        "{}: input statistics have {} columns, the layer {n}",
                        l.name,
                        g.nrows()
                    ),
                });
            }
            let m_aug = Mat::from_fn(l.o, n, |i, j| {
                if j < l.d {
                    l.m[(i, j)]
                } else {
                    l.bias.as_ref().map_or(0.0, |b| b[i])
                }
            });
            let (lw, linv) = whitening(&l.name, g)?;
            let p = &m_aug * &lw;
            let svd = p.thin_svd().map_err(|e| svd_fail(&l.name, e))?;
            let k = l.o.min(n);
            let s: Vec<f64> = (0..k).map(|i| svd.S().column_vector()[i]).collect();
            let (a, bw) = balanced(svd.U(), &s, svd.V());
            let b_aug = &bw * &linv; // k × n
            let b = Mat::from_fn(k, l.d, |r, j| b_aug[(r, j)]);
            let b_bias = Mat::from_fn(k, 1, |r, _| b_aug[(r, l.d)]);
            // output energy around its mean: Σ‖y‖² − rows ‖ȳ‖², with ȳ = M_aug x̄
            let total: f64 = s.iter().map(|x| x * x).sum();
            let xbar = Mat::from_fn(n, 1, |i, _| g[(i, n - 1)] / rows.max(1) as f64);
            let ybar = &m_aug * &xbar;
            let mean_sq: f64 = (0..l.o).map(|i| ybar[(i, 0)] * ybar[(i, 0)]).sum();
            let norm = (total - rows as f64 * mean_sq).max(total * 1e-12);
            Ok(Factors {
                a,
                b,
                sigma: s,
                b_bias: Some(b_bias),
                norm,
            })
        }
    }
}

impl Factors {
    /// Relative error of keeping rank r.
    fn error(&self, r: usize) -> f64 {
        self.sigma[r.min(self.sigma.len())..]
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            / self.norm.max(1e-300)
    }
}

/// Replace the layer by its rank-r factors (the caller checked r).
fn rewrite(
    model: &mut Model,
    l: &Layer,
    scheme: Scheme,
    r: usize,
    f: &Factors,
) -> Result<(), Error> {
    let g = model.graph();
    let idx = g
        .node
        .iter()
        .position(|n| n.name() == l.name)
        .ok_or_else(|| Error::Pass {
            pass: "low-rank".into(),
            reason: format!("no node {}", l.name),
        })?;
    let node = g.node[idx].clone();
    let mid = edit::unique_name(model.graph(), &format!("{}/lowrank", l.output));
    let w1n = edit::unique_name(model.graph(), &format!("{}.lowrank_a", node.input[1]));
    let w2n = edit::unique_name(model.graph(), &format!("{}.lowrank_b", node.input[1]));
    let b1n = edit::unique_name(model.graph(), &format!("{}.lowrank_a_bias", node.input[1]));
    let f32s = |it: &mut dyn Iterator<Item = f64>| it.map(|v| v as f32).collect::<Vec<f32>>();
    let bias1: Option<Vec<f32>> = f
        .b_bias
        .as_ref()
        .map(|bb| f32s(&mut (0..r).map(|k| bb[(k, 0)])));
    let mut inits = vec![];
    let mut first: Vec<NodeProto> = vec![];
    let mut second = node.clone();
    second.input[0] = mid.clone();
    second.input[1] = w2n.clone();
    if bias1.is_some() {
        // data-aware: the bias lives in the first factor
        second.input.truncate(2);
    }
    match (scheme, l.op) {
        (Scheme::Spatial, Op::Conv { c, kh, kw, .. }) => {
            let strides = node
                .attr_ints("strides")
                .map_or(vec![1, 1], <[i64]>::to_vec);
            let dil = node
                .attr_ints("dilations")
                .map_or(vec![1, 1], <[i64]>::to_vec);
            let pads = node.attr_ints("pads").map_or(vec![0; 4], <[i64]>::to_vec);
            let (o, ri) = (l.o, r as i64);
            // first: [r, c, kh, 1] from V1[(c·kh + i), k]
            let w1 = f32s(&mut (0..r * c * kh).map(|x| {
                let (k, ci) = (x / (c * kh), x % (c * kh));
                f.a[(ci, k)]
            }));
            inits.push(from_f32(&w1n, &[ri, c as i64, kh as i64, 1], &w1));
            // second: [o, r, 1, kw] from H[k, (o·kw + j)]
            let w2 = f32s(&mut (0..o * r * kw).map(|x| {
                let (oo, rest) = (x / (r * kw), x % (r * kw));
                let (k, j) = (rest / kw, rest % kw);
                f.b[(k, oo * kw + j)]
            }));
            inits.push(from_f32(&w2n, &[o as i64, ri, 1, kw as i64], &w2));
            let mut n1 = node.clone();
            n1.name = Some(format!("{}/lowrank_a", l.name));
            n1.input = vec![node.input[0].clone(), w1n];
            n1.output = vec![mid.clone()];
            n1.attribute = vec![
                ints("kernel_shape", &[kh as i64, 1]),
                ints("strides", &[strides[0], 1]),
                ints("dilations", &[dil[0], 1]),
                ints("pads", &[pads[0], 0, pads[2], 0]),
            ];
            first.push(n1);
            second.attribute = vec![
                ints("kernel_shape", &[1, kw as i64]),
                ints("strides", &[1, strides[1]]),
                ints("dilations", &[1, dil[1]]),
                ints("pads", &[0, pads[1], 0, pads[3]]),
            ];
        }
        (_, Op::Conv { c, kh, kw, .. }) => {
            let (o, ri) = (l.o, r as i64);
            let w1 = f32s(&mut (0..r * l.d).map(|x| f.b[(x / l.d, x % l.d)]));
            inits.push(from_f32(&w1n, &[ri, c as i64, kh as i64, kw as i64], &w1));
            let w2 = f32s(&mut (0..o * r).map(|x| f.a[(x / r, x % r)]));
            inits.push(from_f32(&w2n, &[o as i64, ri, 1, 1], &w2));
            let mut n1 = node.clone();
            n1.name = Some(format!("{}/lowrank_a", l.name));
            n1.input = vec![node.input[0].clone(), w1n];
            if let Some(b) = &bias1 {
                inits.push(from_f32(&b1n, &[ri], b));
                n1.input.push(b1n);
            }
            n1.output = vec![mid.clone()];
            first.push(n1);
            second.attribute = vec![ints("kernel_shape", &[1, 1])];
        }
        (_, Op::Dense { gemm, .. }) => {
            let (o, ri) = (l.o, r as i64);
            // x [.., d] · B^T [d, r]
            let w1 = f32s(&mut (0..l.d * r).map(|x| f.b[(x % r, x / r)]));
            inits.push(from_f32(&w1n, &[l.d as i64, ri], &w1));
            let mm_out = if bias1.is_some() {
                edit::unique_name(model.graph(), &format!("{}/lowrank_mm", l.output))
            } else {
                mid.clone()
            };
            first.push(NodeProto {
                name: Some(format!("{}/lowrank_a", l.name)),
                op_type: Some("MatMul".into()),
                input: vec![node.input[0].clone(), w1n],
                output: vec![mm_out.clone()],
                ..Default::default()
            });
            if let Some(b) = &bias1 {
                inits.push(from_f32(&b1n, &[ri], b));
                first.push(NodeProto {
                    name: Some(format!("{}/lowrank_a_bias", l.name)),
                    op_type: Some("Add".into()),
                    input: vec![mm_out, b1n],
                    output: vec![mid.clone()],
                    ..Default::default()
                });
            }
            let trans_b = gemm && node.attr_int("transB").unwrap_or(0) != 0;
            let w2 = if trans_b {
                f32s(&mut (0..o * r).map(|x| f.a[(x / r, x % r)]))
            } else {
                f32s(&mut (0..r * o).map(|x| f.a[(x % o, x / o)]))
            };
            let dims = if trans_b {
                [o as i64, ri]
            } else {
                [ri, o as i64]
            };
            inits.push(from_f32(&w2n, &dims, &w2));
        }
    }
    let old: HashSet<String> = node.input[1..].iter().cloned().collect();
    let gm = model.graph_mut();
    gm.node[idx] = second;
    for (k, n) in first.into_iter().enumerate() {
        gm.node.insert(idx + k, n);
    }
    gm.initializer.extend(inits);
    let read: HashSet<String> = gm
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(gm.output.iter().map(|o| o.name().to_string()))
        .collect();
    gm.initializer
        .retain(|t| !old.contains(t.name()) || read.contains(t.name()));
    gm.value_info.clear();
    Ok(())
}

/// Factorise one layer at rank `rank` with `scheme` (channel or spatial), whatever it costs;
/// `gram`: the layer's input statistics for a data-aware channel-wise factorisation.
pub fn factorise_layer(
    model: &mut Model,
    node: &str,
    scheme: Scheme,
    rank: usize,
    gram: Option<(&Mat<f64>, usize)>,
) -> Result<(), Error> {
    let fail = |reason: String| Error::Pass {
        pass: "low-rank".into(),
        reason: format!("{node}: {reason}"),
    };
    let l = survey(model)?
        .into_iter()
        .find_map(|x| match x {
            Ok(l) if l.name == node => Some(Ok(l)),
            Err(s) if s.node == node => Some(Err(s.reason)),
            _ => None,
        })
        .ok_or_else(|| fail("no Conv, Gemm or MatMul with MACs of that name".into()))?
        .map_err(fail)?;
    let scheme = match scheme {
        Scheme::Auto => Scheme::Channel,
        s => s,
    };
    if scheme == Scheme::Spatial && !l.spatial_ok() {
        return Err(fail(
            "the spatial scheme needs a 2-D Conv with kh, kw > 1 and explicit pads".into(),
        ));
    }
    let gram = if scheme == Scheme::Spatial {
        None
    } else {
        gram
    };
    let max = l.max_rank(scheme, gram.is_some());
    if rank == 0 || rank > max {
        return Err(fail(format!("rank {rank} is not in 1..={max}")));
    }
    let f = factors(&l, scheme, gram)?;
    rewrite(model, &l, scheme, rank, &f)
}

/// A layer that may be factorised: its choices and its factors per scheme considered.
struct Candidate {
    layer: Layer,
    choices: Vec<Choice>,
    factors: Vec<(Scheme, Factors)>,
}

/// One choice for one layer: keep it (`rank` None) or a scheme at a rank.
#[derive(Clone, Copy)]
struct Choice {
    scheme: Scheme,
    rank: Option<usize>,
    cost: f64,
    macs: f64,
    params: f64,
    err: f64,
}

/// Factorise the model's layers by the options' rule.
pub fn factorise(
    model: &mut Model,
    stats: Option<&RefitStats>,
    opts: &LowRankOptions,
) -> Result<LowRankReport, Error> {
    factorise_as(model, stats, opts, None)
}

/// One layer of a low-rank plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedLayer {
    /// The layer.
    pub node: String,
    /// Its scheme.
    pub scheme: Scheme,
    /// Its rank.
    pub rank: usize,
}

/// [`factorise`], or with `given` the layers, schemes and ranks of a saved plan (the rule is
/// not consulted; a layer the plan names that cannot take its rank is skipped with the reason).
pub fn factorise_as(
    model: &mut Model,
    stats: Option<&RefitStats>,
    opts: &LowRankOptions,
    given: Option<&[PlannedLayer]>,
) -> Result<LowRankReport, Error> {
    if opts.round_to == 0 {
        return Err(Error::Pass {
            pass: "low-rank".into(),
            reason: "round_to must be at least 1".into(),
        });
    }
    match opts.rule {
        RankRule::Rank(0) => {
            return Err(Error::Pass {
                pass: "low-rank".into(),
                reason: "a rank of 0 removes the layer; give a rank of at least 1".into(),
            });
        }
        RankRule::Energy(f) | RankRule::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
            return Err(Error::Pass {
                pass: "low-rank".into(),
                reason: format!("{f} is not in (0, 1]"),
            });
        }
        RankRule::Budget(Budget::Latency(_)) => {
            return Err(Error::Budget(
                "low rank takes macs= or params= budgets (latency tables cover pruned widths, not factorised layers)".into(),
            ));
        }
        _ => {}
    }
    if opts.data_aware && opts.scheme == Scheme::Spatial {
        return Err(Error::Pass {
            pass: "low-rank".into(),
            reason: "data-aware factors are channel-wise: use --scheme channel or auto with --data-aware".into(),
        });
    }
    let shapes = shape::infer(model, &[])?;
    let base = cost::count(model, &shapes);
    if let RankRule::Budget(Budget::Macs(_)) = opts.rule {
        // a MAC budget is never planned on a guessed size: the unknown dims are named
        base.exact_macs()?;
    }
    let mut skipped = vec![];
    let mut cands: Vec<Candidate> = vec![];
    let by_params = matches!(opts.rule, RankRule::Budget(Budget::Params(_)));
    for x in survey(model)? {
        let l = match x {
            Ok(l) => l,
            Err(s) => {
                skipped.push(s);
                continue;
            }
        };
        let schemes: Vec<Scheme> = match opts.scheme {
            Scheme::Spatial if !l.spatial_ok() => {
                skipped.push(Skipped {
                    node: l.name.clone(),
                    reason: "the spatial scheme needs a 2-D Conv with kh, kw > 1 and explicit pads"
                        .into(),
                });
                continue;
            }
            Scheme::Auto if l.spatial_ok() && !opts.data_aware => {
                vec![Scheme::Channel, Scheme::Spatial]
            }
            Scheme::Auto => vec![Scheme::Channel],
            s => vec![s],
        };
        let gram = match (opts.data_aware, stats) {
            (false, _) => None,
            (true, Some(st)) => match st.gram(&l.name) {
                Some(g) => Some(g),
                None => {
                    skipped.push(Skipped {
                        node: l.name.clone(),
                        reason: "no calibration statistics for it".into(),
                    });
                    continue;
                }
            },
            (true, None) => {
                return Err(Error::Pass {
                    pass: "low-rank".into(),
                    reason: "data-aware factorisation needs calibration data".into(),
                });
            }
        };
        let mut fs = vec![];
        let keep = Choice {
            scheme: schemes[0],
            rank: None,
            cost: if by_params { l.params } else { l.macs },
            macs: l.macs,
            params: l.params,
            err: 0.0,
        };
        let mut choices = vec![keep];
        for &s in &schemes {
            let g = if s == Scheme::Spatial { None } else { gram };
            let f = factors(&l, s, g)?;
            let max = l.max_rank(s, g.is_some());
            let mut r = opts.round_to;
            while r <= max {
                let (m, p) = l.cost(s, r);
                if m < l.macs && p < l.params {
                    choices.push(Choice {
                        scheme: s,
                        rank: Some(r),
                        cost: if by_params { p } else { m },
                        macs: m,
                        params: p,
                        err: f.error(r),
                    });
                }
                r += opts.round_to;
            }
            fs.push((s, f));
        }
        cands.push(Candidate {
            layer: l,
            choices,
            factors: fs,
        });
    }
    // choose per layer
    let mut chosen: Vec<Option<Choice>> = vec![None; cands.len()];
    if let Some(given) = given {
        for (k, cand) in cands.iter().enumerate() {
            let Some(p) = given.iter().find(|p| p.node == cand.layer.name) else {
                continue;
            };
            match cand
                .choices
                .iter()
                .find(|c| c.scheme == p.scheme && c.rank == Some(p.rank))
            {
                Some(c) => chosen[k] = Some(*c),
                None => skipped.push(Skipped {
                    node: p.node.clone(),
                    reason: format!(
                        "the plan's {:?} rank {} does not make it cheaper here",
                        p.scheme, p.rank
                    ),
                }),
            }
        }
    } else {
        match opts.rule {
            RankRule::Budget(b) => {
                let target = b.fraction();
                let total_base = if by_params {
                    base.params as f64
                } else {
                    base.macs as f64
                };
                // Pareto frontier per layer, most expensive (keep) first
                let frontiers: Vec<Vec<Choice>> = cands
                    .iter()
                    .map(|c| {
                        let mut v = c.choices.clone();
                        v.sort_by(|a, b| a.cost.total_cmp(&b.cost));
                        let mut out: Vec<Choice> = vec![];
                        for c in v {
                            if out.last().is_none_or(|p: &Choice| c.err < p.err) {
                                out.push(c);
                            }
                        }
                        out.reverse();
                        out
                    })
                    .collect();
                let fixed = total_base - cands.iter().map(|c| c.choices[0].cost).sum::<f64>();
                let mut at = vec![0usize; cands.len()];
                let total = |at: &[usize]| -> f64 {
                    fixed
                        + frontiers
                            .iter()
                            .zip(at)
                            .map(|(f, &i)| f[i].cost)
                            .sum::<f64>()
                };
                let smallest: Vec<usize> = frontiers.iter().map(|f| f.len() - 1).collect();
                let reachable = total(&smallest) / total_base.max(1e-12);
                if reachable > target + 1e-9 {
                    let kind = b.kind();
                    return Err(Error::Budget(format!(
                        "{kind}={target} is unreachable by low rank: the smallest reachable is {kind}={reachable:.3} (every layer at rank {}; {} layers cannot be factorised)",
                        opts.round_to,
                        skipped.len()
                    )));
                }
                while total(&at) / total_base > target + 1e-9 {
                    let mut best: Option<(f64, usize)> = None;
                    for (l, f) in frontiers.iter().enumerate() {
                        if at[l] + 1 < f.len() {
                            let (a, n) = (f[at[l]], f[at[l] + 1]);
                            let ratio = (n.err - a.err) / (a.cost - n.cost).max(1e-12);
                            if best.is_none_or(|b| ratio < b.0) {
                                best = Some((ratio, l));
                            }
                        }
                    }
                    let Some((_, l)) = best else { break };
                    at[l] += 1;
                }
                for (l, f) in frontiers.iter().enumerate() {
                    chosen[l] = f[at[l]].rank.map(|_| f[at[l]]);
                }
            }
            rule => {
                for (k, cand) in cands.iter().enumerate() {
                    let (l, ch, fs) = (&cand.layer, &cand.choices, &cand.factors);
                    // auto with a per-layer rule: channel-wise
                    let (s, f) = &fs[0];
                    let max = l.max_rank(*s, opts.data_aware);
                    let want = match rule {
                        RankRule::Rank(n) => {
                            if n > max {
                                skipped.push(Skipped {
                                    node: l.name.clone(),
                                    reason: format!("rank {n} exceeds its full rank {max}"),
                                });
                                continue;
                            }
                            n
                        }
                        RankRule::Fraction(x) => {
                            let r = ((max as f64 * x).round() as usize).max(1);
                            (r.div_ceil(opts.round_to) * opts.round_to).min(max)
                        }
                        RankRule::Energy(e) => {
                            let mut r = opts.round_to.min(max);
                            while r < max && 1.0 - f.error(r) < e {
                                r = (r + opts.round_to).min(max);
                            }
                            r
                        }
                        RankRule::Budget(_) => unreachable!("handled above"),
                    };
                    match ch.iter().find(|c| c.scheme == *s && c.rank == Some(want)) {
                        Some(c) => chosen[k] = Some(*c),
                        None => {
                            let (m, _) = l.cost(*s, want);
                            skipped.push(Skipped {
                            node: l.name.clone(),
                            reason: format!(
                                "rank {want} of {max} would not make it cheaper ({:.0} -> {m:.0} MACs)",
                                l.macs
                            ),
                        });
                        }
                    }
                }
            }
        }
    }
    let mut factored = vec![];
    for (cand, c) in cands.iter().zip(&chosen) {
        let (l, fs) = (&cand.layer, &cand.factors);
        let Some(c) = c else { continue };
        let Some(r) = c.rank else { continue };
        let f = &fs
            .iter()
            .find(|(s, _)| *s == c.scheme)
            .expect("factors of every scheme considered")
            .1;
        rewrite(model, l, c.scheme, r, f)?;
        factored.push(Factored {
            node: l.name.clone(),
            scheme: c.scheme,
            rank: r,
            full_rank: l.max_rank(c.scheme, opts.data_aware && c.scheme != Scheme::Spatial),
            macs: (l.macs.round() as u64, c.macs.round() as u64),
            params: (l.params.round() as u64, c.params.round() as u64),
            rel_error: c.err,
        });
    }
    if factored.is_empty() {
        let why = skipped
            .first()
            .map(|s| {
                format!(
                    " ({} of them, e.g. {}: {})",
                    skipped.len(),
                    s.node,
                    s.reason
                )
            })
            .unwrap_or_default();
        return Err(Error::Pass {
            pass: "low-rank".into(),
            reason: format!("nothing to factorise: no layer would get cheaper{why}"),
        });
    }
    whittle_core::check::check_graph(model.graph()).map_err(|e| Error::Pass {
        pass: "low-rank".into(),
        reason: e.to_string(),
    })?;
    shape::infer(model, &[])?;
    Ok(LowRankReport {
        factored,
        skipped,
        data_aware: opts.data_aware,
    })
}

/// Low-rank factorisation as a pipeline method (`--low-rank`, `method = "low_rank"`).
pub struct LowRank;

/// `--low-rank [--scheme S] [--data-aware] [--rank N | --rank-fraction F | --rank-energy E]`.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LowRankFlags {
    /// Factorise layers into two thinner ones (truncated SVD) instead of pruning; combine both
    /// with a recipe (each method gets its own target).
    #[arg(id = "low_rank", long = "low-rank")]
    #[serde(skip)]
    pub enabled: bool,
    /// Low rank: channel (C→r same kernel, r→N 1×1), spatial (kh×1 then 1×kw) or auto (per
    /// layer; default).
    #[arg(long)]
    pub scheme: Option<String>,
    /// Low rank: factorise against the calibration inputs' statistics (channel-wise).
    #[arg(long)]
    #[serde(default)]
    pub data_aware: bool,
    /// Low rank: the same rank for every layer (instead of --target).
    #[arg(long, conflicts_with_all = ["rank_fraction", "rank_energy"])]
    pub rank: Option<usize>,
    /// Low rank: this fraction of each layer's full rank (instead of --target).
    #[arg(long, conflicts_with = "rank_energy")]
    pub rank_fraction: Option<f64>,
    /// Low rank: per layer, the smallest rank keeping this share of its energy (instead of
    /// --target).
    #[arg(long)]
    pub rank_energy: Option<f64>,
    /// The budget (`macs=` or `params=`).
    #[arg(skip)]
    pub target: Option<String>,
    /// Ranks are multiples of this.
    #[arg(skip)]
    pub round_to: Option<usize>,
}

impl LowRankFlags {
    /// The options of [`factorise`].
    pub fn options(&self) -> Result<LowRankOptions, Error> {
        let bad = |reason: String| Error::Pass {
            pass: "low-rank".into(),
            reason,
        };
        let scheme: Scheme = self
            .scheme
            .as_deref()
            .unwrap_or("auto")
            .parse()
            .map_err(|e: String| bad(format!("--scheme: {e}")))?;
        let rule = match (self.rank, self.rank_fraction, self.rank_energy) {
            (Some(r), _, _) => RankRule::Rank(r),
            (_, Some(f), _) => RankRule::Fraction(f),
            (_, _, Some(e)) => RankRule::Energy(e),
            _ => RankRule::Budget(
                self.target
                    .as_deref()
                    .unwrap_or("macs=0.75")
                    .parse()
                    .map_err(|e: String| Error::Budget(format!("--target: {e}")))?,
            ),
        };
        if let RankRule::Rank(0) = rule {
            return Err(bad(
                "--rank 0 would remove the layers; give a rank of at least 1".into(),
            ));
        }
        if let RankRule::Fraction(f) | RankRule::Energy(f) = rule
            && !(f > 0.0 && f <= 1.0)
        {
            return Err(bad(format!(
                "--rank-fraction / --rank-energy {f} is not in (0, 1]"
            )));
        }
        if self.data_aware && scheme == Scheme::Spatial {
            return Err(bad(
                "--data-aware factors are channel-wise: use --scheme channel or auto with --data-aware".into(),
            ));
        }
        let round_to = self.round_to.unwrap_or(1);
        if round_to == 0 {
            return Err(bad("round_to must be at least 1".into()));
        }
        Ok(LowRankOptions {
            rule,
            scheme,
            data_aware: self.data_aware,
            round_to,
        })
    }
}

/// The factorised layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LowRankPlan {
    /// Per layer, its scheme and rank.
    pub layers: Vec<PlannedLayer>,
}

impl crate::pipeline::Method for LowRank {
    const NAME: &'static str = "low_rank";
    type Options = LowRankFlags;
    type Plan = LowRankPlan;
    type Report = LowRankReport;

    fn requested(o: &LowRankFlags) -> bool {
        o.enabled
    }

    fn inherit(o: &mut LowRankFlags, s: &crate::pipeline::Shared) {
        o.target.get_or_insert_with(|| s.target.clone());
        o.round_to.get_or_insert(s.round_to);
    }

    fn validate(o: &LowRankFlags) -> Result<(), Error> {
        o.options().map(|_| ())
    }

    fn needs_data(o: &LowRankFlags) -> Option<&'static str> {
        o.data_aware
            .then_some("data-aware factors use the calibration inputs' statistics")
    }

    fn run(
        o: &LowRankFlags,
        model: &mut Model,
        cx: &crate::pipeline::Context,
        replay: Option<LowRankPlan>,
    ) -> Result<(LowRankPlan, LowRankReport), Error> {
        let mut opts = o.options()?;
        if replay.is_some() {
            // every scheme is considered, so that the plan's can be found
            opts.scheme = Scheme::Auto;
        }
        let stats = if opts.data_aware {
            let c = cx.data(Self::NAME)?;
            Some(crate::refit::collect(
                model,
                &layers(model)?,
                &cx.spec(c, &c.fit),
                &crate::refit::RefitOptions::default(),
            )?)
        } else {
            None
        };
        let given = replay.as_ref().map(|p| p.layers.as_slice());
        let r = factorise_as(model, stats.as_ref(), &opts, given)?;
        let plan = LowRankPlan {
            layers: r
                .factored
                .iter()
                .map(|f| PlannedLayer {
                    node: f.node.clone(),
                    scheme: f.scheme,
                    rank: f.rank,
                })
                .collect(),
        };
        Ok((plan, r))
    }

    fn describe(lr: &LowRankReport) -> Vec<String> {
        let f: Vec<String> = lr
            .factored
            .iter()
            .map(|f| {
                format!(
                    "{} {:?} rank {}/{} (error {:.3})",
                    f.node, f.scheme, f.rank, f.full_rank, f.rel_error
                )
            })
            .collect();
        let mut out = vec![format!(
            "low rank ({}): {} layers factorised: {}",
            if lr.data_aware {
                "data-aware"
            } else {
                "plain SVD"
            },
            f.len(),
            f.join(", ")
        )];
        out.extend(
            lr.skipped
                .iter()
                .map(|k| format!("low rank skipped {}: {}", k.node, k.reason)),
        );
        out
    }
}
