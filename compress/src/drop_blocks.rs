//! Transformer block removal, with or without a linear replacement (ReplaceMe).
//!
//! The blocks are those [`crate::blocks::find_blocks`] finds. On calibration data the hidden state
//! at every block boundary is captured (tokens whose attention mask is 0 are left out when the
//! model has an integer input named `*mask*`), and:
//!
//! - each block's importance is the mean cosine distance `1 − cos(h_in, h_out)` between the hidden
//!   states entering and leaving it (ShortGPT, SANA 1.5);
//! - the span of `count` consecutive blocks removed is the one whose entering and leaving states
//!   are closest by that distance (or the span starting at a given block);
//! - with linear replacement, the span becomes one affine map `h_out ≈ h_in T + b`, fitted by
//!   least squares in f64 with a relative ridge on the calibration tokens, and placed in the graph
//!   as one MatMul and one Add (in a post-norm model the state leaving a span comes out of a
//!   LayerNorm, so `T` cannot be folded into a weight before it exactly). Without it, the span's
//!   output is replaced by its input. The fit is kept only when it lowers the error of plain
//!   removal on the calibration tokens; the report gives both errors.
//!
//! Declines: a count of 0, more blocks than the longest run of chained blocks, a model with no
//! recognised block (the error of [`crate::blocks::find_blocks`]). Guarantees: the graph outputs
//! keep their names and shapes; nothing but the span and what only it used is removed.

use faer::Mat;
use serde::Serialize;
use whittle_calib::{CaptureSpec, capture};
use whittle_core::Model;
use whittle_core::edit;
use whittle_core::onnx::NodeProto;
use whittle_core::stats::cosine;
use whittle_core::tensor::from_f32;

use crate::Error;
use crate::blocks::{self, Block};
use crate::index::Index;
use crate::refit::{AffineFit, RefitReport};

/// What to remove.
#[derive(Debug, Clone, PartialEq)]
pub struct DropOptions {
    /// Consecutive blocks to remove.
    pub count: usize,
    /// Replace the span by a fitted affine map (else by nothing: its input goes on).
    pub linear_replace: bool,
    /// Remove the span starting at this block instead of the closest one.
    pub start: Option<usize>,
    /// Relative ridge of the fit (see [`crate::refit::RefitOptions::ridge`]).
    pub ridge: f64,
}

/// What block removal did.
#[derive(Debug, Clone, Serialize)]
pub struct DropReport {
    /// Blocks the model had.
    pub blocks: usize,
    /// The blocks removed (indices among them).
    pub removed: Vec<usize>,
    /// Per block, the mean cosine distance between the states entering and leaving it.
    pub importance: Vec<f64>,
    /// Per candidate span (by first block), the same distance across the whole span.
    pub span_distance: Vec<(usize, f64)>,
    /// Calibration tokens the statistics cover.
    pub tokens: usize,
    /// Whether the span became an affine map.
    pub linear_replace: bool,
    /// The fit: `rel_error_before` is plain removal's error on the state leaving the span,
    /// `rel_error_after` the map's (`‖Y − Ŷ‖² / ‖Y − mean Y‖²` over the calibration tokens).
    pub fit: Option<RefitReport>,
    /// Weights (initializer elements) before and after.
    pub params: (u64, u64),
}

fn fail(reason: String) -> Error {
    Error::Pass {
        pass: "drop blocks".into(),
        reason,
    }
}

/// Per boundary pair: the sum of cosine distances and the token count.
#[derive(Clone, Default)]
struct Distance {
    sum: f64,
    n: usize,
}

