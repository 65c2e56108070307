//! Feed-forward neuron pruning in transformer blocks (2SSP, stage 1), with a least-squares refit
//! of the down projection.
//!
//! In every block [`crate::blocks::find_blocks`] finds, the feed-forward branch must be
//! `up = x W1 (+ b1)`, an element-wise activation (any chain of element-wise ops whose other
//! operands are scalar constants: Erf or Tanh GELU, ReLU, ...), `down = a W2 (+ b2)`. Neuron `j`
//! scores `mean |a_j| · ‖W2[j, :]‖` over the calibration tokens (padding excluded); each block
//! keeps its `1 − fraction` best neurons (rounded up to a multiple of `round_to`). Columns of
//! `W1`, `b1` and rows of `W2` go; then `W2, b2` are refitted by least squares (f64, relative
//! ridge) so that the kept activations give the original branch output on the calibration tokens
//! (kept only when that lowers the error).
//!
//! Declines, naming the block: a branch of another shape (not two weighted MatMuls; an activation
//! with a per-neuron constant). Guarantees: graph inputs and outputs unchanged.

use std::collections::HashSet;

use faer::Mat;
use serde::Serialize;
use whittle_calib::{CaptureSpec, capture};
use whittle_core::Model;
use whittle_core::tensor::to_f32;

use crate::Error;
use crate::blocks::{self, Linear};
use crate::index::Index;
use crate::refit::{AffineFit, RefitReport};

/// How much to prune.
#[derive(Debug, Clone, PartialEq)]
pub struct WidthOptions {
    /// Fraction of each block's neurons (or heads) removed, in [0, 1).
    pub fraction: f64,
    /// Kept counts are multiples of this (neurons; heads ignore it).
    pub round_to: usize,
    /// Refit the layer after the cut by least squares.
    pub refit: bool,
    /// Relative ridge of the refit.
    pub ridge: f64,
}

/// What was pruned in one block.
#[derive(Debug, Clone, Serialize)]
pub struct WidthLayer {
    /// The block.
    pub block: usize,
    /// Kept of all (neurons or heads).
    pub kept: usize,
    /// Before.
    pub of: usize,
    /// The kept neurons (or heads), ascending.
    pub keep: Vec<usize>,
    /// The refit of the layer after the cut, when it ran.
    pub refit: Option<RefitReport>,
}

/// What a width pass did.
#[derive(Debug, Clone, Serialize)]
pub struct WidthReport {
    /// Per block.
    pub layers: Vec<WidthLayer>,
    /// Calibration tokens the statistics cover.
    pub tokens: usize,
}

pub(crate) fn fail(pass: &str, reason: String) -> Error {
    Error::Pass {
        pass: pass.into(),
        reason,
    }
}

pub(crate) fn check_fraction(opts: &WidthOptions, what: &str) -> Result<(), Error> {
    if !(opts.fraction > 0.0 && opts.fraction < 1.0) {
        return Err(Error::Budget(format!(
            "the fraction of {what} to prune must be in (0, 1), not {}",
            opts.fraction
        )));
    }
    Ok(())
}

/// One block's feed-forward branch.
struct Ffn {
    up: Linear,
    down: Linear,
    /// The activation: the down projection's input.
    act: String,
}

