//! ONNX Runtime sessions (`ort-cpu`, `ort-cuda`, `ort-tensorrt`).

use ndarray::ArrayD;
use ort::ep::{self, ExecutionProvider};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{Session as OrtInner, SessionInputValue};
use ort::value::{
    DynValue, Outlet, PrimitiveTensorElementType, Tensor, TensorElementType, TensorRef, ValueType,
};
use whittle_core::Value;

use crate::error::{Error, one_line};
use crate::ort_lib::{OrtRuntime, ort_runtime};
use crate::session::{
    CPU_EP, Dim, Engine, IoInfo, Loaded, ProviderInfo, RuntimeKind, RuntimeOptions,
    onnx_dtype_name, resolve_shapes,
};

/// A model loaded into ONNX Runtime.
pub(crate) struct OrtSession {
    session: OrtInner,
}

impl OrtSession {
    /// Builds a session for `kind` (one of the `ort-*` kinds) from ONNX bytes.
    pub(crate) fn load(
        kind: RuntimeKind,
        model_bytes: &[u8],
        opts: &RuntimeOptions,
    ) -> Result<Loaded<Self>, Error> {
        let rt = ort_runtime()?;
        let (session, provider) = match kind {
            RuntimeKind::OrtCuda | RuntimeKind::OrtTensorRt => {
                accelerated_session(rt, kind, model_bytes, opts)?
            }
            RuntimeKind::OrtCpu | RuntimeKind::Tract => {
                cpu_session(rt, kind, model_bytes, opts, None)?
            }
        };
        let inputs = session
            .inputs()
            .iter()
            .map(|o| io_info(o, "input"))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| io_info(o, "output"))
            .collect::<Result<Vec<_>, _>>()?;
        let (inputs, outputs) = resolve_shapes(&inputs, &outputs, &opts.input_shapes)?;
        Ok(Loaded {
            engine: OrtSession { session },
            inputs,
            outputs,
            provider,
        })
    }
}

impl Engine for OrtSession {
    fn run(&mut self, inputs: &[Value], declared: &[IoInfo]) -> Result<Vec<Value>, Error> {
        let feeds = inputs
            .iter()
            .map(to_ort)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::ort("preparing the inputs", e))?;
        let outputs = self
            .session
            .run(feeds.as_slice())
            .map_err(|e| Error::ort("running the model", e))?;
        declared
            .iter()
            .enumerate()
            .map(|(ix, info)| from_ort(&outputs[ix], &info.name))
            .collect()
    }
}

/// Session options shared by every provider: full graph optimisation, intra-op threads.
fn base_builder(rt: &OrtRuntime, opts: &RuntimeOptions) -> Result<SessionBuilder, Error> {
    let mut builder =
        OrtInner::builder(&rt.env).map_err(|e| Error::ort("creating session options", e))?;
    builder = builder
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| Error::ort("setting the graph optimisation level", e))?;
    if let Some(threads) = opts.threads {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| Error::ort(format!("setting {threads} intra-op threads"), e))?;
    }
    Ok(builder)
}

fn commit(
    mut builder: SessionBuilder,
    model_bytes: &[u8],
    context: &str,
) -> Result<OrtInner, Error> {
    builder
        .commit_from_memory(model_bytes)
        .map_err(|e| Error::ort(context, e))
}

/// A plain CPU session for `kind`; `fallback_reason` says why it replaces the requested provider.
fn cpu_session(
    rt: &OrtRuntime,
    kind: RuntimeKind,
    model_bytes: &[u8],
    opts: &RuntimeOptions,
    fallback_reason: Option<String>,
) -> Result<(OrtInner, ProviderInfo), Error> {
    let session = commit(
        base_builder(rt, opts)?,
        model_bytes,
        "creating the CPU session",
    )?;
    let provider = ProviderInfo {
        requested: kind.provider_name().to_string(),
        actual: CPU_EP.to_string(),
        fallback: fallback_reason.is_some(),
        reason: fallback_reason,
    };
    Ok((session, provider))
}

