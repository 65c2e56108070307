//! tract sessions (`tract`).
//!
//! tract runs single-threaded here: its multithreading is behind a cargo feature of tract-linalg
//! (`multithread-mm`) that whittle does not enable, so [`RuntimeOptions::threads`] is ignored.

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{DimFact, ShapeFactoid};
use whittle_core::Value;

use crate::error::Error;
use crate::session::{
    Dim, Engine, IoInfo, Loaded, ProviderInfo, RuntimeKind, RuntimeOptions, onnx_dtype_name,
    resolve_shapes,
};

/// A model optimised by tract into a runnable plan, with its reusable run state.
pub(crate) struct TractSession {
    state: TypedSimpleState,
}

impl TractSession {
    /// Parses ONNX bytes, fixes the input facts from `opts.input_shapes`, optimises and plans.
    ///
    /// This is `onnx().model_for_read(..)` split in its two steps, so that the graph's declared
    /// inputs and outputs can be read from the protobuf on the way.
    pub(crate) fn load(model_bytes: &[u8], opts: &RuntimeOptions) -> Result<Loaded<Self>, Error> {
        let onnx = tract_onnx::onnx();
        let mut reader = model_bytes;
        let proto = onnx
            .proto_model_for_read(&mut reader)
            .map_err(|e| Error::tract("reading the ONNX protobuf", &e))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| Error::InvalidModel("the model has no graph".into()))?;
        let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let declared_inputs = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(&i.name.as_str()))
            .map(|i| io_info(i, "input"))
            .collect::<Result<Vec<_>, _>>()?;
        let declared_outputs = graph
            .output
            .iter()
            .map(|o| io_info(o, "output"))
            .collect::<Result<Vec<_>, _>>()?;
        let (inputs, outputs) =
            resolve_shapes(&declared_inputs, &declared_outputs, &opts.input_shapes)?;

        let mut model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| Error::tract("translating the ONNX graph", &e))?;
        let n_inputs = model
            .input_outlets()
            .map_err(|e| Error::tract("listing the inputs", &e))?
            .len();
        if n_inputs != inputs.len() {
            return Err(Error::InvalidModel(format!(
                "tract sees {n_inputs} graph inputs, the protobuf declares {}",
                inputs.len()
            )));
        }
        for (ix, (declared, resolved)) in declared_inputs.iter().zip(&inputs).enumerate() {
            if declared.dims == resolved.dims {
                continue;
            }
            let dims: TVec<DimFact> = resolved
                .dims
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => DimFact::from(n.to_dim()),
                    Dim::Symbolic(s) if s == "?" => DimFact::default(),
                    Dim::Symbolic(s) => DimFact::from(model.sym(s).to_dim()),
                })
                .collect();
            let fact = model
                .input_fact(ix)
                .map_err(|e| Error::tract("reading an input fact", &e))?
                .clone()
                .with_shape(ShapeFactoid::closed(dims));
            model.set_input_fact(ix, fact).map_err(|e| {
                Error::tract(format!("fixing the shape of input '{}'", resolved.name), &e)
            })?;
        }
        let plan = model
            .into_optimized()
            .map_err(|e| Error::tract("optimising the model", &e))?
            .into_runnable()
            .map_err(|e| Error::tract("planning the model", &e))?;
        let state = plan
            .spawn()
            .map_err(|e| Error::tract("preparing the run state", &e))?;
        let provider = ProviderInfo {
            requested: RuntimeKind::Tract.provider_name().to_string(),
            actual: RuntimeKind::Tract.provider_name().to_string(),
            fallback: false,
            reason: None,
        };
        Ok(Loaded {
            engine: TractSession { state },
            inputs,
            outputs,
            provider,
        })
    }
}

impl Engine for TractSession {
    fn run(&mut self, inputs: &[Value], declared: &[IoInfo]) -> Result<Vec<Value>, Error> {
        let feeds: TVec<TValue> = inputs.iter().map(to_tract).collect();
        let outputs = self
            .state
            .run(feeds)
            .map_err(|e| Error::tract("running the model", &e))?;
        if outputs.len() != declared.len() {
            return Err(Error::Tract {
                context: "running the model".into(),
                message: format!(
                    "{} outputs came back, the graph declares {}",
                    outputs.len(),
                    declared.len()
                ),
            });
        }
        outputs
            .iter()
            .zip(declared)
            .map(|(t, info)| from_tract(t, &info.name))
            .collect()
    }
}

/// Describes a graph input or output from its ONNX `ValueInfoProto`.
fn io_info(vi: &pb::ValueInfoProto, io: &'static str) -> Result<IoInfo, Error> {
    let tensor = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => t,
        _ => {
            return Err(Error::InvalidModel(format!(
                "graph {io} '{}' has no tensor type",
                vi.name
            )));
        }
    };
    let Some(shape) = tensor.shape.as_ref() else {
        return Err(Error::InvalidModel(format!(
            "graph {io} '{}' declares no shape",
            vi.name
        )));
    };
    let dims = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => {
                Dim::Fixed(*v as usize)
            }
            Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                Dim::Symbolic(p.clone())
            }
            _ => Dim::Symbolic("?".to_string()),
        })
        .collect();
    Ok(IoInfo {
        name: vi.name.clone(),
        dtype: onnx_dtype_name(tensor.elem_type),
        dims,
    })
}

fn to_tract(value: &Value) -> TValue {
    let tensor: Tensor = match value {
        Value::F32(a) => a.clone().into_tensor(),
        Value::I64(a) => a.clone().into_tensor(),
        Value::I32(a) => a.clone().into_tensor(),
        Value::Bool(a) => a.clone().into_tensor(),
    };
    tensor.into_tvalue()
}

fn from_tract(tensor: &Tensor, name: &str) -> Result<Value, Error> {
    let context = || format!("reading output '{name}'");
    // the array of element type `T`, owned
    macro_rules! array {
        ($t:ty) => {
            tensor
                .to_plain_array_view::<$t>()
                .map_err(|e| Error::tract(context(), &e))?
                .to_owned()
        };
    }
    let value = match tensor.datum_type() {
        DatumType::F32 => Value::F32(array!(f32)),
        DatumType::I64 => Value::I64(array!(i64)),
        DatumType::I32 => Value::I32(array!(i32)),
        DatumType::Bool => Value::Bool(array!(bool)),
        other => {
            return Err(Error::UnsupportedType {
                io: "output",
                name: name.to_string(),
                dtype: format!("{other:?}"),
                action: "read back (float, int64, int32 and bool only)",
            });
        }
    };
    Ok(value)
}
