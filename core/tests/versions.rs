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