/// Removes `opts.count` blocks of `model`, measuring on the items of `spec`.
pub fn drop_blocks(
    model: &mut Model,
    opts: &DropOptions,
    spec: &CaptureSpec,
) -> Result<DropReport, Error> {
    let found = blocks::find_blocks(model)?;
    let runs = blocks::chains(&found);
    let longest = runs.iter().map(|r| r.1).max().unwrap_or(0);
    if opts.count == 0 {
        return Err(Error::Budget(
            "--drop-blocks 0 removes nothing; give 1 or more".into(),
        ));
    }
    if opts.count > longest {
        return Err(Error::Budget(format!(
            "asked to drop {} blocks, the model has {} ({} in its longest run of chained blocks)",
            opts.count,
            found.len(),
            longest
        )));
    }
    // the boundaries: each run's input, then every block's output; candidate spans by first block
    let mut bounds: Vec<String> = Vec::new();
    let mut at: Vec<(usize, usize)> = Vec::new(); // block → (boundary in, boundary out)
    for &(first, len) in &runs {
        bounds.push(found[first].input.clone());
        for b in &found[first..first + len] {
            at.push((bounds.len() - 1, bounds.len()));
            bounds.push(b.output.clone());
        }
    }
    let candidates: Vec<usize> = runs
        .iter()
        .flat_map(|&(first, len)| first..=first + len - opts.count)
        .collect();
    if let Some(s) = opts.start
        && !candidates.contains(&s)
    {
        return Err(Error::Budget(format!(
            "no span of {} chained blocks starts at block {s} (the model has {} blocks)",
            opts.count,
            found.len()
        )));
    }
    let span = |s: usize| (at[s].0, at[s + opts.count - 1].1);
    let hidden = found[0]
        .hidden
        .ok_or_else(|| fail("the hidden size of the blocks is not known from the graph".into()))?;

    let mask = blocks::mask_input(model);
    let mut tensors = bounds.clone();
    if let Some(m) = &mask {
        tensors.push(m.clone());
    }
    let mut fits: Vec<AffineFit> = candidates
        .iter()
        .map(|_| AffineFit::new(hidden, hidden))
        .collect();
    // distances for each block and each candidate span
    let pairs: Vec<(usize, usize)> = at
        .iter()
        .copied()
        .chain(candidates.iter().map(|&s| span(s)))
        .collect();
    let mut dist = vec![Distance::default(); pairs.len()];
    let mut tokens = 0usize;
    capture(model, &tensors, spec, &mut |values, count| {
        let shape = values[0].shape();
        if shape.last() != Some(&hidden)
            || values[..bounds.len()].iter().any(|v| v.shape() != shape)
        {
            return Err(whittle_calib::Error::Capture(format!(
                "the block boundaries hold states of shape {shape:?}, not all [batch, ..., {hidden}]"
            )));
        }
        let rows = blocks::real_tokens(shape, mask.as_ref().map(|_| &values[bounds.len()]), count)?;
        if rows.is_empty() {
            return Ok(());
        }
        tokens += rows.len();
        let states: Vec<Vec<&[f32]>> = (0..bounds.len())
            .map(|b| {
                let flat = values[b]
                    .as_slice()
                    .expect("captured arrays are contiguous");
                rows.iter()
                    .map(|&r| &flat[r * hidden..(r + 1) * hidden])
                    .collect()
            })
            .collect();
        for (k, &(p, q)) in pairs.iter().enumerate() {
            for (x, y) in states[p].iter().zip(&states[q]) {
                dist[k].sum += 1.0 - cosine(x, y);
                dist[k].n += 1;
            }
        }
        for (fit, &s) in fits.iter_mut().zip(&candidates) {
            let (p, q) = span(s);
            let n = rows.len();
            let at = Mat::from_fn(hidden + 1, n, |i, j| {
                if i == hidden {
                    1.0
                } else {
                    f64::from(states[p][j][i])
                }
            });
            let yt = Mat::from_fn(hidden, n, |i, j| f64::from(states[q][j][i]));
            fit.add(&at, &yt);
        }
        Ok(())
    })
    .map_err(|e| fail(format!("capture: {e}")))?;
    if tokens == 0 {
        return Err(fail(
            "the calibration items hold no tokens (every attention mask entry is 0)".into(),
        ));
    }
    let mean = |d: &Distance| d.sum / d.n.max(1) as f64;
    let importance: Vec<f64> = dist[..at.len()].iter().map(mean).collect();
    let span_distance: Vec<(usize, f64)> = candidates
        .iter()
        .zip(&dist[at.len()..])
        .map(|(&s, d)| (s, mean(d)))
        .collect();
    let chosen = match opts.start {
        Some(s) => candidates.iter().position(|&c| c == s).expect("checked"),
        None => (0..candidates.len())
            .min_by(|&a, &b| span_distance[a].1.total_cmp(&span_distance[b].1))
            .expect("at least one candidate"),
    };
    let first = candidates[chosen];
    let removed: Vec<usize> = (first..first + opts.count).collect();
    let params_before = params(model);
    // plain removal is the identity map: T = I, b = 0
    let identity = Mat::from_fn(hidden + 1, hidden, |i, j| if i == j { 1.0 } else { 0.0 });
    let name = format!("blocks {}..{}", first, first + opts.count - 1);
    let (fit, w) = if opts.linear_replace {
        let (r, w) = fits[chosen].solve(&name, &identity, opts.ridge);
        (Some(r), w)
    } else {
        (None, None)
    };
    let (input, output) = (&found[first].input, &found[first + opts.count - 1].output);
    replace_span(
        model,
        &found[first..first + opts.count],
        input,
        output,
        w.as_ref(),
    )?;
    Ok(DropReport {
        blocks: found.len(),
        removed,
        importance,
        span_distance,
        tokens,
        linear_replace: w.is_some(),
        fit,
        params: (params_before, params(model)),
    })
}

