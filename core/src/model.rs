//! The model: an ONNX `ModelProto` kept whole, with loading, normalisation and saving.
//!
//! whittle never converts the protobuf into a narrower structure: the `ModelProto` is the IR's
//! storage, so every op, attribute, domain, metadata entry and doc string it does not understand
//! survives a load/save round trip. On load, three normalisations make later passes simpler and
//! keep outputs identical:
//! - weights held by top-level `Constant` nodes become initializers;
//! - initializers also listed as graph inputs (required before IR 4) are dropped from the inputs
//!   (and listed again on save while the IR version is below 4);
//! - tensors in external side files are read into memory (the path must stay inside the model's
//!   folder).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use prost::Message;

use crate::attr::Attrs;
use crate::error::{Error, Result};
use crate::onnx::tensor_proto::{DataLocation, DataType};
use crate::onnx::{
    GraphProto, ModelProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, tensor_shape_proto, type_proto,
};
use crate::tensor::{dtype_size, element_count, is_external};

/// Limits applied while loading untrusted files.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The largest tensor, in bytes, that a model may declare (default 4 GiB).
    pub max_tensor_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_tensor_bytes: 4 << 30,
        }
    }
}

/// A loaded ONNX model. `proto.graph` is always present.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// The whole model; the graph IR's storage.
    pub proto: ModelProto,
}

impl Model {
    /// Load a model file, reading external data relative to its folder.
    pub fn load(path: &Path) -> Result<Model> {
        Self::load_with(path, &LoadOptions::default())
    }

