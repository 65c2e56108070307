//! Channel pruning on tiny built graphs, one per structure the group analysis must follow.
//!
//! Every fixture makes some channels of each prunable group exactly dead: every weight and bias
//! that produces them is 0 (BatchNormalization beta and mean 0), and every weight that reads them
//! is 0 too, so their L1 score is exactly 0 while every live channel scores above 0. The MAC
//! budget is the MAC count of the same architecture built with the dead channels left out
//! (counted by `whittle_core::cost`, independently of the planner's cost model), so the plan must
//! remove exactly the dead channels. The pruned model must then give the original's outputs
//! (same shapes, max |diff| < 1e-4) in ONNX Runtime (CPU) and tract, and its measured MACs must
//! be the plan's prediction.

use whittle_compress::Error;
use whittle_compress::cleanup::{self, CleanupReport};
use whittle_compress::groups::{self, Group, Groups, Role};
use whittle_compress::prune::{self, Budget, Importance, Plan, PruneOptions};
use whittle_core::attr::Attrs;
use whittle_core::onnx::NodeProto;
use whittle_core::tensor::{from_f32, to_f32};
use whittle_core::{Model, cost, shape};
use whittle_test_support::runtime::{RuntimeKind, Value, probe_tensor};
use whittle_test_support::{
    GraphBuilder, Lcg, assert_same_outputs, attr_int, attr_ints, load_fixture, op_count,
};

// ---------------------------------------------------------------------------------------------
// A tiny graph builder
// ---------------------------------------------------------------------------------------------

struct Net {
    b: GraphBuilder,
    custom_domain: bool,
}

whittle_test_support::derefs_to_graph_builder!(Net, b);

impl Net {
    fn new(seed: u64) -> Net {
        Net {
            b: GraphBuilder::new("fixture", Lcg::seeded(seed, 0x1234_5678)),
            custom_domain: false,
        }
    }

    /// A float tensor value info `[N, dims...]`.
    fn input(&mut self, name: &str, dims: &[i64]) {
        self.b.input(name, &batched(dims));
    }

    fn output(&mut self, name: &str, dims: &[i64]) {
        self.b.output(name, &batched(dims));
    }

    /// A random initializer; an element is 0 when its index along `axis` is in the set, for
    /// any `(axis, set)` of `zero`.
    fn param(
        &mut self,
        name: &str,
        dims: &[i64],
        scale: f32,
        zero: &[(usize, &[usize])],
    ) -> String {
        let n: i64 = dims.iter().product();
        let mut v = Vec::with_capacity(n as usize);
        for flat in 0..n as usize {
            let mut rest = flat;
            let mut idx = vec![0usize; dims.len()];
            for a in (0..dims.len()).rev() {
                idx[a] = rest % dims[a] as usize;
                rest /= dims[a] as usize;
            }
            let x = self.rng.nonzero(scale);
            let dead = zero.iter().any(|(a, set)| set.contains(&idx[*a]));
            v.push(if dead { 0.0 } else { x });
        }
        self.initializer(from_f32(name, dims, &v))
    }

