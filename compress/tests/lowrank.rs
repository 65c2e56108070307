//! Low-rank factorisation: at full rank every scheme reproduces the layer (built fixtures and
//! real ResNet-8 layers, in ONNX Runtime and tract); truncation lowers MACs; ranks that would
//! not are skipped with the reason; bad ranks and schemes are refused.

use faer::Mat;
use whittle_compress::cleanup;
use whittle_compress::lowrank::{self, LowRankOptions, RankRule, Scheme};
use whittle_compress::prune::Budget;
use whittle_core::onnx::{NodeProto, TensorProto};
use whittle_core::tensor::from_f32;
use whittle_core::{Model, cost, shape};
use whittle_test_support::{attr_int, attr_ints, graph, model, node, value_info, values};

fn one_node(node: NodeProto, x: &[&str], y: &[&str], inits: Vec<TensorProto>) -> Model {
    Model {
        proto: model(
            graph(
                "g",
                vec![node],
                vec![value_info("x", x)],
                vec![value_info("y", y)],
                inits,
            ),
            &[],
        ),
    }
}

fn conv(o: usize, c: usize, k: usize, stride: i64, pad: i64) -> Model {
    let node = NodeProto {
        attribute: vec![
            attr_ints("kernel_shape", &[k as i64, k as i64]),
            attr_ints("strides", &[stride, stride]),
            attr_ints("pads", &[pad, pad, pad, pad]),
        ],
        ..node("conv", "Conv", &["x", "w", "b"], &["y"])
    };
    let w = from_f32(
        "w",
        &[o as i64, c as i64, k as i64, k as i64],
        &values(o * c * k * k, 1),
    );
    let b = from_f32("b", &[o as i64], &values(o, 2));
    one_node(
        node,
        &["N", &c.to_string(), "9", "8"],
        &["N", &o.to_string(), "?", "?"],
        vec![w, b],
    )
}

fn gemm(o: usize, d: usize, trans_b: bool) -> Model {
    let node = NodeProto {
        attribute: vec![attr_int("transB", trans_b as i64)],
        ..node("fc", "Gemm", &["x", "w", "b"], &["y"])
    };
    let dims = if trans_b {
        [o as i64, d as i64]
    } else {
        [d as i64, o as i64]
    };
    let w = from_f32("w", &dims, &values(o * d, 3));
    let b = from_f32("b", &[o as i64], &values(o, 4));
    one_node(
        node,
        &["N", &d.to_string()],
        &["N", &o.to_string()],
        vec![w, b],
    )
}

fn matmul(o: usize, d: usize) -> Model {
    let node = node("mm", "MatMul", &["x", "w"], &["y"]);
    let w = from_f32("w", &[d as i64, o as i64], &values(o * d, 5));
    one_node(
        node,
        &["N", "5", &d.to_string()],
        &["N", "5", &o.to_string()],
        vec![w],
    )
}

/// Max |a - b| relative to max |a|, in both runtimes.
fn rel_diff(a: &Model, b: &Model, input: &[usize]) -> f32 {
    whittle_test_support::rel_diff(a, b, input, 0.05)
}

/// A symmetric positive definite matrix, as input statistics stand-in.
fn spd(n: usize) -> Mat<f64> {
    let v = values(n * n, 9);
    let a = Mat::from_fn(n, n, |i, j| f64::from(v[i * n + j]));
    let mut g = &a * a.transpose();
    for i in 0..n {
        g[(i, i)] += 0.5;
    }
    g
}

fn full(m: &Model, node: &str, scheme: Scheme, rank: usize, input: &[usize], gram: bool) {
    let mut f = m.clone();
    // inputs per output (+1: the bias column of the statistics)
    let w = m.initializer("w").unwrap();
    let trans_b = m.graph().node[0]
        .attribute
        .iter()
        .any(|a| a.name() == "transB" && a.i == Some(1));
    let n = 1 + match node {
        "conv" => w.dims[1..].iter().product::<i64>(),
        _ if trans_b => w.dims[1],
        _ => w.dims[0],
    } as usize;
    let g = spd(n);
    lowrank::factorise_layer(&mut f, node, scheme, rank, gram.then_some((&g, 100)))
        .unwrap_or_else(|e| panic!("{node} {scheme:?} rank {rank}: {e}"));
    assert!(f.graph().node.len() >= 2, "split in two");
    let r = rel_diff(m, &f, input);
    assert!(
        r < 1e-4,
        "{node} {scheme:?} data-aware {gram}: full rank differs by {r}"
    );
}

#[test]
fn full_rank_reproduces_every_layer_kind_and_scheme() {
    // 3x3 conv, stride 2, pad 1: channel full rank min(6, 4*9) = 6; spatial min(4*3, 6*3) = 12
    let c = conv(6, 4, 3, 2, 1);
    full(&c, "conv", Scheme::Channel, 6, &[1, 4, 9, 8], false);
    full(&c, "conv", Scheme::Channel, 6, &[1, 4, 9, 8], true);
    full(&c, "conv", Scheme::Spatial, 12, &[1, 4, 9, 8], false);
    for t in [true, false] {
        let g = gemm(7, 5, t);
        full(&g, "fc", Scheme::Channel, 5, &[2, 5], false);
        // data-aware: the bias is factorised too, full rank min(7, 5 + 1)
        full(&g, "fc", Scheme::Channel, 6, &[2, 5], true);
    }
    let m = matmul(6, 8);
    full(&m, "mm", Scheme::Channel, 6, &[2, 5, 8], false);
    full(&m, "mm", Scheme::Channel, 6, &[2, 5, 8], true);
}