    /// Load a model file with explicit limits.
    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Model> {
        let bytes = fs::read(path).map_err(|cause| Error::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let dir = path.parent().map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        });
        Self::from_bytes(&bytes, dir, &path.display().to_string(), opts)
    }

    /// Decode a model from bytes. `base_dir` is where external data is looked up (none: external
    /// data is an error); `what` names the source in messages.
    pub fn from_bytes(
        bytes: &[u8],
        base_dir: Option<&Path>,
        what: &str,
        opts: &LoadOptions,
    ) -> Result<Model> {
        if bytes.is_empty() {
            return Err(Error::Decode {
                what: what.into(),
                reason: "the file is empty".into(),
            });
        }
        let proto = ModelProto::decode(bytes).map_err(|e| Error::Decode {
            what: what.into(),
            reason: format!(
                "protobuf decoding failed ({e}); the file may be truncated or not ONNX"
            ),
        })?;
        let mut model = Model { proto };
        model.check_header(what)?;
        model.resolve_external(base_dir, opts)?;
        model.constants_to_initializers()?;
        model.drop_initializer_inputs();
        model.check_tensors(opts)?;
        crate::check::topo_sort(model.graph_mut())?;
        crate::check::check_graph(model.graph())?;
        Ok(model)
    }

    fn check_header(&self, what: &str) -> Result<()> {
        let ir = self.proto.ir_version();
        if ir < 3 {
            return Err(Error::Decode {
                what: what.into(),
                reason: if ir == 0 {
                    "no IR version (is this an ONNX file?)".into()
                } else {
                    format!("IR version {ir} is older than 3, which whittle does not read")
                },
            });
        }
        if self.proto.graph.is_none() {
            return Err(Error::Decode {
                what: what.into(),
                reason: "the model has no graph".into(),
            });
        }
        if self.opset("").is_none() && self.proto.opset_import.is_empty() {
            return Err(Error::Decode {
                what: what.into(),
                reason: "the model imports no opset".into(),
            });
        }
        Ok(())
    }

    /// The main graph.
    pub fn graph(&self) -> &GraphProto {
        self.proto
            .graph
            .as_ref()
            .expect("Model invariant: graph is present")
    }

    /// The main graph, mutable.
    pub fn graph_mut(&mut self) -> &mut GraphProto {
        self.proto
            .graph
            .as_mut()
            .expect("Model invariant: graph is present")
    }

    /// The imported opset version of a domain (`""` or `ai.onnx` for the default one).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let want_default = domain.is_empty() || domain == "ai.onnx";
        self.proto
            .opset_import
            .iter()
            .find(|o| {
                if want_default {
                    o.domain().is_empty() || o.domain() == "ai.onnx"
                } else {
                    o.domain() == domain
                }
            })
            .map(|o| o.version())
    }

    /// The initializer with this name.
    pub fn initializer(&self, name: &str) -> Option<&TensorProto> {
        self.graph().initializer.iter().find(|t| t.name() == name)
    }

    /// The stored weight behind `name`: the initializer itself, or the quantized initializer a
    /// DequantizeLinear reads when `name` is that DequantizeLinear's output.
    pub fn stored_weight(&self, name: &str) -> Option<&TensorProto> {
        self.initializer(name).or_else(|| {
            let dq = self.graph().node.iter().find(|n| {
                n.op_type() == "DequantizeLinear" && n.output.first().is_some_and(|o| o == name)
            })?;
            self.initializer(dq.input.first()?)
        })
    }

    /// A name → initializer map (for passes that look many up).
    pub fn initializer_map(&self) -> HashMap<&str, &TensorProto> {
        self.graph()
            .initializer
            .iter()
            .map(|t| (t.name(), t))
            .collect()
    }

    /// The graph inputs that are fed at run time (initializers excluded).
    pub fn inputs(&self) -> Vec<&ValueInfoProto> {
        let inits: HashSet<&str> = self.graph().initializer.iter().map(|t| t.name()).collect();
        self.graph()
            .input
            .iter()
            .filter(|v| !inits.contains(v.name()))
            .collect()
    }

    /// Serialise the model with every tensor inline.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.proto_for_save().encode_to_vec()
    }

    /// Serialise the model, moving tensors of at least `threshold` bytes into one side file
    /// named `location` (relative to the model's folder). Returns (model bytes, side-file bytes).
    pub fn to_bytes_external(
        &self,
        location: &str,
        threshold: usize,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut proto = self.proto_for_save();
        let mut side = Vec::new();
        if let Some(g) = proto.graph.as_mut() {
            for t in &mut g.initializer {
                let raw = match raw_bytes(t)? {
                    Some(r) if r.len() >= threshold => r,
                    _ => continue,
                };
                while !side.len().is_multiple_of(64) {
                    side.push(0);
                }
                let offset = side.len();
                side.extend_from_slice(&raw);
                clear_data(t);
                t.data_location = Some(DataLocation::External as i32);
                t.external_data = vec![
                    entry("location", location),
                    entry("offset", &offset.to_string()),
                    entry("length", &raw.len().to_string()),
                ];
            }
        }
        Ok((proto.encode_to_vec(), side))
    }

    fn proto_for_save(&self) -> ModelProto {
        let mut proto = self.proto.clone();
        if proto.ir_version() < 4
            && let Some(g) = proto.graph.as_mut()
        {
            let listed: HashSet<String> = g.input.iter().map(|v| v.name().to_string()).collect();
            let extra: Vec<ValueInfoProto> = g
                .initializer
                .iter()
                .filter(|t| !listed.contains(t.name()))
                .map(tensor_value_info)
                .collect();
            g.input.extend(extra);
        }
        proto
    }

    fn resolve_external(&mut self, base_dir: Option<&Path>, opts: &LoadOptions) -> Result<()> {
        let g = self.graph_mut();
        let mut tensors: Vec<&mut TensorProto> = g.initializer.iter_mut().collect();
        for n in &mut g.node {
            for a in &mut n.attribute {
                if let Some(t) = a.t.as_mut() {
                    tensors.push(t);
                }
            }
        }
        for t in tensors {
            if is_external(t) {
                load_external(t, base_dir, opts)?;
            }
        }
        Ok(())
    }

    fn constants_to_initializers(&mut self) -> Result<()> {
        let g = self.graph_mut();
        let outputs: HashSet<String> = g.output.iter().map(|v| v.name().to_string()).collect();
        let mut kept = Vec::with_capacity(g.node.len());
        let mut new_inits = Vec::new();
        for n in std::mem::take(&mut g.node) {
            let convertible = n.op_type() == "Constant"
                && n.domain().is_empty()
                && n.output.len() == 1
                && !outputs.contains(&n.output[0]);
            match convertible.then(|| constant_tensor(&n)).flatten() {
                Some(mut t) => {
                    t.name = Some(n.output[0].clone());
                    new_inits.push(t);
                }
                None => kept.push(n),
            }
        }
        g.node = kept;
        g.initializer.extend(new_inits);
        Ok(())
    }

    fn drop_initializer_inputs(&mut self) {
        let g = self.graph_mut();
        let inits: HashSet<String> = g.initializer.iter().map(|t| t.name().to_string()).collect();
        g.input.retain(|v| !inits.contains(v.name()));
    }

    fn check_tensors(&self, opts: &LoadOptions) -> Result<()> {
        for t in &self.graph().initializer {
            let n = element_count(t)?;
            let Some(size) = dtype_size(t.data_type()) else {
                continue;
            };
            let bytes = n.checked_mul(size as u64).ok_or_else(|| Error::Tensor {
                tensor: t.name().into(),
                reason: format!("dimensions {:?} overflow", t.dims),
            })?;
            if bytes > opts.max_tensor_bytes {
                return Err(Error::Tensor {
                    tensor: t.name().into(),
                    reason: format!(
                        "declares {bytes} bytes, over the limit of {} bytes",
                        opts.max_tensor_bytes
                    ),
                });
            }
            if let Some(raw) = &t.raw_data
                && raw.len() as u64 != bytes
            {
                return Err(Error::Tensor {
                    tensor: t.name().into(),
                    reason: format!(
                        "dims {:?} declare {bytes} bytes but the data holds {}",
                        t.dims,
                        raw.len()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The tensor held by a `Constant` node, when it holds a plain (dense) value.
fn constant_tensor(n: &crate::onnx::NodeProto) -> Option<TensorProto> {
    if let Some(t) = n.attr_tensor("value") {
        return Some(t.clone());
    }
    if let Some(f) = n.attr_float("value_float") {
        return Some(crate::tensor::from_f32("", &[], &[f]));
    }
    if let Some(fs) = n.attr("value_floats") {
        return Some(crate::tensor::from_f32(
            "",
            &[fs.floats.len() as i64],
            &fs.floats,
        ));
    }
    if let Some(i) = n.attr_int("value_int") {
        return Some(crate::tensor::from_i64("", &[], &[i]));
    }
    if let Some(is) = n.attr("value_ints") {
        return Some(crate::tensor::from_i64(
            "",
            &[is.ints.len() as i64],
            &is.ints,
        ));
    }
    None
}

fn entry(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    }
}

fn clear_data(t: &mut TensorProto) {
    t.raw_data = None;
    t.float_data.clear();
    t.int32_data.clear();
    t.int64_data.clear();
    t.double_data.clear();
    t.uint64_data.clear();
}

/// The tensor's data as little-endian bytes (converting typed fields), or None for strings.
fn raw_bytes(t: &TensorProto) -> Result<Option<Vec<u8>>> {
    if let Some(r) = &t.raw_data {
        return Ok(Some(r.clone()));
    }
    let dt = DataType::try_from(t.data_type()).unwrap_or(DataType::Undefined);
    Ok(Some(match dt {
        DataType::Float => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Double => t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Int64 => t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Int32 => t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => return Ok(None),
    }))
}

fn tensor_value_info(t: &TensorProto) -> ValueInfoProto {
    let dims = t
        .dims
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: t.name.clone(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: t.data_type,
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn ext_err(t: &TensorProto, reason: String) -> Error {
    Error::ExternalData {
        tensor: t.name().to_string(),
        reason,
    }
}

/// Resolve an external-data location inside `base`, refusing anything that leaves it.
fn safe_location(t: &TensorProto, base: &Path, location: &str) -> Result<PathBuf> {
    let rel = Path::new(location);
    if location.is_empty() {
        return Err(ext_err(t, "has an empty location".into()));
    }
    if rel.is_absolute() || rel.has_root() {
        return Err(ext_err(
            t,
            format!(
                "location '{location}' is an absolute path; only paths inside the model's folder are allowed"
            ),
        ));
    }
    if rel
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
    {
        return Err(ext_err(
            t,
            format!("location '{location}' leaves the model's folder"),
        ));
    }
    let joined = base.join(rel);
    let canon_base = base
        .canonicalize()
        .map_err(|e| ext_err(t, format!("model folder {}: {e}", base.display())))?;
    let canon = joined
        .canonicalize()
        .map_err(|e| ext_err(t, format!("file '{location}' cannot be opened: {e}")))?;
    if !canon.starts_with(&canon_base) {
        return Err(ext_err(
            t,
            format!(
                "location '{location}' resolves outside the model's folder (through a symlink)"
            ),
        ));
    }
    Ok(canon)
}

fn load_external(t: &mut TensorProto, base_dir: Option<&Path>, opts: &LoadOptions) -> Result<()> {
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key() == k)
            .map(|e| e.value().to_string())
    };
    let location = get("location").ok_or_else(|| ext_err(t, "has no location".into()))?;
    let parse = |k: &str| -> Result<Option<u64>> {
        get(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| ext_err(t, format!("{k} '{v}' is not a number")))
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?;
    let base = base_dir.ok_or_else(|| {
        ext_err(
            t,
            "cannot be read: the model was not loaded from a file".into(),
        )
    })?;
    let path = safe_location(t, base, &location)?;
    let mut f =
        fs::File::open(&path).map_err(|e| ext_err(t, format!("file {}: {e}", path.display())))?;
    let file_len = f
        .metadata()
        .map_err(|e| ext_err(t, format!("file {}: {e}", path.display())))?
        .len();
    if offset > file_len {
        return Err(ext_err(
            t,
            format!("offset {offset} is past the end of {location} ({file_len} bytes)"),
        ));
    }
    let length = length.unwrap_or(file_len - offset);
    if length > file_len - offset {
        return Err(ext_err(
            t,
            format!(
                "declares {length} bytes at offset {offset}, but {location} has only {file_len} bytes"
            ),
        ));
    }
    if length > opts.max_tensor_bytes {
        return Err(ext_err(
            t,
            format!(
                "declares {length} bytes, over the limit of {} bytes",
                opts.max_tensor_bytes
            ),
        ));
    }
    if let Some(size) = dtype_size(t.data_type()) {
        let want = element_count(t)?.saturating_mul(size as u64);
        if want != length {
            return Err(ext_err(
                t,
                format!("holds {length} bytes but dims {:?} need {want}", t.dims),
            ));
        }
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| ext_err(t, format!("seek in {location}: {e}")))?;
    let mut buf = Vec::with_capacity(length as usize);
    f.take(length)
        .read_to_end(&mut buf)
        .map_err(|e| ext_err(t, format!("read {location}: {e}")))?;
    t.raw_data = Some(buf);
    t.data_location = Some(DataLocation::Default as i32);
    t.external_data.clear();
    Ok(())
}

/// The `ValueInfoProto` of a float tensor whose dims are given as text: a number is a fixed size,
/// anything else a symbol (`&["N", "3", "32", "32"]`). Tests and fixtures build graphs with it.
pub fn float_value_info(name: &str, dims: &[&str]) -> ValueInfoProto {
    use tensor_shape_proto::dimension::Value as D;
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d.parse::<i64>() {
                Ok(v) => D::DimValue(v),
                Err(_) => D::DimParam(d.to_string()),
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
