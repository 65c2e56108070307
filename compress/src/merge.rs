//! Depth merging: two consecutive convolutions become one (LayerMerge, without training).
//!
//! `y = conv2(conv1(x))` with nothing between them is one convolution: kernel
//! `k1 + (k2 − 1)·s1` per axis, stride `s1·s2`, conv1's pads, and bias
//! `b2 + Σ W2·b1`. The composition is exact when conv2 has no padding (zero padding of the
//! intermediate is not conv1 of anything) and both have dilation 1; depthwise and grouped
//! convolutions are composed through their block-diagonal dense form, and two depthwise
//! convolutions stay depthwise. A residual `Add(conv(x), x)` folds into the conv as an identity
//! tap when the conv keeps the shape (stride 1, same channels, odd kernel, centred pads).
//!
//! An activation between the two (Relu, Clip, HardSwish, LeakyRelu) may be removed first
//! ([`remove_activation`]); the merge is then not exact, and the merged conv should be refitted
//! by least squares against the original segment's output (`crate::refit::refit` with the
//! segment's input and output tensors).
//!
//! **Accepts** Conv pairs with 2-D kernels, float initializer weights (and biases), explicit
//! pads (`auto_pad` NOTSET or VALID), dilation 1, where conv1's output is read by conv2 only and
//! is not a graph output. **Declines** with the reason everything else; a padded conv2 is merged
//! only when asked to accept an inexact result, and the report says it is not exact.
//! **Guarantees** the merged node keeps conv2's name and output tensor; the graph stays valid.

use serde::Serialize;
use whittle_core::Model;
use whittle_core::attr::Attrs;
use whittle_core::attr::{int, ints};
use whittle_core::edit;
use whittle_core::onnx::NodeProto;
use whittle_core::tensor::{from_f32, to_f32};

use crate::Error;
use crate::index::Index;

/// What a merge did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// The nodes merged, in order (the result keeps the last one's name).
    pub nodes: Vec<String>,
    /// Whether the result computes exactly what the nodes did.
    pub exact: bool,
    /// Why it is not exact, when it is not.
    pub note: Option<String>,
    /// Kernel of the result.
    pub kernel: [usize; 2],
}

/// A Conv read as numbers.
struct ConvIr {
    idx: usize,
    w: Vec<f32>,
    /// [out, in/group, kh, kw]
    dims: [usize; 4],
    bias: Option<Vec<f32>>,
    group: usize,
    strides: [usize; 2],
    /// top, left, bottom, right
    pads: [usize; 4],
}

fn fail(reason: String) -> Error {
    Error::Pass {
        pass: "merge".into(),
        reason,
    }
}

fn find(model: &Model, name: &str) -> Result<usize, Error> {
    model
        .graph()
        .node
        .iter()
        .position(|n| n.name() == name)
        .ok_or_else(|| fail(format!("no node named {name}")))
}