    /// Conv `cin -> cout`, square kernel `k`, "same" padding, with bias. Output channels in
    /// `dead_out` get zero weights and bias; input channels in `dead_in` (weight axis 1) zero
    /// weights.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        x: &str,
        cin: usize,
        cout: usize,
        k: i64,
        group: usize,
        dead_out: &[usize],
        dead_in: &[usize],
    ) -> String {
        let cin_g = cin / group;
        let scale = 1.0 / ((cin_g as f32) * (k * k) as f32).sqrt();
        let w = self.param(
            &format!("{name}.w"),
            &[cout as i64, cin_g as i64, k, k],
            scale,
            &[(0, dead_out), (1, dead_in)],
        );
        let b = self.param(&format!("{name}.b"), &[cout as i64], 0.3, &[(0, dead_out)]);
        let p = k / 2;
        let mut attrs = vec![
            attr_ints("kernel_shape", &[k, k]),
            attr_ints("pads", &[p, p, p, p]),
        ];
        if group != 1 {
            attrs.push(attr_int("group", group as i64));
        }
        self.node("Conv", name, &[x, &w, &b], attrs)
    }

    /// BatchNormalization over `c` channels; channels in `dead` get beta 0 and mean 0 (so a
    /// zero input stays zero).
    fn batchnorm(&mut self, name: &str, x: &str, c: usize, dead: &[usize]) -> String {
        let mut vals = |lo: f32, hi: f32, zero: bool| -> Vec<f32> {
            (0..c)
                .map(|i| {
                    let v = self.rng.uniform(lo, hi);
                    if zero && dead.contains(&i) { 0.0 } else { v }
                })
                .collect()
        };
        let scale = vals(0.5, 1.5, false);
        let beta = vals(-0.3, 0.3, true);
        let mean = vals(-0.3, 0.3, true);
        let var = vals(0.5, 1.5, false);
        let mut names = Vec::new();
        for (suffix, v) in [
            ("scale", scale),
            ("beta", beta),
            ("mean", mean),
            ("var", var),
        ] {
            let n = format!("{name}.{suffix}");
            self.graph.initializer.push(from_f32(&n, &[c as i64], &v));
            names.push(n);
        }
        let ins: Vec<&str> = std::iter::once(x)
            .chain(names.iter().map(|s| s.as_str()))
            .collect();
        self.node("BatchNormalization", name, &ins, vec![])
    }

    /// Gemm `[N, fin] -> [N, fout]`, transB = 1 (weight `[fout, fin]`); input features in
    /// `dead_in` get zero weights.
    fn gemm(&mut self, name: &str, x: &str, fin: usize, fout: usize, dead_in: &[usize]) -> String {
        let scale = 1.0 / (fin as f32).sqrt();
        let w = self.param(
            &format!("{name}.w"),
            &[fout as i64, fin as i64],
            scale,
            &[(1, dead_in)],
        );
        let b = self.param(&format!("{name}.b"), &[fout as i64], 0.3, &[]);
        self.node("Gemm", name, &[x, &w, &b], vec![attr_int("transB", 1)])
    }

    fn model(self) -> Model {
        let mut opsets = vec![("", 13)];
        if self.custom_domain {
            opsets.push(("com.example", 1));
        }
        load_fixture(self.b.model(8, &opsets))
    }
}