/// A CUDA or TensorRT session. Without `allow_fallback`, the provider must be compiled in, register,
/// and take the whole graph (`session.disable_cpu_ep_fallback`); with it, any of those failing gives
/// a CPU session whose [`ProviderInfo`] records the fallback and its reason.
fn accelerated_session(
    rt: &OrtRuntime,
    kind: RuntimeKind,
    model_bytes: &[u8],
    opts: &RuntimeOptions,
) -> Result<(OrtInner, ProviderInfo), Error> {
    let requested = kind.provider_name();
    let (short, available, dispatch) = if kind == RuntimeKind::OrtTensorRt {
        let mut trt = ep::TensorRT::default().with_fp16(opts.tensorrt_fp16.unwrap_or(true));
        // a QDQ model is TensorRT's explicit quantization: its int8 precision must be on
        if is_quantized(model_bytes) {
            trt = trt.with_int8(true);
        }
        if let Some(bytes) = opts.tensorrt_workspace_bytes {
            trt = trt.with_max_workspace_size(bytes);
        }
        if let Some(dir) = &opts.tensorrt_cache_dir {
            trt = trt
                .with_engine_cache(true)
                .with_engine_cache_path(dir.display());
        }
        ("TensorRT", ep::TensorRT::is_available(), trt.build())
    } else {
        (
            "CUDA",
            ep::CUDA::is_available(),
            ep::CUDA::default().build(),
        )
    };
    let available =
        available.map_err(|e| Error::ort("listing the available execution providers", e))?;
    // With fallback allowed, a failure becomes a CPU session whose reason is the error's message.
    let fall_back = |err: Error, reason: String| {
        if opts.allow_fallback {
            cpu_session(rt, kind, model_bytes, opts, Some(reason))
        } else {
            Err(err)
        }
    };
    if !available {
        let reason = format!(
            "{short} execution provider is not available in this ONNX Runtime build ({})",
            rt.library.display()
        );
        return fall_back(
            Error::ProviderUnavailable {
                provider: short.to_string(),
                library: rt.library.clone(),
            },
            reason,
        );
    }
    let builder =
        match base_builder(rt, opts)?.with_execution_providers([dispatch.error_on_failure()]) {
            Ok(builder) => builder,
            Err(e) => {
                let err = Error::ProviderFailed {
                    provider: short.to_string(),
                    message: one_line(e),
                };
                let reason = err.to_string();
                return fall_back(err, reason);
            }
        };
    let registered = |session| {
        let provider = ProviderInfo {
            requested: requested.to_string(),
            actual: requested.to_string(),
            fallback: false,
            reason: None,
        };
        (session, provider)
    };
    if opts.allow_fallback {
        match commit(
            builder,
            model_bytes,
            &format!("creating the session on {requested}"),
        ) {
            Ok(session) => Ok(registered(session)),
            Err(err) => {
                let reason = err.to_string();
                fall_back(err, reason)
            }
        }
    } else {
        let builder = builder
            .with_config_entry("session.disable_cpu_ep_fallback", "1")
            .map_err(|e| Error::ort("disabling the CPU fallback", e))?;
        let context = format!("creating the session on {requested} with CPU fallback disabled");
        commit(builder, model_bytes, &context).map(registered)
    }
}

/// Describes a session input or output; only tensors are supported.
fn io_info(outlet: &Outlet, io: &'static str) -> Result<IoInfo, Error> {
    match outlet.dtype() {
        ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } => {
            let dims = shape
                .iter()
                .enumerate()
                .map(|(i, &d)| match usize::try_from(d) {
                    Ok(n) => Dim::Fixed(n),
                    Err(_) => Dim::Symbolic(
                        dimension_symbols
                            .get(i)
                            .filter(|s| !s.is_empty())
                            .cloned()
                            .unwrap_or_else(|| "?".to_string()),
                    ),
                })
                .collect();
            Ok(IoInfo {
                name: outlet.name().to_string(),
                dtype: dtype_name(*ty),
                dims,
            })
        }
        other => Err(Error::UnsupportedType {
            io,
            name: outlet.name().to_string(),
            dtype: other.to_string(),
            action: "exchange (tensors only)",
        }),
    }
}

fn dtype_name(ty: TensorElementType) -> String {
    onnx_dtype_name(ort::sys::ONNXTensorElementDataType::from(ty) as i32)
}

/// Borrows a value as an ONNX Runtime tensor (copies only non-contiguous arrays).
fn to_ort(value: &Value) -> ort::Result<SessionInputValue<'_>> {
    fn feed<T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
        a: &ArrayD<T>,
    ) -> ort::Result<SessionInputValue<'_>> {
        if a.is_standard_layout() {
            Ok(TensorRef::from_array_view(a.view())?.into())
        } else {
            Ok(Tensor::from_array(a.as_standard_layout().into_owned())?.into())
        }
    }
    match value {
        Value::F32(a) => feed(a),
        Value::I64(a) => feed(a),
        Value::I32(a) => feed(a),
        Value::Bool(a) => feed(a),
    }
}

