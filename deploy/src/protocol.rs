//! The host <-> board runner protocol: prost messages from `deploy/proto/runner.proto`, framed.
//!
//! A frame is a u32 little-endian payload length, a u32 little-endian CRC-32 (IEEE) of the
//! payload, then the payload: one encoded [`pb::Frame`]. The host sends [`Message::Request`]s; for
//! each the runner answers with zero or more [`Message::Progress`], then exactly one
//! [`Message::Result`] or [`Message::Error`]. A [`Message::Ping`] is answered by a
//! [`Message::Pong`], and a [`Message::Chunk`] of an upload (serial links) by a
//! [`Message::ChunkAck`] or an Error.
//!
//! Reading never panics on bad input: a frame longer than the caller's cap, a checksum that does
//! not match, a payload that is not a `Frame`, or input that ends inside a frame is a
//! [`ProtocolError`] naming what was wrong.

use std::io::{Read, Write};

use prost::Message as _;
use whittle_core::Value;
use whittle_runtime::{BenchStats, ProviderInfo};

/// Types generated from `deploy/proto/runner.proto` (package `whittle.runner`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/whittle.runner.rs"));
}

/// One message on the wire: the body of a [`pb::Frame`].
pub type Message = pb::frame::Body;

/// Bytes before the payload: length and checksum.
pub const HEADER_BYTES: usize = 8;

/// The default cap on a payload: 1 GiB (a request may carry the model itself).
pub const MAX_FRAME_BYTES: u32 = 1 << 30;

/// What can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The input ended inside a frame.
    #[error("truncated frame: the input ended after {got} of {expected} {part} bytes")]
    Truncated {
        /// `header` or `payload`.
        part: &'static str,
        /// Bytes that part needs.
        expected: usize,
        /// Bytes that came.
        got: usize,
    },
    /// The length field is over the cap.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The length the header gave.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The payload's CRC-32 does not match the header.
    #[error("frame checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    Checksum {
        /// The checksum in the header.
        expected: u32,
        /// The checksum of the payload as received.
        actual: u32,
    },
    /// The payload is not an encoded `Frame`, or carries no message.
    #[error("undecodable frame payload: {0}")]
    Decode(String),
    /// Bytes follow the frame in a buffer that should hold exactly one.
    #[error("{0} bytes after the end of the frame")]
    TrailingBytes(usize),
    /// Reading or writing the stream failed.
    #[error("{context}: {message}")]
    Io {
        /// `reading a frame` or `writing a frame`.
        context: &'static str,
        /// What the system said.
        message: String,
    },
}

/// The frame of `msg`: header and payload, ready to write.
pub fn encode_frame(msg: &Message) -> Vec<u8> {
    let payload = pb::Frame {
        body: Some(msg.clone()),
    }
    .encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Writes the frame of `msg` and flushes.
pub fn write_frame(w: &mut dyn Write, msg: &Message) -> Result<(), ProtocolError> {
    let io = |e: std::io::Error| ProtocolError::Io {
        context: "writing a frame",
        message: e.to_string(),
    };
    w.write_all(&encode_frame(msg)).map_err(io)?;
    w.flush().map_err(io)
}

/// Reads one frame whose payload is at most `max_len` bytes.
///
/// `Ok(None)` when the input ends cleanly before a frame starts; an end anywhere inside a frame is
/// [`ProtocolError::Truncated`]. A bad checksum or payload consumes exactly that frame, so the next
/// call reads the next one; after [`ProtocolError::TooLarge`] the stream position is unknown.
pub fn decode_frame(r: &mut dyn Read, max_len: u32) -> Result<Option<Message>, ProtocolError> {
    let mut header = [0u8; HEADER_BYTES];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_BYTES {
        return Err(ProtocolError::Truncated {
            part: "header",
            expected: HEADER_BYTES,
            got,
        });
    }
    let (len, crc) = split_header(&header);
    if len > max_len {
        return Err(ProtocolError::TooLarge {
            len: u64::from(len),
            max: u64::from(max_len),
        });
    }
    let mut payload = Vec::new();
    let got = r
        .take(u64::from(len))
        .read_to_end(&mut payload)
        .map_err(|e| ProtocolError::Io {
            context: "reading a frame",
            message: e.to_string(),
        })?;
    if got < len as usize {
        return Err(ProtocolError::Truncated {
            part: "payload",
            expected: len as usize,
            got,
        });
    }
    decode_payload(&payload, crc).map(Some)
}

/// Decodes a buffer that holds exactly one frame (header and payload) of at most
/// [`MAX_FRAME_BYTES`]. This is the entry point of the protocol's fuzz target.
pub fn decode_message(bytes: &[u8]) -> Result<Message, ProtocolError> {
    if bytes.len() < HEADER_BYTES {
        return Err(ProtocolError::Truncated {
            part: "header",
            expected: HEADER_BYTES,
            got: bytes.len(),
        });
    }
    let (header, rest) = bytes.split_at(HEADER_BYTES);
    let header: [u8; HEADER_BYTES] = header
        .try_into()
        .unwrap_or_else(|_| unreachable!("split at HEADER_BYTES"));
    let (len, crc) = split_header(&header);
    if len > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge {
            len: u64::from(len),
            max: u64::from(MAX_FRAME_BYTES),
        });
    }
    let len = len as usize;
    if rest.len() < len {
        return Err(ProtocolError::Truncated {
            part: "payload",
            expected: len,
            got: rest.len(),
        });
    }
    if rest.len() > len {
        return Err(ProtocolError::TrailingBytes(rest.len() - len));
    }
    decode_payload(rest, crc)
}

