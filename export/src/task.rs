//! What an output means, and the agreement metric that fits it.
//!
//! "Top-1 agreement" is only meaningful for a classifier. A text detector's probability map, a
//! CTC recogniser's sequence of class scores and an encoder's embedding each have their own
//! measure of whether a compressed model still does the same job:
//!
//! | task | output | metric |
//! |---|---|---|
//! | `classify` | `[N, C]` class scores | top-1 agreement (share of items with the same argmax) |
//! | `embed` | `[N, D]` or `[N, T, D]` | mean cosine of the two models' per-item outputs |
//! | `dense` | `[N, C, H, W]` maps | IoU of the thresholded maps (C = 1: above 0.5 for a map in 0..1, above 0 otherwise; C > 1: per-pixel argmax, IoU averaged over the classes present) |
//! | `ctc` | `[N, T, C]` per-step class scores | share of items whose greedy CTC decodings (argmax per step, repeats merged, blank 0 dropped) are equal |
//!
//! Without `--task` the task of each output is guessed from its shape and the op that produces
//! it (looking through Reshape, Transpose and the like), and the reason is reported with it:
//! the guess is never silent.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use whittle_core::Model;

/// What an output is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// `[N, C]` class scores: top-1 agreement.
    Classify,
    /// An embedding or hidden states: mean cosine.
    Embed,
    /// `[N, C, H, W]` maps (segmentation, a text detector's probability map): IoU.
    Dense,
    /// `[N, T, C]` per-step class scores decoded by CTC: sequence agreement.
    Ctc,
}

impl Task {
    /// Every task, as `--task` spells them.
    pub const ALL: [Task; 4] = [Task::Classify, Task::Embed, Task::Dense, Task::Ctc];

    /// The name `--task` takes.
    pub fn name(self) -> &'static str {
        match self {
            Task::Classify => "classify",
            Task::Embed => "embed",
            Task::Dense => "dense",
            Task::Ctc => "ctc",
        }
    }

    /// The metric's name, as reports print it.
    pub fn metric_name(self) -> &'static str {
        match self {
            Task::Classify => "top-1 agreement",
            Task::Embed => "mean cosine",
            Task::Dense => "IoU",
            Task::Ctc => "sequence agreement",
        }
    }

    /// Why an output of `shape` (batch first) cannot be judged as this task, if it cannot.
    pub fn unfit(self, shape: &[usize]) -> Option<String> {
        let ok = match self {
            Task::Classify => shape.len() == 2 && shape[1] >= 2,
            Task::Embed => shape.len() >= 2,
            Task::Dense => shape.len() == 4,
            Task::Ctc => shape.len() == 3 && shape[2] >= 2,
        };
        let want = match self {
            Task::Classify => "[N, C] with C >= 2",
            Task::Embed => "[N, ...]",
            Task::Dense => "[N, C, H, W]",
            Task::Ctc => "[N, T, C] with C >= 2",
        };
        (!ok).then(|| format!("--task {} needs an output {want}", self.name()))
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
                format!("unknown task '{s}' (one of {})", names.join(", "))
            })
    }
}

/// Ops that move or relabel values without changing what they mean: the guess looks through
/// them to the op that made the output.
const PASSTHROUGH: &[&str] = &[
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Identity",
    "Cast",
    "Dropout",
];

/// The op that produced `output`, looking through [`PASSTHROUGH`] ops (`None`: a graph input or
/// an initializer).
fn last_op<'a>(model: &'a Model, output: &str) -> Option<&'a str> {
    let g = model.graph();
    let mut name = output.to_string();
    for _ in 0..g.node.len() {
        let n = g.node.iter().find(|n| n.output.contains(&name))?;
        if !PASSTHROUGH.contains(&n.op_type()) || n.input.is_empty() {
            return Some(n.op_type());
        }
        name = n.input[0].clone();
    }
    None
}

/// The task of `output`, whose runtime shape is `shape` (batch first), and why: `None` when
/// nothing fits (the report then gives the cosine alone).
pub fn guess(model: Option<&Model>, output: &str, shape: &[usize]) -> (Option<Task>, String) {
    let op = model.and_then(|m| last_op(m, output)).unwrap_or("no op");
    let dims = describe(shape);
    let normalised = matches!(op, "ReduceMean" | "ReduceL2" | "LpNormalization" | "Div");
    let softmax = matches!(op, "Softmax" | "LogSoftmax");
    match shape.len() {
        2 if shape[1] >= 2 && normalised => (
            Some(Task::Embed),
            format!("{dims} made by {op}: a pooled or normalised embedding"),
        ),
        2 if shape[1] >= 2 => (
            Some(Task::Classify),
            format!("{dims} made by {op}: class scores"),
        ),
        3 if shape[1] > 1 && shape[2] >= 2 && softmax => (
            Some(Task::Ctc),
            format!("{dims} made by {op}: class scores per step (a CTC head)"),
        ),
        3 => (
            Some(Task::Embed),
            format!("{dims} made by {op}: per-token hidden states"),
        ),
        4 if shape[2] * shape[3] > 1 => (
            Some(Task::Dense),
            format!("{dims} made by {op}: a map per pixel"),
        ),
        _ => (None, format!("{dims} made by {op}: no task fits")),
    }
}

