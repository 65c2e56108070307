//! A small ONNX graph built from fuzz bytes, for the shape rules.
//!
//! Mutating a protobuf file byte by byte mostly breaks its encoding; this builder turns every
//! byte string into a well-formed model instead, so the fuzzer spends its time in the shape
//! rules: up to 3 graph inputs (any rank up to 5, fixed, symbolic, unknown or extreme sizes),
//! up to 4 initializers (small integer or float tensors, as shape computations use), up to 6
//! nodes of the op types shape inference knows (and a few it does not), with the attributes
//! those rules read, set to small, negative or extreme values. Bytes past the end read as 0, so
//! every input builds a model.

use prost::Message;
use whittle_core::onnx::tensor_proto::DataType;
use whittle_core::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_shape_proto, type_proto,
};

/// A model built from fuzz bytes, and the input-shape overrides to infer it with.
#[derive(Debug, Clone)]
pub struct Built {
    /// The encoded `ModelProto`.
    pub model: Vec<u8>,
    /// `--input`-style overrides: input name and positive sizes, one per declared axis.
    pub overrides: Vec<(String, Vec<i64>)>,
}

/// Op types the shape rules know, plus a few they do not (and `Constant`, which load turns
/// into an initializer).
const OPS: &[&str] = &[
    "Relu",
    "Identity",
    "Softmax",
    "BatchNormalization",
    "Dropout",
    "PRelu",
    "Cast",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Equal",
    "Where",
    "Max",
    "Conv",
    "ConvTranspose",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Gemm",
    "MatMul",
    "Concat",
    "Split",
    "Slice",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Shape",
    "Size",
    "Gather",
    "ConstantOfShape",
    "Constant",
    "Range",
    "Expand",
    "Tile",
    "Pad",
    "ReduceMean",
    "ReduceSum",
    "ArgMax",
    "Resize",
    "Upsample",
    "TopK",
    "IsNaN",
    "LayerNormalization",
    "Einsum",
    "NotAnOp",
];

/// Attributes the shape rules read, with the kind each is built as.
const ATTRS: &[(&str, Kind)] = &[
    ("axis", Kind::Int),
    ("axes", Kind::Ints),
    ("perm", Kind::Ints),
    ("kernel_shape", Kind::Ints),
    ("strides", Kind::Ints),
    ("pads", Kind::Ints),
    ("dilations", Kind::Ints),
    ("group", Kind::Int),
    ("transA", Kind::Int),
    ("transB", Kind::Int),
    ("keepdims", Kind::Int),
    ("noop_with_empty_axes", Kind::Int),
    ("start", Kind::Int),
    ("end", Kind::Int),
    ("to", Kind::Int),
    ("auto_pad", Kind::Str),
    ("ceil_mode", Kind::Int),
    ("output_shape", Kind::Ints),
    ("output_padding", Kind::Ints),
    ("split", Kind::Ints),
    ("starts", Kind::Ints),
    ("ends", Kind::Ints),
    ("shape", Kind::Ints),
    ("allowzero", Kind::Int),
    ("value", Kind::Tensor),
    ("scales", Kind::Floats),
    ("value_float", Kind::Float),
    ("value_floats", Kind::Floats),
    ("value_int", Kind::Int),
    ("value_ints", Kind::Ints),
];

#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    Ints,
    Float,
    Floats,
    Str,
    Tensor,
}

const OPSETS: &[i64] = &[13, 11, 17, 9, 7, 18, 10, 21, 5, 1];
const IR_VERSIONS: &[i64] = &[8, 3, 7, 10];
const SYMBOLS: &[&str] = &["N", "S", "batch", ""];
const AUTO_PADS: &[&str] = &["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID", "same"];
const FLOATS: &[f32] = &[
    1.0,
    2.0,
    0.5,
    0.0,
    -1.0,
    3.0,
    1e30,
    f32::NAN,
    f32::INFINITY,
    -0.0,
];

/// Reads fuzz bytes front to back; past the end every read is 0.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// Fewer than `n` values (the count read first), each from `each`.
    fn several<T>(&mut self, n: usize, mut each: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let count = self.below(n);
        (0..count).map(|_| each(self)).collect()
    }

    /// Mostly small integers (-4..=11), sometimes the extremes shape code must survive.
    fn int(&mut self) -> i64 {
        match self.byte() {
            b @ 0..=239 => i64::from(b % 16) - 4,
            240 => i64::MAX,
            241 => i64::MIN,
            242 => i64::from(i32::MAX),
            243 => -i64::from(i32::MAX),
            244 => 1 << 40,
            245 => -1,
            _ => {
                let mut raw = [0u8; 8];
                raw.iter_mut().for_each(|b| *b = self.byte());
                i64::from_le_bytes(raw)
            }
        }
    }

    fn float(&mut self) -> f32 {
        let b = self.byte();
        if b < 128 {
            FLOATS[usize::from(b) % FLOATS.len()]
        } else {
            f32::from(b % 32) * 0.25
        }
    }
}