fn params(model: &Model) -> u64 {
    model
        .graph()
        .initializer
        .iter()
        .map(|t| t.dims.iter().product::<i64>().max(0) as u64)
        .sum()
}

/// Makes `output` (the state leaving the span) come from `input` through `w` ((hidden + 1) ×
/// hidden, last row the bias) or directly, and removes what only the span used.
fn replace_span(
    model: &mut Model,
    span: &[Block],
    input: &str,
    output: &str,
    w: Option<&Mat<f64>>,
) -> Result<(), Error> {
    let ix = Index::new(model.graph());
    let Some(&(p, _)) = ix.producer.get(output) else {
        return Err(fail(format!(
            "nothing produces the span's output '{output}'"
        )));
    };
    let base = format!(
        "whittle/replace_blocks_{}_{}",
        span[0].index,
        span[span.len() - 1].index
    );
    let g = model.graph_mut();
    let is_output = g.output.iter().any(|o| o.name() == output);
    match w {
        Some(w) => {
            let d = w.ncols();
            let t: Vec<f32> = (0..d * d).map(|k| w[(k / d, k % d)] as f32).collect();
            let b: Vec<f32> = (0..d).map(|j| w[(d, j)] as f32).collect();
            let (tn, bn, mid) = (
                format!("{base}.weight"),
                format!("{base}.bias"),
                format!("{base}/MatMul_output"),
            );
            g.initializer.push(from_f32(&tn, &[d as i64, d as i64], &t));
            g.initializer.push(from_f32(&bn, &[d as i64], &b));
            let nodes = [
                NodeProto {
                    name: Some(format!("{base}/MatMul")),
                    op_type: Some("MatMul".into()),
                    input: vec![input.into(), tn],
                    output: vec![mid.clone()],
                    ..Default::default()
                },
                NodeProto {
                    name: Some(format!("{base}/Add")),
                    op_type: Some("Add".into()),
                    input: vec![mid, bn],
                    output: vec![output.into()],
                    ..Default::default()
                },
            ];
            g.node.splice(p..=p, nodes);
        }
        None => {
            // a graph output keeps its name (an Identity carries the skip to it)
            edit::bypass(g, p, input);
            if is_output {
                g.node[p].name = Some(base);
            }
        }
    }
    edit::remove_dead(model.graph_mut());
    whittle_core::check::check_graph(model.graph())
        .map_err(|e| fail(format!("the graph after removal: {e}")))?;
    Ok(())
}

