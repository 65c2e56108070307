//! Runtimes behind one [`Session`] trait: ONNX Runtime (CPU, CUDA, TensorRT) and tract (cargo
//! feature `tract`).
//!
//! A session takes [`Value`]s in graph-input order and returns [`Value`]s in graph-output order.
//! Both runtimes check the values against the graph inputs with the same code before running, so a
//! wrong dtype or shape gives the same [`Error::InputMismatch`] everywhere.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;
use whittle_core::Value;

use crate::error::Error;

/// The runtimes whittle can run a model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    /// ONNX Runtime with its default CPU execution provider (`ort-cpu`).
    OrtCpu,
    /// ONNX Runtime with the CUDA execution provider (`ort-cuda`).
    OrtCuda,
    /// ONNX Runtime with the TensorRT execution provider, fp16 enabled, and int8 for a quantized
    /// (QDQ) model (`ort-tensorrt`).
    OrtTensorRt,
    /// tract, the pure-Rust inference engine (`tract`).
    Tract,
}

impl RuntimeKind {
    /// Every runtime, in the order they are listed to users.
    pub const ALL: [RuntimeKind; 4] = [
        RuntimeKind::OrtCpu,
        RuntimeKind::OrtCuda,
        RuntimeKind::OrtTensorRt,
        RuntimeKind::Tract,
    ];

    /// The name used on the command line and in reports (`ort-cpu`, `ort-cuda`, `ort-tensorrt`, `tract`).
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::OrtCpu => "ort-cpu",
            RuntimeKind::OrtCuda => "ort-cuda",
            RuntimeKind::OrtTensorRt => "ort-tensorrt",
            RuntimeKind::Tract => "tract",
        }
    }

    /// The provider this runtime asks for, as [`ProviderInfo::requested`] reports it
    /// (ONNX Runtime's execution provider name, or `tract`).
    pub fn provider_name(self) -> &'static str {
        match self {
            RuntimeKind::OrtCpu => CPU_EP,
            RuntimeKind::OrtCuda => "CUDAExecutionProvider",
            RuntimeKind::OrtTensorRt => "TensorrtExecutionProvider",
            RuntimeKind::Tract => "tract",
        }
    }
}

/// ONNX Runtime's name for its CPU execution provider.
pub(crate) const CPU_EP: &str = "CPUExecutionProvider";

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RuntimeKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        RuntimeKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::UnknownRuntime {
                name: s.to_string(),
                valid: RuntimeKind::ALL.map(RuntimeKind::name).join(", "),
            })
    }
}

impl<'de> serde::Deserialize<'de> for RuntimeKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for RuntimeKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// How to build a session.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Intra-op threads for ONNX Runtime (`None`: its default, one per core). tract runs on one
    /// thread (its multithreading is a build feature whittle does not enable) and ignores this.
    pub threads: Option<usize>,
    /// For `ort-cuda` / `ort-tensorrt`: when the execution provider is missing or cannot be
    /// registered, run on CPU instead of failing, and say so in [`ProviderInfo`].
    pub allow_fallback: bool,
    /// Concrete shapes for some inputs, by name. They must agree with the fixed dims the model
    /// declares; a symbolic dim they set (say `N`) takes that value in every input that uses it.
    /// tract fixes its input facts to them (a faster, static plan); both runtimes then check that
    /// `run` is given exactly these shapes.
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// For `ort-tensorrt`: a folder where TensorRT caches its engines (`None`: no cache).
    pub tensorrt_cache_dir: Option<PathBuf>,
    /// For `ort-tensorrt`: build fp16 engines (`None`: yes).
    pub tensorrt_fp16: Option<bool>,
    /// For `ort-tensorrt`: the most memory, in bytes, TensorRT may use while building an engine
    /// (`trt_max_workspace_size`; `None`: its default).
    pub tensorrt_workspace_bytes: Option<usize>,
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A known size.
    Fixed(usize),
    /// A size chosen at run time, by its ONNX `dim_param` name (`?` when it has none).
    Symbolic(String),
}

impl Serialize for Dim {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Dim::Fixed(n) => serializer.serialize_u64(*n as u64),
            Dim::Symbolic(s) => serializer.serialize_str(s),
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// A graph input or output: name, element type and dimensions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IoInfo {
    /// The tensor name in the graph.
    pub name: String,
    /// The element type as ONNX names it: `float`, `int64`, `int32`, `bool`, `float16`, `uint8`, ...
    pub dtype: String,
    /// The dimensions, outermost first.
    pub dims: Vec<Dim>,
}

