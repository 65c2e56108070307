//! whittle's board runner: the small program `whittle deploy` starts on a board.
//!
//! It reads [`Request`](whittle_deploy::protocol::pb::Request) frames on its input, and for each
//! loads the model in the requested runtime, builds synthetic inputs (the shapes asked for, other
//! symbolic dims 1), runs the model once for the output checksums, then warm-up and timed runs with
//! [`whittle_runtime::bench`]. Session creation (with TensorRT: the engine build, unless cached) and
//! the first run are timed apart from those runs (`load_ms`, `first_run_ms`). It answers with Progress frames and one Result, or one Error frame
//! with the runtime's own text, and then serves the next request, until its input closes. Its
//! output carries frames only; anything it has to say goes to stderr.
//!
//! It also answers Ping frames, and takes files uploaded in Chunk frames into its upload folder
//! (see [`Server`]): that is how models reach a board over a serial line, where the runner listens
//! with [`serve_serial`] (`whittle-runner --serial DEVICE`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use whittle_core::Value;
use whittle_deploy::protocol::{
    MAX_FRAME_BYTES, Message, ProtocolError, decode_frame, output_checksum, pb, write_frame,
};
use whittle_deploy::serial::{Link, LinkError, valid_upload_name};
use whittle_runtime::{BenchConfig, RuntimeKind, RuntimeOptions};

/// The most elements one synthetic input may have (a bad shape must not exhaust the board).
pub const MAX_INPUT_ELEMENTS: usize = 1 << 28;

/// Progress frames per request, at most (plus the last one).
const PROGRESS_FRAMES: u64 = 20;

/// What the runner keeps between frames: the folder that uploaded files go to.
pub struct Server {
    upload_dir: PathBuf,
}

impl Default for Server {
    fn default() -> Self {
        Server::new(Server::default_upload_dir())
    }
}

impl Server {
    /// A server that puts uploaded files in `upload_dir` (created when the first one comes).
    pub fn new(upload_dir: impl Into<PathBuf>) -> Self {
        Server {
            upload_dir: upload_dir.into(),
        }
    }

    /// `$TMPDIR/whittle-runner` (`/tmp/whittle-runner`).
    pub fn default_upload_dir() -> PathBuf {
        std::env::temp_dir().join("whittle-runner")
    }

    /// The upload folder.
    pub fn upload_dir(&self) -> &Path {
        &self.upload_dir
    }

    /// Answers one message from the host with zero or more frames passed to `send`; stops at the
    /// first error `send` returns.
    pub fn answer<E>(
        &mut self,
        msg: Message,
        send: &mut dyn FnMut(&Message) -> Result<(), E>,
    ) -> Result<(), E> {
        match msg {
            Message::Request(req) => {
                let id = req.id;
                let mut progress_err = None;
                let answer = handle(&req, &mut |done, total| {
                    if progress_err.is_none() {
                        let msg = Message::Progress(pb::Progress { id, done, total });
                        if let Err(e) = send(&msg) {
                            progress_err = Some(e);
                        }
                    }
                });
                if let Some(e) = progress_err {
                    return Err(e);
                }
                send(&match answer {
                    Ok(result) => Message::Result(result),
                    Err(message) => Message::Error(pb::Error { id, message }),
                })
            }
            Message::Ping(p) => send(&Message::Pong(pb::Pong {
                id: p.id,
                runner: format!("whittle-runner {}", env!("CARGO_PKG_VERSION")),
                upload_dir: self.upload_dir.display().to_string(),
            })),
            Message::Chunk(c) => send(&match self.chunk(&c) {
                Ok(ack) => Message::ChunkAck(ack),
                Err(message) => Message::Error(pb::Error { id: c.id, message }),
            }),
            other => {
                let message = format!("expected a request, got {}", kind(&other));
                send(&Message::Error(pb::Error { id: 0, message }))
            }
        }
    }

