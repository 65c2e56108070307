//! Channel dependency groups (in the spirit of DepGraph), found on the ONNX graph itself.
//!
//! A *group* is a set of channels that must lose the same indices everywhere: the output channels
//! of every Conv / Gemm producing them (tied through residual Add / Sub / Mul, depthwise convs,
//! BatchNormalization, activations, pools), the input channels of every consumer (Conv weights,
//! Gemm columns after Flatten, in blocks of H x W features), per-channel constants, and Concat
//! segments (at their offsets). An op the analysis does not understand freezes the channels it
//! touches, with the reason; a frozen group is never pruned, so the analysis never corrupts a
//! graph it does not understand.

use std::collections::HashMap;

use serde::Serialize;
use whittle_core::Model;
use whittle_core::attr::Attrs;
use whittle_core::shape::{self, ShapeInfo};

use crate::Error;
use crate::index::Index;

/// How a node takes part in a group.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// Produces the channels: Conv weight axis 0 and bias; Gemm / MatMul output features.
    Producer,
    /// Reads the channels: Conv weight axis 1 (group 1); Gemm / MatMul input features.
    Consumer,
    /// A depthwise Conv: its channels are the group's on both sides (weight axis 0, bias, `group`).
    Depthwise,
    /// An initializer input of the node sliced along an axis (BatchNormalization parameters,
    /// per-channel Mul / Add constants, PRelu slopes).
    Param {
        /// Input slot of the initializer.
        slot: usize,
        /// Axis of the initializer that carries the channels.
        axis: usize,
    },
}

/// One node's part in a group.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// Node index in the graph.
    pub node: usize,
    /// Node name.
    pub name: String,
    /// What it does with the channels.
    #[serde(flatten)]
    pub role: Role,
    /// Where the group's channel 0 sits along the node's channel axis (Concat segments).
    pub offset: usize,
    /// Features per channel along that axis (H x W after a Flatten; 1 otherwise).
    pub block: usize,
}

/// A channel dependency group.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// Index in [`Groups::groups`].
    pub id: usize,
    /// Number of channels.
    pub size: usize,
    /// Every node that must change when a channel goes.
    pub members: Vec<Member>,
    /// Activation tensors that carry exactly these channels (for activation-based importance).
    pub tensors: Vec<String>,
    /// Why the group may not be pruned, when it may not.
    pub frozen: Option<String>,
}

impl Group {
    /// Names of the producing nodes.
    pub fn producers(&self) -> Vec<&str> {
        self.members
            .iter()
            .filter(|m| m.role == Role::Producer)
            .map(|m| m.name.as_str())
            .collect()
    }
}

/// All groups of a model.
#[derive(Debug, Clone, Serialize)]
pub struct Groups {
    /// Groups with at least one producer, in graph order of their first producer.
    pub groups: Vec<Group>,
}

impl Groups {
    /// Groups that may be pruned.
    pub fn prunable(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter().filter(|g| g.frozen.is_none())
    }
}

#[derive(Debug, Clone)]
struct Seg {
    space: usize,
    offset: usize,
    len: usize,
}

#[derive(Debug, Clone)]
struct Layout {
    segs: Vec<Seg>,
    block: usize,
}

impl Layout {
    fn channels(&self) -> usize {
        self.segs.iter().map(|s| s.len).sum()
    }
    fn single(&self) -> Option<usize> {
        (self.segs.len() == 1 && self.block == 1).then(|| self.segs[0].space)
    }
}

struct Cx<'a> {
    model: &'a Model,
    shapes: ShapeInfo,
    index: Index,
    parent: Vec<usize>,
    len: Vec<usize>,
    frozen: Vec<Option<String>>,
    producer: Vec<bool>,
    members: Vec<(usize, Member)>,
    tensors: Vec<(usize, String)>,
    layouts: HashMap<String, Layout>,
}

const UNARY: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Erf",
    "Identity",
    "Dropout",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Gelu",
    "Mish",
    "ThresholdedRelu",
    "Cast",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "LpPool",
    "GlobalLpPool",
];

