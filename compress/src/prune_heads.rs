//! Attention head pruning in transformer blocks (Minitron), with a least-squares refit of the
//! output projection.
//!
//! In every block [`crate::blocks::find_blocks`] finds, the attention branch must hold three
//! projections reading one input (Q, K, V: `[d, H·dh]`, heads in consecutive column slices) and
//! an output projection `[H·dh, d]`, with `H` known from the graph. Head `h` scores the root mean
//! square over calibration tokens (padding excluded) of its share of the output projection,
//! `ctx_h · Wo[h]`. Each block keeps its `H − round(fraction · H)` best heads (at least 1): their
//! columns of Q, K, V (weights and biases) and rows of Wo stay, and every Reshape shape constant
//! of the branch that holds the head count (`[.., .., H, dh]`) or the attention width
//! (`[.., .., H·dh]`) is rewritten, so the graph keeps running for any batch and sequence (`-1`
//! and `0` entries are left as they are). Then `Wo, bo` are refitted by least squares on the
//! original model's context of the kept heads.
//!
//! Declines, naming the block: another branch shape (fused QKV, no output projection), an
//! unknown head count, a head count that does not divide the width.

use faer::Mat;
use whittle_calib::{CaptureSpec, capture};
use whittle_core::Model;
use whittle_core::edit;
use whittle_core::tensor::{from_i64, to_i64};

use crate::Error;
use crate::blocks::{self, Linear};
use crate::index::Index;
use crate::prune_ffn::{
    WidthLayer, WidthOptions, WidthReport, WidthSettings, check_fraction, fail, keep_columns,
    keep_rows_refitted, top, weights, width_method,
};
use crate::refit::AffineFit;

/// One block's attention projections.
struct Attention {
    qkv: [Linear; 3],
    out: Linear,
    heads: usize,
    head_dim: usize,
    reshapes: Vec<String>,
}

fn attention_of(model: &Model, b: &blocks::Block) -> Result<Attention, Error> {
    let bad = |why: String| fail("prune heads", format!("block {}: {why}", b.index));
    let lin = blocks::linears(model, &b.attention.nodes);
    let [q, k, v, o] = lin.as_slice() else {
        return Err(bad(format!(
            "the attention branch has {} weighted MatMuls, not 4 (query, key, value, output)",
            lin.len()
        )));
    };
    if !(q.input == k.input && k.input == v.input) || o.input == q.input {
        return Err(bad(
            "the query, key and value projections do not read one input (fused QKV is not handled)"
                .into(),
        ));
    }
    let width = q.dims.1;
    if k.dims != q.dims || v.dims != q.dims || o.dims.0 != width {
        return Err(bad(format!(
            "projection shapes {:?} {:?} {:?} {:?} do not pair",
            q.dims, k.dims, v.dims, o.dims
        )));
    }
    let heads = b
        .heads
        .ok_or_else(|| bad("the head count is not known from the graph".into()))?;
    if heads == 0 || width % heads != 0 {
        return Err(bad(format!(
            "{heads} heads do not divide the width {width}"
        )));
    }
    let g = model.graph();
    let reshapes = g
        .node
        .iter()
        .filter(|n| n.op_type() == "Reshape" && b.attention.nodes.iter().any(|x| x == n.name()))
        .map(|n| n.name().to_string())
        .collect();
    Ok(Attention {
        qkv: [q.clone(), k.clone(), v.clone()],
        out: o.clone(),
        heads,
        head_dim: width / heads,
        reshapes,
    })
}

/// Prunes the attention heads of every transformer block of `model`.
pub fn prune_heads(
    model: &mut Model,
    opts: &WidthOptions,
    spec: &CaptureSpec,
) -> Result<WidthReport, Error> {
    prune_heads_keeping(model, opts, spec, None)
}