impl IoInfo {
    /// The type and shape as messages print them, e.g. `float [N,3,32,32]`.
    pub fn signature(&self) -> String {
        format!("{} {}", self.dtype, format_dims(&self.dims))
    }
}

impl fmt::Display for IoInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.signature())
    }
}

/// Which execution provider a session asked for and which one it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderInfo {
    /// The provider asked for, e.g. `CUDAExecutionProvider` (`tract` for tract).
    pub requested: String,
    /// The provider the session was built with, e.g. `CPUExecutionProvider` after a fallback.
    /// With fallback allowed and the provider registered, ONNX Runtime may still place single
    /// nodes it cannot handle on the CPU; without fallback it refuses such models.
    pub actual: String,
    /// True when `actual` is not what was requested.
    pub fallback: bool,
    /// Why the fallback happened (ONNX Runtime's message), when it did.
    pub reason: Option<String>,
}

/// A loaded model, ready to run.
pub trait Session: Send {
    /// The graph inputs (initializers excluded), in graph order. Dims fixed by
    /// [`RuntimeOptions::input_shapes`] are reported as fixed.
    fn inputs(&self) -> &[IoInfo];
    /// The graph outputs, in graph order.
    fn outputs(&self) -> &[IoInfo];
    /// The execution provider in use.
    fn provider(&self) -> &ProviderInfo;
    /// Runs the model once. `inputs` are in [`Session::inputs`] order and are checked first
    /// ([`Error::InputMismatch`] on a wrong count, dtype or shape); outputs come back in
    /// [`Session::outputs`] order.
    fn run(&mut self, inputs: &[Value]) -> Result<Vec<Value>, Error>;
}

/// A runtime's model, run on inputs [`Loaded`] has checked.
pub(crate) trait Engine: Send {
    /// Runs the model; `outputs` are the graph's outputs, in order.
    fn run(&mut self, inputs: &[Value], outputs: &[IoInfo]) -> Result<Vec<Value>, Error>;
}

/// A loaded model: its engine, what it takes and gives, and the provider running it.
pub(crate) struct Loaded<E> {
    pub(crate) engine: E,
    pub(crate) inputs: Vec<IoInfo>,
    pub(crate) outputs: Vec<IoInfo>,
    pub(crate) provider: ProviderInfo,
}

impl<E: Engine> Session for Loaded<E> {
    fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }

    fn provider(&self) -> &ProviderInfo {
        &self.provider
    }

    fn run(&mut self, inputs: &[Value]) -> Result<Vec<Value>, Error> {
        check_inputs(&self.inputs, inputs)?;
        self.engine.run(inputs, &self.outputs)
    }
}

/// Loads an ONNX model from memory into the given runtime.
///
/// `ort-cuda` / `ort-tensorrt` without [`RuntimeOptions::allow_fallback`] fail when the execution
/// provider is not in the ONNX Runtime build ([`Error::ProviderUnavailable`]), cannot be registered,
/// or cannot take the whole graph; with it they fall back to CPU and report it in
/// [`Session::provider`].
pub fn load(
    kind: RuntimeKind,
    model_bytes: &[u8],
    opts: &RuntimeOptions,
) -> Result<Box<dyn Session>, Error> {
    match kind {
        #[cfg(feature = "tract")]
        RuntimeKind::Tract => Ok(Box::new(crate::tract_session::TractSession::load(
            model_bytes,
            opts,
        )?)),
        #[cfg(not(feature = "tract"))]
        RuntimeKind::Tract => Err(Error::RuntimeNotBuilt {
            runtime: "tract",
            feature: "tract",
        }),
        RuntimeKind::OrtCpu | RuntimeKind::OrtCuda | RuntimeKind::OrtTensorRt => Ok(Box::new(
            crate::ort_session::OrtSession::load(kind, model_bytes, opts)?,
        )),
    }
}