impl<'a> Cx<'a> {
    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        self.parent[rb] = ra;
        if self.len[ra] != self.len[rb] && self.frozen[ra].is_none() {
            self.frozen[ra] = Some(format!(
                "tied channel sets of sizes {} and {}",
                self.len[ra], self.len[rb]
            ));
        }
        if self.frozen[ra].is_none() {
            self.frozen[ra] = self.frozen[rb].take();
        }
        self.producer[ra] |= self.producer[rb];
    }

    fn new_space(&mut self, len: usize, tensor: &str, frozen: Option<String>) -> Layout {
        let id = self.parent.len();
        self.parent.push(id);
        self.len.push(len);
        self.frozen.push(frozen);
        self.producer.push(false);
        self.tensors.push((id, tensor.to_string()));
        Layout {
            segs: vec![Seg {
                space: id,
                offset: 0,
                len,
            }],
            block: 1,
        }
    }

    fn freeze(&mut self, layout: &Layout, why: &str) {
        for s in &layout.segs {
            let r = self.find(s.space);
            if self.frozen[r].is_none() {
                self.frozen[r] = Some(why.to_string());
            }
        }
    }

    fn freeze_inputs(&mut self, node: usize, why: &str) {
        let n = &self.model.graph().node[node];
        let ls: Vec<Layout> = n
            .input
            .iter()
            .filter_map(|x| self.layouts.get(x).cloned())
            .collect();
        for l in ls {
            self.freeze(&l, why);
        }
    }

    fn member(&mut self, space: usize, node: usize, role: Role, offset: usize, block: usize) {
        let name = self.model.graph().node[node].name().to_string();
        if role == Role::Producer {
            let r = self.find(space);
            self.producer[r] = true;
        }
        self.members.push((
            space,
            Member {
                node,
                name,
                role,
                offset,
                block,
            },
        ));
    }

    fn members_for(&mut self, layout: &Layout, node: usize, role: Role) {
        for s in layout.segs.clone() {
            self.member(s.space, node, role.clone(), s.offset, layout.block);
        }
    }

    fn set_out(&mut self, node: usize, layout: Layout) {
        let n = &self.model.graph().node[node];
        if let Some(o) = n.output.first() {
            if let Some(s) = layout.single() {
                self.tensors.push((s, o.clone()));
            }
            self.layouts.insert(o.clone(), layout);
        }
    }

    fn dims(&self, t: &str) -> Option<Vec<i64>> {
        self.shapes
            .shape(t)
            .map(|s| s.iter().map(|d| d.known().unwrap_or(-1)).collect())
    }

    fn init_dims(&self, t: &str) -> Option<Vec<i64>> {
        self.model.initializer(t).map(|t| t.dims.clone())
    }

    /// An initializer read by this node only (so slicing it cannot change another node).
    fn own_init(&self, t: &str) -> bool {
        self.model.initializer(t).is_some() && self.index.readers(t).len() == 1
    }

    fn out_channels(&self, node: usize) -> Option<usize> {
        let n = &self.model.graph().node[node];
        let d = self.dims(n.output.first()?)?;
        (d.len() >= 2 && d[1] > 0).then(|| d[1] as usize)
    }

    fn visit(&mut self, i: usize) {
        let n = self.model.graph().node[i].clone();
        let op = n.op_type();
        let l0 = n.input.first().and_then(|x| self.layouts.get(x)).cloned();
        let why = |s: &str| format!("{s} at node '{}' ({op})", n.name());
        if !n.domain().is_empty() || n.input.is_empty() || n.output.is_empty() {
            self.freeze_inputs(i, &why("unknown op"));
            return;
        }
        match op {
            "Conv" => {
                let w = n.input.get(1).cloned().unwrap_or_default();
                let Some(wd) = self.init_dims(&w).filter(|d| d.len() >= 3) else {
                    self.freeze_inputs(i, &why("weights computed at run time"));
                    return;
                };
                let bias_ok = n
                    .input
                    .get(2)
                    .is_none_or(|b| b.is_empty() || self.own_init(b));
                let owned = self.own_init(&w) && bias_ok;
                let g = n.attr_int("group").unwrap_or(1);
                let (cout, cin_g) = (wd[0] as usize, wd[1] as usize);
                let out_name = n.output[0].clone();
                if g == 1 {
                    if let Some(l) = &l0 {
                        if l.block != 1 || !owned {
                            self.freeze(
                                l,
                                &why(if owned {
                                    "flattened input"
                                } else {
                                    "shared weights"
                                }),
                            );
                        } else {
                            self.members_for(l, i, Role::Consumer);
                        }
                    }
                    let frozen = (!owned).then(|| why("shared weights"));
                    let out = self.new_space(cout, &out_name, frozen);
                    self.member(out.segs[0].space, i, Role::Producer, 0, 1);
                    self.set_out(i, out);
                } else if cin_g == 1
                    && cout as i64 == g
                    && l0
                        .as_ref()
                        .is_some_and(|l| l.channels() == cout && l.block == 1)
                    && owned
                {
                    let l = l0.unwrap_or_else(|| unreachable!());
                    self.members_for(&l, i, Role::Depthwise);
                    self.set_out(i, l);
                } else {
                    if let Some(l) = &l0 {
                        self.freeze(l, &why(&format!("grouped conv (group {g})")));
                    }
                    let out = self.new_space(
                        cout,
                        &out_name,
                        Some(why(&format!("grouped conv (group {g})"))),
                    );
                    // listed (frozen) so that --explain shows these channels and why they stay
                    self.member(out.segs[0].space, i, Role::Producer, 0, 1);
                    self.set_out(i, out);
                }
            }
            "Gemm" | "MatMul" => {
                let w = n.input.get(1).cloned().unwrap_or_default();
                let a_rank = self.dims(&n.input[0]).map(|d| d.len());
                let wd = self.init_dims(&w);
                let gemm = op == "Gemm";
                let plain = if gemm {
                    n.attr_int("transA").unwrap_or(0) == 0
                } else {
                    true
                };
                let bias_ok = !gemm
                    || n.input.get(2).is_none_or(|b| {
                        b.is_empty()
                            || (self.own_init(b)
                                && self.model.initializer(b).is_some_and(|t| {
                                    t.dims.len() <= 1
                                        || t.dims[..t.dims.len() - 1].iter().all(|&d| d == 1)
                                }))
                    });
                let ok = plain
                    && bias_ok
                    && a_rank == Some(2)
                    && wd.as_ref().is_some_and(|d| d.len() == 2)
                    && self.own_init(&w);
                if !ok {
                    self.freeze_inputs(i, &why("a matrix product whittle does not prune through"));
                    if let Some(c) = self.out_channels(i) {
                        let out = self.new_space(
                            c,
                            &n.output[0],
                            Some(why("a matrix product whittle does not prune through")),
                        );
                        self.set_out(i, out);
                    }
                    return;
                }
                if let Some(l) = &l0 {
                    self.members_for(l, i, Role::Consumer);
                }
                let wd = wd.unwrap_or_default();
                let trans_b = gemm && n.attr_int("transB").unwrap_or(0) != 0;
                let nout = if trans_b { wd[0] } else { wd[1] } as usize;
                let out = self.new_space(nout, &n.output[0], None);
                self.member(out.segs[0].space, i, Role::Producer, 0, 1);
                self.set_out(i, out);
            }
            "BatchNormalization" | "InstanceNormalization" => {
                let Some(l) = l0 else { return };
                let params = if op == "BatchNormalization" {
                    1..5
                } else {
                    1..3
                };
                if l.block != 1 || !n.input[params.clone()].iter().all(|p| self.own_init(p)) {
                    self.freeze(&l, &why("parameters that are not per-channel constants"));
                    return;
                }
                for slot in params {
                    self.members_for(&l, i, Role::Param { slot, axis: 0 });
                }
                self.set_out(i, l);
            }
            "PRelu" | "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" | "Sum" | "Mean" => {
                self.elementwise(i)
            }
            "Concat" => {
                let rank = self.dims(&n.output[0]).map(|d| d.len()).unwrap_or(0) as i64;
                let mut axis = n.attr_int("axis").unwrap_or(0);
                if axis < 0 {
                    axis += rank;
                }
                let ls: Option<Vec<Layout>> = n
                    .input
                    .iter()
                    .map(|x| self.layouts.get(x).cloned())
                    .collect();
                match ls {
                    Some(ls) if axis == 1 && ls.iter().all(|l| l.block == 1) => {
                        let mut segs = Vec::new();
                        let mut off = 0;
                        for l in &ls {
                            for s in &l.segs {
                                segs.push(Seg {
                                    space: s.space,
                                    offset: off + s.offset,
                                    len: s.len,
                                });
                            }
                            off += l.channels();
                        }
                        self.set_out(i, Layout { segs, block: 1 });
                    }
                    _ => {
                        self.freeze_inputs(i, &why("concat not on the channel axis, or of channels whittle cannot follow"));
                        if axis == 1
                            && let Some(c) = self.out_channels(i)
                        {
                            let out = self.new_space(
                                c,
                                &n.output[0],
                                Some(why("concat of channels whittle cannot follow")),
                            );
                            self.set_out(i, out);
                        }
                    }
                }
            }
            "Flatten" | "Reshape" => {
                let Some(l) = l0 else { return };
                let ind = self.dims(&n.input[0]).unwrap_or_default();
                let outd = self.dims(&n.output[0]).unwrap_or_default();
                let axis_ok = op == "Reshape" || n.attr_int("axis").unwrap_or(1) == 1;
                let spatial: i64 = ind.iter().skip(2).product();
                if axis_ok
                    && ind.len() >= 2
                    && outd.len() == 2
                    && spatial > 0
                    && l.block == 1
                    && outd[1] == ind[1] * spatial
                {
                    self.set_out(
                        i,
                        Layout {
                            segs: l.segs.clone(),
                            block: spatial as usize,
                        },
                    );
                } else if op == "Reshape" && ind == outd && !ind.contains(&-1) {
                    self.set_out(i, l);
                } else {
                    self.freeze(&l, &why("a reshape that mixes channels"));
                }
            }
            "Squeeze" | "Unsqueeze" => {
                let Some(l) = l0 else { return };
                let ind = self.dims(&n.input[0]).unwrap_or_default();
                let outd = self.dims(&n.output[0]).unwrap_or_default();
                if ind.len() >= 2 && outd.len() >= 2 && ind[..2] == outd[..2] && l.block == 1 {
                    self.set_out(i, l);
                } else {
                    self.freeze(&l, &why("a squeeze of the channel axis"));
                }
            }
            "Pad" | "Slice" | "Resize" | "Upsample" => {
                let Some(l) = l0 else { return };
                let ind = self.dims(&n.input[0]).unwrap_or_default();
                let outd = self.dims(&n.output[0]).unwrap_or_default();
                let channel_untouched =
                    ind.len() >= 2 && outd.len() == ind.len() && ind[1] == outd[1] && ind[1] > 0;
                let slice_ok = op != "Slice"
                    || self
                        .slice_axes(&n, ind.len())
                        .is_some_and(|a| !a.contains(&1) && !a.contains(&0));
                if channel_untouched && slice_ok && l.block == 1 {
                    self.set_out(i, l);
                } else {
                    self.freeze(&l, &why("padding or slicing on the channel axis"));
                    if let Some(c) = self.out_channels(i) {
                        let out = self.new_space(
                            c,
                            &n.output[0],
                            Some(why("padding or slicing on the channel axis")),
                        );
                        self.set_out(i, out);
                    }
                }
            }
            "Softmax" | "LogSoftmax" | "Hardmax" => {
                let Some(l) = l0 else { return };
                let rank = self.dims(&n.input[0]).map(|d| d.len() as i64).unwrap_or(0);
                let default = if self.model.opset("").unwrap_or(13) >= 13 {
                    -1
                } else {
                    1
                };
                let mut axis = n.attr_int("axis").unwrap_or(default);
                if axis < 0 {
                    axis += rank;
                }
                if axis == 1 || (default == 1 && axis <= 1) {
                    self.freeze(&l, &why("a softmax over the channels"));
                } else {
                    self.set_out(i, l);
                }
            }
            _ if UNARY.contains(&op) => {
                if let Some(l) = l0 {
                    if op == "MaxPool" && n.output.get(1).is_some_and(|o| !o.is_empty()) {
                        self.freeze(&l, &why("pool indices"));
                        return;
                    }
                    self.set_out(i, l);
                }
            }
            _ => self.freeze_inputs(i, &why("an op whittle does not prune through")),
        }
    }

    fn slice_axes(&self, n: &whittle_core::onnx::NodeProto, rank: usize) -> Option<Vec<i64>> {
        let axes: Vec<i64> = if let Some(a) = n.attr_ints("axes") {
            a.to_vec()
        } else if let Some(a) = n.input.get(3).filter(|x| !x.is_empty()) {
            whittle_core::tensor::to_i64(self.model.initializer(a)?).ok()?
        } else {
            let starts = n.input.get(1)?;
            let k = self
                .model
                .initializer(starts)
                .map(|t| t.dims.iter().product::<i64>())?;
            (0..k).collect()
        };
        Some(
            axes.into_iter()
                .map(|a| if a < 0 { a + rank as i64 } else { a })
                .collect(),
        )
    }

    fn elementwise(&mut self, i: usize) {
        let n = self.model.graph().node[i].clone();
        let why = |s: &str| format!("{s} at node '{}' ({})", n.name(), n.op_type());
        let Some(outd) = self.dims(&n.output[0]) else {
            self.freeze_inputs(i, &why("unknown shapes"));
            return;
        };
        let rank = outd.len();
        let c = if rank >= 2 { outd[1] } else { -1 };
        let mut acts: Vec<Layout> = Vec::new();
        let mut params: Vec<(usize, Option<usize>)> = Vec::new();
        let mut blocked = None;
        for (slot, x) in n.input.iter().enumerate() {
            if let Some(l) = self.layouts.get(x).cloned() {
                let xd = self.dims(x).unwrap_or_default();
                if xd.len() == rank && xd.get(1) == Some(&c) && l.block == 1 {
                    acts.push(l);
                } else {
                    self.freeze(&l, &why("a broadcast over the channel axis"));
                    blocked = Some(why("a broadcast over the channel axis"));
                }
            } else if let Some(d) = self.init_dims(x) {
                // the initializer axis aligned with the output's channel axis
                let shift = rank as i64 - d.len() as i64;
                let ax = 1 - shift;
                let along = usize::try_from(ax).ok().and_then(|a| d.get(a).copied());
                if rank < 2 {
                    // no channel axis: nothing to slice, nothing tied
                } else if ax < 0 || along == Some(1) {
                    params.push((slot, None));
                } else if along == Some(c) && self.own_init(x) {
                    params.push((slot, Some(ax as usize)));
                } else {
                    blocked = Some(why(
                        "a constant that is neither per-channel nor shared by all channels",
                    ));
                }
            } else {
                let xd = self.dims(x).unwrap_or_default();
                if rank >= 2 && xd.len() == rank && xd.get(1).is_some_and(|&d| d != 1) {
                    blocked = Some(why("channels from a tensor whittle cannot follow"));
                }
            }
        }
        if acts.is_empty() {
            return;
        }
        let out = acts[0].clone();
        let same_structure = acts.iter().all(|l| {
            l.segs.len() == out.segs.len()
                && l.segs
                    .iter()
                    .zip(&out.segs)
                    .all(|(a, b)| a.len == b.len && a.offset == b.offset)
        });
        if let Some(reason) = blocked
            .clone()
            .or_else(|| (!same_structure).then(|| why("operands with different channel layouts")))
        {
            for l in &acts {
                self.freeze(l, &reason);
            }
        }
        if same_structure {
            for l in &acts[1..] {
                for (a, b) in out.segs.iter().zip(&l.segs) {
                    self.union(a.space, b.space);
                }
            }
        }
        for (slot, axis) in params {
            if let Some(axis) = axis {
                self.members_for(&out, i, Role::Param { slot, axis });
            }
        }
        self.set_out(i, out);
    }
}