fn read_conv(model: &Model, idx: usize) -> Result<ConvIr, Error> {
    let n = &model.graph().node[idx];
    let name = n.name();
    if n.op_type() != "Conv" {
        return Err(fail(format!("{name} is a {}, not a Conv", n.op_type())));
    }
    let wt = n
        .input
        .get(1)
        .and_then(|w| model.initializer(w))
        .filter(|t| t.data_type() == 1 && t.dims.len() == 4)
        .ok_or_else(|| {
            fail(format!(
                "{name}: weight is not a float 2-D-kernel initializer"
            ))
        })?;
    let w = to_f32(wt)?;
    let d: Vec<usize> = wt.dims.iter().map(|&v| v.max(0) as usize).collect();
    let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => Some(to_f32(
            model
                .initializer(b)
                .filter(|t| t.data_type() == 1)
                .ok_or_else(|| fail(format!("{name}: bias is not a float initializer")))?,
        )?),
        None => None,
    };
    let auto_pad = n.attr_str("auto_pad").unwrap_or_default();
    if !(auto_pad.is_empty() || auto_pad == "NOTSET" || auto_pad == "VALID") {
        return Err(fail(format!(
            "{name}: auto_pad {auto_pad}; merging needs explicit pads"
        )));
    }
    if n.attr_ints("dilations")
        .is_some_and(|d| d.iter().any(|&v| v != 1))
    {
        return Err(fail(format!("{name}: dilation other than 1")));
    }
    let two = |k: &str, def: usize| -> [usize; 2] {
        n.attr_ints(k)
            .filter(|v| v.len() == 2)
            .map_or([def, def], |v| [v[0].max(0) as usize, v[1].max(0) as usize])
    };
    let pads = n
        .attr_ints("pads")
        .filter(|v| v.len() == 4)
        .map_or([0; 4], |v| {
            [v[0], v[1], v[2], v[3]].map(|x| x.max(0) as usize)
        });
    Ok(ConvIr {
        idx,
        w,
        dims: [d[0], d[1], d[2], d[3]],
        bias,
        group: n.attr_int("group").unwrap_or(1).max(1) as usize,
        strides: two("strides", 1),
        pads,
    })
}

impl ConvIr {
    /// Input channels.
    fn cin(&self) -> usize {
        self.dims[1] * self.group
    }

    /// Weight as dense [out, cin, kh, kw] (zeros outside each group's block).
    fn dense(&self) -> Vec<f64> {
        let [o, ig, kh, kw] = self.dims;
        let cin = self.cin();
        let per_group_out = o / self.group;
        let mut d = vec![0.0; o * cin * kh * kw];
        for oo in 0..o {
            let g = oo / per_group_out.max(1);
            for c in 0..ig {
                for k in 0..kh * kw {
                    d[(oo * cin + g * ig + c) * kh * kw + k] =
                        f64::from(self.w[(oo * ig + c) * kh * kw + k]);
                }
            }
        }
        d
    }

    fn depthwise(&self) -> bool {
        self.group > 1 && self.dims[1] == 1 && self.dims[0] == self.group
    }
}

