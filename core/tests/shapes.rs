//! Dynamic input shapes (issue 17): -1 / 0 dims are symbols, bindings fix them everywhere, and a
//! MAC count is exact at the bound shape or names the dims it is missing.

#[path = "fixtures/dynamic.rs"]
mod dynamic;

use dynamic::*;
use whittle_core::cost::{self, UnknownDim};
use whittle_core::model::float_value_info;
use whittle_core::onnx::{ModelProto, NodeProto};
use whittle_core::{Dim, Model, shape};
use whittle_test_support::{graph, model_with, node};

fn model(m: &ModelProto) -> Model {
    Model::from_bytes(
        &prost::Message::encode_to_vec(m),
        None,
        "fixture",
        &Default::default(),
    )
    .expect("fixture loads")
}

fn bind(name: &str, dims: &[i64]) -> Vec<(String, Vec<i64>)> {
    vec![(name.to_string(), dims.to_vec())]
}

fn macs(m: &Model, ov: &[(String, Vec<i64>)]) -> cost::ModelCost {
    cost::count(m, &shape::infer(m, ov).expect("shapes"))
}

fn input_dim(name: &str, input: &str, axis: usize) -> UnknownDim {
    UnknownDim::Input {
        name: name.into(),
        input: input.into(),
        axis,
    }
}

#[test]
fn minus_one_and_zero_batches_are_symbols_counted_per_item() {
    let Some(src) = shared_model("resnet8_cifar10.onnx") else {
        return;
    };
    let original = macs(&Model::load(&src).unwrap(), &[]);
    assert_eq!(original.per_item, vec!["N"]);
    assert!(original.is_exact());
    for batch in ["-1", "0"] {
        let m = model(&derive(&src, batch, "32", "32"));
        let shapes = shape::infer(&m, &[]).unwrap();
        assert_eq!(
            shapes.shape("input").unwrap()[0],
            Dim::Sym("input_dim0".into()),
            "batch {batch}"
        );
        let c = cost::count(&m, &shapes);
        assert_eq!(c.per_item, vec!["input_dim0"]);
        assert_eq!(c.exact_macs().unwrap(), original.macs, "batch {batch}");
        assert_eq!(c.costed_at_text(), "input=1x3x32x32");
        // the failure: an override of a -1 batch was "a fixed size -1"
        let c4 = macs(&m, &bind("input", &[4, 3, 32, 32]));
        assert!(c4.per_item.is_empty());
        assert_eq!(c4.exact_macs().unwrap(), 4 * original.macs);
        assert_eq!(c4.costed_at_text(), "input=4x3x32x32");
    }
}

#[test]
fn symbolic_height_and_width_are_named_never_counted_as_1() {
    let Some(src) = shared_model("resnet8_cifar10.onnx") else {
        return;
    };
    let m = model(&symbolic_hw(&src, "-1", "-1"));
    let c = macs(&m, &[]);
    assert_eq!(
        c.unknown_dims,
        vec![
            input_dim("input_dim2", "input", 2),
            input_dim("input_dim3", "input", 3)
        ]
    );
    assert_eq!(c.per_item, vec!["N"]);
    assert_eq!(c.binding_hint(), "input=1x3x?x?");
    let e = c.exact_macs().unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot count MACs: dims input_dim2 (input input axis 2), input_dim3 (input input axis 3) \
         unknown; bind them with the input shapes (input=1x3x?x?, numbers for ?)"
    );
    assert_eq!(
        cost::unknown_dims(&m, &shape::infer(&m, &[]).unwrap()),
        c.unknown_dims
    );
    // every conv names the dims it needs; the classifier after the global pool needs none
    let conv = c.nodes.iter().find(|n| n.op == "Conv").unwrap();
    assert_eq!(conv.unknown_dims, vec!["input_dim2", "input_dim3"]);
    // a padded stride-1 conv keeps the symbols; a stride-2 one divides them
    assert_eq!(conv.output_shape, "[N,16,input_dim2,input_dim3]");
    assert!(
        c.nodes
            .iter()
            .any(|n| n.output_shape == "[N,64,input_dim2/2/2,input_dim3/2/2]"),
        "{:?}",
        c.nodes
    );
    let gemm = c.nodes.iter().find(|n| n.op == "Gemm").unwrap();
    assert!(
        gemm.unknown_dims.is_empty() && gemm.macs == 64 * 10,
        "{gemm:?}"
    );

    // named symbols keep their names; binding one input dim leaves the other unknown
    let named = model(&symbolic_hw(&src, "H", "W"));
    let c = macs(&named, &[]);
    let names: Vec<&str> = c.unknown_dims.iter().map(|d| d.name()).collect();
    assert_eq!(names, ["H", "W"]);
    assert!(macs(&named, &bind("input", &[1, 3, 32, 32])).is_exact());
}

