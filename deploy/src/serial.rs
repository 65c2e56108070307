//! Boards reached over a serial port (targets with `transport = "serial"`).
//!
//! A [`Link`] is an open serial device carrying the same frames as every other transport (see
//! [`protocol`](crate::protocol)); the runner's serial mode (`whittle-runner --serial DEVICE`) uses
//! it on the board's side, and [`Serial`] on this machine. The board shares no files with this
//! machine, so [`Serial`] uploads each model in chunks, each acknowledged with the number of bytes
//! the runner holds. When the link drops (a read or write error, a broken pipe, a timeout, a frame
//! that does not decode), the port is reopened with back-off, a bounded number of times, and the
//! upload resumes from the last acknowledged byte; the runner checks the whole file's CRC-32 before
//! it uses it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serialport::{ClearBuffer, SerialPort};

use crate::protocol::{MAX_FRAME_BYTES, Message, ProtocolError, decode_frame, encode_frame, pb};
use crate::target::{Connection, Target};
use crate::transport::{RunRequest, Sent, Transport, TransportError, send_err, wrong_transport};

/// An open serial device that carries frames.
///
/// Writes go no faster than the line's rate (`baud / 10` bytes per second: 8 data bits, start and
/// stop bit), so that a pseudo-terminal, which has no line rate, behaves like the serial line the
/// target describes, and a board without flow control is never sent a burst.
pub struct Link {
    device: PathBuf,
    port: Box<dyn SerialPort>,
    bytes_per_second: f64,
    /// When the bytes written so far have left at the line's rate.
    line_free_at: Instant,
}

/// Why [`Link::recv`] returned no message.
#[derive(Debug)]
pub enum LinkError {
    /// No frame started within the patience given (the link may be fine).
    Idle,
    /// A whole frame arrived, but its checksum or payload is bad; it was consumed and the next frame
    /// can be read.
    Bad(ProtocolError),
    /// The link failed: a read or write error (a broken pipe when the other end went away), a
    /// frame cut short or too long. Where the stream stands is unknown: reopen it.
    Lost(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Idle => write!(f, "no answer"),
            LinkError::Bad(e) => write!(f, "{e}"),
            LinkError::Lost(m) => write!(f, "{m}"),
        }
    }
}

impl Link {
    /// Opens `device` at `baud` (8N1, no flow control, exclusive); `timeout` is the longest wait for
    /// one read or write, and so the longest pause inside a frame.
    pub fn open(device: &Path, baud: u32, timeout: Duration) -> Result<Link, String> {
        let port = serialport::new(device.to_string_lossy(), baud)
            .timeout(timeout)
            .open()
            .map_err(|e| e.to_string())?;
        Ok(Link {
            device: device.to_path_buf(),
            port,
            bytes_per_second: f64::from(baud.max(1)) / 10.0,
            line_free_at: Instant::now(),
        })
    }

    /// The device path.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Drops whatever is waiting to be read (stale bytes of an earlier session).
    pub fn discard_input(&mut self) {
        let _ = self.port.clear(ClearBuffer::Input);
    }