    /// Takes one chunk of an upload; `Err` is the one-line text of the Error frame.
    ///
    /// The bytes go to `.partial/<name>` in the upload folder, beside `.partial/<name>.meta`
    /// holding the whole file's size and CRC-32; a partial file of another size or checksum is
    /// started over. A chunk that does not start where the partial file ends is not written. Once
    /// the partial file has all its bytes and its CRC-32 matches, it becomes `<name>`. A chunk with
    /// no data asks where the upload stands; when `<name>` already holds that very file, it is
    /// complete at once.
    pub fn chunk(&mut self, c: &pb::Chunk) -> Result<pb::ChunkAck, String> {
        if !valid_upload_name(&c.name) {
            return Err(format!(
                "upload name {:?} is not a plain file name (letters, digits, `._+-`)",
                c.name
            ));
        }
        let name = &c.name;
        let io = |what: &str, p: &Path, e: std::io::Error| {
            format!("upload of {name}: {what} {}: {e}", p.display())
        };
        let partial_dir = self.upload_dir.join(".partial");
        std::fs::create_dir_all(&partial_dir).map_err(|e| io("cannot create", &partial_dir, e))?;
        let done = self.upload_dir.join(name);
        let part = partial_dir.join(name);
        let meta = partial_dir.join(format!("{name}.meta"));
        let want = format!("{} {:08x}\n", c.size, c.crc32);
        let ack = |offset: u64, path: &Path| pb::ChunkAck {
            id: c.id,
            offset,
            path: path.display().to_string(),
        };
        let same_meta = std::fs::read_to_string(&meta).is_ok_and(|m| m == want);
        let mut held = match std::fs::metadata(&part) {
            Ok(m) if same_meta && m.len() <= c.size => m.len(),
            _ => {
                if c.data.is_empty() && holds(&done, c.size, c.crc32) {
                    return Ok(ack(c.size, &done));
                }
                std::fs::write(&part, b"").map_err(|e| io("cannot write", &part, e))?;
                std::fs::write(&meta, &want).map_err(|e| io("cannot write", &meta, e))?;
                0
            }
        };
        if !c.data.is_empty() {
            if c.offset != held {
                return Ok(ack(held, Path::new("")));
            }
            let end = held.checked_add(c.data.len() as u64);
            if end.is_none_or(|end| end > c.size) {
                return Err(format!(
                    "upload of {name}: a chunk of {} bytes at {held} goes past the file's {} bytes",
                    c.data.len(),
                    c.size
                ));
            }
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&part)
                .map_err(|e| io("cannot open", &part, e))?;
            f.write_all(&c.data)
                .and_then(|()| f.sync_data())
                .map_err(|e| io("cannot write", &part, e))?;
            held += c.data.len() as u64;
        }
        if held < c.size {
            return Ok(ack(held, Path::new("")));
        }
        let bytes = std::fs::read(&part).map_err(|e| io("cannot read", &part, e))?;
        let crc = crc32fast::hash(&bytes);
        if crc != c.crc32 {
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::remove_file(&meta);
            return Err(format!(
                "upload of {name}: the {} bytes received have CRC-32 {crc:08x}, the host's file has {:08x}; the partial file was discarded",
                c.size, c.crc32
            ));
        }
        std::fs::rename(&part, &done).map_err(|e| io("cannot rename to", &done, e))?;
        let _ = std::fs::remove_file(&meta);
        Ok(ack(c.size, &done))
    }
}

/// Whether the file at `path` has `size` bytes with CRC-32 `crc32`.
fn holds(path: &Path, size: u64, crc32: u32) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size)
        && std::fs::read(path).is_ok_and(|b| crc32fast::hash(&b) == crc32)
}

/// Serves requests from `input` until it ends, answering on `output`, with uploads in
/// [`Server::default_upload_dir`].
///
/// A request that fails gets an Error frame and the runner goes on. A frame with a bad checksum or
/// payload gets an Error frame with id 0 and the runner reads on; input that ends inside a frame,
/// an oversize frame, or an output that cannot be written ends the loop with that error.
pub fn serve(input: &mut dyn Read, output: &mut dyn Write) -> Result<(), ProtocolError> {
    serve_with(&mut Server::default(), input, output)
}

/// [`serve`] with the given server (its upload folder).
pub fn serve_with(
    server: &mut Server,
    input: &mut dyn Read,
    output: &mut dyn Write,
) -> Result<(), ProtocolError> {
    loop {
        let msg = match decode_frame(input, MAX_FRAME_BYTES) {
            Ok(None) => return Ok(()),
            Ok(Some(msg)) => msg,
            Err(e @ (ProtocolError::Checksum { .. } | ProtocolError::Decode(_))) => {
                let message = format!("bad request frame: {e}");
                write_frame(output, &Message::Error(pb::Error { id: 0, message }))?;
                continue;
            }
            Err(e) => return Err(e),
        };
        server.answer(msg, &mut |m| write_frame(output, m))?;
    }
}

/// The longest wait for one read or write on the serial port (a pause inside a frame).
pub const SERIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between attempts to reopen the serial device after the link dropped.
const REOPEN_PAUSE: Duration = Duration::from_millis(200);

