//! Activation capture: run a model over calibration items and hand chosen tensors to a visitor.
//!
//! [`capture`] exposes the asked-for tensors as extra graph outputs of a copy of the model, loads
//! that copy once into a runtime, and runs it over the items batch by batch. Passes that need
//! statistics of intermediate activations (least-squares reconstruction, channel importance)
//! accumulate what they need inside the visitor, so no batch is kept longer than one call.

use std::collections::HashSet;

use ndarray::{ArrayD, Axis};
use whittle_core::Model;
use whittle_core::Value;
use whittle_core::onnx::tensor_proto::DataType;
use whittle_core::onnx::{TypeProto, ValueInfoProto, type_proto};
use whittle_runtime::{Dim, IoInfo, RuntimeKind, RuntimeOptions};

use crate::dataset::{Dataset, InputSpec};
use crate::error::Error;
use crate::profile::Preprocess;

/// What to run a capture on: the items, how to turn them into inputs, and the runtime.
#[derive(Debug, Clone, Copy)]
pub struct CaptureSpec<'a> {
    /// The dataset the items come from.
    pub dataset: &'a Dataset,
    /// The item indices, in the order they are run (see [`Dataset::sample`]).
    pub indices: &'a [usize],
    /// The preprocessing for image datasets.
    pub pre: &'a Preprocess,
    /// Items per run for models with a symbolic batch axis; a model with a fixed batch runs that.
    pub batch: usize,
    /// The runtime the model runs in.
    pub runtime: RuntimeKind,
    /// Intra-op threads for the runtime (`None`: its default).
    pub threads: Option<usize>,
}

impl<'a> CaptureSpec<'a> {
    /// A capture on ONNX Runtime's CPU provider with `threads` intra-op threads.
    pub fn ort_cpu(
        dataset: &'a Dataset,
        indices: &'a [usize],
        pre: &'a Preprocess,
        batch: usize,
        threads: usize,
    ) -> Self {
        CaptureSpec {
            dataset,
            indices,
            pre,
            batch,
            runtime: RuntimeKind::OrtCpu,
            threads: Some(threads),
        }
    }
}

/// The input specs a dataset must fill, from a session's inputs: every dim but the batch axis must
/// be fixed. Returns the specs and the batch size to use: the model's own batch when its first
/// dim is fixed, else `batch` (at least 1).
pub fn input_specs(
    inputs: &[IoInfo],
    batch: usize,
    data: Option<(&Dataset, &Preprocess)>,
) -> Result<(Vec<InputSpec>, usize), Error> {
    let mut specs = Vec::new();
    let mut bs = batch.max(1);
    for io in inputs {
        if let Some(Dim::Fixed(b)) = io.dims.first() {
            bs = *b;
        }
        // a symbolic non-batch dim (a sequence length, an image's height) takes its size from
        // the data (a tensor's item shape, the first image after preprocessing)
        let from_data = match data {
            Some((d, pre))
                if io
                    .dims
                    .iter()
                    .skip(1)
                    .any(|d| matches!(d, Dim::Symbolic(_))) =>
            {
                d.item_shape_with(&io.name, pre, 0)?
            }
            _ => None,
        };
        let item: Option<Vec<usize>> = io
            .dims
            .iter()
            .skip(1)
            .enumerate()
            .map(|(k, d)| match d {
                Dim::Fixed(v) => Some(*v),
                Dim::Symbolic(_) => from_data.as_ref().and_then(|s| s.get(k).copied()),
            })
            .collect();
        let item = item.ok_or_else(|| {
            Error::Capture(format!(
                "input '{}' is {}: the data gives no item shape for its symbolic dims (an image after preprocessing, or an array of that name and rank)",
                io.name,
                io.signature()
            ))
        })?;
        specs.push(InputSpec {
            name: io.name.clone(),
            dtype: io.dtype.clone(),
            item_shape: item,
        });
    }
    Ok((specs, bs.max(1)))
}

/// Where a captured tensor comes from in a run.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// A graph input: the fed value, at this index of the session inputs.
    Input(usize),
    /// A graph output of the extended model, at this index of the session outputs.
    Output(usize),
}

