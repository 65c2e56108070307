//! Typed access to a node's attributes.

use crate::onnx::attribute_proto::AttributeType;
use crate::onnx::{AttributeProto, NodeProto, TensorProto};

/// Attribute look-ups on a `NodeProto`; a missing attribute gives `None`.
pub trait Attrs {
    /// The attribute with this name.
    fn attr(&self, name: &str) -> Option<&AttributeProto>;
    /// An integer attribute.
    fn attr_int(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(|a| a.i)
    }
    /// A float attribute.
    fn attr_float(&self, name: &str) -> Option<f32> {
        self.attr(name).and_then(|a| a.f)
    }
    /// An integer-list attribute.
    fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }
    /// An integer-list attribute, or `len` copies of `default` when it is missing.
    fn attr_ints_or(&self, name: &str, default: i64, len: usize) -> Vec<i64> {
        self.attr_ints(name)
            .map_or_else(|| vec![default; len], <[i64]>::to_vec)
    }
    /// A float-list attribute.
    fn attr_floats(&self, name: &str) -> Option<&[f32]> {
        self.attr(name).map(|a| a.floats.as_slice())
    }
    /// A string attribute (lossy UTF-8).
    fn attr_str(&self, name: &str) -> Option<String> {
        self.attr(name)
            .and_then(|a| a.s.as_ref())
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }
    /// A tensor attribute.
    fn attr_tensor(&self, name: &str) -> Option<&TensorProto> {
        self.attr(name).and_then(|a| a.t.as_ref())
    }
}

impl Attrs for NodeProto {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute.iter().find(|a| a.name() == name)
    }
}

/// A display name for a node: its name, else its first output, else its op type.
pub fn node_label(n: &NodeProto) -> String {
    if !n.name().is_empty() {
        n.name().to_string()
    } else if let Some(o) = n.output.first() {
        o.clone()
    } else {
        n.op_type().to_string()
    }
}

/// An integer attribute.
pub fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    }
}

/// A node of the default domain.
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}