/// Serves frames on the serial `device` at `baud`, for ever: the runner of a board reached over a
/// serial line. A device that cannot be opened at the start is an error; after that, a dropped
/// link (a read or write error, a frame cut short) closes the device and opens it again until it
/// opens, and serving goes on (the upload folder keeps partial files, so uploads resume).
pub fn serve_serial(server: &mut Server, device: &Path, baud: u32) -> Result<(), String> {
    let mut link = Link::open(device, baud, SERIAL_TIMEOUT)
        .map_err(|e| format!("cannot open the serial port {}: {e}", device.display()))?;
    eprintln!(
        "whittle-runner: listening on {} at {baud} baud; uploads go to {}",
        device.display(),
        server.upload_dir().display()
    );
    loop {
        let lost = match link.recv(None) {
            Ok(msg) => match server.answer(msg, &mut |m| link.send(m)) {
                Ok(()) => continue,
                Err(e) => e.to_string(),
            },
            Err(LinkError::Bad(e)) => {
                let message = format!("bad frame: {e}");
                match link.send(&Message::Error(pb::Error { id: 0, message })) {
                    Ok(()) => continue,
                    Err(e) => e.to_string(),
                }
            }
            Err(LinkError::Idle) => continue,
            Err(LinkError::Lost(m)) => m,
        };
        eprintln!(
            "whittle-runner: the link dropped ({lost}); reopening {}",
            device.display()
        );
        drop(link);
        link = loop {
            std::thread::sleep(REOPEN_PAUSE);
            if let Ok(l) = Link::open(device, baud, SERIAL_TIMEOUT) {
                break l;
            }
        };
        eprintln!("whittle-runner: reopened {}", device.display());
    }
}