/// Runs `model` over the items of `spec` and calls `visit` once per batch with the values of
/// `tensors`.
///
/// `tensors` may name any float tensor of the model: node outputs (graph outputs included) and
/// graph inputs (integer and bool inputs, such as an attention mask, come converted to f32); a
/// name may appear more than once. The values come in `tensors` order, as f32 with
/// the batch axis first, together with the batch's item count. When the model has a fixed batch
/// larger than the last chunk of items, that chunk is padded by repeating its last item: the
/// arrays then hold the model's full batch and only the first `count` entries along the batch
/// axis are real.
///
/// Fails, before running anything, on a name the model does not have (naming it), on an
/// initializer, on a tensor whose inferred element type is not float, or on no items; a runtime or
/// dataset failure stops the capture with its error, as does an error returned by `visit`.
#[allow(clippy::type_complexity)]
pub fn capture(
    model: &Model,
    tensors: &[String],
    spec: &CaptureSpec,
    visit: &mut dyn FnMut(&[ArrayD<f32>], usize) -> Result<(), Error>,
) -> Result<(), Error> {
    if spec.indices.is_empty() {
        return Err(Error::Capture("no calibration items to run".into()));
    }
    let info = whittle_core::shape::infer(model, &[])
        .map_err(|e| Error::Capture(format!("shape inference: {e}")))?;
    let graph = model.graph();
    let input_names: HashSet<&str> = model.inputs().iter().map(|v| v.name()).collect();
    let produced: HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .filter(|s| !s.is_empty())
        .collect();
    let outputs: HashSet<&str> = graph.output.iter().map(|v| v.name()).collect();

    let mut extended = model.clone();
    let mut added: HashSet<&str> = HashSet::new();
    for name in tensors {
        let name = name.as_str();
        if input_names.contains(name) {
            continue;
        }
        if !produced.contains(name) {
            let reason = if model.initializer(name).is_some() {
                format!("'{name}' is an initializer (a constant), not an activation")
            } else {
                format!("the model has no tensor named '{name}'")
            };
            return Err(Error::Capture(reason));
        }
        let dtype = info
            .types
            .get(name)
            .map_or(DataType::Float as i32, |t| t.dtype);
        if dtype != DataType::Float as i32 {
            return Err(Error::Capture(format!(
                "tensor '{name}' is {}, only float tensors can be captured",
                whittle_core::tensor::dtype_name(dtype)
            )));
        }
        if outputs.contains(name) || !added.insert(name) {
            continue;
        }
        extended.graph_mut().output.push(ValueInfoProto {
            name: Some(name.to_string()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(dtype),
                    shape: None,
                })),
                denotation: None,
            }),
            ..Default::default()
        });
    }

    let opts = RuntimeOptions {
        threads: spec.threads,
        ..Default::default()
    };
    let runtime = |e: whittle_runtime::Error| Error::Runtime(e.to_string());
    let mut session =
        whittle_runtime::load(spec.runtime, &extended.to_bytes(), &opts).map_err(runtime)?;
    let sources: Vec<Source> = tensors
        .iter()
        .map(|name| {
            if let Some(i) = session.inputs().iter().position(|io| &io.name == name) {
                Ok(Source::Input(i))
            } else if let Some(k) = session.outputs().iter().position(|io| &io.name == name) {
                Ok(Source::Output(k))
            } else {
                Err(Error::Capture(format!(
                    "the runtime's session does not expose tensor '{name}'"
                )))
            }
        })
        .collect::<Result<_, _>>()?;
    let infos = session.inputs().to_vec();
    let (specs, bs) = input_specs(&infos, spec.batch, Some((spec.dataset, spec.pre)))?;

    for chunk in spec.indices.chunks(bs) {
        let batch = spec.dataset.load_batch(chunk, &specs, spec.pre)?;
        let inputs = pad_batch(&batch.inputs, chunk.len(), bs, &infos);
        let outs = session.run(&inputs).map_err(runtime)?;
        let values = sources
            .iter()
            .zip(tensors)
            .map(|(source, name)| {
                let value = match *source {
                    Source::Input(i) => &inputs[i],
                    Source::Output(k) => &outs[k],
                };
                match (value, source) {
                    (Value::F32(a), _) => Ok(a.clone()),
                    // an integer graph input (a token id, an attention mask) comes as its values
                    (Value::I64(a), Source::Input(_)) => Ok(a.mapv(|v| v as f32)),
                    (Value::I32(a), Source::Input(_)) => Ok(a.mapv(|v| v as f32)),
                    (Value::Bool(a), Source::Input(_)) => Ok(a.mapv(|v| f32::from(u8::from(v)))),
                    (other, _) => Err(Error::Capture(format!(
                        "tensor '{name}' came back as {}, not float",
                        other.dtype_name()
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        visit(&values, chunk.len())?;
    }
    Ok(())
}

/// For inputs with a fixed batch larger than the last chunk, repeats the last item to fill it.
pub fn pad_batch(inputs: &[Value], have: usize, bs: usize, infos: &[IoInfo]) -> Vec<Value> {
    let fixed = infos
        .iter()
        .any(|io| matches!(io.dims.first(), Some(Dim::Fixed(_))));
    if !fixed || have == bs {
        return inputs.to_vec();
    }
    fn pad<T: Clone>(a: &ArrayD<T>, bs: usize) -> ArrayD<T> {
        let n = a.shape()[0];
        let idx: Vec<usize> = (0..bs).map(|i| i.min(n - 1)).collect();
        a.select(Axis(0), &idx)
    }
    inputs
        .iter()
        .map(|v| match v {
            Value::F32(a) => Value::F32(pad(a, bs)),
            Value::I64(a) => Value::I64(pad(a, bs)),
            Value::I32(a) => Value::I32(pad(a, bs)),
            Value::Bool(a) => Value::Bool(pad(a, bs)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;
    use whittle_core::onnx::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};

    fn value_info(name: &str, dims: &[&str]) -> ValueInfoProto {
        whittle_core::model::float_value_info(name, dims)
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            name: Some(output.into()),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    /// x -> Relu -> h -> Add(h, c) -> y, with x of shape [batch, 2, 3].
    fn relu_add_model(batch: &str) -> Model {
        let c = whittle_core::tensor::from_f32("c", &[1], &[0.5]);
        let graph = GraphProto {
            name: Some("g".into()),
            node: vec![node("Relu", &["x"], "h"), node("Add", &["h", "c"], "y")],
            input: vec![value_info("x", &[batch, "2", "3"])],
            output: vec![value_info("y", &[batch, "2", "3"])],
            initializer: vec![c],
            ..Default::default()
        };
        let proto = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(13),
            }],
            graph: Some(graph),
            ..Default::default()
        };
        Model { proto }
    }

    fn dataset(dir: &std::path::Path, items: usize) -> (Dataset, ArrayD<f32>) {
        let data = ArrayD::from_shape_fn(IxDyn(&[items, 2, 3]), |ix| {
            (ix[0] as f32 - 2.0) * 0.7 + ix[1] as f32 * 0.3 - ix[2] as f32 * 0.45
        });
        let path = dir.join("x.npy");
        ndarray_npy::write_npy(&path, &data).expect("writes npy");
        (Dataset::open(&path).expect("opens npy"), data)
    }

    fn run(
        model: &Model,
        names: &[&str],
        data: &Dataset,
        n: usize,
    ) -> Vec<(Vec<ArrayD<f32>>, usize)> {
        let indices: Vec<usize> = (0..n).collect();
        let pre = Preprocess::default();
        let spec = CaptureSpec::ort_cpu(data, &indices, &pre, 2, 1);
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut seen = Vec::new();
        capture(model, &names, &spec, &mut |values, count| {
            seen.push((values.to_vec(), count));
            Ok(())
        })
        .expect("captures");
        seen
    }

    #[test]
    fn captures_inputs_intermediates_and_outputs_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (data, x) = dataset(dir.path(), 5);
        let model = relu_add_model("N");
        let seen = run(&model, &["y", "h", "x", "h"], &data, 5);
        assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), vec![2, 2, 1]);
        let mut start = 0;
        for (values, count) in &seen {
            let xs = x
                .slice_axis(Axis(0), (start..start + count).into())
                .to_owned();
            let h = xs.mapv(|v| v.max(0.0));
            assert_eq!(values.len(), 4);
            assert_eq!(values[0], h.mapv(|v| v + 0.5));
            assert_eq!(values[1], h);
            assert_eq!(values[2], xs);
            assert_eq!(values[3], h);
            start += count;
        }
    }

    #[test]
    fn a_fixed_batch_is_padded_and_the_true_count_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (data, x) = dataset(dir.path(), 6);
        let model = relu_add_model("4");
        let seen = run(&model, &["h"], &data, 6);
        assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), vec![4, 2]);
        let last = &seen[1].0[0];
        assert_eq!(last.shape(), &[4, 2, 3]);
        let real = x.slice_axis(Axis(0), (4..6).into()).mapv(|v| v.max(0.0));
        assert_eq!(last.slice_axis(Axis(0), (0..2).into()), real);
    }

    #[test]
    fn unknown_names_and_initializers_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (data, _) = dataset(dir.path(), 2);
        let model = relu_add_model("N");
        let indices = [0, 1];
        let pre = Preprocess::default();
        let spec = CaptureSpec::ort_cpu(&data, &indices, &pre, 2, 1);
        let mut visit = |_: &[ArrayD<f32>], _: usize| Ok(());
        let err = capture(&model, &["nope".into()], &spec, &mut visit).unwrap_err();
        assert_eq!(
            err.to_string(),
            "capture: the model has no tensor named 'nope'"
        );
        let err = capture(&model, &["c".into()], &spec, &mut visit).unwrap_err();
        assert!(err.to_string().contains("'c' is an initializer"), "{err}");
    }
}