/// The graph inputs an ONNX model declares (initializers excluded), without loading it into a
/// runtime: what [`RuntimeOptions::input_shapes`] can be built from before the first load.
pub fn declared_inputs(model_bytes: &[u8]) -> Result<Vec<IoInfo>, Error> {
    use prost::Message as _;
    use whittle_core::onnx::{ModelProto, tensor_shape_proto::dimension, type_proto};

    let proto = ModelProto::decode(model_bytes).map_err(|e| {
        Error::InvalidModel(format!(
            "protobuf decoding failed ({e}); the bytes may be truncated or not ONNX"
        ))
    })?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| Error::InvalidModel("the model has no graph".into()))?;
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    graph
        .input
        .iter()
        .filter(|i| !initializers.contains(&i.name()))
        .map(|vi| {
            let tensor = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(type_proto::Value::TensorType(t)) => t,
                _ => {
                    return Err(Error::InvalidModel(format!(
                        "graph input '{}' has no tensor type",
                        vi.name()
                    )));
                }
            };
            let Some(shape) = tensor.shape.as_ref() else {
                return Err(Error::InvalidModel(format!(
                    "graph input '{}' declares no shape",
                    vi.name()
                )));
            };
            let dims = shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(dimension::Value::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
                    Some(dimension::Value::DimParam(p)) if !p.is_empty() => {
                        Dim::Symbolic(p.clone())
                    }
                    _ => Dim::Symbolic("?".to_string()),
                })
                .collect();
            Ok(IoInfo {
                name: vi.name().to_string(),
                dtype: onnx_dtype_name(tensor.elem_type()),
                dims,
            })
        })
        .collect()
}

/// `[N,3,32,32]`.
pub(crate) fn format_dims(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims.iter().map(Dim::to_string).collect();
    format!("[{}]", parts.join(","))
}

fn format_shape(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(","))
}

/// The name ONNX gives to a `TensorProto.DataType` code (`1` -> `float`).
pub(crate) fn onnx_dtype_name(code: i32) -> String {
    let name = match code {
        1 => "float",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "double",
        12 => "uint32",
        13 => "uint64",
        14 => "complex64",
        15 => "complex128",
        16 => "bfloat16",
        17 => "float8e4m3fn",
        18 => "float8e4m3fnuz",
        19 => "float8e5m2",
        20 => "float8e5m2fnuz",
        21 => "uint4",
        22 => "int4",
        23 => "float4e2m1",
        24 => "float8e8m0",
        25 => "uint2",
        26 => "int2",
        other => return format!("dtype#{other}"),
    };
    name.to_string()
}

/// Applies shape overrides to the graph inputs: an overridden input gets its concrete shape, and
/// every symbolic dim an override pins (say `N = 4`) becomes fixed wherever it appears, inputs and
/// outputs alike. Fails when an override names no input, has the wrong rank, contradicts a fixed
/// dim, or gives one symbol two values.
pub(crate) fn resolve_shapes(
    inputs: &[IoInfo],
    outputs: &[IoInfo],
    overrides: &[(String, Vec<usize>)],
) -> Result<(Vec<IoInfo>, Vec<IoInfo>), Error> {
    let mut bound: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut resolved: Vec<IoInfo> = inputs.to_vec();
    let mut seen: Vec<&str> = Vec::new();
    for (name, shape) in overrides {
        let fail = |reason: String| Error::ShapeOverride {
            input: name.clone(),
            reason,
        };
        if seen.contains(&name.as_str()) {
            return Err(fail("given twice".to_string()));
        }
        seen.push(name);
        let Some(info) = inputs.iter().find(|i| &i.name == name) else {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(fail(format!(
                "the model has no such input (inputs: {})",
                names.join(", ")
            )));
        };
        let mismatch = || {
            fail(format!(
                "{} does not fit the declared {}",
                format_shape(shape),
                info.signature()
            ))
        };
        if shape.len() != info.dims.len() {
            return Err(mismatch());
        }
        for (dim, &size) in info.dims.iter().zip(shape) {
            match dim {
                Dim::Fixed(n) if *n != size => return Err(mismatch()),
                Dim::Fixed(_) => {}
                Dim::Symbolic(sym) if sym == "?" => {}
                Dim::Symbolic(sym) => match bound.get(sym) {
                    Some((prev, from)) if *prev != size => {
                        return Err(fail(format!(
                            "{} sets {sym}={size}, but the shape of input '{from}' sets {sym}={prev}",
                            format_shape(shape)
                        )));
                    }
                    Some(_) => {}
                    None => {
                        bound.insert(sym.clone(), (size, name.clone()));
                    }
                },
            }
        }
    }
    let substitute = |info: &IoInfo| IoInfo {
        dims: info
            .dims
            .iter()
            .map(|d| match d {
                Dim::Symbolic(s) => bound
                    .get(s)
                    .map_or_else(|| d.clone(), |(n, _)| Dim::Fixed(*n)),
                Dim::Fixed(_) => d.clone(),
            })
            .collect(),
        ..info.clone()
    };
    for info in resolved.iter_mut() {
        if let Some((_, shape)) = overrides.iter().find(|(n, _)| *n == info.name) {
            info.dims = shape.iter().map(|&n| Dim::Fixed(n)).collect();
        } else {
            *info = substitute(info);
        }
    }
    Ok((resolved, outputs.iter().map(substitute).collect()))
}