fn resnet8() -> Model {
    let mut m = Model::load(&whittle_test_support::resnet8()).unwrap();
    cleanup::cleanup(&mut m).unwrap();
    m
}

#[test]
fn full_rank_reproduces_real_resnet8_layers() {
    let m = resnet8();
    for (node, scheme, rank) in [
        ("conv2d_1", Scheme::Channel, 16),
        ("conv2d_4", Scheme::Spatial, 96),
        ("conv2d_7", Scheme::Channel, 64),
        ("dense", Scheme::Channel, 10),
    ] {
        let mut f = m.clone();
        lowrank::factorise_layer(&mut f, node, scheme, rank, None).unwrap();
        let r = rel_diff(&m, &f, &[1, 3, 32, 32]);
        assert!(r < 1e-4, "{node} {scheme:?}: {r}");
    }
}

fn macs(m: &Model) -> u64 {
    cost::count(m, &shape::infer(m, &[]).unwrap()).macs
}

#[test]
fn budgets_lower_macs_and_uneconomic_ranks_are_skipped() {
    let m = resnet8();
    for scheme in [Scheme::Channel, Scheme::Spatial, Scheme::Auto] {
        let mut f = m.clone();
        let r = lowrank::factorise(
            &mut f,
            None,
            &LowRankOptions {
                rule: RankRule::Budget(Budget::Macs(0.7)),
                scheme,
                data_aware: false,
                round_to: 1,
            },
        )
        .unwrap();
        assert!(macs(&f) as f64 <= 0.7 * macs(&m) as f64 + 1.0, "{scheme:?}");
        for l in &r.factored {
            assert!(l.macs.1 < l.macs.0 && l.params.1 < l.params.0, "{l:?}");
        }
        rel_diff(&m, &f, &[1, 3, 32, 32]); // runs in both runtimes
    }
    // at full rank nothing gets cheaper: refused, naming how many layers were skipped and why,
    // and the model is untouched
    let mut f = m.clone();
    let e = lowrank::factorise(
        &mut f,
        None,
        &LowRankOptions {
            rule: RankRule::Fraction(1.0),
            scheme: Scheme::Channel,
            data_aware: false,
            round_to: 1,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nothing to factorise"), "{e}");
    assert!(e.contains("(10 of them"), "{e}");
    assert!(e.contains("would not make it cheaper"), "{e}");
    assert_eq!(macs(&f), macs(&m));
}

#[test]
fn bad_ranks_and_schemes_are_refused_or_skipped() {
    let m = resnet8();
    let opts = |rule, scheme, data_aware| LowRankOptions {
        rule,
        scheme,
        data_aware,
        round_to: 1,
    };
    let mut f = m.clone();
    let e = lowrank::factorise(
        &mut f,
        None,
        &opts(RankRule::Rank(0), Scheme::Channel, false),
    )
    .unwrap_err();
    assert!(e.to_string().contains("rank of 0"), "{e}");
    // rank 12 exceeds the full rank (10) of the classifier only
    let r = lowrank::factorise(
        &mut f,
        None,
        &opts(RankRule::Rank(12), Scheme::Channel, false),
    )
    .unwrap();
    assert!(
        r.skipped
            .iter()
            .any(|s| s.node == "dense" && s.reason.contains("exceeds its full rank 10")),
        "{:?}",
        r.skipped
    );
    let e = lowrank::factorise(
        &mut m.clone(),
        None,
        &opts(RankRule::Rank(4), Scheme::Spatial, true),
    )
    .unwrap_err();
    assert!(e.to_string().contains("channel-wise"), "{e}");
    let e = lowrank::factorise_layer(&mut m.clone(), "conv2d_1", Scheme::Channel, 17, None)
        .unwrap_err();
    assert!(e.to_string().contains("not in 1..=16"), "{e}");
    // 1x1 convs have no spatial factorisation
    let e =
        lowrank::factorise_layer(&mut m.clone(), "conv2d_5", Scheme::Spatial, 2, None).unwrap_err();
    assert!(e.to_string().contains("spatial scheme needs"), "{e}");
    // a grouped conv is listed as skipped, with the reason
    let node = NodeProto {
        attribute: vec![attr_ints("kernel_shape", &[3, 3]), attr_int("group", 4)],
        ..node("dw", "Conv", &["x", "w"], &["y"])
    };
    let g = one_node(
        node,
        &["N", "4", "6", "6"],
        &["N", "4", "4", "4"],
        vec![from_f32("w", &[4, 1, 3, 3], &values(36, 7))],
    );
    let e = lowrank::factorise(
        &mut g.clone(),
        None,
        &opts(RankRule::Rank(1), Scheme::Auto, false),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nothing to factorise"), "{e}");
    assert!(e.contains("dw: it is a grouped Conv"), "{e}");
}
