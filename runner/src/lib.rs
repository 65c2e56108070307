//! whittle's board runner: the small program `whittle deploy` starts on a board.
//!
//! It reads [`Request`](whittle_deploy::protocol::pb::Request) frames on its input, and for each
//! loads the model in the requested runtime, builds synthetic inputs (the shapes asked for, other
//! symbolic dims 1), runs the model once for the output checksums, then warm-up and timed runs with
//! [`whittle_deploy::bench`]. It answers with Progress frames and one Result, or one Error frame
//! with the runtime's own text, and then serves the next request, until its input closes. Its
//! output carries frames only; anything it has to say goes to stderr.

use std::io::{Read, Write};
use std::path::Path;

use whittle_core::Value;
use whittle_deploy::protocol::{
    MAX_FRAME_BYTES, Message, ProtocolError, decode_frame, output_checksum, pb, write_frame,
};
use whittle_deploy::{BenchConfig, RuntimeKind, RuntimeOptions};

/// The most elements one synthetic input may have (a bad shape must not exhaust the board).
pub const MAX_INPUT_ELEMENTS: usize = 1 << 28;

/// Progress frames per request, at most (plus the last one).
const PROGRESS_FRAMES: u64 = 20;

/// Serves requests from `input` until it ends, answering on `output`.
///
/// A request that fails gets an Error frame and the runner goes on. A frame with a bad checksum or
/// payload gets an Error frame with id 0 and the runner reads on; input that ends inside a frame,
/// an oversize frame, or an output that cannot be written ends the loop with that error.
pub fn serve(input: &mut dyn Read, output: &mut dyn Write) -> Result<(), ProtocolError> {
    loop {
        let req = match decode_frame(input, MAX_FRAME_BYTES) {
            Ok(None) => return Ok(()),
            Ok(Some(Message::Request(req))) => req,
            Ok(Some(other)) => {
                let message = format!("expected a request, got {}", kind(&other));
                write_frame(output, &Message::Error(pb::Error { id: 0, message }))?;
                continue;
            }
            Err(e @ (ProtocolError::Checksum { .. } | ProtocolError::Decode(_))) => {
                let message = format!("bad request frame: {e}");
                write_frame(output, &Message::Error(pb::Error { id: 0, message }))?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let id = req.id;
        let mut progress_err = None;
        let answer = handle(&req, &mut |done, total| {
            if progress_err.is_none() {
                let msg = Message::Progress(pb::Progress { id, done, total });
                if let Err(e) = write_frame(output, &msg) {
                    progress_err = Some(e);
                }
            }
        });
        if let Some(e) = progress_err {
            return Err(e);
        }
        let msg = match answer {
            Ok(result) => Message::Result(result),
            Err(message) => Message::Error(pb::Error { id, message }),
        };
        write_frame(output, &msg)?;
    }
}

fn kind(msg: &Message) -> &'static str {
    match msg {
        Message::Request(_) => "a request",
        Message::Progress(_) => "a progress frame",
        Message::Result(_) => "a result",
        Message::Error(_) => "an error frame",
    }
}

/// Runs one request; `Err` is the one-line text of the Error frame.
pub fn handle(
    req: &pb::Request,
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<pb::Result, String> {
    let runtime: RuntimeKind = req.runtime.parse().map_err(|e| format!("{e}"))?;
    let bytes = match &req.model {
        Some(pb::request::Model::ModelBytes(b)) => std::borrow::Cow::Borrowed(b.as_slice()),
        Some(pb::request::Model::ModelPath(p)) => std::borrow::Cow::Owned(
            std::fs::read(p).map_err(|e| format!("cannot read model {p}: {e}"))?,
        ),
        None => return Err("the request carries no model (neither bytes nor a path)".into()),
    };
    if !req.ort_library.is_empty() && runtime != RuntimeKind::Tract {
        whittle_deploy::init_ort_from(Path::new(&req.ort_library)).map_err(|e| e.to_string())?;
    }
    let input_shapes: Vec<(String, Vec<usize>)> = req
        .input_shapes
        .iter()
        .map(pb::InputShape::to_pair)
        .collect();
    for (name, dims) in &input_shapes {
        let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if n.is_none_or(|n| n > MAX_INPUT_ELEMENTS) {
            return Err(format!(
                "shape for input '{name}': {dims:?} has more than {MAX_INPUT_ELEMENTS} elements"
            ));
        }
    }
    let opts = RuntimeOptions {
        threads: req.threads.map(|t| t as usize),
        allow_fallback: req.allow_fallback,
        input_shapes: input_shapes.clone(),
        tensorrt_cache_dir: None,
    };
    let cfg = BenchConfig {
        warmup: req.warmup as usize,
        iters: req.iters as usize,
        max_seconds: req.max_seconds,
    };
    reset_peak_rss();
    let mut session = whittle_deploy::load(runtime, &bytes, &opts).map_err(|e| {
        if req.name.is_empty() {
            e.to_string()
        } else {
            format!("{}: {e}", req.name)
        }
    })?;
    drop(bytes);
    let inputs = whittle_deploy::synthetic_inputs(session.inputs(), &input_shapes)
        .map_err(|e| e.to_string())?;
    for (info, value) in session.inputs().iter().zip(&inputs) {
        let n: usize = value.shape().iter().product();
        if n > MAX_INPUT_ELEMENTS {
            return Err(format!(
                "input '{}' would have {n} elements, more than {MAX_INPUT_ELEMENTS}",
                info.name
            ));
        }
    }
    let outputs: Vec<Value> = session.run(&inputs).map_err(|e| e.to_string())?;
    let checksums = session
        .outputs()
        .iter()
        .zip(&outputs)
        .map(|(info, v)| output_checksum(&info.name, v))
        .collect();
    drop(outputs);
    let total = (cfg.warmup + cfg.iters) as u64;
    let step = total.div_ceil(PROGRESS_FRAMES).max(1);
    let stats = whittle_deploy::bench(session.as_mut(), &inputs, &cfg, &mut |done, total| {
        let (done, total) = (done as u64, total as u64);
        if done % step == 0 || done == total {
            on_progress(done, total);
        }
    })
    .map_err(|e| e.to_string())?;
    Ok(pb::Result {
        id: req.id,
        iters: stats.iters as u64,
        mean_ms: stats.mean_ms,
        p50_ms: stats.p50_ms,
        p90_ms: stats.p90_ms,
        p99_ms: stats.p99_ms,
        min_ms: stats.min_ms,
        max_ms: stats.max_ms,
        fps: stats.fps,
        peak_rss_bytes: whittle_deploy::peak_rss_bytes(),
        provider: Some(session.provider().into()),
        input_shapes: session
            .inputs()
            .iter()
            .zip(&inputs)
            .map(|(info, v)| pb::InputShape::new(&info.name, v.shape()))
            .collect(),
        outputs: checksums,
    })
}

/// Resets this process's peak RSS (`VmHWM`) so that a result reports its own request's peak
/// (Linux: writing 5 to `/proc/self/clear_refs`; elsewhere, or when refused, it keeps growing).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;
    use whittle_deploy::protocol::encode_frame;

    fn answers(input: Vec<u8>) -> (Result<(), ProtocolError>, Vec<Message>) {
        let mut out = Vec::new();
        let r = serve(&mut input.as_slice(), &mut out);
        let mut frames = Vec::new();
        let mut s = out.as_slice();
        while let Some(m) = decode_frame(&mut s, MAX_FRAME_BYTES).expect("runner output decodes") {
            frames.push(m);
        }
        (r, frames)
    }

    #[test]
    fn bad_requests_get_error_frames_and_the_loop_goes_on() {
        let req = |id, runtime: &str, model| {
            Message::Request(pb::Request {
                id,
                name: "m".into(),
                runtime: runtime.into(),
                model,
                iters: 1,
                ..Default::default()
            })
        };
        let mut input = encode_frame(&req(1, "onnxruntime", None));
        input.extend(encode_frame(&req(2, "tract", None)));
        let mut corrupt = encode_frame(&req(3, "tract", None));
        corrupt[HEADER_LAST] ^= 0xff;
        input.extend(corrupt);
        input.extend(encode_frame(&Message::Progress(pb::Progress::default())));
        input.extend(encode_frame(&req(
            5,
            "tract",
            Some(pb::request::Model::ModelPath("/nonexistent/m.onnx".into())),
        )));
        input.extend(encode_frame(&req(
            6,
            "tract",
            Some(pb::request::Model::ModelBytes(b"not onnx".to_vec())),
        )));
        let (r, frames) = answers(input);
        assert!(r.is_ok(), "{r:?}");
        let errors: Vec<(u64, String)> = frames
            .into_iter()
            .map(|m| match m {
                Message::Error(e) => (e.id, e.message),
                other => panic!("expected only errors, got {other:?}"),
            })
            .collect();
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert_eq!(errors[0].0, 1);
        assert!(
            errors[0].1.starts_with("unknown runtime 'onnxruntime'"),
            "{errors:?}"
        );
        assert!(errors[1].1.contains("carries no model"), "{errors:?}");
        assert_eq!(errors[2].0, 0);
        assert!(errors[2].1.contains("checksum mismatch"), "{errors:?}");
        assert!(
            errors[3]
                .1
                .contains("expected a request, got a progress frame")
        );
        assert!(errors[4].1.contains("/nonexistent/m.onnx"), "{errors:?}");
        assert_eq!(errors[5].0, 6);
        assert!(errors[5].1.starts_with("m: "), "{errors:?}");
    }

    /// The last header byte (the checksum's high byte).
    const HEADER_LAST: usize = whittle_deploy::protocol::HEADER_BYTES - 1;

    #[test]
    fn truncated_input_ends_the_loop_with_an_error() {
        let mut input = encode_frame(&Message::Request(pb::Request::default()));
        input.truncate(input.len() - 1);
        let (r, frames) = answers(input);
        assert!(matches!(r, Err(ProtocolError::Truncated { .. })), "{r:?}");
        assert!(frames.is_empty());
    }
}