fn ffn_of(model: &Model, b: &blocks::Block) -> Result<Ffn, Error> {
    let bad = |why: String| fail("prune ffn", format!("block {}: {why}", b.index));
    let lin = blocks::linears(model, &b.feed_forward.nodes);
    let [up, down] = lin.as_slice() else {
        return Err(bad(format!(
            "the feed-forward branch has {} weighted MatMuls, not 2 (up, down)",
            lin.len()
        )));
    };
    let (d, f) = up.dims;
    if down.dims != (f, d) {
        return Err(bad(format!(
            "up {:?} and down {:?} projections do not pair",
            up.dims, down.dims
        )));
    }
    // the activation path: element-wise ops whose other operands are scalar constants
    let g = model.graph();
    let ix = Index::new(g);
    let mut path: HashSet<String> = HashSet::from([up.output.clone()]);
    const ELEMENTWISE: &[&str] = &[
        "Relu",
        "Gelu",
        "Erf",
        "Tanh",
        "Sigmoid",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Sqrt",
        "HardSigmoid",
        "HardSwish",
        "LeakyRelu",
        "Clip",
        "Softplus",
        "Elu",
        "Selu",
    ];
    let scalar = |t: &str| {
        let small = |dims: &[i64]| dims.iter().product::<i64>() <= 1;
        model.initializer(t).is_some_and(|c| small(&c.dims))
            || ix.producer.get(t).is_some_and(|&(p, _)| {
                g.node[p].op_type() == "Constant"
                    && g.node[p]
                        .attribute
                        .iter()
                        .any(|a| a.t.as_ref().is_some_and(|c| small(&c.dims)))
            })
    };
    // graph order is topological: one pass follows the activation from the up projection
    for n in &g.node {
        let on_path = n.input.iter().any(|t| path.contains(t));
        if !on_path || n.name() == down.matmul {
            continue;
        }
        if !ELEMENTWISE.contains(&n.op_type()) {
            return Err(bad(format!(
                "'{}' ({}) between the up and down projections is not element-wise",
                n.name(),
                n.op_type()
            )));
        }
        if let Some(t) = n
            .input
            .iter()
            .find(|t| !t.is_empty() && !path.contains(*t) && !scalar(t))
        {
            return Err(bad(format!(
                "the activation '{}' ({}) reads '{t}', which is not a scalar constant",
                n.name(),
                n.op_type()
            )));
        }
        path.extend(n.output.iter().cloned());
    }
    if !path.contains(&down.input) {
        return Err(bad(format!(
            "the down projection's input '{}' is not reached from the up projection by element-wise ops",
            down.input
        )));
    }
    Ok(Ffn {
        up: up.clone(),
        down: down.clone(),
        act: down.input.clone(),
    })
}

pub(crate) fn weights(model: &Model, name: &str) -> Result<Vec<f32>, Error> {
    let t = model
        .initializer(name)
        .ok_or_else(|| fail("width", format!("no initializer '{name}'")))?;
    Ok(to_f32(t)?)
}

/// Keeps the output columns `keep` of a [`Linear`] (weight and bias).
pub(crate) fn keep_columns(model: &mut Model, l: &Linear, keep: &[usize]) -> Result<(), Error> {
    let ((d, cols), kn) = (l.dims, keep.len());
    let w = weights(model, &l.weight)?;
    let w = &w;
    let wk: Vec<f32> = (0..d)
        .flat_map(|i| keep.iter().map(move |&j| w[i * cols + j]))
        .collect();
    blocks::write_weight(model, &l.weight, &[d as i64, kn as i64], &wk, &[&l.matmul]);
    if let (Some(bn), Some(add)) = (&l.bias, &l.bias_add) {
        let b = weights(model, bn)?;
        let bk: Vec<f32> = keep.iter().map(|&j| b[j]).collect();
        blocks::write_weight(model, bn, &[kn as i64], &bk, &[add]);
    }
    Ok(())
}

/// Keeps the input rows `keep` of a [`Linear`], refitted by `fit` (statistics of the kept rows
/// against the layer's original output) when given and when that lowers the error; the bias is
/// refitted only where the layer has one.
pub(crate) fn keep_rows_refitted(
    model: &mut Model,
    l: &Linear,
    keep: &[usize],
    fit: Option<&AffineFit>,
    ridge: f64,
    name: &str,
) -> Result<Option<RefitReport>, Error> {
    let ((_, d), kn) = (l.dims, keep.len());
    let w = weights(model, &l.weight)?;
    let bias = match &l.bias {
        Some(n) => weights(model, n)?,
        None => vec![0.0; d],
    };
    // before the refit: the kept rows and the bias as they were
    let before = Mat::from_fn(kn + 1, d, |i, o| {
        if i == kn {
            f64::from(bias[o])
        } else {
            f64::from(w[keep[i] * d + o])
        }
    });
    let (report, solved) = match fit {
        Some(f) => {
            let (r, w) = f.solve(name, &before, ridge);
            (Some(r), w)
        }
        None => (None, None),
    };
    let w = match (&solved, &l.bias) {
        (Some(w), Some(_)) => w,
        _ => &before,
    };
    let wk: Vec<f32> = (0..kn * d).map(|x| w[(x / d, x % d)] as f32).collect();
    blocks::write_weight(model, &l.weight, &[kn as i64, d as i64], &wk, &[&l.matmul]);
    if let (Some(bn), Some(add)) = (&l.bias, &l.bias_add) {
        let b: Vec<f32> = (0..d).map(|o| w[(kn, o)] as f32).collect();
        blocks::write_weight(model, bn, &[d as i64], &b, &[add]);
    }
    Ok(report)
}

