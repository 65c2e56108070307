//! Runtime tensor values exchanged between datasets, runtimes and verification.

use ndarray::ArrayD;

/// A dense tensor value fed to or returned by a runtime.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// 32-bit floats.
    F32(ArrayD<f32>),
    /// 64-bit integers (token ids, masks, indices).
    I64(ArrayD<i64>),
    /// 32-bit integers.
    I32(ArrayD<i32>),
    /// Booleans.
    Bool(ArrayD<bool>),
}

impl Value {
    /// The dimensions of the tensor.
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32(a) => a.shape(),
            Value::I64(a) => a.shape(),
            Value::I32(a) => a.shape(),
            Value::Bool(a) => a.shape(),
        }
    }

    /// The element type, as ONNX names it (`float`, `int64`, `int32`, `bool`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Value::F32(_) => "float",
            Value::I64(_) => "int64",
            Value::I32(_) => "int32",
            Value::Bool(_) => "bool",
        }
    }

    /// The values converted to f32, in row-major order (for comparisons and checksums).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Value::F32(a) => a.iter().copied().collect(),
            Value::I64(a) => a.iter().map(|&v| v as f32).collect(),
            Value::I32(a) => a.iter().map(|&v| v as f32).collect(),
            Value::Bool(a) => a.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect(),
        }
    }

    /// The f32 array, if this value holds floats.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Value::F32(a) => Some(a),
            _ => None,
        }
    }
}

/// A value with the graph input or output name it belongs to.
pub type NamedValue = (String, Value);
