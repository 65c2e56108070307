//! whittle's graph IR over the ONNX ModelProto: load and save losslessly, check, infer shapes,
//! count params and MACs.

/// Types generated from the vendored `proto/onnx.proto` (ONNX 1.23.2).
#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
pub mod attr;
pub mod check;
pub mod cost;
pub mod edit;
pub mod error;
pub mod model;
pub mod opset;
pub mod shape;
pub mod stats;
pub mod tensor;
pub mod value;

pub use error::{Error, Result};
pub use model::{LoadOptions, Model};
pub use shape::{Dim, ShapeInfo, TensorType};
pub use value::{NamedValue, Value};