/// Copies an ONNX Runtime output into a [`Value`].
fn from_ort(value: &DynValue, name: &str) -> Result<Value, Error> {
    let context = || format!("reading output '{name}'");
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(Error::UnsupportedType {
                io: "output",
                name: name.to_string(),
                dtype: other.to_string(),
                action: "read back (tensors only)",
            });
        }
    };
    // the array of element type `T`, owned
    macro_rules! array {
        ($t:ty) => {
            value
                .try_extract_array::<$t>()
                .map_err(|e| Error::ort(context(), e))?
                .to_owned()
        };
    }
    let out = match ty {
        TensorElementType::Float32 => Value::F32(array!(f32)),
        TensorElementType::Int64 => Value::I64(array!(i64)),
        TensorElementType::Int32 => Value::I32(array!(i32)),
        TensorElementType::Bool => Value::Bool(array!(bool)),
        other => {
            return Err(Error::UnsupportedType {
                io: "output",
                name: name.to_string(),
                dtype: dtype_name(other),
                action: "read back (float, int64, int32 and bool only)",
            });
        }
    };
    Ok(out)
}

/// Whether a model is quantized: QuantizeLinear / DequantizeLinear, QLinear* or *Integer* ops
/// (false for bytes that do not decode).
pub fn is_quantized(model_bytes: &[u8]) -> bool {
    use prost::Message as _;
    whittle_core::onnx::ModelProto::decode(model_bytes).is_ok_and(|m| {
        m.graph.unwrap_or_default().node.iter().any(|n| {
            let op = n.op_type();
            matches!(op, "QuantizeLinear" | "DequantizeLinear")
                || op.starts_with("QLinear")
                || op.contains("Integer")
        })
    })
}

/// For a quantized model, why (part of) it runs in float on `kind`, where whittle can tell:
/// tract runs QDQ models in float; ONNX Runtime's CPU provider runs a DequantizeLinear it could
/// not fuse in float. `None` for a float model, an int8 model that fused, or another runtime.
pub fn runs_in_float(kind: crate::RuntimeKind, model_bytes: &[u8]) -> Option<String> {
    if !is_quantized(model_bytes) {
        return None;
    }
    match kind {
        crate::RuntimeKind::Tract => Some(
            "a quantized model: tract runs its QuantizeLinear / DequantizeLinear in float".into(),
        ),
        crate::RuntimeKind::OrtCpu => {
            let unfused = ort_cpu_kernels(model_bytes)
                .ok()?
                .get("DequantizeLinear")
                .copied()
                .unwrap_or(0);
            (unfused > 0).then(|| {
                format!(
                    "ONNX Runtime left {unfused} DequantizeLinear unfused: those parts run in float"
                )
            })
        }
        _ => None,
    }
}

/// The operators ONNX Runtime's CPU provider runs after its graph optimisations (level 2, where
/// QuantizeLinear / DequantizeLinear groups fuse into QLinearConv, QGemm and the like), by op
/// type: what tells a quantized model that runs on int8 kernels from one that runs in float.
pub fn ort_cpu_kernels(
    model_bytes: &[u8],
) -> Result<std::collections::BTreeMap<String, usize>, Error> {
    use prost::Message as _;
    let rt = ort_runtime()?;
    let path = std::env::temp_dir().join(format!(
        "whittle-kernels-{}-{:?}.onnx",
        std::process::id(),
        std::thread::current().id()
    ));
    let builder = OrtInner::builder(&rt.env)
        .map_err(|e| Error::ort("creating session options", e))?
        .with_optimization_level(GraphOptimizationLevel::Level2)
        .map_err(|e| Error::ort("setting the graph optimisation level", e))?
        .with_optimized_model_path(&path)
        .map_err(|e| Error::ort("asking for the optimised model", e))?;
    let session = commit(builder, model_bytes, "optimising the model");
    let bytes = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    drop(session?);
    let bytes = bytes
        .map_err(|e| Error::InvalidModel(format!("reading ONNX Runtime's optimised model: {e}")))?;
    let model = whittle_core::onnx::ModelProto::decode(bytes.as_slice()).map_err(|e| {
        Error::InvalidModel(format!("decoding ONNX Runtime's optimised model: {e}"))
    })?;
    let mut ops = std::collections::BTreeMap::new();
    for n in &model.graph.unwrap_or_default().node {
        *ops.entry(n.op_type().to_string()).or_default() += 1;
    }
    Ok(ops)
}