    /// Writes the frame of `msg` at the line's rate and waits for it to leave.
    pub fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        let frame = encode_frame(msg);
        let now = Instant::now();
        if self.line_free_at > now {
            std::thread::sleep(self.line_free_at - now);
        }
        let lost = |e: std::io::Error| LinkError::Lost(format!("writing a frame: {e}"));
        self.port.write_all(&frame).map_err(lost)?;
        self.port.flush().map_err(lost)?;
        let start = self.line_free_at.max(now);
        self.line_free_at =
            start + Duration::from_secs_f64(frame.len() as f64 / self.bytes_per_second);
        Ok(())
    }

    /// Waits up to `patience` (`None`: for ever) for a frame to start, then reads it, each read
    /// waiting at most the port's timeout.
    pub fn recv(&mut self, patience: Option<Duration>) -> Result<Message, LinkError> {
        let deadline = patience.map(|p| Instant::now() + p);
        let mut first = [0u8; 1];
        loop {
            match self.port.read(&mut first) {
                Ok(1) => break,
                Ok(_) => return Err(LinkError::Lost("the device reported end of input".into())),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(LinkError::Idle);
                    }
                }
                Err(e) => return Err(LinkError::Lost(format!("reading a frame: {e}"))),
            }
        }
        let mut rest = (&first[..]).chain(&mut self.port);
        match decode_frame(&mut rest, MAX_FRAME_BYTES) {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(LinkError::Lost("the device reported end of input".into())),
            Err(e @ (ProtocolError::Checksum { .. } | ProtocolError::Decode(_))) => {
                Err(LinkError::Bad(e))
            }
            Err(e) => Err(LinkError::Lost(e.to_string())),
        }
    }
}

/// Whether `name` may be an uploaded file's name: letters, digits and `._+-`, not starting with `.`
/// or `-`, at most 200 bytes.
pub fn valid_upload_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
}

/// How a [`Serial`] transport waits, retries and cuts uploads.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialOptions {
    /// Line rate.
    pub baud: u32,
    /// The longest wait for an answer to a ping or a chunk (and for one read or write) before the
    /// link counts as dropped.
    pub timeout: Duration,
    /// The longest silence from the runner while it loads and measures a model.
    pub run_timeout: Duration,
    /// Times the port is reopened after a drop, for each upload or request (and attempts to reopen
    /// it each time), with back-off.
    pub reconnects: u32,
    /// Bytes of a file per chunk.
    pub chunk_bytes: usize,
}

/// A board's runner listening on a serial port (targets with `transport = "serial"`).
///
/// [`Transport::start`] opens the device and pings the runner. Each file is uploaded once per
/// session in chunks into the runner's upload folder (resumed after a drop, also from an earlier
/// session's partial file), and requests name the uploaded file. A request whose link drops is sent
/// again once the link is back.
pub struct Serial {
    device: PathBuf,
    opts: SerialOptions,
    link: Option<Link>,
    next_id: u64,
    /// `whittle-runner <version>` and its upload folder, from the last Pong.
    runner: Option<pb::Pong>,
    /// Files uploaded this session.
    sent: Sent,
    /// Drops and resumes, one line each.
    events: Vec<String>,
}

/// Why an exchange failed: the link (reopen and go on), or for good.
enum Fail {
    Lost(String),
    Fatal(TransportError),
}

impl From<TransportError> for Fail {
    fn from(e: TransportError) -> Self {
        Fail::Fatal(e)
    }
}

impl Serial {
    /// A transport to the runner on `device` (nothing is opened yet).
    pub fn new(device: impl Into<PathBuf>, opts: SerialOptions) -> Self {
        Serial {
            device: device.into(),
            opts,
            link: None,
            next_id: 1,
            runner: None,
            sent: Sent::default(),
            events: Vec::new(),
        }
    }

    /// The transport for a serial target: its `device`, `baud`, timeouts, reconnects and chunk
    /// size.
    pub fn for_target(target: &Target) -> Result<Self, TransportError> {
        let Connection::Serial(c) = &target.connection else {
            return Err(wrong_transport(target, "serial"));
        };
        Ok(Serial::new(c.device.clone(), c.options()))
    }

    /// What answered the last ping: `whittle-runner <version>, uploads in <folder>`.
    pub fn describe(&self) -> String {
        match &self.runner {
            Some(p) => format!(
                "{} on {} at {} baud, uploads in {}",
                p.runner,
                self.device.display(),
                self.opts.baud,
                p.upload_dir
            ),
            None => format!("{} (not reached yet)", self.device.display()),
        }
    }

    fn error(&self, message: impl Into<String>) -> TransportError {
        TransportError::Serial {
            device: self.device.clone(),
            message: message.into(),
        }
    }