/// Merge the Conv named `first` into the Conv named `second` that reads it. With
/// `allow_inexact`, a padded `second` is merged too and the report says it is not exact.
pub fn merge_pair(
    model: &mut Model,
    first: &str,
    second: &str,
    allow_inexact: bool,
) -> Result<MergeReport, Error> {
    let (i1, i2) = (find(model, first)?, find(model, second)?);
    let (c1, c2) = (read_conv(model, i1)?, read_conv(model, i2)?);
    let g = model.graph();
    let ix = Index::new(g);
    let mid = &g.node[i1].output[0];
    if g.node[i2].input.first() != Some(mid) {
        return Err(fail(format!("{second} does not read {first}'s output")));
    }
    if ix.readers(mid).len() != 1 || ix.is_output(mid) {
        return Err(fail(format!(
            "{first}'s output is read elsewhere too; merging would lose it"
        )));
    }
    if c2.cin() != c1.dims[0] {
        return Err(fail(format!(
            "{second} reads {} channels, {first} makes {}",
            c2.cin(),
            c1.dims[0]
        )));
    }
    let padded = c2.pads.iter().any(|&p| p > 0);
    if padded && !allow_inexact {
        return Err(fail(format!(
            "{second} pads its input: the merge would not be exact at the borders"
        )));
    }
    let (m, cin, o) = (c1.dims[0], c1.cin(), c2.dims[0]);
    let [_, _, k1h, k1w] = c1.dims;
    let [_, _, k2h, k2w] = c2.dims;
    let (s1, s2) = (c1.strides, c2.strides);
    let kh = k1h + (k2h - 1) * s1[0];
    let kw = k1w + (k2w - 1) * s1[1];
    let (w1, w2) = (c1.dense(), c2.dense());
    let both_dw = c1.depthwise() && c2.depthwise();
    // merged dense weight [o, cin, kh, kw]
    let mut w = vec![0.0f64; o * cin * kh * kw];
    for oo in 0..o {
        for mm in 0..m {
            for i in 0..k2h {
                for j in 0..k2w {
                    let a = w2[((oo * m + mm) * k2h + i) * k2w + j];
                    if a == 0.0 {
                        continue;
                    }
                    for c in 0..cin {
                        for u in 0..k1h {
                            for v in 0..k1w {
                                let b = w1[((mm * cin + c) * k1h + u) * k1w + v];
                                let (uu, vv) = (u + i * s1[0], v + j * s1[1]);
                                w[((oo * cin + c) * kh + uu) * kw + vv] += a * b;
                            }
                        }
                    }
                }
            }
        }
    }
    let mut bias: Vec<f64> = (0..o)
        .map(|oo| c2.bias.as_ref().map_or(0.0, |b| f64::from(b[oo])))
        .collect();
    if let Some(b1) = &c1.bias {
        for (oo, bo) in bias.iter_mut().enumerate() {
            for (mm, &b) in b1.iter().enumerate() {
                let s: f64 = (0..k2h * k2w)
                    .map(|k| w2[(oo * m + mm) * k2h * k2w + k])
                    .sum();
                *bo += s * f64::from(b);
            }
        }
    }
    let (wdims, wvals, group): (Vec<i64>, Vec<f32>, usize) = if both_dw {
        // keep it depthwise: the diagonal of the dense result
        let vals = (0..o)
            .flat_map(|oo| {
                let w = &w;
                (0..kh * kw).map(move |k| w[(oo * cin + oo) * kh * kw + k] as f32)
            })
            .collect();
        (vec![o as i64, 1, kh as i64, kw as i64], vals, o)
    } else {
        (
            vec![o as i64, cin as i64, kh as i64, kw as i64],
            w.iter().map(|&v| v as f32).collect(),
            1,
        )
    };
    let node2 = model.graph().node[i2].clone();
    let node1 = model.graph().node[i1].clone();
    let wn = edit::unique_name(model.graph(), &format!("{second}.merged_weight"));
    let bn = edit::unique_name(model.graph(), &format!("{second}.merged_bias"));
    let pads = c1.pads;
    let merged = NodeProto {
        name: node2.name.clone(),
        op_type: Some("Conv".into()),
        domain: node2.domain.clone(),
        input: vec![node1.input[0].clone(), wn.clone(), bn.clone()],
        output: node2.output.clone(),
        attribute: vec![
            ints("kernel_shape", &[kh as i64, kw as i64]),
            ints("strides", &[(s1[0] * s2[0]) as i64, (s1[1] * s2[1]) as i64]),
            ints(
                "pads",
                &[
                    (pads[0] + c2.pads[0] * s1[0]) as i64,
                    (pads[1] + c2.pads[1] * s1[1]) as i64,
                    (pads[2] + c2.pads[2] * s1[0]) as i64,
                    (pads[3] + c2.pads[3] * s1[1]) as i64,
                ],
            ),
            int("group", group as i64),
        ],
        ..Default::default()
    };
    let old: Vec<String> = node1.input[1..]
        .iter()
        .chain(&node2.input[1..])
        .cloned()
        .collect();
    let gm = model.graph_mut();
    gm.node[c2.idx] = merged;
    gm.node.remove(c1.idx);
    gm.initializer.push(from_f32(&wn, &wdims, &wvals));
    gm.initializer.push(from_f32(
        &bn,
        &[o as i64],
        &bias.iter().map(|&v| v as f32).collect::<Vec<_>>(),
    ));
    drop_unread(model, &old);
    Ok(MergeReport {
        nodes: vec![first.into(), second.into()],
        exact: !padded,
        note: padded.then(|| {
            format!("{second} padded its input; the merged conv pads the input instead, which differs at the borders")
        }),
        kernel: [kh, kw],
    })
}

