//! The IR reads the IR versions and opsets the issue names: IR 3 (mnist-8, in assets.rs) to 10,
//! opsets 8 to 21.

use prost::Message;
use whittle_core::onnx::NodeProto;
use whittle_core::{Model, shape};
use whittle_test_support::{graph, model_with, value_info};

#[test]
fn ir_10_opset_21_loads_round_trips_and_infers() {
    for (ir, opset) in [(4, 9), (6, 11), (7, 13), (9, 19), (10, 21)] {
        let nodes = vec![
            NodeProto {
                op_type: Some("Relu".into()),
                input: vec!["x".into()],
                output: vec!["r".into()],
                ..Default::default()
            },
            NodeProto {
                op_type: Some("Flatten".into()),
                input: vec!["r".into()],
                output: vec!["y".into()],
                ..Default::default()
            },
        ];
        let x = vec![value_info("x", &["N", "2", "3"])];
        let y = vec![value_info("y", &["N", "6"])];
        let m = model_with(ir, &[("", opset)], graph("g", nodes, x, y, vec![]));
        let bytes = m.encode_to_vec();
        let loaded = Model::from_bytes(&bytes, None, "m", &Default::default()).unwrap();
        assert_eq!(
            loaded.to_bytes(),
            bytes,
            "IR {ir} opset {opset}: byte-identical round trip"
        );
        let s = shape::infer(&loaded, &[]).unwrap();
        assert_eq!(
            shape::describe_shape(s.shape("y")),
            "[N,6]",
            "IR {ir} opset {opset}"
        );
    }
}

/// An opset-9 model with attribute forms that became inputs (Clip's bounds, Unsqueeze's axes)
/// around `extra` (an op that may block the raise).
fn opset9(extra: &str) -> Model {
    use whittle_test_support::{GraphBuilder, Lcg, attr_float, attr_ints, load_fixture};
    let mut b = GraphBuilder::new("g", Lcg(1));
    let x = b.input("x", &["1", "4"]);
    let c = b.node(
        "Clip",
        "clip",
        &[&x],
        vec![attr_float("min", 0.0), attr_float("max", 6.0)],
    );
    let e = b.node(extra, "extra", &[&c], vec![]);
    let u = b.node("Unsqueeze", "unsq", &[&e], vec![attr_ints("axes", &[0])]);
    b.output(&u, &["1", "1", "4"]);
    load_fixture(b.model(4, &[("", 9)]))
}

#[test]
fn an_older_opset_is_raised_with_attributes_moved_to_inputs() {
    let mut m = opset9("Relu");
    assert_eq!(whittle_core::opset::upgrade(&mut m, 13).unwrap(), Some(9));
    assert_eq!(m.opset(""), Some(13));
    assert!(m.proto.ir_version() >= 7);
    let clip = &m.graph().node[0];
    assert_eq!(clip.input.len(), 3, "{clip:?}");
    assert!(clip.attribute.is_empty());
    let unsq = &m.graph().node[2];
    assert_eq!(unsq.input.len(), 2, "{unsq:?}");
    let axes = m.initializer(&unsq.input[1]).unwrap();
    assert_eq!(whittle_core::tensor::to_i64(axes).unwrap(), vec![0]);
    let s = shape::infer(&m, &[]).unwrap();
    assert_eq!(shape::describe_shape(s.shape("unsq_out")), "[1,1,4]");
    // already there: nothing to do
    assert_eq!(whittle_core::opset::upgrade(&mut m, 13).unwrap(), None);
}

#[test]
fn an_op_that_changed_meaning_blocks_the_raise_by_name() {
    let mut m = opset9("Upsample");
    let before = m.to_bytes();
    let e = whittle_core::opset::upgrade(&mut m, 13)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Upsample") && e.contains("9"), "{e}");
    assert_eq!(
        m.to_bytes(),
        before,
        "a refused raise leaves the model as it was"
    );
}