    fn note(&mut self, line: String) {
        eprintln!("serial {}: {line}", self.device.display());
        self.events.push(line);
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn link(&mut self) -> Result<&mut Link, Fail> {
        self.link
            .as_mut()
            .ok_or_else(|| Fail::Lost("the port is closed".into()))
    }

    fn send_msg(&mut self, msg: &Message) -> Result<(), Fail> {
        self.link()?
            .send(msg)
            .map_err(|e| Fail::Lost(e.to_string()))
    }

    /// The next frame, waiting at most `patience` for it to start.
    fn recv_msg(&mut self, patience: Duration) -> Result<Message, Fail> {
        match self.link()?.recv(Some(patience)) {
            Ok(m) => Ok(m),
            Err(LinkError::Idle) => Err(Fail::Lost(format!(
                "no answer from the runner within {:.1} s",
                patience.as_secs_f64()
            ))),
            Err(e) => Err(Fail::Lost(e.to_string())),
        }
    }

    /// Pings the runner on the open link; frames for other ids (stale answers) are skipped.
    fn handshake(&mut self) -> Result<(), Fail> {
        let id = self.id();
        self.send_msg(&Message::Ping(pb::Ping { id }))?;
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_msg(left)? {
                Message::Pong(p) if p.id == id => {
                    self.runner = Some(p);
                    return Ok(());
                }
                _ => continue,
            }
        }
    }

    /// Opens the device and pings the runner.
    fn connect(&mut self) -> Result<(), Fail> {
        let link = Link::open(&self.device, self.opts.baud, self.opts.timeout)
            .map_err(|e| Fail::Fatal(self.error(format!("cannot open the serial port: {e}"))))?;
        self.link = Some(link);
        self.handshake()
    }

    /// Closes the port and opens it again, up to `reconnects` times with back-off (0.25 s,
    /// doubling, at most 4 s), each time pinging the runner.
    fn reconnect(&mut self, cause: &str) -> Result<(), TransportError> {
        self.link = None;
        let started = Instant::now();
        let mut last = String::new();
        for attempt in 1..=self.opts.reconnects {
            let wait = Duration::from_millis(250u64 << (attempt - 1).min(4));
            std::thread::sleep(wait);
            match Link::open(&self.device, self.opts.baud, self.opts.timeout) {
                Err(e) => last = format!("cannot open the serial port: {e}"),
                Ok(mut link) => {
                    link.discard_input();
                    self.link = Some(link);
                    match self.handshake() {
                        Ok(()) => {
                            self.note(format!(
                                "reopened after {:.1} s (attempt {attempt} of {})",
                                started.elapsed().as_secs_f64(),
                                self.opts.reconnects
                            ));
                            return Ok(());
                        }
                        Err(Fail::Lost(m)) => last = m,
                        Err(Fail::Fatal(e)) => return Err(e),
                    }
                    self.link = None;
                }
            }
        }
        Err(self.error(format!(
            "the link dropped ({cause}) and did not come back: {} attempts to reopen it over {:.1} s, the last one: {last}",
            self.opts.reconnects,
            started.elapsed().as_secs_f64()
        )))
    }

    /// Sends one chunk and waits for its acknowledgement.
    fn chunk(
        &mut self,
        name: &str,
        size: u64,
        crc32: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<pb::ChunkAck, Fail> {
        let id = self.id();
        self.send_msg(&Message::Chunk(pb::Chunk {
            id,
            name: name.to_string(),
            size,
            crc32,
            offset,
            data: data.to_vec(),
        }))?;
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_msg(left)? {
                Message::ChunkAck(a) if a.id == id => return Ok(a),
                Message::Error(e) if e.id == id => {
                    return Err(Fail::Fatal(TransportError::Remote(e.message)));
                }
                _ => continue,
            }
        }
    }