fn kind(msg: &Message) -> &'static str {
    match msg {
        Message::Request(_) => "a request",
        Message::Progress(_) => "a progress frame",
        Message::Result(_) => "a result",
        Message::Error(_) => "an error frame",
        Message::Ping(_) => "a ping",
        Message::Pong(_) => "a pong",
        Message::Chunk(_) => "a chunk",
        Message::ChunkAck(_) => "a chunk acknowledgement",
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
        whittle_runtime::init_ort_from(Path::new(&req.ort_library)).map_err(|e| e.to_string())?;
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
    let tensorrt_cache_dir = (!req.tensorrt_cache_dir.is_empty()
        && runtime == RuntimeKind::OrtTensorRt)
        .then(|| PathBuf::from(&req.tensorrt_cache_dir));
    if let Some(dir) = &tensorrt_cache_dir {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "cannot create the TensorRT engine cache folder {}: {e}",
                dir.display()
            )
        })?;
    }
    let opts = RuntimeOptions {
        threads: req.threads.map(|t| t as usize),
        allow_fallback: req.allow_fallback,
        input_shapes: input_shapes.clone(),
        tensorrt_cache_dir,
        tensorrt_fp16: req.tensorrt_fp16,
        tensorrt_workspace_bytes: req
            .tensorrt_workspace_bytes
            .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
    };
    let cfg = BenchConfig {
        warmup: req.warmup as usize,
        iters: req.iters as usize,
        max_seconds: req.max_seconds,
    };
    reset_peak_rss();
    let loading = std::time::Instant::now();
    let mut session = whittle_runtime::load(runtime, &bytes, &opts).map_err(|e| {
        if req.name.is_empty() {
            e.to_string()
        } else {
            format!("{}: {e}", req.name)
        }
    })?;
    let load_ms = loading.elapsed().as_secs_f64() * 1e3;
    drop(bytes);
    let inputs = whittle_runtime::synthetic_inputs(session.inputs(), &input_shapes)
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
    let first_run = std::time::Instant::now();
    let outputs: Vec<Value> = session.run(&inputs).map_err(|e| e.to_string())?;
    let first_run_ms = first_run.elapsed().as_secs_f64() * 1e3;
    let checksums = session
        .outputs()
        .iter()
        .zip(&outputs)
        .map(|(info, v)| output_checksum(&info.name, v))
        .collect();
    drop(outputs);
    let total = (cfg.warmup + cfg.iters) as u64;
    let step = total.div_ceil(PROGRESS_FRAMES).max(1);
    let stats = whittle_runtime::bench(session.as_mut(), &inputs, &cfg, &mut |done, total| {
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
        peak_rss_bytes: whittle_runtime::peak_rss_bytes(),
        provider: Some(session.provider().into()),
        input_shapes: session
            .inputs()
            .iter()
            .zip(&inputs)
            .map(|(info, v)| pb::InputShape::new(&info.name, v.shape()))
            .collect(),
        outputs: checksums,
        load_ms: Some(load_ms),
        first_run_ms: Some(first_run_ms),
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

    fn chunk(name: &str, whole: &[u8], offset: usize, len: usize) -> pb::Chunk {
        pb::Chunk {
            id: offset as u64 + 1,
            name: name.into(),
            size: whole.len() as u64,
            crc32: crc32fast::hash(whole),
            offset: offset as u64,
            data: whole[offset..offset + len].to_vec(),
        }
    }

    #[test]
    fn uploads_resume_from_the_acknowledged_offset_and_check_the_whole_file() {
        let dir = tempfile_dir("uploads");
        let whole: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut server = Server::new(&dir);
        let ask = |server: &mut Server| server.chunk(&chunk("m.onnx", &whole, 0, 0)).unwrap();
        assert_eq!(ask(&mut server).offset, 0);
        let ack = server.chunk(&chunk("m.onnx", &whole, 0, 4000)).unwrap();
        assert_eq!((ack.offset, ack.path.as_str()), (4000, ""));
        // A chunk that does not start at the held offset is not written.
        let ack = server.chunk(&chunk("m.onnx", &whole, 6000, 1000)).unwrap();
        assert_eq!(ack.offset, 4000);
        // A new runner on the same folder (the link dropped, the runner restarted) still holds 4000.
        let mut server = Server::new(&dir);
        assert_eq!(ask(&mut server).offset, 4000);
        let ack = server.chunk(&chunk("m.onnx", &whole, 4000, 6000)).unwrap();
        assert_eq!(ack.offset, 10_000);
        assert_eq!(ack.path, dir.join("m.onnx").display().to_string());
        assert_eq!(std::fs::read(dir.join("m.onnx")).unwrap(), whole);
        assert!(!dir.join(".partial/m.onnx").exists());
        // The same file asked again: complete at once.
        let ack = ask(&mut server);
        assert_eq!((ack.offset, ack.path.is_empty()), (10_000, false));

        // Another file under the same name starts over; a wrong checksum is refused and discarded.
        let mut other = whole.clone();
        other[0] ^= 1;
        let mut c = chunk("m.onnx", &other, 0, 0);
        assert_eq!(server.chunk(&c).unwrap().offset, 0);
        c.data = whole.clone();
        let e = server.chunk(&c).unwrap_err();
        assert!(e.contains("CRC-32") && e.contains("discarded"), "{e}");
        assert!(!dir.join(".partial/m.onnx").exists());
        assert_eq!(std::fs::read(dir.join("m.onnx")).unwrap(), whole);

        let e = server.chunk(&chunk("../x", &whole, 0, 0)).unwrap_err();
        assert!(e.contains("not a plain file name"), "{e}");
        let mut c = chunk("n.onnx", &whole, 0, 0);
        c.size = 10;
        c.data = vec![0; 11];
        let e = server.chunk(&c).unwrap_err();
        assert!(e.contains("goes past"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pings_and_chunks_are_answered_in_the_stream() {
        let dir = tempfile_dir("stream");
        let whole = b"0123456789".to_vec();
        let mut input = encode_frame(&Message::Ping(pb::Ping { id: 9 }));
        input.extend(encode_frame(&Message::Chunk(chunk("f.bin", &whole, 0, 10))));
        let mut out = Vec::new();
        serve_with(&mut Server::new(&dir), &mut input.as_slice(), &mut out).unwrap();
        let mut s = out.as_slice();
        let Some(Message::Pong(p)) = decode_frame(&mut s, MAX_FRAME_BYTES).unwrap() else {
            panic!("a pong first")
        };
        assert_eq!(p.id, 9);
        assert_eq!(p.upload_dir, dir.display().to_string());
        let Some(Message::ChunkAck(a)) = decode_frame(&mut s, MAX_FRAME_BYTES).unwrap() else {
            panic!("then an ack")
        };
        assert_eq!(a.offset, 10);
        assert_eq!(std::fs::read(&a.path).unwrap(), whole);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("whittle-runner-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn truncated_input_ends_the_loop_with_an_error() {
        let mut input = encode_frame(&Message::Request(pb::Request::default()));
        input.truncate(input.len() - 1);
        let (r, frames) = answers(input);
        assert!(matches!(r, Err(ProtocolError::Truncated { .. })), "{r:?}");
        assert!(frames.is_empty());
    }
}