/// The kept count of `n` after removing `fraction`, a multiple of `round_to`, at least 1.
pub(crate) fn kept_count(n: usize, fraction: f64, round_to: usize) -> usize {
    let keep = ((1.0 - fraction) * n as f64).round() as usize;
    let r = round_to.max(1);
    keep.div_ceil(r).saturating_mul(r).clamp(1, n)
}

/// Indices of the `k` largest scores, ascending.
pub(crate) fn top(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Prunes the feed-forward neurons of every transformer block of `model`.
pub fn prune_ffn(
    model: &mut Model,
    opts: &WidthOptions,
    spec: &CaptureSpec,
) -> Result<WidthReport, Error> {
    prune_ffn_keeping(model, opts, spec, None)
}

/// [`prune_ffn`], keeping the neurons `keep` lists per block (a saved plan) instead of the
/// highest scored.
pub fn prune_ffn_keeping(
    model: &mut Model,
    opts: &WidthOptions,
    spec: &CaptureSpec,
    keep: Option<&[Vec<usize>]>,
) -> Result<WidthReport, Error> {
    check_fraction(opts, "feed-forward neurons")?;
    let found = blocks::find_blocks(model)?;
    let ffns: Vec<Ffn> = found
        .iter()
        .map(|b| ffn_of(model, b))
        .collect::<Result<_, _>>()?;
    check_keep(keep, ffns.iter().map(|f| f.up.dims.1), "prune ffn")?;
    let mask = blocks::mask_input(model);
    let mut tensors: Vec<String> = ffns.iter().map(|f| f.act.clone()).collect();
    tensors.extend(ffns.iter().map(|f| f.down.output.clone()));
    if let Some(m) = &mask {
        tensors.push(m.clone());
    }
    let nb = ffns.len();
    // pass 1: mean |a_j| per block
    let mut sums: Vec<Vec<f64>> = ffns.iter().map(|f| vec![0.0; f.up.dims.1]).collect();
    let mut tokens = 0usize;
    let err = |e: whittle_calib::Error| fail("prune ffn", format!("capture: {e}"));
    let mut act_tensors: Vec<String> = tensors[..nb].to_vec();
    if let Some(m) = &mask {
        act_tensors.push(m.clone());
    }
    capture(model, &act_tensors, spec, &mut |v, count| {
        let rows = blocks::real_tokens(v[0].shape(), mask.as_ref().map(|_| &v[nb]), count)?;
        tokens += rows.len();
        for (b, s) in sums.iter_mut().enumerate() {
            let f = s.len();
            let flat = v[b].as_slice().expect("contiguous");
            for &r in &rows {
                for (j, x) in flat[r * f..(r + 1) * f].iter().enumerate() {
                    s[j] += f64::from(x.abs());
                }
            }
        }
        Ok(())
    })
    .map_err(err)?;
    let mut keeps = Vec::new();
    for (b, (f, s)) in ffns.iter().zip(&sums).enumerate() {
        if let Some(k) = keep {
            keeps.push(k[b].clone());
            continue;
        }
        let (fdim, d) = f.down.dims;
        let w2 = weights(model, &f.down.weight)?;
        let score: Vec<f64> = (0..fdim)
            .map(|j| {
                let norm: f64 = w2[j * d..(j + 1) * d]
                    .iter()
                    .map(|&w| f64::from(w) * f64::from(w))
                    .sum::<f64>()
                    .sqrt();
                s[j] / tokens.max(1) as f64 * norm
            })
            .collect();
        keeps.push(top(&score, kept_count(fdim, opts.fraction, opts.round_to)));
    }
    // pass 2: the refit of each down projection from its kept activations
    let mut fits: Vec<AffineFit> = ffns
        .iter()
        .zip(&keeps)
        .map(|(f, k)| AffineFit::new(k.len(), f.down.dims.1))
        .collect();
    if opts.refit {
        capture(model, &tensors, spec, &mut |v, count| {
            let rows = blocks::real_tokens(v[0].shape(), mask.as_ref().map(|_| &v[2 * nb]), count)?;
            for (b, fit) in fits.iter_mut().enumerate() {
                let (fdim, d) = ffns[b].down.dims;
                let (a, y) = (
                    v[b].as_slice().expect("contiguous"),
                    v[nb + b].as_slice().expect("contiguous"),
                );
                let k = &keeps[b];
                let at = Mat::from_fn(k.len() + 1, rows.len(), |i, j| {
                    if i == k.len() {
                        1.0
                    } else {
                        f64::from(a[rows[j] * fdim + k[i]])
                    }
                });
                let yt = Mat::from_fn(d, rows.len(), |i, j| f64::from(y[rows[j] * d + i]));
                fit.add(&at, &yt);
            }
            Ok(())
        })
        .map_err(err)?;
    }
    let mut layers = Vec::new();
    for (b, f) in ffns.iter().enumerate() {
        let k = &keeps[b];
        let (fdim, kn) = (f.up.dims.1, k.len());
        keep_columns(model, &f.up, k)?;
        let fit = opts.refit.then_some(&fits[b]);
        let report = keep_rows_refitted(
            model,
            &f.down,
            k,
            fit,
            opts.ridge,
            &format!("block {} ffn", found[b].index),
        )?;
        layers.push(WidthLayer {
            block: found[b].index,
            kept: kn,
            of: fdim,
            keep: k.clone(),
            refit: report,
        });
    }
    Ok(WidthReport { layers, tokens })
}

/// A replayed plan must name, per block, distinct indices below that block's width.
pub(crate) fn check_keep(
    keep: Option<&[Vec<usize>]>,
    widths: impl Iterator<Item = usize>,
    pass: &str,
) -> Result<(), Error> {
    let Some(keep) = keep else { return Ok(()) };
    let widths: Vec<usize> = widths.collect();
    if keep.len() != widths.len() {
        return Err(fail(
            pass,
            format!(
                "the plan lists {} blocks, the model has {}",
                keep.len(),
                widths.len()
            ),
        ));
    }
    for (b, (k, &w)) in keep.iter().zip(&widths).enumerate() {
        if k.is_empty() || k.windows(2).any(|p| p[0] >= p[1]) || k.iter().any(|&i| i >= w) {
            return Err(fail(
                pass,
                format!("the plan's block {b} does not list ascending indices below {w}"),
            ));
        }
    }
    Ok(())
}

/// The width methods' settings besides the fraction.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct WidthSettings {
    /// Kept neuron counts are multiples of this.
    #[arg(skip)]
    pub round_to: Option<usize>,
    /// Refit the layer after the cut (default true).
    #[arg(skip)]
    pub reconstruct: Option<bool>,
    /// Relative ridge of the refit.
    #[arg(skip)]
    pub ridge: Option<f64>,
}