fn describe(shape: &[usize]) -> String {
    let s: Vec<String> = shape
        .iter()
        .enumerate()
        .map(|(i, d)| if i == 0 { "N".into() } else { d.to_string() })
        .collect();
    format!("[{}]", s.join(", "))
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Greedy CTC decoding of one item's `[T, C]` scores: the argmax per step, repeats merged,
/// the blank (class 0) dropped.
pub fn ctc_decode(scores: &[f32], classes: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut prev = usize::MAX;
    for step in scores.chunks(classes) {
        let c = argmax(step);
        if c != prev && c != 0 {
            out.push(c);
        }
        prev = c;
    }
    out
}

/// The threshold of a one-channel map: 0.5 when the reference's values lie in 0..1 (a
/// probability map), else 0 (logits).
pub fn map_threshold(reference: &[f32]) -> f32 {
    if reference.iter().all(|v| (0.0..=1.0).contains(v)) {
        0.5
    } else {
        0.0
    }
}

/// IoU of one item's `[C, H, W]` maps: the thresholded foreground for C = 1, else the mean over
/// the classes present in either of the per-pixel argmax IoUs. Two empty maps agree (1).
pub fn map_iou(a: &[f32], b: &[f32], channels: usize, threshold: f32) -> f64 {
    if channels <= 1 {
        let (mut inter, mut union) = (0usize, 0usize);
        for (x, y) in a.iter().zip(b) {
            let (p, q) = (*x > threshold, *y > threshold);
            inter += (p && q) as usize;
            union += (p || q) as usize;
        }
        return if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        };
    }
    let pixels = a.len() / channels;
    let label = |m: &[f32], p: usize| -> usize {
        let mut best = 0;
        for c in 1..channels {
            if m[c * pixels + p] > m[best * pixels + p] {
                best = c;
            }
        }
        best
    };
    let (mut inter, mut union) = (vec![0usize; channels], vec![0usize; channels]);
    for p in 0..pixels {
        let (la, lb) = (label(a, p), label(b, p));
        if la == lb {
            inter[la] += 1;
            union[la] += 1;
        } else {
            union[la] += 1;
            union[lb] += 1;
        }
    }
    let present: Vec<f64> = (0..channels)
        .filter(|&c| union[c] > 0)
        .map(|c| inter[c] as f64 / union[c] as f64)
        .collect();
    if present.is_empty() {
        1.0
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctc_merges_repeats_and_drops_blanks() {
        // steps: 1 1 0 1 2 2 0 -> [1, 1, 2]
        let mut s = vec![];
        for c in [1, 1, 0, 1, 2, 2, 0] {
            let mut row = vec![0.0f32; 3];
            row[c] = 1.0;
            s.extend(row);
        }
        assert_eq!(ctc_decode(&s, 3), vec![1, 1, 2]);
    }

    #[test]
    fn iou_of_maps() {
        let a = [0.9, 0.9, 0.1, 0.1];
        let b = [0.9, 0.1, 0.9, 0.1];
        assert_eq!(map_threshold(&a), 0.5);
        assert!((map_iou(&a, &b, 1, 0.5) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(map_iou(&[0.0; 4], &[0.0; 4], 1, 0.5), 1.0);
        // two classes over two pixels: class planes [c0 p0, c0 p1, c1 p0, c1 p1]
        let a = [1.0, 0.0, 0.0, 1.0]; // labels 0, 1
        let b = [1.0, 1.0, 0.0, 0.0]; // labels 0, 0
        // class 0: inter 1, union 2; class 1: inter 0, union 1
        assert!((map_iou(&a, &b, 2, 0.0) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn the_guess_reads_shape_and_last_op() {
        assert_eq!(guess(None, "y", &[4, 10]).0, Some(Task::Classify));
        assert_eq!(guess(None, "y", &[4, 1, 64, 64]).0, Some(Task::Dense));
        assert_eq!(guess(None, "y", &[4, 1]).0, None);
        assert_eq!(guess(None, "y", &[4, 40, 384]).0, Some(Task::Embed));
        assert!(
            "det"
                .parse::<Task>()
                .unwrap_err()
                .contains("classify, embed")
        );
        assert!(Task::Dense.unfit(&[4, 10]).is_some());
    }
}