/// Find the channel groups of a model. Nodes must have unique names (see
/// [`crate::cleanup::name_nodes`]).
pub fn analyse(model: &Model) -> Result<Groups, Error> {
    let shapes = shape::infer(model, &[])?;
    let mut cx = Cx {
        model,
        shapes,
        index: Index::new(model.graph()),
        parent: vec![],
        len: vec![],
        frozen: vec![],
        producer: vec![],
        members: vec![],
        tensors: vec![],
        layouts: HashMap::new(),
    };
    for v in model.inputs() {
        if let Some(d) = cx.dims(v.name())
            && d.len() >= 2
            && d[1] > 0
        {
            let l = cx.new_space(
                d[1] as usize,
                v.name(),
                Some(format!("channels of the graph input '{}'", v.name())),
            );
            cx.layouts.insert(v.name().to_string(), l);
        }
    }
    for i in 0..model.graph().node.len() {
        cx.visit(i);
    }
    for o in cx.index.graph_outputs.clone() {
        if let Some(l) = cx.layouts.get(&o).cloned() {
            cx.freeze(&l, &format!("channels of the graph output '{o}'"));
        }
    }
    // collect classes
    let mut by_root: HashMap<usize, usize> = HashMap::new();
    let mut groups: Vec<Group> = Vec::new();
    let members = std::mem::take(&mut cx.members);
    for (space, m) in members {
        let r = cx.find(space);
        if !cx.producer[r] {
            continue;
        }
        let gi = *by_root.entry(r).or_insert_with(|| {
            groups.push(Group {
                id: groups.len(),
                size: cx.len[r],
                members: vec![],
                tensors: vec![],
                frozen: cx.frozen[r].clone(),
            });
            groups.len() - 1
        });
        groups[gi].members.push(m);
    }
    for (space, t) in std::mem::take(&mut cx.tensors) {
        let r = cx.find(space);
        if let Some(&gi) = by_root.get(&r)
            && !groups[gi].tensors.contains(&t)
        {
            groups[gi].tensors.push(t);
        }
    }
    for g in &mut groups {
        g.members.sort_by_key(|m| m.node);
    }
    Ok(Groups { groups })
}
