//! Tiny ONNX graphs built with the prost types: nodes, attributes, value infos, tensors, graphs,
//! models, and [`GraphBuilder`], which names each node's output and draws random initializers.

use std::path::Path;

use prost::Message;
use whittle_core::Model;
use whittle_core::model::float_value_info;
use whittle_core::onnx::tensor_proto::{DataLocation, DataType};
use whittle_core::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, ValueInfoProto, attribute_proto::AttributeType,
};
use whittle_core::tensor::from_f32;

use crate::rng::Lcg;

/// One dim of a value info: a number is a fixed size, text that is not a number a symbol, `None`
/// the symbol `N`.
pub trait IntoDim {
    /// The dim as [`float_value_info`] reads it.
    fn text(&self) -> String;
}

impl IntoDim for &str {
    fn text(&self) -> String {
        self.to_string()
    }
}

impl IntoDim for String {
    fn text(&self) -> String {
        self.clone()
    }
}

impl IntoDim for i64 {
    fn text(&self) -> String {
        self.to_string()
    }
}

impl IntoDim for Option<i64> {
    fn text(&self) -> String {
        self.map_or("N".into(), |v| v.to_string())
    }
}

/// A float tensor value info: `value_info("x", &["N", "3", "32", "32"])`, `&[1, 4]`,
/// `&[None, Some(2)]`.
pub fn value_info<D: IntoDim>(name: &str, dims: &[D]) -> ValueInfoProto {
    let dims: Vec<String> = dims.iter().map(IntoDim::text).collect();
    float_value_info(name, &dims.iter().map(String::as_str).collect::<Vec<_>>())
}

/// An int attribute (core's builder).
pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    whittle_core::attr::int(name, v)
}

/// An ints attribute (core's builder).
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    whittle_core::attr::ints(name, v)
}

/// A float attribute.
pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        f: Some(v),
        r#type: Some(AttributeType::Float as i32),
        ..Default::default()
    }
}

/// A string attribute.
pub fn attr_str(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        s: Some(v.as_bytes().to_vec()),
        r#type: Some(AttributeType::String as i32),
        ..Default::default()
    }
}

/// A node in the default domain.
pub fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A float tensor with inline raw data.
pub fn tensor_f32(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    assert_eq!(dims.iter().product::<i64>() as usize, values.len());
    from_f32(name, dims, values)
}

/// A float tensor whose data lives in an external file.
pub fn tensor_external(name: &str, dims: &[i64], location: &str, length: usize) -> TensorProto {
    let e = |k: &str, v: &str| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    };
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            e("location", location),
            e("offset", "0"),
            e("length", &length.to_string()),
        ],
        ..Default::default()
    }
}

/// A graph.
pub fn graph(
    name: &str,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
) -> GraphProto {
    GraphProto {
        name: Some(name.into()),
        node: nodes,
        input: inputs,
        output: outputs,
        initializer: initializers,
        ..Default::default()
    }
}

/// A model of this IR version importing these `(domain, version)` opsets (`""` the default
/// domain) around a graph.
pub fn model_with(ir_version: i64, opsets: &[(&str, i64)], graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: Some(ir_version),
        producer_name: Some("whittle-tests".into()),
        opset_import: opsets
            .iter()
            .map(|(d, v)| OperatorSetIdProto {
                domain: Some(d.to_string()),
                version: Some(*v),
            })
            .collect(),
        graph: Some(graph),
        ..Default::default()
    }
}

/// A model (IR 8, opset 13, plus any extra domains) around a graph.
pub fn model(graph: GraphProto, extra_domains: &[(&str, i64)]) -> ModelProto {
    let mut opsets = vec![("", 13)];
    opsets.extend_from_slice(extra_domains);
    model_with(8, &opsets, graph)
}

/// The model as whittle loads it (normalised, checked); a fixture that does not load panics.
pub fn load_fixture(m: ModelProto) -> Model {
    Model::from_bytes(&m.encode_to_vec(), None, "fixture", &Default::default())
        .expect("the fixture loads")
}

/// How many nodes of `m`'s main graph run `op`.
pub fn op_count(m: &Model, op: &str) -> usize {
    m.graph().node.iter().filter(|n| n.op_type() == op).count()
}

/// Encode a model into a file.
pub fn write_model(path: &Path, m: &ModelProto) {
    std::fs::write(path, m.encode_to_vec()).unwrap();
}

/// A graph built node by node: each node has one output, `<name>_out`, and initializers take
/// their values from a seeded [`Lcg`], so a fixture is the same on every run.
pub struct GraphBuilder {
    /// The graph so far.
    pub graph: GraphProto,
    /// Where random initializers come from.
    pub rng: Lcg,
}

impl GraphBuilder {
    /// An empty graph called `name`.
    pub fn new(name: &str, rng: Lcg) -> GraphBuilder {
        GraphBuilder {
            graph: GraphProto {
                name: Some(name.into()),
                ..Default::default()
            },
            rng,
        }
    }

    /// A float graph input; returns its name.
    pub fn input<D: IntoDim>(&mut self, name: &str, dims: &[D]) -> String {
        self.graph.input.push(value_info(name, dims));
        name.to_string()
    }

    /// A float graph output.
    pub fn output<D: IntoDim>(&mut self, name: &str, dims: &[D]) {
        self.graph.output.push(value_info(name, dims));
    }

    /// An initializer; returns its name.
    pub fn initializer(&mut self, t: TensorProto) -> String {
        let name = t.name().to_string();
        self.graph.initializer.push(t);
        name
    }

    /// A node with one output named `<name>_out`; returns that name.
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> String {
        let out = format!("{name}_out");
        self.graph.node.push(NodeProto {
            attribute: attrs,
            ..node(name, op, inputs, &[&out])
        });
        out
    }

    /// The model: IR `ir_version`, these opsets (see [`model_with`]).
    pub fn model(self, ir_version: i64, opsets: &[(&str, i64)]) -> ModelProto {
        model_with(ir_version, opsets, self.graph)
    }
}