    /// One pass of an upload: asks where it stands, then sends the rest.
    fn upload_pass(
        &mut self,
        name: &str,
        bytes: &[u8],
        crc32: u32,
        acked: &mut u64,
        resumed: bool,
        on_progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PathBuf, Fail> {
        let size = bytes.len() as u64;
        let mut ack = self.chunk(name, size, crc32, 0, &[])?;
        if resumed {
            let line = format!(
                "resumed the upload of {name} at byte {} of {size}",
                ack.offset
            );
            self.note(line);
        } else if ack.offset > 0 && ack.path.is_empty() {
            let line = format!(
                "the board holds {} of {size} bytes of {name} from an earlier upload: resuming there",
                ack.offset
            );
            self.note(line);
        }
        let mut stalled = 0;
        loop {
            if ack.offset > size {
                return Err(Fail::Fatal(self.error(format!(
                    "the runner acknowledged {} bytes of {name}, which has {size}",
                    ack.offset
                ))));
            }
            *acked = ack.offset;
            on_progress(ack.offset, size);
            if !ack.path.is_empty() {
                return Ok(PathBuf::from(ack.path));
            }
            let start = ack.offset as usize;
            let end = (start + self.opts.chunk_bytes.max(1)).min(bytes.len());
            let next = self.chunk(name, size, crc32, ack.offset, &bytes[start..end])?;
            if next.offset != end as u64 && next.path.is_empty() {
                // The runner holds another amount than we thought: go on from there, but not for
                // ever.
                stalled += 1;
                if stalled > 3 {
                    return Err(Fail::Lost(format!(
                        "the runner keeps acknowledging byte {} of {name} instead of {end}",
                        next.offset
                    )));
                }
            }
            ack = next;
        }
    }

    /// Uploads `bytes` as `name`, reopening the link and resuming after drops.
    fn upload(
        &mut self,
        name: &str,
        bytes: &[u8],
        on_progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PathBuf, TransportError> {
        let crc32 = crc32fast::hash(bytes);
        let mut drops = 0;
        let mut acked = 0u64;
        loop {
            match self.upload_pass(name, bytes, crc32, &mut acked, drops > 0, on_progress) {
                Ok(path) => return Ok(path),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Lost(cause)) => {
                    if drops >= self.opts.reconnects {
                        return Err(self.error(format!(
                            "the upload of {name} failed: the link dropped {} times, the last time: {cause}",
                            drops + 1
                        )));
                    }
                    drops += 1;
                    let line = format!(
                        "the link dropped during the upload of {name} with {acked} of {} bytes acknowledged ({cause}); reopening",
                        bytes.len()
                    );
                    self.note(line);
                    self.reconnect(&cause)?;
                }
            }
        }
    }

    /// Sends a request and waits for its answer on the open link.
    fn request_once(
        &mut self,
        req: &pb::Request,
        on_progress: &mut dyn FnMut(u64, u64),
    ) -> Result<pb::Result, Fail> {
        let id = req.id;
        self.send_msg(&Message::Request(req.clone()))?;
        loop {
            match self.recv_msg(self.opts.run_timeout)? {
                Message::Progress(p) if p.id == id => on_progress(p.done, p.total),
                Message::Result(r) if r.id == id => return Ok(r),
                Message::Error(e) if e.id == id => {
                    return Err(Fail::Fatal(TransportError::Remote(e.message)));
                }
                _ => continue,
            }
        }
    }
}

impl Transport for Serial {
    fn send_file(&mut self, local: &Path) -> Result<PathBuf, TransportError> {
        self.send_file_with_progress(local, &mut |_, _| {})
    }

