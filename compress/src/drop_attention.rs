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

use serde::Serialize;
use whittle_calib::{CaptureSpec, capture};
use whittle_core::Model;
use whittle_core::stats::cosine;

use crate::Error;
use crate::blocks;
use crate::cleanup;

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
    if count == 0 || count > found.len() {
        return Err(Error::Budget(format!(
            "asked to remove the attention of {count} blocks; the model has {} blocks",
            found.len()
        )));
    }
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
    let importance: Vec<f64> = sums.iter().map(|s| s / tokens.max(1) as f64).collect();
    let mut order: Vec<usize> = (0..nb).collect();
    order.sort_by(|&a, &b| importance[a].total_cmp(&importance[b]));
    let mut removed: Vec<usize> = order[..count].to_vec();
    removed.sort_unstable();
    let g = model.graph_mut();
    for &b in &removed {
        let sub = &found[b].attention;
        let Some(i) = g.node.iter().position(|n| n.name() == sub.add) else {
            continue;
        };
        let sum = g.node[i].output[0].clone();
        if g.output.iter().any(|o| o.name() == sum) {
            // a graph output keeps its name: an Identity carries the skip to it
            g.node[i].op_type = Some("Identity".into());
            g.node[i].input = vec![sub.input.clone()];
            continue;
        }
        g.node.remove(i);
        for n in &mut g.node {
            for x in n.input.iter_mut().filter(|x| **x == sum) {
                *x = sub.input.clone();
            }
        }
    }
    cleanup::remove_dead(model);
    whittle_core::check::check_graph(model.graph()).map_err(|e| Error::Pass {
        pass: "drop attention".into(),
        reason: format!("the graph after removal: {e}"),
    })?;
    Ok(DropAttentionReport {
        importance,
        removed,
        tokens,
    })
}