/// Fold `Add(conv(x), x)` into the conv named `conv` as an identity tap. Returns the Add's name.
pub fn fold_residual(model: &mut Model, conv: &str) -> Result<String, Error> {
    let ic = find(model, conv)?;
    let c = read_conv(model, ic)?;
    let g = model.graph();
    let ix = Index::new(g);
    let node = &g.node[ic];
    let (x, y) = (node.input[0].clone(), node.output[0].clone());
    let readers = ix.readers(&y);
    let Some(&(ia, _)) = readers
        .first()
        .filter(|_| readers.len() == 1 && !ix.is_output(&y))
    else {
        return Err(fail(format!("{conv}'s output is not read by one Add only")));
    };
    let add = &g.node[ia];
    let other = match (add.op_type(), add.input.as_slice()) {
        ("Add", [a, b]) if *a == y => b.clone(),
        ("Add", [a, b]) if *b == y => a.clone(),
        _ => return Err(fail(format!("{conv}'s output is not read by one Add only"))),
    };
    if other != x {
        return Err(fail(format!(
            "the Add after {conv} does not add the conv's input"
        )));
    }
    let [o, _, kh, kw] = c.dims;
    let same = c.strides == [1, 1]
        && c.cin() == o
        && kh % 2 == 1
        && kw % 2 == 1
        && c.pads == [kh / 2, kw / 2, kh / 2, kw / 2];
    if !same {
        return Err(fail(format!(
            "{conv} does not keep its input's shape (stride 1, same channels, odd kernel, centred pads)"
        )));
    }
    let per = c.dims[1];
    if !(c.group == 1 || c.depthwise()) {
        return Err(fail(format!(
            "{conv} is a grouped (not depthwise) conv; the identity fold handles dense and depthwise"
        )));
    }
    let mut w = c.w.clone();
    for oo in 0..o {
        // dense: input channel oo; depthwise: the one input of channel oo
        let cin = if c.group == 1 { oo } else { 0 };
        w[((oo * per + cin) * kh + kh / 2) * kw + kw / 2] += 1.0;
    }
    let add_name = add.name().to_string();
    let add_out = add.output[0].clone();
    let w_name = node.input[1].clone();
    let wn = edit::unique_name(model.graph(), &format!("{conv}.residual_weight"));
    let gm = model.graph_mut();
    gm.initializer.push(from_f32(
        &wn,
        &[o as i64, per as i64, kh as i64, kw as i64],
        &w,
    ));
    gm.node[ic].input[1] = wn;
    gm.node[ic].output[0] = add_out;
    gm.node.remove(ia);
    drop_unread(model, &[w_name]);
    Ok(add_name)
}

/// Remove an elementwise activation node (its output is read as its input): the pair around it
/// becomes mergeable, and the result is no longer exact.
pub fn remove_activation(model: &mut Model, name: &str) -> Result<(), Error> {
    let i = find(model, name)?;
    let n = &model.graph().node[i];
    if !matches!(n.op_type(), "Relu" | "Clip" | "HardSwish" | "LeakyRelu") {
        return Err(fail(format!(
            "{name} is a {}; only Relu, Clip, HardSwish and LeakyRelu are removed",
            n.op_type()
        )));
    }
    let (from, to) = (n.output[0].clone(), n.input[0].clone());
    if Index::new(model.graph()).is_output(&from) {
        return Err(fail(format!("{name}'s output is a graph output")));
    }
    let extra: Vec<String> = n.input[1..].to_vec();
    let gm = model.graph_mut();
    edit::bypass(gm, i, &to);
    drop_unread(model, &extra);
    Ok(())
}

/// Drop these initializers when nothing reads them any more.
fn drop_unread(model: &mut Model, names: &[String]) {
    let gm = model.graph_mut();
    let read: std::collections::HashSet<&str> = gm
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .chain(gm.output.iter().map(|o| o.name()))
        .collect();
    let dead: Vec<String> = names
        .iter()
        .filter(|n| !read.contains(n.as_str()))
        .cloned()
        .collect();
    gm.initializer
        .retain(|t| !dead.iter().any(|d| d == t.name()));
    gm.value_info.clear();
}