/// `[N, dims...]`.
fn batched(dims: &[i64]) -> Vec<Option<i64>> {
    std::iter::once(None)
        .chain(dims.iter().map(|&d| Some(d)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn macs(m: &Model) -> u64 {
    cost::count(m, &shape::infer(m, &[]).expect("shapes")).macs
}

fn live(size: usize, dead: &[usize]) -> Vec<usize> {
    (0..size).filter(|c| !dead.contains(c)).collect()
}

/// The group whose producers include `producer`.
fn group_of<'a>(gs: &'a Groups, producer: &str) -> &'a Group {
    gs.groups
        .iter()
        .find(|g| g.producers().contains(&producer))
        .unwrap_or_else(|| panic!("no group produced by '{producer}' in {gs:#?}"))
}

fn opts(f: f64) -> PruneOptions {
    PruneOptions {
        budget: Budget::Macs(f),
        global: true,
        min_channels: 1,
        min_fraction: 0.0,
        round_to: 1,
        latency: None,
    }
}

/// A fixture run through cleanup, analysis, scoring and planning.
struct Planned {
    original: Model,
    cleaned: Model,
    report: CleanupReport,
    groups: Groups,
    scores: Vec<Vec<f64>>,
    plan: Plan,
}

/// Clean, analyse and plan `model` to the MACs of `reduced` (the same architecture with the dead
/// channels left out).
fn plan_to(model: Model, reduced: &Model) -> Planned {
    let original = model.clone();
    let mut cleaned = model;
    let report = cleanup::cleanup(&mut cleaned).expect("cleanup");
    let groups = groups::analyse(&cleaned).expect("analyse");
    let scores = prune::weight_scores(&cleaned, &groups, Importance::L1).expect("scores");
    let m0 = macs(&cleaned);
    let m1 = macs(reduced);
    assert!(
        m1 < m0,
        "the reduced architecture has fewer MACs ({m1} vs {m0})"
    );
    let target = m1 as f64 / m0 as f64;
    let plan = prune::plan(&cleaned, &groups, &scores, None, &opts(target))
        .unwrap_or_else(|e| panic!("plan to macs={target}: {e}\ngroups: {groups:#?}"));
    assert_eq!(plan.macs.0, m0, "plan.macs.0 is the model's MACs");
    assert_eq!(
        plan.macs.1, m1,
        "the plan predicts the MACs of the architecture without the dead channels"
    );
    Planned {
        original,
        cleaned,
        report,
        groups,
        scores,
        plan,
    }
}

/// The plan keeps exactly the live channels of each listed group (`(producer, size, dead)`), and
/// prunes no other group. A frozen group is checked to be left whole, whatever its dead channels.
fn assert_keeps(p: &Planned, expected: &[(&str, usize, &[usize])]) {
    let mut ids = Vec::new();
    for &(producer, size, dead) in expected {
        let g = group_of(&p.groups, producer);
        assert_eq!(g.size, size, "size of the group produced by '{producer}'");
        ids.push(g.id);
        let entry = p.plan.groups.iter().find(|gp| gp.id == g.id);
        if g.frozen.is_some() {
            assert!(
                entry.is_none(),
                "group of '{producer}' is frozen and must not be pruned: {entry:?}"
            );
            continue;
        }
        let scores = &p.scores[g.id];
        for &c in dead {
            assert_eq!(
                scores[c], 0.0,
                "dead channel {c} of '{producer}' scores 0 (scores {scores:?})"
            );
        }
        for c in live(size, dead) {
            assert!(
                scores[c] > 0.0,
                "live channel {c} of '{producer}' scores > 0"
            );
        }
        if dead.is_empty() {
            assert!(
                entry.is_none(),
                "group of '{producer}' has no dead channels and must not be pruned: {entry:?}"
            );
        } else {
            let entry = entry.unwrap_or_else(|| {
                panic!("group of '{producer}' is not in the plan: {:?}", p.plan)
            });
            assert_eq!(entry.size, size);
            assert_eq!(
                entry.keep,
                live(size, dead),
                "group of '{producer}' keeps exactly its live channels"
            );
        }
    }
    for gp in &p.plan.groups {
        assert!(
            ids.contains(&gp.id),
            "the plan prunes group {} ({:?}), which has no dead channels",
            gp.id,
            p.groups.groups[gp.id].producers()
        );
    }
}

/// Apply the plan; check the measured MACs against the plan and the outputs against the
/// original model in ONNX Runtime and tract.
fn apply_and_compare(p: &Planned, input: &[usize]) -> Model {
    let mut pruned = p.cleaned.clone();
    prune::apply(&mut pruned, &p.groups, &p.plan).expect("apply");
    let m = macs(&pruned);
    assert_eq!(
        m, p.plan.macs.1,
        "measured MACs of the pruned model = plan.macs.1"
    );
    assert!(m < p.plan.macs.0, "pruning lowers the MACs");
    let x = Value::F32(probe_tensor(input, -1.0, 1.0));
    assert_same_outputs(
        &p.original,
        &pruned,
        &[x],
        &[RuntimeKind::OrtCpu, RuntimeKind::Tract],
    );
    pruned
}

fn init_dims(m: &Model, name: &str) -> Vec<i64> {
    m.initializer(name)
        .unwrap_or_else(|| panic!("no initializer {name}"))
        .dims
        .clone()
}

fn init_values(m: &Model, name: &str) -> Vec<f32> {
    to_f32(
        m.initializer(name)
            .unwrap_or_else(|| panic!("no initializer {name}")),
    )
    .expect("float initializer")
}

/// `t` (row-major, `dims`) restricted to `keep` along `axis`.
fn select(t: &[f32], dims: &[i64], axis: usize, keep: &[usize]) -> Vec<f32> {
    let outer: usize = dims[..axis].iter().product::<i64>() as usize;
    let len = dims[axis] as usize;
    let inner: usize = dims[axis + 1..].iter().product::<i64>() as usize;
    let mut out = Vec::new();
    for o in 0..outer {
        for &k in keep {
            let b = (o * len + k) * inner;
            out.extend_from_slice(&t[b..b + inner]);
        }
    }
    out
}

/// The initializer `name` of `pruned`, and the same of the original (`p.cleaned`) restricted to
/// the columns `kept` (axis 1): equal where pruning kept exactly those input columns.
fn pruned_and_kept_columns(
    p: &Planned,
    pruned: &Model,
    name: &str,
    kept: &[usize],
) -> (Vec<f32>, Vec<f32>) {
    let dims = init_dims(&p.cleaned, name);
    let want = select(&init_values(&p.cleaned, name), &dims, 1, kept);
    (init_values(pruned, name), want)
}

fn node<'a>(m: &'a Model, name: &str) -> &'a NodeProto {
    m.graph()
        .node
        .iter()
        .find(|n| n.name() == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn roles(g: &Group, node: &str) -> Vec<(Role, usize, usize)> {
    g.members
        .iter()
        .filter(|m| m.name == node)
        .map(|m| (m.role.clone(), m.offset, m.block))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Fixture 1: Conv -> BatchNormalization -> Relu -> Conv -> Relu -> GlobalAveragePool ->
/// Flatten -> Gemm.
fn conv_bn(c1: usize, c2: usize, d1: &[usize], d2: &[usize]) -> Model {
    let mut n = Net::new(1);
    n.input("x", &[3, 8, 8]);
    let y = n.conv("conv1", "x", 3, c1, 3, 1, d1, &[]);
    let y = n.batchnorm("bn1", &y, c1, d1);
    let y = n.node("Relu", "relu1", &[&y], vec![]);
    let y = n.conv("conv2", &y, c1, c2, 3, 1, d2, d1);
    let y = n.node("Relu", "relu2", &[&y], vec![]);
    let y = n.node("GlobalAveragePool", "gap", &[&y], vec![]);
    let y = n.node("Flatten", "flatten", &[&y], vec![]);
    let y = n.gemm("fc", &y, c2, 10, d2);
    n.output(&y, &[10]);
    n.model()
}

const CONV_BN_D1: &[usize] = &[1, 4, 6];
const CONV_BN_D2: &[usize] = &[0, 3];

#[test]
fn conv_batchnorm_relu_conv_gap_gemm_prunes_exactly_the_dead_channels() {
    let reduced = conv_bn(5, 4, &[], &[]);
    let p = plan_to(conv_bn(8, 6, CONV_BN_D1, CONV_BN_D2), &reduced);
    assert_eq!(p.report.folded_batchnorms, 1, "cleanup folds the one BN");
    assert_eq!(
        op_count(&p.cleaned, "BatchNormalization"),
        0,
        "no BatchNormalization left after cleanup"
    );
    let fc = group_of(&p.groups, "fc");
    assert!(
        fc.frozen
            .as_deref()
            .is_some_and(|r| r.contains("graph output")),
        "the logits are frozen as a graph output: {:?}",
        fc.frozen
    );
    let g1 = group_of(&p.groups, "conv1");
    assert_eq!(roles(g1, "conv2"), vec![(Role::Consumer, 0, 1)]);
    let g2 = group_of(&p.groups, "conv2");
    assert_eq!(roles(g2, "fc"), vec![(Role::Consumer, 0, 1)]);
    assert_keeps(&p, &[("conv1", 8, CONV_BN_D1), ("conv2", 6, CONV_BN_D2)]);
    let pruned = apply_and_compare(&p, &[2, 3, 8, 8]);
    assert_eq!(init_dims(&pruned, "conv1.w"), vec![5, 3, 3, 3]);
    assert_eq!(init_dims(&pruned, "conv2.w"), vec![4, 5, 3, 3]);
    assert_eq!(init_dims(&pruned, "fc.w"), vec![10, 4]);
}

/// Fixture 2: two Convs (`ca`, `cb` channels) concatenated on axis 1 -> Relu -> Conv 1x1
/// (output).
fn concat(ca: usize, cb: usize, da: &[usize], db: &[usize]) -> Model {
    let mut n = Net::new(2);
    n.input("x", &[3, 8, 8]);
    let a = n.conv("conva", "x", 3, ca, 3, 1, da, &[]);
    let b = n.conv("convb", "x", 3, cb, 1, 1, db, &[]);
    let y = n.node("Concat", "cat", &[&a, &b], vec![attr_int("axis", 1)]);
    let y = n.node("Relu", "relu", &[&y], vec![]);
    let cols: Vec<usize> = da
        .iter()
        .copied()
        .chain(db.iter().map(|c| ca + c))
        .collect();
    let y = n.conv("convc", &y, ca + cb, 5, 1, 1, &[], &cols);
    n.output(&y, &[5, 8, 8]);
    n.model()
}

#[test]
fn concat_consumer_loses_the_columns_at_each_segments_offset() {
    const DA: &[usize] = &[0, 5, 7];
    const DB: &[usize] = &[2, 3];
    let reduced = concat(5, 4, &[], &[]);
    let p = plan_to(concat(8, 6, DA, DB), &reduced);
    let ga = group_of(&p.groups, "conva");
    let gb = group_of(&p.groups, "convb");
    assert_ne!(ga.id, gb.id, "the two branches are separate groups");
    assert_eq!(roles(ga, "convc"), vec![(Role::Consumer, 0, 1)]);
    assert_eq!(roles(gb, "convc"), vec![(Role::Consumer, 8, 1)]);
    assert_keeps(&p, &[("conva", 8, DA), ("convb", 6, DB)]);
    let pruned = apply_and_compare(&p, &[2, 3, 8, 8]);
    // convc keeps the input columns 1,2,3,4,6 (branch a) and 8+{0,1,4,5} (branch b)
    let kept_cols = vec![1, 2, 3, 4, 6, 8, 9, 12, 13];
    assert_eq!(init_dims(&pruned, "convc.w"), vec![5, 9, 1, 1]);
    let (got, want) = pruned_and_kept_columns(&p, &pruned, "convc.w", &kept_cols);
    assert_eq!(
        got, want,
        "convc's weight is the original's at the kept columns"
    );
}

/// Fixture 3: Conv 1x1 (c) -> Relu -> depthwise Conv 3x3 (group c) -> Relu -> Conv 1x1
/// (output).
fn depthwise(c: usize, d: &[usize]) -> Model {
    let mut n = Net::new(3);
    n.input("x", &[4, 8, 8]);
    let y = n.conv("pw1", "x", 4, c, 1, 1, d, &[]);
    let y = n.node("Relu", "relu1", &[&y], vec![]);
    let y = n.conv("dw", &y, c, c, 3, c, d, &[]);
    let y = n.node("Relu", "relu2", &[&y], vec![]);
    let y = n.conv("pw2", &y, c, 6, 1, 1, &[], d);
    n.output(&y, &[6, 8, 8]);
    n.model()
}

#[test]
fn depthwise_conv_follows_its_producer_and_gets_the_new_group_count() {
    const D: &[usize] = &[2, 5, 9, 10];
    let reduced = depthwise(8, &[]);
    let p = plan_to(depthwise(12, D), &reduced);
    let g = group_of(&p.groups, "pw1");
    assert_eq!(roles(g, "dw"), vec![(Role::Depthwise, 0, 1)]);
    assert_eq!(roles(g, "pw2"), vec![(Role::Consumer, 0, 1)]);
    assert_eq!(g.producers(), vec!["pw1"]);
    assert!(g.frozen.is_none(), "{:?}", g.frozen);
    assert_keeps(&p, &[("pw1", 12, D)]);
    let pruned = apply_and_compare(&p, &[2, 4, 8, 8]);
    assert_eq!(node(&pruned, "dw").attr_int("group"), Some(8));
    assert_eq!(init_dims(&pruned, "dw.w"), vec![8, 1, 3, 3]);
    assert_eq!(init_dims(&pruned, "dw.b"), vec![8]);
    assert_eq!(init_dims(&pruned, "pw2.w"), vec![6, 8, 1, 1]);
}

/// Fixture 4: Conv 1x1 (8) -> Relu -> grouped Conv 3x3 (group 2, 8 -> 8) -> Relu ->
/// Conv 1x1 (c3) -> Relu -> GlobalAveragePool -> Flatten -> Gemm.
fn grouped(c3: usize, d1: &[usize], d3: &[usize]) -> Model {
    let mut n = Net::new(4);
    n.input("x", &[4, 8, 8]);
    let y = n.conv("c1", "x", 4, 8, 1, 1, d1, &[]);
    let y = n.node("Relu", "relu1", &[&y], vec![]);
    let y = n.conv("gconv", &y, 8, 8, 3, 2, &[], &[]);
    let y = n.node("Relu", "relu2", &[&y], vec![]);
    let y = n.conv("c3", &y, 8, c3, 1, 1, d3, &[]);
    let y = n.node("Relu", "relu3", &[&y], vec![]);
    let y = n.node("GlobalAveragePool", "gap", &[&y], vec![]);
    let y = n.node("Flatten", "flatten", &[&y], vec![]);
    let y = n.gemm("fc", &y, c3, 10, d3);
    n.output(&y, &[10]);
    n.model()
}

#[test]
fn grouped_conv_freezes_its_channels_and_the_rest_still_prunes() {
    const D1: &[usize] = &[0, 3];
    const D3: &[usize] = &[1, 4];
    let reduced = grouped(4, D1, &[]);
    let p = plan_to(grouped(6, D1, D3), &reduced);
    // the grouped conv's input channels: frozen, with the reason
    let g1 = group_of(&p.groups, "c1");
    let why = g1.frozen.as_deref().unwrap_or_default();
    assert!(
        why.contains("group") && why.contains("gconv"),
        "c1's channels are frozen by the grouped conv: {:?}",
        g1.frozen
    );
    // the grouped conv's output channels: no prunable group touches gconv, or reads its output
    // (c3 as a consumer)
    for g in p.groups.prunable() {
        assert!(
            !g.members.iter().any(|m| m.name == "gconv"),
            "prunable group {} touches the grouped conv: {g:#?}",
            g.id
        );
        assert!(
            !g.members
                .iter()
                .any(|m| m.name == "c3" && m.role == Role::Consumer),
            "prunable group {} slices c3's input channels (the grouped conv's output): {g:#?}",
            g.id
        );
    }
    // c1's dead channels stay (frozen); c3's go
    assert_keeps(&p, &[("c1", 8, D1), ("c3", 6, D3)]);
    let pruned = apply_and_compare(&p, &[2, 4, 8, 8]);
    assert_eq!(init_dims(&pruned, "c1.w"), vec![8, 4, 1, 1]);
    assert_eq!(init_dims(&pruned, "gconv.w"), vec![8, 4, 3, 3]);
    assert_eq!(node(&pruned, "gconv").attr_int("group"), Some(2));
    assert_eq!(init_dims(&pruned, "c3.w"), vec![4, 8, 1, 1]);
}

/// Fixture 5, Squeeze-Excitation: Conv (cm) -> Relu -> r; GlobalAveragePool(r) ->
/// Conv 1x1 (cm -> cs) -> Relu -> Conv 1x1 (cs -> cm) -> Sigmoid -> s; Mul(r, s) ->
/// Conv 1x1 (output).
fn squeeze_excite(cm: usize, cs: usize, dm: &[usize], ds: &[usize]) -> Model {
    let mut n = Net::new(5);
    n.input("x", &[3, 8, 8]);
    let y = n.conv("main", "x", 3, cm, 3, 1, dm, &[]);
    let r = n.node("Relu", "relu", &[&y], vec![]);
    let y = n.node("GlobalAveragePool", "se_pool", &[&r], vec![]);
    let y = n.conv("se_squeeze", &y, cm, cs, 1, 1, ds, dm);
    let y = n.node("Relu", "se_relu", &[&y], vec![]);
    let y = n.conv("se_expand", &y, cs, cm, 1, 1, dm, ds);
    let s = n.node("Sigmoid", "se_gate", &[&y], vec![]);
    let y = n.node("Mul", "se_mul", &[&r, &s], vec![]);
    let y = n.conv("head", &y, cm, 6, 1, 1, &[], dm);
    n.output(&y, &[6, 8, 8]);
    n.model()
}

#[test]
fn squeeze_excitation_ties_the_expand_conv_to_the_main_conv() {
    const DM: &[usize] = &[3, 7, 8, 15];
    const DS: &[usize] = &[1];
    let reduced = squeeze_excite(12, 3, &[], &[]);
    let p = plan_to(squeeze_excite(16, 4, DM, DS), &reduced);
    let gm = group_of(&p.groups, "main");
    let mut prods = gm.producers();
    prods.sort();
    assert_eq!(
        prods,
        vec!["main", "se_expand"],
        "the Mul ties se_expand to main"
    );
    assert_eq!(roles(gm, "se_squeeze"), vec![(Role::Consumer, 0, 1)]);
    assert_eq!(roles(gm, "head"), vec![(Role::Consumer, 0, 1)]);
    let gs = group_of(&p.groups, "se_squeeze");
    assert_ne!(gs.id, gm.id);
    assert_eq!(gs.producers(), vec!["se_squeeze"]);
    assert_eq!(roles(gs, "se_expand"), vec![(Role::Consumer, 0, 1)]);
    assert_keeps(&p, &[("main", 16, DM), ("se_squeeze", 4, DS)]);
    let pruned = apply_and_compare(&p, &[2, 3, 8, 8]);
    assert_eq!(init_dims(&pruned, "main.w"), vec![12, 3, 3, 3]);
    assert_eq!(init_dims(&pruned, "se_squeeze.w"), vec![3, 12, 1, 1]);
    assert_eq!(init_dims(&pruned, "se_expand.w"), vec![12, 3, 1, 1]);
    assert_eq!(init_dims(&pruned, "head.w"), vec![6, 12, 1, 1]);
}

/// Fixture 6: Conv (c) -> Relu -> Flatten ([N, c, 4, 4] -> [N, 16c]) -> Gemm (16c -> 10, transB).
fn flatten_gemm(c: usize, d: &[usize]) -> Model {
    let mut n = Net::new(6);
    n.input("x", &[3, 4, 4]);
    let y = n.conv("conv", "x", 3, c, 3, 1, d, &[]);
    let y = n.node("Relu", "relu", &[&y], vec![]);
    let y = n.node("Flatten", "flatten", &[&y], vec![]);
    let cols: Vec<usize> = d.iter().flat_map(|&k| k * 16..k * 16 + 16).collect();
    let y = n.gemm("fc", &y, 16 * c, 10, &cols);
    n.output(&y, &[10]);
    n.model()
}

#[test]
fn flatten_into_gemm_removes_blocks_of_spatial_features() {
    const D: &[usize] = &[0, 3, 7];
    let reduced = flatten_gemm(5, &[]);
    let p = plan_to(flatten_gemm(8, D), &reduced);
    let g = group_of(&p.groups, "conv");
    assert_eq!(roles(g, "fc"), vec![(Role::Consumer, 0, 16)]);
    assert_keeps(&p, &[("conv", 8, D)]);
    let pruned = apply_and_compare(&p, &[2, 3, 4, 4]);
    let kept: Vec<usize> = live(8, D)
        .into_iter()
        .flat_map(|k| k * 16..k * 16 + 16)
        .collect();
    assert_eq!(kept.len(), 80);
    assert_eq!(init_dims(&pruned, "fc.w"), vec![10, 80]);
    assert_eq!(init_dims(&p.cleaned, "fc.w"), vec![10, 128]);
    let (got, want) = pruned_and_kept_columns(&p, &pruned, "fc.w", &kept);
    assert_eq!(
        got, want,
        "fc keeps the 16-feature blocks of the kept channels"
    );
}

/// Fixture 7: x -> ConvA -> Relu -> a; b = ConvB(a); s1 = a + b; c = ConvC(s1); s2 = s1 + c ->
/// Relu -> Conv head (output).
fn residual(c: usize, d: &[usize]) -> Model {
    let mut n = Net::new(7);
    n.input("x", &[3, 8, 8]);
    let y = n.conv("conva", "x", 3, c, 3, 1, d, &[]);
    let a = n.node("Relu", "relu_a", &[&y], vec![]);
    let b = n.conv("convb", &a, c, c, 3, 1, d, d);
    let s1 = n.node("Add", "add1", &[&a, &b], vec![]);
    let cc = n.conv("convc", &s1, c, c, 1, 1, d, d);
    let s2 = n.node("Add", "add2", &[&s1, &cc], vec![]);
    let y = n.node("Relu", "relu_out", &[&s2], vec![]);
    let y = n.conv("head", &y, c, 5, 1, 1, &[], d);
    n.output(&y, &[5, 8, 8]);
    n.model()
}

#[test]
fn residual_adds_put_three_convs_in_one_group() {
    const D: &[usize] = &[2, 6];
    let reduced = residual(6, &[]);
    let p = plan_to(residual(8, D), &reduced);
    let g = group_of(&p.groups, "conva");
    let mut prods = g.producers();
    prods.sort();
    assert_eq!(prods, vec!["conva", "convb", "convc"]);
    assert!(g.frozen.is_none(), "{:?}", g.frozen);
    for consumer in ["convb", "convc", "head"] {
        assert!(
            roles(g, consumer).contains(&(Role::Consumer, 0, 1)),
            "{consumer} reads the group: {g:#?}"
        );
    }
    assert_keeps(&p, &[("conva", 8, D)]);
    let pruned = apply_and_compare(&p, &[2, 3, 8, 8]);
    assert_eq!(init_dims(&pruned, "conva.w"), vec![6, 3, 3, 3]);
    assert_eq!(init_dims(&pruned, "convb.w"), vec![6, 6, 3, 3]);
    assert_eq!(init_dims(&pruned, "convc.w"), vec![6, 6, 1, 1]);
    assert_eq!(init_dims(&pruned, "head.w"), vec![5, 6, 1, 1]);
}

/// Fixture 8: Conv -> com.example:Fancy (output): the conv's channels reach only an op
/// whittle does not know.
#[test]
fn channels_into_a_custom_op_are_frozen_and_nothing_is_pruned() {
    let mut n = Net::new(8);
    n.custom_domain = true;
    n.input("x", &[3, 8, 8]);
    let y = n.conv("conv", "x", 3, 8, 3, 1, &[1, 2], &[]);
    n.graph.node.push(NodeProto {
        name: Some("fancy".into()),
        op_type: Some("Fancy".into()),
        domain: Some("com.example".into()),
        input: vec![y],
        output: vec!["y".into()],
        ..Default::default()
    });
    n.output("y", &[8, 8, 8]);
    let mut m = n.model();
    cleanup::cleanup(&mut m).expect("cleanup of a graph with a custom op");
    let gs = groups::analyse(&m).expect("analyse does not fail on a custom op");
    let g = group_of(&gs, "conv");
    let why = g.frozen.as_deref().unwrap_or_default();
    assert!(
        why.contains("'fancy'"),
        "the conv's group is frozen, naming the custom node: {:?}",
        g.frozen
    );
    assert_eq!(gs.prunable().count(), 0);
    let scores = prune::weight_scores(&m, &gs, Importance::L1).expect("scores");
    match prune::plan(&m, &gs, &scores, None, &opts(0.5)) {
        Err(e @ Error::NothingToPrune(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("nothing to prune"), "{msg}");
            assert!(msg.contains("fancy"), "the message gives the reason: {msg}");
        }
        other => panic!("expected NothingToPrune, got {other:?}"),
    }
}

/// Fixture 9: fixture 1 at macs=0.01: below what pruning every group to one channel reaches.
#[test]
fn unreachable_mac_budget_says_the_smallest_reachable() {
    let mut m = conv_bn(8, 6, CONV_BN_D1, CONV_BN_D2);
    cleanup::cleanup(&mut m).expect("cleanup");
    let gs = groups::analyse(&m).expect("analyse");
    let scores = prune::weight_scores(&m, &gs, Importance::L1).expect("scores");
    match prune::plan(&m, &gs, &scores, None, &opts(0.01)) {
        Err(e @ Error::Budget(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("smallest reachable"), "{msg}");
            assert!(msg.contains("macs=0.01"), "{msg}");
        }
        other => panic!("expected Error::Budget, got {other:?}"),
    }
}