/// [`prune_heads`], keeping the heads `keep` lists per block (a saved plan) instead of the
/// highest scored.
pub fn prune_heads_keeping(
    model: &mut Model,
    opts: &WidthOptions,
    spec: &CaptureSpec,
    keep: Option<&[Vec<usize>]>,
) -> Result<WidthReport, Error> {
    check_fraction(opts, "attention heads")?;
    let found = blocks::find_blocks(model)?;
    let atts: Vec<Attention> = found
        .iter()
        .map(|b| attention_of(model, b))
        .collect::<Result<_, _>>()?;
    crate::prune_ffn::check_keep(keep, atts.iter().map(|a| a.heads), "prune heads")?;
    let mask = blocks::mask_input(model);
    let nb = atts.len();
    let mut tensors: Vec<String> = atts.iter().map(|a| a.out.input.clone()).collect();
    tensors.extend(atts.iter().map(|a| a.out.output.clone()));
    if let Some(m) = &mask {
        tensors.push(m.clone());
    }
    let mut fits: Vec<AffineFit> = atts
        .iter()
        .map(|a| AffineFit::new(a.out.dims.0, a.out.dims.1))
        .collect();
    let mut tokens = 0;
    capture(model, &tensors, spec, &mut |v, count| {
        let rows = blocks::real_tokens(v[0].shape(), mask.as_ref().map(|_| &v[2 * nb]), count)?;
        tokens += rows.len();
        for (b, fit) in fits.iter_mut().enumerate() {
            let (w, d) = atts[b].out.dims;
            let (c, y) = (
                v[b].as_slice().expect("contiguous"),
                v[nb + b].as_slice().expect("contiguous"),
            );
            let at = Mat::from_fn(w + 1, rows.len(), |i, j| {
                if i == w {
                    1.0
                } else {
                    f64::from(c[rows[j] * w + i])
                }
            });
            let yt = Mat::from_fn(d, rows.len(), |i, j| f64::from(y[rows[j] * d + i]));
            fit.add(&at, &yt);
        }
        Ok(())
    })
    .map_err(|e| fail("prune heads", format!("capture: {e}")))?;
    let mut layers = Vec::new();
    for (b, a) in atts.iter().enumerate() {
        let d = a.out.dims.1;
        let (h, dh) = (a.heads, a.head_dim);
        let wo = weights(model, &a.out.weight)?;
        // ‖C_h Wo_h‖² summed over tokens = tr(Wo_hᵀ G_hh Wo_h)
        let gram = fits[b].gram();
        let score: Vec<f64> = (0..h)
            .map(|head| {
                let s = head * dh;
                let mut sum = 0.0;
                for o in 0..d {
                    for i in 0..dh {
                        let wi = f64::from(wo[(s + i) * d + o]);
                        for j in 0..dh {
                            sum += wi * gram[(s + i, s + j)] * f64::from(wo[(s + j) * d + o]);
                        }
                    }
                }
                (sum / tokens.max(1) as f64).max(0.0).sqrt()
            })
            .collect();
        let removed = ((opts.fraction * h as f64).round() as usize).min(h - 1);
        let keep_heads = match keep {
            Some(k) => k[b].clone(),
            None => top(&score, h - removed),
        };
        let keep: Vec<usize> = keep_heads
            .iter()
            .flat_map(|&x| x * dh..(x + 1) * dh)
            .collect();
        for l in &a.qkv {
            keep_columns(model, l, &keep)?;
        }
        let fit = opts.refit.then(|| fits[b].select(&keep));
        let report = keep_rows_refitted(
            model,
            &a.out,
            &keep,
            fit.as_ref(),
            opts.ridge,
            &format!("block {} attention output", found[b].index),
        )?;
        for r in &a.reshapes {
            rewrite_shape(model, r, h, dh, keep_heads.len())?;
        }
        layers.push(WidthLayer {
            block: found[b].index,
            kept: keep_heads.len(),
            of: h,
            keep: keep_heads.clone(),
            refit: report,
        });
    }
    edit::remove_dead(model.graph_mut());
    Ok(WidthReport { layers, tokens })
}

/// The new value of a shape vector: `[.., .., H, dh]` → `H'`, `[.., .., H·dh]` → `H'·dh`.
fn new_shape(s: &[i64], h: usize, dh: usize, kept: usize) -> Option<Vec<i64>> {
    let (h, dh, kept) = (h as i64, dh as i64, kept as i64);
    let mut s = s.to_vec();
    match s.len() {
        4 if s[2] == h && (s[3] == dh || s[3] == -1) => s[2] = kept,
        3 if s[2] == h * dh => s[2] = kept * dh,
        _ => return None,
    }
    Some(s)
}