/// A run of convolutions that can become one: consecutive Convs with at most one activation
/// between each pair, every intermediate read once, optionally closed by a residual Add of the
/// run's input.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Segment {
    /// The Convs, in order (the merged conv keeps the last one's name).
    pub convs: Vec<String>,
    /// The activations between them (removed by the merge).
    pub acts: Vec<String>,
    /// The residual Add that closes the run, folded in as an identity tap.
    pub add: Option<String>,
    /// The run's input tensor.
    pub input: String,
    /// The run's output tensor.
    pub output: String,
    /// Node index of the first and last node (topological order): runs that overlap conflict.
    pub span: (usize, usize),
}

/// What a model without merge candidates is told.
pub const NOTHING_TO_MERGE: &str = "nothing to merge: no two convolutions in a row (at most one activation between, the first read by the second only)";

const ACTIVATIONS: [&str; 4] = ["Relu", "Clip", "HardSwish", "LeakyRelu"];

/// Every run of 2 or 3 convolutions that [`apply_segment`] can merge (a residual block as a
/// whole when its Add closes the run).
pub fn segments(model: &Model) -> Vec<Segment> {
    let g = model.graph();
    let ix = Index::new(g);
    let single = |t: &str| -> Option<usize> {
        let r = ix.readers(t);
        (r.len() == 1 && !ix.is_output(t)).then(|| r[0].0)
    };
    let mut out = vec![];
    for (i, n) in g.node.iter().enumerate() {
        if n.op_type() != "Conv" || read_conv(model, i).is_err() {
            continue;
        }
        let (mut convs, mut acts) = (vec![i], vec![]);
        let mut cur = i;
        while convs.len() < 3 {
            let Some(mut next) = single(&g.node[cur].output[0]) else {
                break;
            };
            let mut act = None;
            if ACTIVATIONS.contains(&g.node[next].op_type()) {
                act = Some(next);
                match single(&g.node[next].output[0]) {
                    Some(k) => next = k,
                    None => break,
                }
            }
            if g.node[next].op_type() != "Conv" || read_conv(model, next).is_err() {
                break;
            }
            acts.extend(act);
            convs.push(next);
            cur = next;
            let input = n.input[0].clone();
            let last = &g.node[next];
            let add = ix
                .readers(&last.output[0])
                .first()
                .filter(|_| ix.readers(&last.output[0]).len() == 1)
                .map(|r| &g.node[r.0])
                .filter(|a| a.op_type() == "Add" && a.input.contains(&input));
            let name = |k: &usize| g.node[*k].name().to_string();
            out.push(Segment {
                convs: convs.iter().map(name).collect(),
                acts: acts.iter().map(name).collect(),
                add: add.map(|a| a.name().to_string()),
                input,
                output: add.map_or(last.output[0].clone(), |a| a.output[0].clone()),
                span: (
                    i,
                    add.and_then(|a| g.node.iter().position(|x| x.name() == a.name()))
                        .unwrap_or(next),
                ),
            });
        }
    }
    out
}

/// Merge a segment into one conv: remove its activations, merge its convs in order, fold its
/// residual. Not exact when an activation went or a padded conv was merged.
pub fn apply_segment(model: &mut Model, seg: &Segment) -> Result<MergeReport, Error> {
    for a in &seg.acts {
        remove_activation(model, a)?;
    }
    let mut exact = seg.acts.is_empty();
    let mut notes = vec![];
    if !seg.acts.is_empty() {
        notes.push(format!("activations removed: {}", seg.acts.join(", ")));
    }
    let mut kernel = [1, 1];
    for w in seg.convs.windows(2) {
        let r = merge_pair(model, &w[0], &w[1], true)?;
        exact &= r.exact;
        notes.extend(r.note);
        kernel = r.kernel;
    }
    if seg.add.is_some() {
        fold_residual(model, seg.convs.last().expect("two convs or more"))?;
    }
    Ok(MergeReport {
        nodes: seg.convs.clone(),
        exact,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
        kernel,
    })
}

