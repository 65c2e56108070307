//! The IR reads the IR versions and opsets the issue names: IR 3 (mnist-8, in assets.rs) to 10,
//! opsets 8 to 21.

use prost::Message;
use whittle_core::onnx::tensor_proto::DataType;
use whittle_core::onnx::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto,
    ValueInfoProto, tensor_shape_proto, type_proto,
};
use whittle_core::{Model, shape};

fn vi(name: &str, dims: &[&str]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d.parse::<i64>() {
                Ok(v) => tensor_shape_proto::dimension::Value::DimValue(v),
                Err(_) => tensor_shape_proto::dimension::Value::DimParam(d.to_string()),
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

#[test]
fn ir_10_opset_21_loads_round_trips_and_infers() {
    for (ir, opset) in [(4, 9), (6, 11), (7, 13), (9, 19), (10, 21)] {
        let m = ModelProto {
            ir_version: Some(ir),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            producer_name: Some("versions-test".into()),
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![
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
                ],
                input: vec![vi("x", &["N", "2", "3"])],
                output: vec![vi("y", &["N", "6"])],
                ..Default::default()
            }),
            ..Default::default()
        };
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
