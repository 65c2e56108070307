//! Attention sub-module removal (2SSP, stage 2): the attention branches that change the hidden
//! state least are cut out of their blocks, the feed-forward parts stay.
//!
//! For every block [`crate::blocks::find_blocks`] finds, the attention sub-block's importance is
//! the mean cosine distance between the state entering it and the state leaving it (after its
//! post-norm, if any) on the calibration tokens (padding excluded). The `count` least important
//! are removed: the residual Add `h + Attn(h)` becomes `h` (a post-norm then normalises `h`
//! itself), and every node only the branch used goes.
//!
//! Declines: a count of 0 or more than the blocks. Guarantees: graph inputs and outputs unchanged.
//!
//! As a pipeline method: `--drop-attention N`, `[[step]] method = "drop_attention"` with
//! `count = N`; the plan is the list of blocks whose attention went.

use serde::{Deserialize, Serialize};
use whittle_calib::{CaptureSpec, capture};
use whittle_core::Model;
use whittle_core::edit;
use whittle_core::stats::cosine;

use crate::Error;
use crate::blocks::{self, Block};
use crate::pipeline::{Context, Method};

/// What attention removal did.
#[derive(Debug, Clone, Serialize)]
pub struct DropAttentionReport {
    /// Per block, the mean cosine distance between the attention sub-block's input and output.
    pub importance: Vec<f64>,
    /// The blocks whose attention was removed.
    pub removed: Vec<usize>,
    /// Calibration tokens the statistics cover.
    pub tokens: usize,
}

/// Removes the attention of the `count` blocks where it matters least.
pub fn drop_attention(
    model: &mut Model,
    count: usize,
    spec: &CaptureSpec,
) -> Result<DropAttentionReport, Error> {
    let found = blocks::find_blocks(model)?;
    check_count(count, found.len())?;
    let (importance, tokens) = importance(model, &found, spec)?;
    let mut order: Vec<usize> = (0..found.len()).collect();
    order.sort_by(|&a, &b| importance[a].total_cmp(&importance[b]));
    let mut removed: Vec<usize> = order[..count].to_vec();
    removed.sort_unstable();
    remove_attention(model, &found, &removed)?;
    Ok(DropAttentionReport {
        importance,
        removed,
        tokens,
    })
}

fn check_count(count: usize, blocks: usize) -> Result<(), Error> {
    if count == 0 || count > blocks {
        return Err(Error::Budget(format!(
            "asked to remove the attention of {count} blocks; the model has {blocks} blocks"
        )));
    }
    Ok(())
}

/// Per block, the mean cosine distance between its attention sub-block's input and output, and
/// the calibration tokens counted.
fn importance(
    model: &Model,
    found: &[Block],
    spec: &CaptureSpec,
) -> Result<(Vec<f64>, usize), Error> {
    let mask = blocks::mask_input(model);
    let nb = found.len();
    let mut tensors: Vec<String> = found.iter().map(|b| b.attention.input.clone()).collect();
    tensors.extend(found.iter().map(|b| b.attention.output.clone()));
    if let Some(m) = &mask {
        tensors.push(m.clone());
    }
    let mut sums = vec![0f64; nb];
    let mut tokens = 0usize;
    capture(model, &tensors, spec, &mut |v, n| {
        let rows = blocks::real_tokens(v[0].shape(), mask.as_ref().map(|_| &v[2 * nb]), n)?;
        tokens += rows.len();
        for (b, sum) in sums.iter_mut().enumerate() {
            let d = *v[b].shape().last().unwrap_or(&1);
            let (x, y) = (
                v[b].as_slice().expect("contiguous"),
                v[nb + b].as_slice().expect("contiguous"),
            );
            for &r in &rows {
                *sum += 1.0 - cosine(&x[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
            }
        }
        Ok(())
    })
    .map_err(|e| Error::Pass {
        pass: "drop attention".into(),
        reason: format!("capture: {e}"),
    })?;
    Ok((
        sums.iter().map(|s| s / tokens.max(1) as f64).collect(),
        tokens,
    ))
}

/// Cuts the attention branches of the blocks `removed` out of the model.
fn remove_attention(model: &mut Model, found: &[Block], removed: &[usize]) -> Result<(), Error> {
    let g = model.graph_mut();
    for &b in removed {
        let sub = &found[b].attention;
        let Some(i) = g.node.iter().position(|n| n.name() == sub.add) else {
            continue;
        };
        edit::bypass(g, i, &sub.input);
    }
    edit::remove_dead(model.graph_mut());
    whittle_core::check::check_graph(model.graph()).map_err(|e| Error::Pass {
        pass: "drop attention".into(),
        reason: format!("the graph after removal: {e}"),
    })
}

/// Attention removal as a pipeline method.
pub struct DropAttention;

/// `--drop-attention N`.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropAttentionOptions {
    /// Transformers: remove the attention of this many blocks (those that change the hidden state
    /// least on the calibration data), keeping their feed-forward parts.
    #[arg(id = "drop_attention", long = "drop-attention", value_name = "N")]
    pub count: Option<usize>,
}

/// The blocks whose attention goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropAttentionPlan {
    /// Block indices, ascending.
    pub removed: Vec<usize>,
}

impl Method for DropAttention {
    const NAME: &'static str = "drop_attention";
    type Options = DropAttentionOptions;
    type Plan = DropAttentionPlan;
    type Report = DropAttentionReport;

    fn requested(o: &DropAttentionOptions) -> bool {
        o.count.is_some()
    }

    fn validate(o: &DropAttentionOptions) -> Result<(), Error> {
        match o.count {
            Some(_) => Ok(()),
            None => Err(Error::Budget("drop_attention needs count = N".into())),
        }
    }

    fn run(
        o: &DropAttentionOptions,
        model: &mut Model,
        cx: &Context,
        replay: Option<DropAttentionPlan>,
    ) -> Result<(DropAttentionPlan, DropAttentionReport), Error> {
        let r = match replay {
            Some(p) => {
                let found = blocks::find_blocks(model)?;
                check_count(p.removed.len(), found.len())?;
                if let Some(b) = p.removed.iter().find(|&&b| b >= found.len()) {
                    return Err(Error::Plan(format!(
                        "the plan removes the attention of block {b}; the model has {} blocks",
                        found.len()
                    )));
                }
                remove_attention(model, &found, &p.removed)?;
                DropAttentionReport {
                    importance: vec![],
                    removed: p.removed,
                    tokens: 0,
                }
            }
            None => {
                let c = cx.data(Self::NAME)?;
                cx.start("attention", 0);
                let r = drop_attention(model, o.count.unwrap_or(1), &cx.spec(c, &c.fit));
                cx.progress.finish();
                r?
            }
        };
        let plan = DropAttentionPlan {
            removed: r.removed.clone(),
        };
        Ok((plan, r))
    }

    fn describe(d: &DropAttentionReport) -> Vec<String> {
        let imp: Vec<String> = d.importance.iter().map(|v| format!("{v:.4}")).collect();
        vec![format!(
            "attention importance (cosine distance in -> out, {} calibration tokens): {}; removed the attention of blocks {:?}",
            d.tokens,
            imp.join(", "),
            d.removed
        )]
    }
}