/// A merge candidate's latency, measured in the whole model: the model as it is and the model
/// with only this segment merged, side by side on one runtime (what `whittle profile --merge`
/// adds to a latency table). In context, not alone: a segment alone pays the runtime's layout
/// changes and call overhead at its borders, which the model around it does not, and its
/// saving alone was seen to overstate the saving in the model several times over.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SegmentLatency {
    /// The segment's convolutions (with `acts` and `add`, how a table names it).
    pub convs: Vec<String>,
    /// Its activations.
    pub acts: Vec<String>,
    /// Its residual Add.
    pub add: Option<String>,
    /// The model as it is, ms (fastest run, measured beside `after_ms`).
    pub before_ms: f64,
    /// The model with this segment merged into one conv, ms.
    pub after_ms: f64,
}

impl SegmentLatency {
    /// Whether this entry measures `seg`.
    pub fn is(&self, seg: &Segment) -> bool {
        self.convs == seg.convs && self.acts == seg.acts && self.add == seg.add
    }

    /// Latency saved by merging, ms (negative: the merged model is slower).
    pub fn saved_ms(&self) -> f64 {
        self.before_ms - self.after_ms
    }
}

/// Measure every segment in the model, merged and not (weights as merged, not refitted: a refit
/// changes values, not cost). `progress(done, total)` after each segment.
pub fn measure_segments(
    model: &Model,
    segs: &[Segment],
    measure: &mut crate::latency::PairMeasure,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<SegmentLatency>, Error> {
    let mut out = Vec::with_capacity(segs.len());
    for (i, seg) in segs.iter().enumerate() {
        let mut merged = model.clone();
        apply_segment(&mut merged, seg)?;
        let (before_ms, after_ms) = measure(model, &merged)?;
        out.push(SegmentLatency {
            convs: seg.convs.clone(),
            acts: seg.acts.clone(),
            add: seg.add.clone(),
            before_ms,
            after_ms,
        });
        progress(i + 1, segs.len());
    }
    Ok(out)
}

/// Each segment's saving from a table measured earlier (`whittle profile --merge`), in the order
/// of `segs`; a segment the table does not hold is refused by name.
pub fn table_savings(table: &[SegmentLatency], segs: &[Segment]) -> Result<Vec<f64>, Error> {
    segs.iter()
        .map(|s| {
            table
                .iter()
                .find(|t| t.is(s))
                .map(SegmentLatency::saved_ms)
                .ok_or_else(|| {
                    Error::Budget(format!(
                        "the latency table has no entry for the merge of {}: measure it with `whittle profile --merge` on this model",
                        s.convs.join(" + ")
                    ))
                })
        })
        .collect()
}

/// One measured candidate for [`choose`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Measured {
    /// Node span; overlapping spans conflict.
    pub span: (usize, usize),
    /// Latency saved by merging it, ms.
    pub saved_ms: f64,
    /// Output damage on calibration data after the merge and its refit.
    pub damage: f64,
}

/// The candidates `keep` accepts, ordered by where they end, and for each position k how many of
/// the first k end before the k-th starts (what a weighted-interval programme steps back to).
fn by_end(cands: &[Measured], keep: impl Fn(&Measured) -> bool) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..cands.len()).filter(|&i| keep(&cands[i])).collect();
    order.sort_by_key(|&i| (cands[i].span.1, cands[i].span.0));
    let p = (0..order.len())
        .map(|k| {
            let s = cands[order[k]].span.0;
            order[..k]
                .iter()
                .rposition(|&j| cands[j].span.1 < s)
                .map_or(0, |x| x + 1)
        })
        .collect();
    (order, p)
}