/// Rewrites the head count in the shape input of Reshape `name`: an initializer, or a Concat of
/// one-element constants (initializers or Constant nodes).
fn rewrite_shape(
    model: &mut Model,
    name: &str,
    h: usize,
    dh: usize,
    kept: usize,
) -> Result<(), Error> {
    let g = model.graph();
    let ix = Index::new(g);
    let Some(node) = g.node.iter().find(|n| n.name() == name) else {
        return Ok(());
    };
    let shape_t = node.input[1].clone();
    if let Some(t) = model.initializer(&shape_t) {
        let s = to_i64(t)?;
        if let Some(n) = new_shape(&s, h, dh, kept) {
            let new = edit::unique_name(model.graph(), &format!("{shape_t}.heads{kept}"));
            edit::set_initializer(model.graph_mut(), from_i64(&new, &[n.len() as i64], &n));
            point(model, name, &shape_t, &new);
        }
        return Ok(());
    }
    let Some(&(c, _)) = ix.producer.get(&shape_t) else {
        return Ok(());
    };
    let concat = &g.node[c];
    if concat.op_type() != "Concat" {
        return Ok(());
    }
    // positions are known only when every Concat input is one element
    let info = whittle_core::shape::infer(model, &[])?;
    let one = |t: &str| {
        info.shape(t)
            .is_some_and(|s| s.len() == 1 && s[0].known() == Some(1))
    };
    if !concat.input.iter().all(|t| one(t)) {
        return Ok(());
    }
    // the constant value of each Concat input
    let mut vals: Vec<Option<i64>> = Vec::new();
    for t in &concat.input {
        let v = if let Some(init) = model.initializer(t) {
            to_i64(init).ok().filter(|v| v.len() == 1).map(|v| v[0])
        } else {
            ix.producer.get(t).and_then(|&(p, _)| {
                let n = &g.node[p];
                (n.op_type() == "Constant")
                    .then(|| n.attribute.iter().find_map(|a| a.t.as_ref()))
                    .flatten()
                    .and_then(|t| to_i64(t).ok())
                    .filter(|v| v.len() == 1)
                    .map(|v| v[0])
            })
        };
        vals.push(v);
    }
    // unknown entries (the batch, the sequence) read as 0: only the known ones are compared
    let s: Vec<i64> = vals.iter().map(|v| v.unwrap_or(0)).collect();
    let Some(n) = new_shape(&s, h, dh, kept) else {
        return Ok(());
    };
    let concat_name = concat.name().to_string();
    let inputs = concat.input.clone();
    for (k, (old, new)) in s.iter().zip(&n).enumerate() {
        if old != new && vals[k].is_some() {
            let t = edit::unique_name(model.graph(), &format!("{}.heads{kept}", inputs[k]));
            edit::set_initializer(model.graph_mut(), from_i64(&t, &[1], &[*new]));
            point(model, &concat_name, &inputs[k], &t);
        }
    }
    Ok(())
}

/// Points node `node`'s input `from` at `to`.
fn point(model: &mut Model, node: &str, from: &str, to: &str) {
    let nodes = model.graph_mut().node.iter_mut();
    edit::replace_uses(nodes.filter(|n| n.name() == node), from, to);
}

/// Attention head pruning as a pipeline method (`--prune-heads F`, `method = "prune_heads"`).
pub struct PruneHeads;

/// `--prune-heads F`.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct PruneHeadsOptions {
    /// Transformers: remove this fraction of every block's attention heads (by the norm of their
    /// output), refitting the output projection.
    #[arg(id = "prune_heads", long = "prune-heads", value_name = "FRACTION")]
    pub fraction: Option<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub settings: WidthSettings,
}

width_method!(
    PruneHeads,
    PruneHeadsOptions,
    "prune_heads",
    "attention heads",
    prune_heads_keeping
);
