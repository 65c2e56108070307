//! Depth merging: every merge shape is exact on built fixtures and on real layers (the
//! MobileNetV2 stand-in EfficientNet-Lite0 and the VWW MobileNetV1), in ONNX Runtime and tract;
//! padded second convs and odd shapes are refused or reported as not exact.

use whittle_compress::{cleanup, merge};
use whittle_core::Model;
use whittle_core::onnx::{NodeProto, TensorProto};
use whittle_core::tensor::from_f32;
use whittle_test_support::runtime::{RuntimeKind, Value, probe_tensor};
use whittle_test_support::{
    asset, attr_int, attr_ints, graph as graph_proto, max_abs, max_abs_diff, model, node,
    run_model, value_info, values,
};

/// A conv layer spec: (out, in, k, stride, pad, group).
type Spec = (usize, usize, usize, i64, i64, usize);

fn conv(name: &str, x: &str, y: &str, s: Spec, seed: u64) -> (NodeProto, Vec<TensorProto>) {
    let (o, c, k, stride, pad, g) = s;
    let w = format!("{name}.w");
    let b = format!("{name}.b");
    let node = NodeProto {
        name: Some(name.into()),
        op_type: Some("Conv".into()),
        input: vec![x.into(), w.clone(), b.clone()],
        output: vec![y.into()],
        attribute: vec![
            attr_ints("kernel_shape", &[k as i64, k as i64]),
            attr_ints("strides", &[stride, stride]),
            attr_ints("pads", &[pad, pad, pad, pad]),
            attr_int("group", g as i64),
        ],
        ..Default::default()
    };
    let n = o * (c / g) * k * k;
    let inits = vec![
        from_f32(
            &w,
            &[o as i64, (c / g) as i64, k as i64, k as i64],
            &values(n, seed),
        ),
        from_f32(&b, &[o as i64], &values(o, seed + 100)),
    ];
    (node, inits)
}

fn graph(nodes: Vec<(NodeProto, Vec<TensorProto>)>, c: usize, extra: Vec<NodeProto>) -> Model {
    let (mut node, mut init) = (vec![], vec![]);
    for (n, i) in nodes {
        node.push(n);
        init.extend(i);
    }
    node.extend(extra);
    Model {
        proto: model(
            graph_proto(
                "g",
                node,
                vec![value_info("x", &["N", &c.to_string(), "11", "10"])],
                vec![value_info("y", &["N", "?", "?", "?"])],
                init,
            ),
            &[],
        ),
    }
}

fn pair(a: Spec, b: Spec) -> Model {
    graph(
        vec![conv("c1", "x", "t", a, 1), conv("c2", "t", "y", b, 2)],
        a.1,
        vec![],
    )
}

/// Max |a - b| / max |a| over every output, worst of both runtimes.
fn rel_diff(a: &Model, b: &Model, input: &[usize]) -> f32 {
    whittle_test_support::rel_diff(a, b, input, 0.01)
}

fn merged(m: &Model, a: &str, b: &str) -> (Model, merge::MergeReport) {
    let mut out = m.clone();
    let r = merge::merge_pair(&mut out, a, b, false).unwrap_or_else(|e| panic!("{a}+{b}: {e}"));
    assert_eq!(out.graph().node.len(), m.graph().node.len() - 1);
    (out, r)
}

#[test]
fn every_merge_shape_is_exact() {
    // (what, the first conv, the second, the merged kernel): a table, one case a row
    #[rustfmt::skip]
    let cases: [(&str, Spec, Spec, [usize; 2]); 6] = [
        ("kxk then 1x1",             (6, 4, 3, 1, 1, 1), (5, 6, 1, 1, 0, 1), [3, 3]),
        ("1x1 then kxk",             (6, 4, 1, 1, 0, 1), (5, 6, 3, 1, 0, 1), [3, 3]),
        ("depthwise then pointwise", (4, 4, 3, 1, 1, 4), (7, 4, 1, 1, 0, 1), [3, 3]),
        ("kxk stride 2 then kxk",    (6, 4, 3, 2, 1, 1), (5, 6, 3, 1, 0, 1), [7, 7]),
        ("kxk then kxk stride 2",    (6, 4, 3, 1, 1, 1), (5, 6, 3, 2, 0, 1), [5, 5]),
        ("depthwise then depthwise", (4, 4, 3, 1, 1, 4), (4, 4, 3, 1, 0, 4), [5, 5]),
    ];
    for (what, a, b, kernel) in cases {
        let m = pair(a, b);
        let (out, r) = merged(&m, "c1", "c2");
        assert!(r.exact, "{what}");
        assert_eq!(r.kernel, kernel, "{what}");
        let d = rel_diff(&m, &out, &[2, a.1, 11, 10]);
        assert!(d < 1e-4, "{what}: differs by {d}");
        let w = &out.graph().node[0].input[1];
        let dims = &out.initializer(w).unwrap().dims;
        if what == "depthwise then depthwise" {
            assert_eq!(dims[1], 1, "two depthwise convs stay depthwise");
        }
    }
}

#[test]
fn a_padded_second_conv_is_refused_or_marked_inexact() {
    let m = pair((6, 4, 1, 1, 0, 1), (5, 6, 3, 1, 1, 1));
    let e = merge::merge_pair(&mut m.clone(), "c1", "c2", false).unwrap_err();
    assert!(e.to_string().contains("not be exact at the borders"), "{e}");
    let mut out = m.clone();
    let r = merge::merge_pair(&mut out, "c1", "c2", true).unwrap();
    assert!(!r.exact && r.note.is_some());
    // inside the borders it still agrees; at the borders c1's bias makes the difference
    assert!(rel_diff(&m, &out, &[1, 4, 11, 10]) > 1e-4);
}

