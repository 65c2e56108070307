//! Errors of the graph IR.

use std::path::PathBuf;

/// Everything that can go wrong while loading, checking or saving a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model file could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The bytes are not an ONNX ModelProto.
    #[error("{what} is not a valid ONNX model: {reason}")]
    Decode {
        /// The file (or "input bytes").
        what: String,
        /// Why decoding failed.
        reason: String,
    },
    /// The model decodes but breaks a rule of the format.
    #[error("invalid model: {0}")]
    Invalid(String),
    /// A tensor's external data cannot be used.
    #[error("tensor '{tensor}': external data {reason}")]
    ExternalData {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's contents cannot be read.
    #[error("tensor '{tensor}': {reason}")]
    Tensor {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// Shape inference found an inconsistency.
    #[error("shape inference failed at node '{node}' ({op}): {reason}")]
    Shape {
        /// The node's name.
        node: String,
        /// Its op type.
        op: String,
        /// What is inconsistent.
        reason: String,
    },
    /// An input-shape override is malformed or names no input.
    #[error("input override: {0}")]
    Override(String),
    /// A MAC count depends on dims no binding fixed.
    #[error("{}", unknown_dims_message(dims, hint))]
    UnknownDims {
        /// The unknown dims, input symbols first.
        dims: Vec<crate::cost::UnknownDim>,
        /// The inputs to bind, `x=1x3x?x?`.
        hint: String,
    },
    /// The graph is not a valid DAG.
    #[error("invalid graph: {0}")]
    Graph(String),
    /// The opset cannot be raised.
    #[error("the model's opset {from} cannot be raised to {to}: {reason}")]
    Opset {
        /// The model's opset.
        from: i64,
        /// The opset asked for.
        to: i64,
        /// Why not.
        reason: String,
    },
}

fn unknown_dims_message(dims: &[crate::cost::UnknownDim], hint: &str) -> String {
    let names: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    let noun = if dims.len() == 1 { "dim" } else { "dims" };
    let mut s = format!("cannot count MACs: {noun} {} unknown", names.join(", "));
    if !hint.is_empty() {
        s += &format!("; bind them with the input shapes ({hint}, numbers for ?)");
    }
    s
}

/// Result with the IR's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