/// Dynamic programme over non-overlapping candidates: the set with the least total damage that
/// saves at least `needed_ms` (latency savings discretised into 200 steps of the need). Returns
/// the chosen indices, or the most that can be saved when `needed_ms` is out of reach.
pub fn choose(cands: &[Measured], needed_ms: f64) -> Result<Vec<usize>, f64> {
    let (order, p) = by_end(cands, |c| c.saved_ms > 0.0);
    let n = order.len();
    // the most that can be saved, for the error
    let mut best = vec![0.0f64; n + 1];
    for k in 0..n {
        best[k + 1] = best[k].max(best[p[k]] + cands[order[k]].saved_ms);
    }
    if needed_ms <= 0.0 {
        return Ok(vec![]);
    }
    if best[n] < needed_ms {
        return Err(best[n]);
    }
    const STEPS: usize = 200;
    let unit = needed_ms / STEPS as f64;
    let units = |ms: f64| ((ms / unit).floor() as usize).min(STEPS);
    // dp[k][b]: least damage over the first k candidates saving at least b units
    let inf = f64::INFINITY;
    let mut dp = vec![vec![inf; STEPS + 1]; n + 1];
    for row in &mut dp {
        row[0] = 0.0;
    }
    for k in 0..n {
        let c = cands[order[k]];
        let u = units(c.saved_ms);
        for b in 1..=STEPS {
            let take = c.damage + dp[p[k]][b.saturating_sub(u)];
            dp[k + 1][b] = dp[k][b].min(take);
        }
    }
    if !dp[n][STEPS].is_finite() {
        // rounding down lost what the exact sums reach
        return Err(best[n].min(needed_ms - unit));
    }
    let mut chosen = vec![];
    let (mut k, mut b) = (n, STEPS);
    while k > 0 && b > 0 {
        if dp[k][b] == dp[k - 1][b] {
            k -= 1;
        } else {
            let c = cands[order[k - 1]];
            chosen.push(order[k - 1]);
            b = b.saturating_sub(units(c.saved_ms));
            k = p[k - 1];
        }
    }
    chosen.sort();
    Ok(chosen)
}

/// Dynamic programme over non-overlapping candidates, the other way round: the set that saves
/// the most latency with a total damage of at most `max_damage` (damages rounded up to 200
/// steps of the allowance, so the true total never exceeds it). Empty when no paying candidate
/// fits.
pub fn choose_within_damage(cands: &[Measured], max_damage: f64) -> Vec<usize> {
    const STEPS: usize = 200;
    if max_damage.is_nan() || max_damage <= 0.0 {
        return vec![];
    }
    let unit = max_damage / STEPS as f64;
    let units = |d: f64| (d / unit).ceil() as usize;
    let (order, p) = by_end(cands, |c| {
        c.saved_ms > 0.0 && c.damage.is_finite() && units(c.damage.max(0.0)) <= STEPS
    });
    let n = order.len();
    // dp[k][d]: the most saved over the first k candidates with at most d damage units
    let mut dp = vec![vec![0.0f64; STEPS + 1]; n + 1];
    for k in 0..n {
        let c = cands[order[k]];
        let u = units(c.damage.max(0.0));
        for d in 0..=STEPS {
            let skip = dp[k][d];
            dp[k + 1][d] = if d >= u {
                skip.max(dp[p[k]][d - u] + c.saved_ms)
            } else {
                skip
            };
        }
    }
    let mut chosen = vec![];
    let (mut k, mut d) = (n, STEPS);
    while k > 0 {
        if dp[k][d] == dp[k - 1][d] {
            k -= 1;
        } else {
            let c = cands[order[k - 1]];
            chosen.push(order[k - 1]);
            d -= units(c.damage.max(0.0));
            k = p[k - 1];
        }
    }
    chosen.sort();
    chosen
}