impl WidthSettings {
    pub(crate) fn inherit(&mut self, s: &crate::pipeline::Shared) {
        self.round_to.get_or_insert(s.round_to);
        self.reconstruct.get_or_insert(!s.no_reconstruct);
        self.ridge.get_or_insert(s.ridge);
    }

    pub(crate) fn width(&self, fraction: Option<f64>) -> WidthOptions {
        WidthOptions {
            fraction: fraction.unwrap_or(0.25),
            round_to: self.round_to.unwrap_or(1),
            refit: self.reconstruct.unwrap_or(true),
            ridge: self.ridge.unwrap_or(1e-3),
        }
    }
}

/// A width method's fraction must be in [0, 1).
fn check_given_fraction(fraction: Option<f64>, what: &str) -> Result<(), Error> {
    match fraction {
        Some(f) if (0.0..1.0).contains(&f) => Ok(()),
        Some(f) => Err(fail(what, format!("fraction {f} is not in [0, 1)"))),
        None => Err(fail(what, "needs a fraction (e.g. fraction = 0.25)".into())),
    }
}

/// The kept units per block, as a plan.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WidthPlan {
    /// Per block (in model order), the kept neurons or heads, ascending.
    pub keep: Vec<Vec<usize>>,
}

/// A width method (feed-forward neurons, attention heads): a fraction flag and
/// [`WidthSettings`], a per-block keep list as its plan, a [`WidthReport`]. Implementing it makes
/// the type a [`crate::pipeline::Method`].
pub trait Width: 'static {
    /// The recipe step's name.
    const NAME: &'static str;
    /// What is pruned, for the summary line.
    const WHAT: &'static str;
    /// The flag's struct: the fraction and the settings.
    type Options: clap::Args + Serialize + serde::de::DeserializeOwned + Default;
    /// The fraction and the settings of `options`.
    fn parts(options: &Self::Options) -> (Option<f64>, &WidthSettings);
    /// Mutable settings of `options`.
    fn settings_mut(options: &mut Self::Options) -> &mut WidthSettings;
    /// The pass, keeping the units `keep` lists per block when given.
    fn keeping(
        model: &mut Model,
        opts: &WidthOptions,
        spec: &CaptureSpec,
        keep: Option<&[Vec<usize>]>,
    ) -> Result<WidthReport, Error>;
}