#[test]
fn residual_identity_folds_into_the_conv() {
    for (what, spec) in [
        ("dense", (4, 4, 3, 1, 1, 1)),
        ("depthwise", (4, 4, 3, 1, 1, 4)),
    ] {
        let add = node("add", "Add", &["t", "x"], &["y"]);
        let m = graph(vec![conv("c", "x", "t", spec, 3)], 4, vec![add]);
        let mut out = m.clone();
        assert_eq!(merge::fold_residual(&mut out, "c").unwrap(), "add");
        assert_eq!(out.graph().node.len(), 1);
        let d = rel_diff(&m, &out, &[1, 4, 11, 10]);
        assert!(d < 1e-4, "{what}: {d}");
    }
    // a strided conv does not keep the shape
    let add = node("add", "Add", &["t", "x"], &["y"]);
    let mut m = graph(
        vec![conv("c", "x", "t", (4, 4, 3, 2, 1, 1), 3)],
        4,
        vec![add],
    );
    let e = merge::fold_residual(&mut m, "c").unwrap_err();
    assert!(e.to_string().contains("keep its input's shape"), "{e}");
}

#[test]
fn a_pair_whose_middle_is_read_twice_is_refused() {
    let mut m = pair((6, 4, 3, 1, 1, 1), (5, 6, 1, 1, 0, 1));
    m.graph_mut()
        .output
        .push(value_info("t", &["N", "6", "11", "10"]));
    let e = merge::merge_pair(&mut m, "c1", "c2", false).unwrap_err();
    assert!(e.to_string().contains("read elsewhere"), "{e}");
    let e = merge::remove_activation(&mut m, "c1").unwrap_err();
    assert!(e.to_string().contains("only Relu"), "{e}");
}

fn shared(name: &str) -> Option<Model> {
    let p = asset(&format!("models/{name}"))?;
    let mut m = Model::load(&p).unwrap();
    cleanup::cleanup(&mut m).unwrap();
    Some(m)
}

/// Merge the first `count` conv → activation → conv chains (activation removed in both the
/// reference and the merged model, so the merge itself must be exact on the real weights).
fn real_chains(m: &Model, input: &[usize], count: usize, want_dw_first: bool) {
    let g = m.graph();
    let mut found = 0;
    for (i, n) in g.node.iter().enumerate() {
        if found == count || n.op_type() != "Conv" {
            continue;
        }
        let dw = g.node[i]
            .attribute
            .iter()
            .any(|a| a.name() == "group" && a.i.unwrap_or(1) > 1);
        if dw != want_dw_first {
            continue;
        }
        // conv -> act -> conv (unpadded second)
        let Some(act) = g
            .node
            .iter()
            .find(|a| a.input.first() == Some(&n.output[0]))
        else {
            continue;
        };
        if !matches!(act.op_type(), "Relu" | "Clip") {
            continue;
        }
        let Some(next) = g.node.iter().find(|c| {
            c.op_type() == "Conv"
                && c.input.first() == Some(&act.output[0])
                && c.attribute
                    .iter()
                    .all(|a| a.name() != "pads" || a.ints.iter().all(|&p| p == 0))
        }) else {
            continue;
        };
        let mut reference = m.clone();
        merge::remove_activation(&mut reference, act.name()).unwrap();
        let mut out = reference.clone();
        let r = merge::merge_pair(&mut out, n.name(), next.name(), false)
            .unwrap_or_else(|e| panic!("{} + {}: {e}", n.name(), next.name()));
        assert!(r.exact);
        let d = rel_diff(&reference, &out, input);
        assert!(d < 1e-4, "{} + {}: {d}", n.name(), next.name());
        found += 1;
    }
    assert_eq!(found, count, "real chains found");
}

#[test]
fn real_depthwise_then_pointwise_layers_merge_exactly() {
    if let Some(m) = shared("efficientnet_lite0_224.onnx") {
        real_chains(&m, &[1, 3, 224, 224], 2, true);
    }
    if let Some(m) = shared("mobilenetv1_025_vww96.onnx") {
        real_chains(&m, &[1, 3, 96, 96], 3, true);
    }
}

#[test]
fn paired_runs_both_models_on_the_same_inputs() {
    // the original (two convs) beside a current model where they are merged: the graph outputs
    // are the original's, and the current model's tensors are there under the prefix
    let m = pair((6, 4, 3, 1, 1, 1), (5, 6, 1, 1, 0, 1));
    let (current, _) = merged(&m, "c1", "c2");
    let mut both = merge::paired(&m, &current);
    whittle_core::check::check_graph(both.graph()).unwrap();
    assert_eq!(both.graph().output.len(), 1);
    // expose the current model's output too, then run: it equals the original's (exact merge)
    // the graph input both read keeps its name (a merge at the model's first layer refits from
    // it); every other tensor of the current model is renamed
    let input = m.graph().input[0].name().to_string();
    assert_eq!(merge::paired_name(&current, &input), input);
    let name = merge::paired_name(&current, "y");
    assert_ne!(name, "y");
    both.graph_mut()
        .output
        .push(value_info(&name, &["N", "?", "?", "?"]));
    let x = Value::F32(probe_tensor(&[2, 4, 11, 10], -1.0, 1.0));
    for kind in [RuntimeKind::OrtCpu, RuntimeKind::Tract] {
        let out = run_model(kind, &both, std::slice::from_ref(&x));
        let (a, b) = (out[0].to_f32_vec(), out[1].to_f32_vec());
        let peak = max_abs(&a);
        let d = max_abs_diff(&a, &b);
        assert!(d <= 1e-4 * peak, "{}: {d} vs peak {peak}", kind.name());
    }
}