/// The prefix of `current`'s tensors in [`paired`].
const PAIRED_PREFIX: &str = "whittle_current::";

/// The name `current`'s tensor `t` has in [`paired`]: prefixed, except the graph inputs that
/// both models read (and the empty name of an absent optional input).
pub fn paired_name(current: &Model, t: &str) -> String {
    let graph_input = current
        .graph()
        .input
        .iter()
        .any(|i| i.name() == t && current.initializer(t).is_none());
    if t.is_empty() || graph_input {
        t.to_string()
    } else {
        format!("{PAIRED_PREFIX}{t}")
    }
}

/// One graph holding `original` and `current` side by side on the same graph inputs: every
/// tensor, node and initializer of `current` (graph inputs excepted) is renamed with
/// [`PAIRED_PREFIX`]; the graph outputs are `original`'s. One run then gives a layer's input as
/// the partly compressed model computes it and the original's output at the same place, which is
/// what a sequential refit fits (each merged layer corrects the drift of the merges before it).
pub fn paired(original: &Model, current: &Model) -> Model {
    let mut out = original.clone();
    let rename = |t: &str| paired_name(current, t);
    let cur = current.graph();
    let g = out.graph_mut();
    for n in &cur.node {
        let mut n = n.clone();
        n.name = Some(format!("{PAIRED_PREFIX}{}", n.name()));
        n.input = n.input.iter().map(|t| rename(t)).collect();
        n.output = n.output.iter().map(|t| rename(t)).collect();
        g.node.push(n);
    }
    for t in &cur.initializer {
        let mut t = t.clone();
        t.name = Some(rename(t.name()));
        g.initializer.push(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(span: (usize, usize), saved_ms: f64, damage: f64) -> Measured {
        Measured {
            span,
            saved_ms,
            damage,
        }
    }

    #[test]
    fn the_plan_follows_the_latency_table() {
        // a: cheap to merge, saves little; b overlaps c; c saves a lot but costs more damage
        let damage = [0.01, 0.05, 0.2];
        let spans = [(0, 2), (3, 5), (4, 7)];
        let table1 = [0.5, 0.3, 2.0];
        let table2 = [0.5, 1.6, 0.4];
        let plan = |t: &[f64]| {
            let c: Vec<Measured> = (0..3).map(|i| m(spans[i], t[i], damage[i])).collect();
            choose(&c, 1.0)
        };
        assert_eq!(plan(&table1), Ok(vec![2]));
        assert_eq!(plan(&table2), Ok(vec![1]));
        // overlapping b and c never both; an unreachable need reports the best reachable
        let c: Vec<Measured> = (0..3).map(|i| m(spans[i], table1[i], damage[i])).collect();
        assert_eq!(choose(&c, 2.5), Ok(vec![0, 2]));
        assert_eq!(choose(&c, 10.0), Err(2.5));
        assert_eq!(choose(&c, 0.0), Ok(vec![]));
    }

    #[test]
    fn under_a_damage_allowance_the_plan_saves_the_most() {
        let spans = [(0, 2), (3, 5), (4, 7), (8, 9)];
        let c: Vec<Measured> = [(0.5, 0.01), (0.3, 0.05), (2.0, 0.2), (-0.1, 0.0)]
            .iter()
            .zip(spans)
            .map(|(&(saved, damage), span)| m(span, saved, damage))
            .collect();
        // 0.25 allows a and c (b overlaps c); 0.1 allows a and b; nothing that slows is taken
        assert_eq!(choose_within_damage(&c, 0.25), vec![0, 2]);
        assert_eq!(choose_within_damage(&c, 0.1), vec![0, 1]);
        assert_eq!(choose_within_damage(&c, 0.005), Vec::<usize>::new());
        let mut inf = c.clone();
        inf[2].damage = f64::INFINITY;
        assert_eq!(choose_within_damage(&inf, 10.0), vec![0, 1]);
    }
}