/// `impl Width` for a method type whose options have `fraction` and `settings`, with its step
/// name, what it prunes, and its pass.
macro_rules! width_method {
    ($method:ident, $options:ident, $name:literal, $what:literal, $keeping:path) => {
        impl $crate::prune_ffn::Width for $method {
            const NAME: &'static str = $name;
            const WHAT: &'static str = $what;
            type Options = $options;

            fn parts(o: &$options) -> (Option<f64>, &$crate::prune_ffn::WidthSettings) {
                (o.fraction, &o.settings)
            }

            fn settings_mut(o: &mut $options) -> &mut $crate::prune_ffn::WidthSettings {
                &mut o.settings
            }

            fn keeping(
                model: &mut Model,
                opts: &$crate::prune_ffn::WidthOptions,
                spec: &CaptureSpec,
                keep: Option<&[Vec<usize>]>,
            ) -> Result<$crate::prune_ffn::WidthReport, Error> {
                $keeping(model, opts, spec, keep)
            }
        }
    };
}
pub(crate) use width_method;

impl<W: Width> crate::pipeline::Method for W {
    const NAME: &'static str = W::NAME;
    type Options = W::Options;
    type Plan = WidthPlan;
    type Report = WidthReport;

    fn requested(o: &W::Options) -> bool {
        W::parts(o).0.is_some()
    }

    fn inherit(o: &mut W::Options, s: &crate::pipeline::Shared) {
        W::settings_mut(o).inherit(s);
    }

    fn validate(o: &W::Options) -> Result<(), Error> {
        check_given_fraction(W::parts(o).0, W::NAME)
    }

    fn run(
        o: &W::Options,
        model: &mut Model,
        cx: &crate::pipeline::Context,
        replay: Option<WidthPlan>,
    ) -> Result<(WidthPlan, WidthReport), Error> {
        let (fraction, settings) = W::parts(o);
        let opts = settings.width(fraction);
        let c = cx.data(W::NAME)?;
        cx.start(W::NAME, 0);
        let r = W::keeping(
            model,
            &opts,
            &cx.spec(c, &c.fit),
            replay.as_ref().map(|p| p.keep.as_slice()),
        );
        cx.progress.finish();
        let r = r?;
        let plan = WidthPlan {
            keep: r.layers.iter().map(|l| l.keep.clone()).collect(),
        };
        Ok((plan, r))
    }

    fn describe(r: &WidthReport) -> Vec<String> {
        describe_width(W::WHAT, r)
    }
}

/// A width report in a line.
fn describe_width(what: &str, r: &WidthReport) -> Vec<String> {
    let per: Vec<String> = r
        .layers
        .iter()
        .map(|l| {
            format!(
                "block {} {}/{}{}",
                l.block,
                l.kept,
                l.of,
                l.refit
                    .as_ref()
                    .filter(|f| f.skipped.is_none())
                    .map(|f| format!(
                        " (refit error {:.3} -> {:.3})",
                        f.rel_error_before, f.rel_error_after
                    ))
                    .unwrap_or_default()
            )
        })
        .collect();
    vec![format!(
        "{what} kept ({} calibration tokens): {}",
        r.tokens,
        per.join(", ")
    )]
}

/// Feed-forward neuron pruning as a pipeline method (`--prune-ffn F`, `method = "prune_ffn"`).
pub struct PruneFfn;

/// `--prune-ffn F`.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct PruneFfnOptions {
    /// Transformers: remove this fraction of every block's feed-forward neurons (by mean
    /// |activation| times output-row norm), refitting the down projection.
    #[arg(id = "prune_ffn", long = "prune-ffn", value_name = "FRACTION")]
    pub fraction: Option<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub settings: WidthSettings,
}

width_method!(
    PruneFfn,
    PruneFfnOptions,
    "prune_ffn",
    "feed-forward neurons",
    prune_ffn_keeping
);