/// Checks run-time values against the graph inputs: count, dtype, rank, fixed dims, and that a
/// symbolic dim has the same size in every input that uses it.
pub(crate) fn check_inputs(infos: &[IoInfo], values: &[Value]) -> Result<(), Error> {
    if infos.len() != values.len() {
        let listed: Vec<String> = infos.iter().map(IoInfo::to_string).collect();
        let plural = if infos.len() == 1 { "" } else { "s" };
        return Err(Error::InputMismatch {
            input: None,
            expected: format!("{} input{plural} ({})", infos.len(), listed.join("; ")),
            got: format!(
                "{} value{}",
                values.len(),
                if values.len() == 1 { "" } else { "s" }
            ),
        });
    }
    let mut bound: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    for (info, value) in infos.iter().zip(values) {
        let shape = value.shape();
        let mismatch = |note: String| Error::InputMismatch {
            input: Some(info.name.clone()),
            expected: format!("{}{note}", info.signature()),
            got: format!("{} {}", value.dtype_name(), format_shape(shape)),
        };
        if value.dtype_name() != info.dtype || shape.len() != info.dims.len() {
            return Err(mismatch(String::new()));
        }
        for (dim, &size) in info.dims.iter().zip(shape) {
            match dim {
                Dim::Fixed(n) if *n != size => return Err(mismatch(String::new())),
                Dim::Symbolic(sym) if sym != "?" => match bound.get(sym.as_str()) {
                    Some((prev, from)) if *prev != size => {
                        return Err(mismatch(format!(" with {sym}={prev} as in input '{from}'")));
                    }
                    Some(_) => {}
                    None => {
                        bound.insert(sym, (size, &info.name));
                    }
                },
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn info(name: &str, dtype: &str, dims: &[&str]) -> IoInfo {
        IoInfo {
            name: name.into(),
            dtype: dtype.into(),
            dims: dims
                .iter()
                .map(|d| {
                    d.parse()
                        .map_or_else(|_| Dim::Symbolic(d.to_string()), Dim::Fixed)
                })
                .collect(),
        }
    }

    fn f32_value(shape: &[usize]) -> Value {
        Value::F32(ArrayD::zeros(IxDyn(shape)))
    }

    #[test]
    fn runtime_names_round_trip_and_unknown_lists_valid() {
        for kind in RuntimeKind::ALL {
            assert_eq!(kind.to_string().parse::<RuntimeKind>().ok(), Some(kind));
        }
        let msg = "onnxruntime"
            .parse::<RuntimeKind>()
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "unknown runtime 'onnxruntime'; valid runtimes: ort-cpu, ort-cuda, ort-tensorrt, tract"
        );
    }

    #[test]
    fn input_mismatch_reads_like_the_spec() {
        let infos = [info("input", "float", &["N", "3", "32", "32"])];
        let err = check_inputs(&infos, &[f32_value(&[1, 3, 64, 64])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'input' expects float [N,3,32,32], got float [1,3,64,64]"
        );
        assert!(check_inputs(&infos, &[f32_value(&[7, 3, 32, 32])]).is_ok());

        let err =
            check_inputs(&infos, &[Value::I64(ArrayD::zeros(IxDyn(&[1, 3, 32, 32])))]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input 'input' expects float [N,3,32,32], got int64 [1,3,32,32]"
        );

        let err = check_inputs(&infos, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model expects 1 input (input: float [N,3,32,32]), got 0 values"
        );
        assert!(matches!(err, Error::InputMismatch { input: None, .. }));
    }

    #[test]
    fn a_symbol_must_agree_across_inputs() {
        let infos = [
            info("ids", "int64", &["batch", "seq"]),
            info("mask", "int64", &["batch", "seq"]),
        ];
        let v = |s: &[usize]| Value::I64(ArrayD::zeros(IxDyn(s)));
        assert!(check_inputs(&infos, &[v(&[2, 7]), v(&[2, 7])]).is_ok());
        let msg = check_inputs(&infos, &[v(&[2, 7]), v(&[2, 8])])
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "input 'mask' expects int64 [batch,seq] with seq=7 as in input 'ids', got int64 [2,8]"
        );
    }

    #[test]
    fn overrides_pin_symbols_everywhere_and_reject_contradictions() {
        let inputs = [
            info("ids", "int64", &["batch", "seq"]),
            info("mask", "int64", &["batch", "seq"]),
        ];
        let outputs = [info("emb", "float", &["batch", "384"])];
        let (i, o) =
            resolve_shapes(&inputs, &outputs, &[("ids".into(), vec![2, 16])]).expect("resolves");
        assert_eq!(i[1].signature(), "int64 [2,16]");
        assert_eq!(o[0].signature(), "float [2,384]");

        let err = resolve_shapes(&inputs, &outputs, &[("nope".into(), vec![1])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shape for input 'nope': the model has no such input (inputs: ids, mask)"
        );

        let img = [info("input", "float", &["N", "3", "32", "32"])];
        let err = resolve_shapes(&img, &[], &[("input".into(), vec![1, 3, 64, 64])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shape for input 'input': [1,3,64,64] does not fit the declared float [N,3,32,32]"
        );
        let err = resolve_shapes(&img, &[], &[("input".into(), vec![1, 3, 32])]).unwrap_err();
        assert!(matches!(err, Error::ShapeOverride { .. }));

        let err = resolve_shapes(
            &inputs,
            &[],
            &[("ids".into(), vec![1, 4]), ("mask".into(), vec![1, 5])],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "shape for input 'mask': [1,5] sets seq=5, but the shape of input 'ids' sets seq=4"
        );
    }

    #[test]
    fn declared_inputs_skip_initializers_and_name_dims() {
        use prost::Message as _;
        use whittle_core::onnx::{
            GraphProto, ModelProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
            tensor_shape_proto::{Dimension, dimension},
            type_proto,
        };
        let vi = |name: &str, dims: Vec<Option<dimension::Value>>| ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .into_iter()
                            .map(|value| Dimension {
                                value,
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let model = ModelProto {
            graph: Some(GraphProto {
                input: vec![
                    vi(
                        "x",
                        vec![
                            Some(dimension::Value::DimParam("N".into())),
                            Some(dimension::Value::DimValue(3)),
                            Some(dimension::Value::DimParam(String::new())),
                            None,
                        ],
                    ),
                    vi("w", vec![Some(dimension::Value::DimValue(3))]),
                ],
                initializer: vec![TensorProto {
                    name: Some("w".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let inputs = declared_inputs(&model.encode_to_vec()).expect("declared inputs");
        assert_eq!(inputs.len(), 1, "{inputs:?}");
        assert_eq!(inputs[0].to_string(), "x: float [N,3,?,?]");

        let err = declared_inputs(b"not onnx at all").unwrap_err();
        assert!(matches!(err, Error::InvalidModel(_)), "{err}");
        let err = declared_inputs(&ModelProto::default().encode_to_vec()).unwrap_err();
        assert_eq!(err.to_string(), "invalid model: the model has no graph");
    }

    #[cfg(not(feature = "tract"))]
    #[test]
    fn tract_without_the_feature_says_so() {
        let err = load(RuntimeKind::Tract, b"", &RuntimeOptions::default())
            .err()
            .expect("no tract in this build");
        assert_eq!(
            err.to_string(),
            "this build has no tract (built without the `tract` feature)"
        );
    }

    #[test]
    fn serialises_as_names() {
        let info = info("input", "float", &["N", "3"]);
        let json = serde_json::to_string(&info).expect("serialises");
        assert_eq!(json, r#"{"name":"input","dtype":"float","dims":["N",3]}"#);
        let json = serde_json::to_string(&RuntimeKind::ALL).expect("serialises");
        assert_eq!(json, r#"["ort-cpu","ort-cuda","ort-tensorrt","tract"]"#);
    }
}