fn value_info(
    name: &str,
    elem_type: Option<i32>,
    dims: Option<Vec<tensor_shape_proto::Dimension>>,
) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: elem_type.map(|e| TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(e),
                shape: dims.map(|dim| TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

/// A graph input: element type, then rank (or no shape), then each dimension.
fn graph_input(b: &mut Bytes, name: &str) -> (ValueInfoProto, Option<Vec<Option<i64>>>) {
    use tensor_shape_proto::dimension::Value;
    let elem = b.pick(&[
        DataType::Float,
        DataType::Float,
        DataType::Int64,
        DataType::Int32,
        DataType::Bool,
    ]) as i32;
    let rank = b.byte() % 7;
    if rank == 6 {
        return (value_info(name, Some(elem), None), None);
    }
    let mut dims = Vec::new();
    // Per axis: the fixed size, or None for a symbolic or unknown one.
    let mut fixed = Vec::new();
    for _ in 0..rank {
        let (d, f) = match b.byte() {
            x @ 0..=179 => (
                Some(Value::DimValue(i64::from(x % 10))),
                Some(i64::from(x % 10)),
            ),
            x @ 180..=229 => (
                Some(Value::DimParam(
                    SYMBOLS[usize::from(x) % SYMBOLS.len()].into(),
                )),
                None,
            ),
            230..=239 => (None, None),
            _ => {
                let v = b.int();
                (Some(Value::DimValue(v)), Some(v))
            }
        };
        dims.push(tensor_shape_proto::Dimension {
            value: d,
            denotation: None,
        });
        fixed.push(f);
    }
    (value_info(name, Some(elem), Some(dims)), Some(fixed))
}

/// A small tensor: element type, rank 0 to 4, dims 0 to 7 (rarely negative or huge), values.
fn tensor(b: &mut Bytes, name: &str) -> TensorProto {
    let dt = b.pick(&[
        DataType::Int64,
        DataType::Float,
        DataType::Int64,
        DataType::Int32,
        DataType::Float16,
        DataType::Double,
        DataType::Uint8,
        DataType::Bool,
    ]);
    let rank = b.below(5);
    let dims: Vec<i64> = (0..rank)
        .map(|_| match b.byte() {
            x @ 0..=249 => i64::from(x % 8),
            250 => -1,
            _ => b.int(),
        })
        .collect();
    // Element count as declared, capped so that a huge declaration does not allocate.
    let count = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(u64::try_from(d).ok()?))
        .unwrap_or(0)
        .min(4096) as usize;
    let mut t = TensorProto {
        name: Some(name.to_string()),
        dims,
        data_type: Some(dt as i32),
        ..Default::default()
    };
    let typed = b.byte().is_multiple_of(4);
    match dt {
        DataType::Float if typed => t.float_data = (0..count).map(|_| b.float()).collect(),
        DataType::Float => {
            t.raw_data = Some((0..count).flat_map(|_| b.float().to_le_bytes()).collect());
        }
        DataType::Double if typed => {
            t.double_data = (0..count).map(|_| f64::from(b.float())).collect();
        }
        DataType::Double => {
            t.raw_data = Some(
                (0..count)
                    .flat_map(|_| f64::from(b.float()).to_le_bytes())
                    .collect(),
            );
        }
        DataType::Int64 if typed => t.int64_data = (0..count).map(|_| b.int()).collect(),
        DataType::Int64 => {
            t.raw_data = Some((0..count).flat_map(|_| b.int().to_le_bytes()).collect());
        }
        DataType::Int32 if typed => t.int32_data = (0..count).map(|_| b.int() as i32).collect(),
        DataType::Int32 => {
            t.raw_data = Some(
                (0..count)
                    .flat_map(|_| (b.int() as i32).to_le_bytes())
                    .collect(),
            );
        }
        DataType::Float16 => {
            t.raw_data = Some((0..count).flat_map(|_| [b.byte(), b.byte()]).collect());
        }
        _ => t.raw_data = Some((0..count).map(|_| b.byte() % 2).collect()),
    }
    // Now and then a data length that does not match the dims.
    if b.byte() == 255
        && let Some(raw) = t.raw_data.as_mut()
    {
        raw.pop();
    }
    t
}

fn attribute(b: &mut Bytes) -> AttributeProto {
    let (name, kind) = b.pick(ATTRS);
    let mut a = AttributeProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    // Now and then the wrong kind for the name.
    let kind = if b.byte() >= 240 {
        b.pick(&[
            Kind::Int,
            Kind::Ints,
            Kind::Float,
            Kind::Floats,
            Kind::Str,
            Kind::Tensor,
        ])
    } else {
        kind
    };
    match kind {
        Kind::Int => a.i = Some(b.int()),
        Kind::Ints => a.ints = b.several(7, Bytes::int),
        Kind::Float => a.f = Some(b.float()),
        Kind::Floats => a.floats = b.several(6, Bytes::float),
        Kind::Str => a.s = Some(b.pick(AUTO_PADS).as_bytes().to_vec()),
        Kind::Tensor => a.t = Some(tensor(b, "")),
    }
    let ty = match kind {
        Kind::Int => AttributeType::Int,
        Kind::Ints => AttributeType::Ints,
        Kind::Float => AttributeType::Float,
        Kind::Floats => AttributeType::Floats,
        Kind::Str => AttributeType::String,
        Kind::Tensor => AttributeType::Tensor,
    };
    a.r#type = Some(ty as i32);
    a
}

/// Builds a model from fuzz bytes (see the module documentation).
pub fn build(data: &[u8]) -> Built {
    let mut b = Bytes { data, pos: 0 };
    let ir = b.pick(IR_VERSIONS);
    let opset = b.pick(OPSETS);
    let mut g = GraphProto {
        name: Some("fuzz".into()),
        ..Default::default()
    };
    // Names a node input may read: graph inputs, initializers, earlier node outputs.
    let mut names: Vec<String> = Vec::new();
    let mut declared = Vec::new();
    for i in 0..1 + b.below(3) {
        let name = format!("x{i}");
        let (vi, fixed) = graph_input(&mut b, &name);
        g.input.push(vi);
        declared.push((name.clone(), fixed));
        names.push(name);
    }
    for i in 0..b.below(5) {
        let name = format!("w{i}");
        g.initializer.push(tensor(&mut b, &name));
        names.push(name);
    }
    let mut last = names[0].clone();
    for i in 0..1 + b.below(6) {
        let op = b.pick(OPS);
        let domain = match b.byte() {
            0..=249 => None,
            250..=252 => Some("ai.onnx"),
            _ => Some("com.microsoft"),
        };
        let inputs = b.several(5, |b| match b.byte() {
            0..=99 => last.clone(),
            100..=109 => String::new(),
            x => names[usize::from(x) % names.len()].clone(),
        });
        let outputs: Vec<String> =
            (0..1 + usize::from(b.byte() >= 224) + usize::from(b.byte() >= 248))
                .map(|k| format!("t{i}_{k}"))
                .collect();
        let attribute = b.several(5, attribute);
        g.node.push(NodeProto {
            input: inputs,
            output: outputs.clone(),
            op_type: Some(op.to_string()),
            domain: domain.map(str::to_string),
            attribute,
            ..Default::default()
        });
        last = outputs[0].clone();
        names.extend(outputs);
    }
    // The last node's first output is the graph output, declared without a type or with one.
    let out_type = b.byte().is_multiple_of(2).then_some(DataType::Float as i32);
    g.output.push(value_info(&last, out_type, None));

    // Overrides for the inputs with a declared shape: their fixed sizes kept (a different size
    // is an error, tried sometimes), the others set to a positive size.
    let mut overrides = Vec::new();
    if !b.byte().is_multiple_of(2) {
        for (name, fixed) in declared {
            let Some(fixed) = fixed else { continue };
            let dims: Vec<i64> = fixed
                .iter()
                .map(|f| match (f, b.byte()) {
                    (Some(v), 0..=249) if *v > 0 => *v,
                    (_, x @ 0..=249) => i64::from(x % 8) + 1,
                    (_, 250) => i64::MAX,
                    (_, 251) => 1 << 31,
                    (_, _) => b.int().checked_abs().unwrap_or(1).max(1),
                })
                .collect();
            overrides.push((name, dims));
        }
    }
    let model = ModelProto {
        ir_version: Some(ir),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        producer_name: Some("whittle-fuzz".into()),
        graph: Some(g),
        ..Default::default()
    };
    Built {
        model: model.encode_to_vec(),
        overrides,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whittle_core::{LoadOptions, Model};

    #[test]
    fn every_byte_string_builds_a_decodable_model() {
        for data in [&b""[..], b"\x00", b"\xff\xff\xff\xff", b"0123456789abcdef"] {
            let built = build(data);
            let proto = ModelProto::decode(built.model.as_slice()).unwrap();
            assert!(proto.graph.is_some());
        }
    }

    #[test]
    fn zero_bytes_build_a_loadable_relu() {
        // All zeros: IR 8, opset 13, one float input of rank 0, one Relu reading it.
        let built = build(&[0; 64]);
        let model = Model::from_bytes(&built.model, None, "t", &LoadOptions::default()).unwrap();
        assert_eq!(model.graph().node[0].op_type(), "Relu");
        assert_eq!(model.opset(""), Some(13));
    }
}