#[test]
fn macs_at_the_bound_shape_equal_the_fixed_shape_copy() {
    for (file, native) in CNNS {
        let Some(src) = shared_model(file) else {
            return;
        };
        let original = macs(&Model::load(&src).unwrap(), &[]).exact_macs().unwrap();
        for (h, w) in ["-1", "H"].iter().zip(["-1", "W"]) {
            let sym = model(&symbolic_hw(&src, h, w));
            assert!(!macs(&sym, &[]).is_exact(), "{file}");
            let at_native = macs(&sym, &bind("input", &[1, 3, native, native]));
            assert_eq!(at_native.exact_macs().unwrap(), original, "{file} {h}");
            for shape in [
                [1, 3, native + 16, native * 2],
                [2, 3, native / 2 + 8, native],
            ] {
                let bound = macs(&sym, &bind("input", &shape));
                let fixed = macs(&model(&fixed_at(&src, shape)), &[]);
                assert!(fixed.is_exact() && fixed.per_item.is_empty(), "{file}");
                assert_eq!(bound.exact_macs().unwrap(), fixed.macs, "{file} {shape:?}");
                let per_node =
                    |c: &cost::ModelCost| c.nodes.iter().map(|n| n.macs).collect::<Vec<_>>();
                assert_eq!(per_node(&bound), per_node(&fixed), "{file} {shape:?}");
                assert_ne!(bound.macs, original, "{file} {shape:?}");
            }
        }
    }
}

#[test]
fn bind_inputs_writes_the_shapes_and_restore_io_undoes_it() {
    let Some(src) = shared_model("efficientnet_lite0_224.onnx") else {
        return;
    };
    let mut m = model(&symbolic_hw(&src, "-1", "-1"));
    let before = m.clone();
    let saved = shape::declared_io(&m);
    let ov = bind("input", &[1, 3, 160, 192]);
    let expected = macs(&m, &ov).exact_macs().unwrap();
    shape::bind_inputs(&mut m, &ov).unwrap();
    // passes call infer with no bindings: they now see the bound shapes
    let c = macs(&m, &[]);
    assert_eq!(c.exact_macs().unwrap(), expected);
    assert_eq!(c.costed_at_text(), "input=1x3x160x192");
    let out = shape::infer(&m, &[]).unwrap();
    assert_eq!(
        shape::value_info_type(&m.graph().output[0]).unwrap().shape,
        Some(vec![Dim::Known(1), Dim::Known(1000)])
    );
    assert_eq!(
        out.shape("logits"),
        Some(&[Dim::Known(1), Dim::Known(1000)][..])
    );
    shape::restore_io(&mut m, &saved);
    assert_eq!(m, before);
    // a contradiction is refused before anything is written
    let mut m2 = before.clone();
    assert!(shape::bind_inputs(&mut m2, &bind("input", &[1, 4, 160, 192])).is_err());
    assert_eq!(m2, before);
}

fn two_input_model() -> Model {
    let g = graph(
        "two",
        vec![node("add", "Add", &["a", "b"], &["y"])],
        vec![
            float_value_info("a", &["N", "-1"]),
            float_value_info("b", &["N", "4"]),
        ],
        vec![float_value_info("y", &["N", "4"])],
        vec![],
    );
    model(&model_with(8, &[("", 13)], g))
}

#[test]
fn a_symbol_takes_one_size_in_every_input() {
    let m = two_input_model();
    let s = shape::infer(&m, &bind("a", &[3, 4])).unwrap();
    assert_eq!(s.shape("b"), Some(&[Dim::Known(3), Dim::Known(4)][..]));
    assert_eq!(s.bound.get("N"), Some(&3));
    assert_eq!(s.bound.get("a_dim1"), Some(&4));
    let both = vec![("a".to_string(), vec![3, 4]), ("b".to_string(), vec![2, 4])];
    let e = shape::infer(&m, &both).unwrap_err().to_string();
    assert!(e.contains("sets N=2") && e.contains("sets N=3"), "{e}");
    let twice = vec![("a".to_string(), vec![3, 4]), ("a".to_string(), vec![3, 4])];
    assert!(
        shape::infer(&m, &twice)
            .unwrap_err()
            .to_string()
            .contains("twice")
    );
    let e = shape::infer(&m, &bind("b", &[3, 5]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("fixed size 4 at axis 1"), "{e}");
}

#[test]
fn a_mac_layer_without_a_shape_is_reported() {
    let fancy = NodeProto {
        domain: Some("com.example".into()),
        ..node("fancy", "FancyOp", &["x"], &["f"])
    };
    let g = graph(
        "fancy",
        vec![fancy, node("mm", "MatMul", &["f", "x"], &["y"])],
        vec![float_value_info("x", &["4", "4"])],
        vec![float_value_info("y", &["4", "4"])],
        vec![],
    );
    let m = model(&model_with(8, &[("", 13), ("com.example", 1)], g));
    let c = macs(&m, &[]);
    assert!(!c.is_exact());
    assert!(
        c.unknown_dims
            .contains(&UnknownDim::NoShape { name: "f".into() }),
        "{:?}",
        c.unknown_dims
    );
    assert_eq!(c.binding_hint(), "");
    let e = c.exact_macs().unwrap_err().to_string();
    assert!(
        e.contains("the shape of 'f' (not inferred)") && !e.contains("bind"),
        "{e}"
    );
}