    /// Uploads the file into the runner's upload folder (once per session for an unchanged file)
    /// and returns its path on the board.
    fn send_file_with_progress(
        &mut self,
        local: &Path,
        on_progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PathBuf, TransportError> {
        let out = match self.sent.lookup(local)? {
            Ok(remote) => return Ok(remote),
            Err(out) => out,
        };
        self.start()?;
        let bytes = std::fs::read(&out.canonical).map_err(|e| send_err(local, e))?;
        // Two local files with one name get different names on the board.
        let name = self.sent.remote_name(&out, 180, "");
        let remote = self.upload(&name, &bytes, on_progress)?;
        self.sent.insert(out, remote.clone());
        Ok(remote)
    }

    /// Opens the device and pings the runner (a no-op when the link is up). A device that cannot
    /// be opened, or a runner that does not answer, is an error at once.
    fn start(&mut self) -> Result<(), TransportError> {
        if self.link.is_some() {
            return Ok(());
        }
        match self.connect() {
            Ok(()) => Ok(()),
            Err(Fail::Fatal(e)) => {
                self.link = None;
                Err(e)
            }
            Err(Fail::Lost(m)) => {
                self.link = None;
                Err(self.error(format!(
                    "{m} (is `whittle-runner --serial <the board's serial device> --baud {}` running on the board?)",
                    self.opts.baud
                )))
            }
        }
    }

    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        match self.send_msg(msg) {
            Ok(()) => Ok(()),
            Err(Fail::Lost(m)) => Err(self.error(m)),
            Err(Fail::Fatal(e)) => Err(e),
        }
    }

    fn recv(&mut self) -> Result<Message, TransportError> {
        match self.recv_msg(self.opts.run_timeout) {
            Ok(m) => Ok(m),
            Err(Fail::Lost(m)) => Err(self.error(m)),
            Err(Fail::Fatal(e)) => Err(e),
        }
    }

    /// Closes the port; the runner on the board goes on listening.
    fn close(&mut self) -> Result<(), TransportError> {
        self.link = None;
        Ok(())
    }

    /// Sends `req` and waits for its answer; when the link drops, reopens it and sends the request
    /// again (at most `reconnects` times).
    fn request(
        &mut self,
        req: &RunRequest,
        on_progress: &mut dyn FnMut(u64, u64),
    ) -> Result<pb::Result, TransportError> {
        let mut req = req.to_proto()?;
        self.start()?;
        let caller_id = req.id;
        let mut drops = 0;
        loop {
            // A fresh id for each attempt, so that a late answer to an earlier one is skipped.
            req.id = self.id();
            match self.request_once(&req, on_progress) {
                Ok(mut r) => {
                    r.id = caller_id;
                    return Ok(r);
                }
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Lost(cause)) => {
                    if drops >= self.opts.reconnects {
                        return Err(self.error(format!(
                            "measuring {} failed: the link dropped {} times, the last time: {cause}",
                            req.name,
                            drops + 1
                        )));
                    }
                    drops += 1;
                    let line = format!(
                        "the link dropped while measuring {} ({cause}); reopening and asking again",
                        req.name
                    );
                    self.note(line);
                    self.reconnect(&cause)?;
                }
            }
        }
    }

    fn link_events(&self) -> Vec<String> {
        self.events.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names() {
        assert!(valid_upload_name("resnet8_cifar10.pruned.onnx"));
        assert!(valid_upload_name("1-m+x.onnx"));
        for bad in ["", ".hidden", "-x", "a/b", "../x", "a b", "x\0"] {
            assert!(!valid_upload_name(bad), "{bad:?}");
        }
        assert!(!valid_upload_name(&"a".repeat(201)));
    }

    #[test]
    fn a_missing_device_is_one_line_naming_it() {
        let mut t = Serial::new(
            "/nonexistent/ttyUSB9",
            SerialOptions {
                baud: 115_200,
                timeout: Duration::from_secs(1),
                run_timeout: Duration::from_secs(1),
                reconnects: 3,
                chunk_bytes: 4096,
            },
        );
        let started = Instant::now();
        let msg = t.start().unwrap_err().to_string();
        assert!(
            msg.starts_with("serial /nonexistent/ttyUSB9: cannot open the serial port"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(1), "no retries");
    }
}