/// Block removal as a pipeline method (`--drop-blocks N`, `method = "drop_blocks"`).
pub struct DropBlocks;

/// `--drop-blocks N [--linear-replace] [--drop-start B]`.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropBlocksOptions {
    /// Transformers: remove this many consecutive blocks (the span whose entering and leaving
    /// hidden states are closest on the calibration data, or the one at --drop-start).
    #[arg(id = "drop_blocks", long = "drop-blocks", value_name = "N")]
    pub count: Option<usize>,
    /// With --drop-blocks: replace the span by one affine map fitted by least squares (ReplaceMe)
    /// instead of removing it outright.
    #[arg(long)]
    #[serde(default)]
    pub linear_replace: bool,
    /// With --drop-blocks: remove the span starting at this block (0-based; see `whittle inspect`).
    #[arg(id = "drop_start", long = "drop-start", value_name = "BLOCK")]
    pub start: Option<usize>,
    /// Relative ridge of the fit.
    #[arg(skip)]
    pub ridge: Option<f64>,
}

/// Which span was removed.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DropBlocksPlan {
    /// The first block removed.
    pub start: usize,
    /// Blocks removed.
    pub count: usize,
}

impl crate::pipeline::Method for DropBlocks {
    const NAME: &'static str = "drop_blocks";
    type Options = DropBlocksOptions;
    type Plan = DropBlocksPlan;
    type Report = DropReport;

    fn requested(o: &DropBlocksOptions) -> bool {
        o.count.is_some() || o.linear_replace || o.start.is_some()
    }

    fn inherit(o: &mut DropBlocksOptions, s: &crate::pipeline::Shared) {
        o.ridge.get_or_insert(s.ridge);
    }

    fn validate(o: &DropBlocksOptions) -> Result<(), Error> {
        match o.count {
            Some(_) => Ok(()),
            None => Err(fail(
                "--linear-replace and --drop-start go with --drop-blocks N (count = N in a recipe)"
                    .into(),
            )),
        }
    }

    fn run(
        o: &DropBlocksOptions,
        model: &mut Model,
        cx: &crate::pipeline::Context,
        replay: Option<DropBlocksPlan>,
    ) -> Result<(DropBlocksPlan, DropReport), Error> {
        let c = cx.data(Self::NAME)?;
        let spec = cx.spec(c, &c.fit);
        let opts = DropOptions {
            count: replay.as_ref().map_or(o.count.unwrap_or(1), |p| p.count),
            linear_replace: o.linear_replace,
            start: replay.as_ref().map(|p| p.start).or(o.start),
            ridge: o.ridge.unwrap_or(1e-3),
        };
        cx.start("blocks", 0);
        let r = drop_blocks(model, &opts, &spec);
        cx.progress.finish();
        let r = r?;
        let plan = DropBlocksPlan {
            start: r.removed.first().copied().unwrap_or(0),
            count: r.removed.len(),
        };
        Ok((plan, r))
    }

    fn describe(d: &DropReport) -> Vec<String> {
        let imp: Vec<String> = d.importance.iter().map(|v| format!("{v:.4}")).collect();
        let removed: Vec<String> = d.removed.iter().map(|b| b.to_string()).collect();
        vec![
            format!(
                "block importance (cosine distance in -> out, {} calibration tokens): {}",
                d.tokens,
                imp.join(", ")
            ),
            format!(
                "removed blocks {} of {}: {}",
                removed.join(", "),
                d.blocks,
                match &d.fit {
                    Some(f) if d.linear_replace => format!(
                        "replaced by one linear map (hidden-state error {:.4}, removal alone {:.4})",
                        f.rel_error_after, f.rel_error_before
                    ),
                    Some(f) => format!(
                        "removed outright: {}",
                        f.skipped.as_deref().unwrap_or("the fit did not help")
                    ),
                    None => "removed outright (no --linear-replace)".into(),
                }
            ),
        ]
    }
}