fn split_header(header: &[u8; HEADER_BYTES]) -> (u32, u32) {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    (len, crc)
}

fn decode_payload(payload: &[u8], expected: u32) -> Result<Message, ProtocolError> {
    let actual = crc32fast::hash(payload);
    if actual != expected {
        return Err(ProtocolError::Checksum { expected, actual });
    }
    pb::Frame::decode(payload)
        .map_err(|e| ProtocolError::Decode(e.to_string()))?
        .body
        .ok_or_else(|| ProtocolError::Decode("the frame carries no message".to_string()))
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(ProtocolError::Io {
                    context: "reading a frame",
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(got)
}

/// The checksum of one output: dtype, shape, and the sum and sum of squares of its elements in
/// f64, row-major. The runner and the host compute it with this same function.
pub fn output_checksum(name: &str, value: &Value) -> pb::OutputChecksum {
    let (mut sum, mut sum_squares) = (0.0f64, 0.0f64);
    let mut add = |v: f64| {
        sum += v;
        sum_squares += v * v;
    };
    match value {
        Value::F32(a) => a.iter().for_each(|&v| add(f64::from(v))),
        Value::I64(a) => a.iter().for_each(|&v| add(v as f64)),
        Value::I32(a) => a.iter().for_each(|&v| add(f64::from(v))),
        Value::Bool(a) => a.iter().for_each(|&v| add(if v { 1.0 } else { 0.0 })),
    }
    pb::OutputChecksum {
        name: name.to_string(),
        dtype: value.dtype_name().to_string(),
        shape: value.shape().iter().map(|&d| d as u64).collect(),
        sum,
        sum_squares,
    }
}

impl pb::Result {
    /// The latency statistics this result carries (`min`/`max` included).
    pub fn stats(&self) -> BenchStats {
        BenchStats {
            iters: self.iters as usize,
            mean_ms: self.mean_ms,
            p50_ms: self.p50_ms,
            p90_ms: self.p90_ms,
            p99_ms: self.p99_ms,
            min_ms: self.min_ms,
            max_ms: self.max_ms,
            fps: self.fps,
            cpu_ms: None,
        }
    }

    /// The execution provider this result ran on (empty names when the runner sent none).
    pub fn provider_info(&self) -> ProviderInfo {
        let p = self.provider.clone().unwrap_or_default();
        ProviderInfo {
            requested: p.requested,
            actual: p.actual,
            fallback: p.fallback,
            reason: (!p.reason.is_empty()).then_some(p.reason),
        }
    }

    /// The input shapes used, as `(name, dims)`.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.input_shapes
            .iter()
            .map(pb::InputShape::to_pair)
            .collect()
    }
}

impl From<&ProviderInfo> for pb::Provider {
    fn from(p: &ProviderInfo) -> Self {
        pb::Provider {
            requested: p.requested.clone(),
            actual: p.actual.clone(),
            fallback: p.fallback,
            reason: p.reason.clone().unwrap_or_default(),
        }
    }
}

impl pb::InputShape {
    /// A shape message from a name and dims.
    pub fn new(name: &str, dims: &[usize]) -> Self {
        pb::InputShape {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as u64).collect(),
        }
    }

    /// `(name, dims)`; a dim beyond `usize` saturates (and is then refused as too large).
    pub fn to_pair(&self) -> (String, Vec<usize>) {
        let dims = self
            .dims
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect();
        (self.name.clone(), dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn request() -> Message {
        Message::Request(pb::Request {
            id: 7,
            name: "resnet8".into(),
            model: Some(pb::request::Model::ModelBytes(vec![1, 2, 3, 250])),
            runtime: "ort-cpu".into(),
            threads: Some(2),
            warmup: 3,
            iters: 10,
            max_seconds: Some(1.5),
            input_shapes: vec![pb::InputShape::new("input", &[1, 3, 32, 32])],
            allow_fallback: true,
            ort_library: String::new(),
            tensorrt_fp16: Some(false),
            tensorrt_cache_dir: "/var/cache/trt".into(),
            tensorrt_workspace_bytes: Some(1 << 30),
        })
    }

    fn result() -> Message {
        Message::Result(pb::Result {
            id: 7,
            iters: 10,
            mean_ms: 1.25,
            p50_ms: 1.0,
            p90_ms: 2.0,
            p99_ms: 3.0,
            min_ms: 0.5,
            max_ms: 3.5,
            fps: 800.0,
            peak_rss_bytes: Some(1 << 20),
            provider: Some(pb::Provider {
                requested: "CUDAExecutionProvider".into(),
                actual: "CPUExecutionProvider".into(),
                fallback: true,
                reason: "not in this build".into(),
            }),
            input_shapes: vec![pb::InputShape::new("input", &[1, 3, 32, 32])],
            outputs: vec![output_checksum(
                "y",
                &Value::F32(ArrayD::from_elem(IxDyn(&[1, 2]), 0.5)),
            )],
            load_ms: Some(1234.5),
            first_run_ms: Some(56.25),
        })
    }

    #[test]
    fn every_message_round_trips_through_a_stream() {
        let msgs = [
            request(),
            Message::Progress(pb::Progress {
                id: 7,
                done: 4,
                total: 13,
            }),
            result(),
            Message::Error(pb::Error {
                id: 7,
                message: "invalid model: no graph".into(),
            }),
            Message::Ping(pb::Ping { id: 8 }),
            Message::Pong(pb::Pong {
                id: 8,
                runner: "whittle-runner 0.1.0".into(),
                upload_dir: "/tmp/whittle-runner".into(),
            }),
            Message::Chunk(pb::Chunk {
                id: 9,
                name: "m.onnx".into(),
                size: 10,
                crc32: 0xdead_beef,
                offset: 4,
                data: vec![1, 2, 3],
            }),
            Message::ChunkAck(pb::ChunkAck {
                id: 9,
                offset: 7,
                path: String::new(),
            }),
        ];
        let mut stream = Vec::new();
        for m in &msgs {
            write_frame(&mut stream, m).expect("write to a Vec");
        }
        let mut r = stream.as_slice();
        for m in &msgs {
            assert_eq!(
                decode_frame(&mut r, MAX_FRAME_BYTES).expect("decodes"),
                Some(m.clone())
            );
        }
        assert_eq!(
            decode_frame(&mut r, MAX_FRAME_BYTES).expect("clean end"),
            None
        );
        for m in &msgs {
            assert_eq!(decode_message(&encode_frame(m)).expect("decodes"), *m);
        }
    }

    #[test]
    fn a_flipped_payload_bit_is_a_checksum_error_and_the_stream_goes_on() {
        let mut bad = encode_frame(&request());
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        let err = decode_message(&bad).unwrap_err();
        assert!(matches!(err, ProtocolError::Checksum { .. }), "{err}");
        assert!(
            err.to_string().starts_with("frame checksum mismatch"),
            "{err}"
        );

        let mut stream = bad.clone();
        stream.extend(encode_frame(&result()));
        let mut r = stream.as_slice();
        assert!(matches!(
            decode_frame(&mut r, MAX_FRAME_BYTES),
            Err(ProtocolError::Checksum { .. })
        ));
        assert_eq!(
            decode_frame(&mut r, MAX_FRAME_BYTES).expect("next"),
            Some(result())
        );
    }

    #[test]
    fn truncated_frames_are_errors_at_every_cut() {
        let frame = encode_frame(&result());
        for cut in 1..frame.len() {
            let part = &frame[..cut];
            let err = decode_message(part).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Truncated { .. }),
                "cut {cut}: {err}"
            );
            let err = decode_frame(&mut &part[..], MAX_FRAME_BYTES).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
        assert_eq!(
            decode_message(&frame[..5]).unwrap_err().to_string(),
            "truncated frame: the input ended after 5 of 8 header bytes"
        );
        assert_eq!(
            decode_message(&[]).unwrap_err().to_string(),
            "truncated frame: the input ended after 0 of 8 header bytes"
        );
    }

    #[test]
    fn oversize_frames_are_refused_before_reading_the_payload() {
        let mut frame = u32::MAX.to_le_bytes().to_vec();
        frame.extend([0; 4]);
        let err = decode_message(&frame).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "frame of {} bytes is over the limit of {MAX_FRAME_BYTES} bytes",
                u32::MAX
            )
        );
        let small = encode_frame(&request());
        let err = decode_frame(&mut small.as_slice(), 4).unwrap_err();
        assert!(
            matches!(err, ProtocolError::TooLarge { max: 4, .. }),
            "{err}"
        );
    }

    #[test]
    fn garbage_with_a_valid_checksum_is_a_decode_error() {
        for payload in [&[][..], &[0xff, 0xff, 0xff][..], &[0x0a, 0x05, 0x01][..]] {
            let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
            frame.extend(crc32fast::hash(payload).to_le_bytes());
            frame.extend(payload);
            let err = decode_message(&frame).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Decode(_)),
                "{payload:?}: {err}"
            );
        }
        let mut frame = encode_frame(&request());
        frame.push(0);
        assert!(matches!(
            decode_message(&frame),
            Err(ProtocolError::TrailingBytes(1))
        ));
    }

    #[test]
    fn mutated_payloads_with_valid_checksums_never_panic() {
        // A small deterministic stand-in for the fuzz target: flip bytes of real payloads, fix
        // the checksum so that the protobuf decoder sees them, and decode.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for msg in [request(), result()] {
            let frame = encode_frame(&msg);
            for _ in 0..2000 {
                let mut payload = frame[HEADER_BYTES..].to_vec();
                for _ in 0..1 + next() % 4 {
                    let i = (next() % payload.len() as u64) as usize;
                    payload[i] = next() as u8;
                }
                let cut = (next() % (payload.len() as u64 + 1)) as usize;
                payload.truncate(cut.max(payload.len() / 2));
                let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
                bytes.extend(crc32fast::hash(&payload).to_le_bytes());
                bytes.extend(&payload);
                let _ = decode_message(&bytes);
                let _ = decode_frame(&mut bytes.as_slice(), MAX_FRAME_BYTES);
            }
        }
    }

    #[test]
    fn checksums_and_conversions() {
        let v = Value::F32(
            ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![1.0, -2.0, 0.5]).expect("shape"),
        );
        let c = output_checksum("y", &v);
        assert_eq!(
            (c.dtype.as_str(), c.shape.as_slice()),
            ("float", &[1u64, 3][..])
        );
        assert_eq!((c.sum, c.sum_squares), (-0.5, 5.25));
        let c = output_checksum("m", &Value::Bool(ArrayD::from_elem(IxDyn(&[2]), true)));
        assert_eq!((c.sum, c.sum_squares), (2.0, 2.0));

        let Message::Result(r) = result() else {
            unreachable!()
        };
        let p = r.provider_info();
        assert!(p.fallback);
        assert_eq!(p.reason.as_deref(), Some("not in this build"));
        assert_eq!(
            pb::Provider::from(&p),
            r.provider.clone().expect("provider")
        );
        assert_eq!(r.stats().p99_ms, 3.0);
        assert_eq!(r.shapes(), vec![("input".to_string(), vec![1, 3, 32, 32])]);
    }
}
