//! Reaching a board runner: a [`Transport`] puts files where the runner can read them, starts the
//! runner and exchanges [`protocol`](crate::protocol) frames with it. [`Local`] runs the runner as a
//! child process of this one and talks over its stdin and stdout; [`Emulated`] does the same with a
//! runner built for another architecture, started under a user-mode emulator (qemu-user); [`Ssh`]
//! copies the runner and the models to a board with scp and starts the runner there through ssh,
//! talking frames over ssh's stdin and stdout; [`Serial`](crate::serial::Serial) uploads the models
//! in acknowledged chunks to a runner listening on a serial port, and resumes after a dropped link.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{MAX_FRAME_BYTES, Message, ProtocolError, decode_frame, pb, write_frame};
use whittle_runtime::{BenchConfig, RuntimeKind, RuntimeOptions};

use crate::target::{Connection, Target};

/// The runner binary's file name.
pub const RUNNER_NAME: &str = "whittle-runner";

/// The environment variable that names the runner binary for [`Local`].
pub const RUNNER_ENV: &str = "WHITTLE_RUNNER";

/// What can go wrong talking to a runner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The runner binary is not where we looked.
    #[error("runner not found: {looked}; build it with `{build}` or set WHITTLE_RUNNER")]
    RunnerNotFound {
        /// Where we looked.
        looked: String,
        /// The command that builds it.
        build: String,
    },
    /// The runner could not be started.
    #[error("cannot start the runner {}: {message}", path.display())]
    Spawn {
        /// The program started: the runner, or the emulator that runs it.
        path: PathBuf,
        /// What the system said.
        message: String,
    },
    /// A file could not be made available to the runner.
    #[error("cannot send {}: {message}", path.display())]
    SendFile {
        /// The local file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The runner is not running (never started, or already closed).
    #[error("the runner is not running")]
    NotRunning,
    /// The frames did not go through.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// The runner closed its output.
    #[error("the runner stopped ({status}){}", stderr_note(.stderr))]
    RunnerExited {
        /// Its exit status, or `still running` when only its output closed.
        status: String,
        /// The last lines it wrote to stderr.
        stderr: String,
    },
    /// The runner answered a request with an Error frame.
    #[error("runner: {0}")]
    Remote(String),
    /// The runner sent a frame that does not belong here.
    #[error("unexpected answer from the runner: {0}")]
    Unexpected(String),
    /// A request the protocol cannot carry (a count too large for it).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The transport was made for a target of another transport.
    #[error("target '{target}' uses transport \"{transport}\", not \"{expected}\"")]
    WrongTransport {
        /// The target's name.
        target: String,
        /// Its transport.
        transport: &'static str,
        /// The transport asked for.
        expected: &'static str,
    },
    /// The serial port could not be opened, the runner on it did not answer, or the link dropped
    /// and did not come back.
    #[error("serial {}: {message}", device.display())]
    Serial {
        /// The device path.
        device: PathBuf,
        /// The cause, on one line.
        message: String,
    },
    /// ssh or scp could not reach the board, or a command there failed.
    #[error("ssh {dest}: {message}")]
    Ssh {
        /// `user@host:port`.
        dest: String,
        /// The cause, on one line (host key verification failed, permission denied, ...).
        message: String,
    },
}

/// Flattens a (possibly multi-line) message to one line.
pub(crate) fn one_line(message: impl std::fmt::Display) -> String {
    let text = message.to_string();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The error of a transport made for a target of another transport.
pub(crate) fn wrong_transport(target: &Target, expected: &'static str) -> TransportError {
    TransportError::WrongTransport {
        target: target.name.clone(),
        transport: target.transport().name(),
        expected,
    }
}

fn stderr_note(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; its stderr ends: {}", one_line(stderr))
    }
}

/// The model a [`RunRequest`] measures.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// The model itself, sent inside the request.
    Bytes(Vec<u8>),
    /// A path to the model on the board (what [`Transport::send_file`] returned).
    Path(PathBuf),
}

/// One measurement for the runner: load a model into a runtime, time it, and answer with a
/// [`pb::Result`].
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Chosen by the host; echoed in every answer to this request.
    pub id: u64,
    /// The model's name, for messages.
    pub name: String,
    /// The model.
    pub model: ModelSource,
    /// The runtime to measure it in.
    pub runtime: RuntimeKind,
    /// Warmup and timed runs.
    pub bench: BenchConfig,
    /// Threads, fallback, input shapes and the TensorRT options; `tensorrt_cache_dir` is a folder
    /// on the board.
    pub options: RuntimeOptions,
    /// Where ONNX Runtime's library is on the board (`None`: `ORT_DYLIB_PATH` there, or whittle's
    /// cache).
    pub ort_library: Option<PathBuf>,
}

impl RunRequest {
    /// A request with the runtime's default options.
    pub fn new(id: u64, name: impl Into<String>, model: ModelSource, runtime: RuntimeKind) -> Self {
        RunRequest {
            id,
            name: name.into(),
            model,
            runtime,
            bench: BenchConfig::default(),
            options: RuntimeOptions::default(),
            ort_library: None,
        }
    }

    /// A request with the target's options: threads, fallback, ONNX Runtime's library and the
    /// TensorRT options.
    pub fn for_target(
        target: &Target,
        id: u64,
        name: impl Into<String>,
        model: ModelSource,
        runtime: RuntimeKind,
    ) -> Self {
        RunRequest {
            options: RuntimeOptions {
                threads: target.threads,
                allow_fallback: target.allow_fallback,
                tensorrt_cache_dir: target.tensorrt_cache_dir.as_ref().map(PathBuf::from),
                tensorrt_fp16: target.tensorrt_fp16,
                tensorrt_workspace_bytes: target
                    .tensorrt_workspace_bytes()
                    .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
                input_shapes: Vec::new(),
            },
            ort_library: target.ort_library.clone(),
            ..RunRequest::new(id, name, model, runtime)
        }
    }

    /// The request as the runner reads it; counts the protocol cannot carry are refused.
    pub fn to_proto(&self) -> Result<pb::Request, TransportError> {
        let count = |what: &str, n: usize| {
            u32::try_from(n).map_err(|_| {
                TransportError::InvalidRequest(format!("{what} {n} is too large for the runner"))
            })
        };
        let path = |p: &Path| p.display().to_string();
        Ok(pb::Request {
            id: self.id,
            name: self.name.clone(),
            model: Some(match &self.model {
                ModelSource::Bytes(b) => pb::request::Model::ModelBytes(b.clone()),
                ModelSource::Path(p) => pb::request::Model::ModelPath(path(p)),
            }),
            runtime: self.runtime.name().to_string(),
            threads: self
                .options
                .threads
                .map(|n| count("threads", n))
                .transpose()?,
            warmup: count("warmup", self.bench.warmup)?,
            iters: count("iters", self.bench.iters)?,
            max_seconds: self.bench.max_seconds,
            input_shapes: self
                .options
                .input_shapes
                .iter()
                .map(|(name, dims)| pb::InputShape::new(name, dims))
                .collect(),
            allow_fallback: self.options.allow_fallback,
            ort_library: self.ort_library.as_deref().map(path).unwrap_or_default(),
            tensorrt_fp16: self.options.tensorrt_fp16,
            tensorrt_cache_dir: self
                .options
                .tensorrt_cache_dir
                .as_deref()
                .map(path)
                .unwrap_or_default(),
            tensorrt_workspace_bytes: self.options.tensorrt_workspace_bytes.map(|b| b as u64),
        })
    }
}

/// Times `files` on the board in `rounds` interleaved rounds, the first of each round rotating:
/// `p[round][file]`, each one's p50 in ms (`bench` runs per request). Each file is sent once.
pub fn interleaved_p50(
    runner: &mut dyn Transport,
    files: &[PathBuf],
    rounds: usize,
    target: &Target,
    runtime: RuntimeKind,
    input_shapes: &[(String, Vec<usize>)],
    bench: &BenchConfig,
) -> Result<Vec<Vec<f64>>, TransportError> {
    let sent = files
        .iter()
        .map(|f| runner.send_file(f))
        .collect::<Result<Vec<_>, _>>()?;
    let n = files.len();
    let mut p = Vec::with_capacity(rounds.max(1));
    for r in 0..rounds.max(1) {
        let mut row = vec![0.0; n];
        for j in 0..n {
            let k = (r + j) % n;
            let name = files[k]
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
            let mut req = RunRequest {
                bench: bench.clone(),
                ..RunRequest::for_target(
                    target,
                    (r * n + j) as u64 + 1,
                    name,
                    ModelSource::Path(sent[k].clone()),
                    runtime,
                )
            };
            req.options.input_shapes = input_shapes.to_vec();
            row[k] = runner.request(&req, &mut |_, _| {})?.stats().p50_ms;
        }
        p.push(row);
    }
    Ok(p)
}

/// A way to reach a board and its runner.
pub trait Transport {
    /// Makes a local file readable by the runner and returns its path on the board.
    fn send_file(&mut self, local: &Path) -> Result<PathBuf, TransportError>;
    /// [`Transport::send_file`], calling `on_progress(bytes_done, bytes_total)` as the file goes
    /// (by default once, at the end).
    fn send_file_with_progress(
        &mut self,
        local: &Path,
        on_progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PathBuf, TransportError> {
        let path = self.send_file(local)?;
        let len = std::fs::metadata(local).map(|m| m.len()).unwrap_or(0);
        on_progress(len, len);
        Ok(path)
    }
    /// Starts the runner (a no-op when it is running).
    fn start(&mut self) -> Result<(), TransportError>;
    /// Sends one frame to the runner.
    fn send(&mut self, msg: &Message) -> Result<(), TransportError>;
    /// Receives the runner's next frame.
    fn recv(&mut self) -> Result<Message, TransportError>;
    /// Closes the runner's input and waits for it to exit.
    fn close(&mut self) -> Result<(), TransportError>;

    /// What happened to the link so far (drops, reopenings, resumed uploads), one line each; empty
    /// for transports that do not reconnect.
    fn link_events(&self) -> Vec<String> {
        Vec::new()
    }

    /// Sends `req` and waits for its answer: `on_progress(done, total)` for each Progress frame,
    /// then the Result, or [`TransportError::Remote`] with the runner's error text.
    fn request(
        &mut self,
        req: &RunRequest,
        on_progress: &mut dyn FnMut(u64, u64),
    ) -> Result<pb::Result, TransportError> {
        let req = req.to_proto()?;
        self.start()?;
        let id = req.id;
        self.send(&Message::Request(req))?;
        loop {
            match self.recv()? {
                Message::Progress(p) if p.id == id => on_progress(p.done, p.total),
                Message::Result(r) if r.id == id => return Ok(r),
                Message::Error(e) if e.id == id => return Err(TransportError::Remote(e.message)),
                other => {
                    return Err(TransportError::Unexpected(format!(
                        "{other:?} while waiting for request {id}"
                    )));
                }
            }
        }
    }
}

/// The runner as a child process of this one (targets with `transport = "local"`).
pub struct Local {
    /// The program and arguments that come before the runner's path on the command line (empty:
    /// the runner is started itself; [`Emulated`]: the emulator and its options).
    launcher: Vec<OsString>,
    runner: PathBuf,
    /// Added to a spawn error: how to get the program that failed to start.
    spawn_hint: String,
    child: Option<Running>,
}

struct Running {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr_tail: Arc<Mutex<Vec<String>>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
}

/// Lines of the runner's stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 20;

impl Local {
    /// A transport for the runner binary at `runner` (started on first use).
    pub fn new(runner: impl Into<PathBuf>) -> Self {
        Local {
            launcher: Vec::new(),
            runner: runner.into(),
            spawn_hint: String::new(),
            child: None,
        }
    }

    /// A transport for the runner found by [`Local::find_runner`].
    pub fn from_env() -> Result<Self, TransportError> {
        Ok(Local::new(Local::find_runner()?))
    }

    /// The runner binary for this machine: see [`Local::find_runner_for`] with `host`.
    pub fn find_runner() -> Result<PathBuf, TransportError> {
        Local::find_runner_for("host")
    }

    /// The runner binary for the Rust target `triple` (`host`: this machine).
    ///
    /// `WHITTLE_RUNNER` when set; else, for `host`, `whittle-runner` next to the current executable
    /// or one folder up (test binaries live in `target/<profile>/deps/`); for another triple, the
    /// cross build beside it in cargo's layout, `target/<triple>/<profile>/whittle-runner`.
    pub fn find_runner_for(triple: &str) -> Result<PathBuf, TransportError> {
        let build = if triple == "host" {
            "cargo build --release -p whittle-runner".to_string()
        } else {
            format!(
                "cargo build --release -p whittle-runner --no-default-features --target {triple}"
            )
        };
        let not_found = |looked: String| TransportError::RunnerNotFound {
            looked,
            build: build.clone(),
        };
        if let Some(p) = std::env::var_os(RUNNER_ENV).filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(p)
            } else {
                Err(not_found(format!(
                    "{} (from {RUNNER_ENV}) is not a file",
                    p.display()
                )))
            };
        }
        let exe = std::env::current_exe()
            .map_err(|e| not_found(format!("cannot locate the current executable: {e}")))?;
        let mut looked = Vec::new();
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = if triple == "host" {
                dir.join(RUNNER_NAME)
            } else {
                // <target>/<profile>/ -> <target>/<triple>/<profile>/
                let (Some(target_dir), Some(profile)) = (dir.parent(), dir.file_name()) else {
                    continue;
                };
                target_dir.join(triple).join(profile).join(RUNNER_NAME)
            };
            if candidate.is_file() {
                return Ok(candidate);
            }
            looked.push(candidate.display().to_string());
        }
        Err(not_found(format!("looked for {}", looked.join(" and "))))
    }

    fn running(&mut self) -> Result<&mut Running, TransportError> {
        self.child.as_mut().ok_or(TransportError::NotRunning)
    }

    /// The error for a runner whose output ended: its exit status and stderr tail.
    fn exited(&mut self) -> TransportError {
        let Some(run) = self.child.as_mut() else {
            return TransportError::NotRunning;
        };
        // Give a dying runner a moment to be reaped, so that the status is known.
        let deadline = Instant::now() + Duration::from_secs(2);
        let status = loop {
            match run.child.try_wait() {
                Ok(Some(s)) => break s.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => break "still running".to_string(),
                Err(e) => break format!("status unknown: {e}"),
            }
        };
        // Once the runner has exited its stderr closes: read it to the end before quoting it.
        if status != "still running"
            && let Some(t) = run.stderr_thread.take()
        {
            let _ = t.join();
        }
        let stderr = run
            .stderr_tail
            .lock()
            .map(|t| t.join("\n"))
            .unwrap_or_default();
        TransportError::RunnerExited { status, stderr }
    }
}

impl Transport for Local {
    /// The runner shares this machine's files: the path is returned as it is.
    fn send_file(&mut self, local: &Path) -> Result<PathBuf, TransportError> {
        std::fs::canonicalize(local).map_err(|e| send_err(local, e))
    }

    fn start(&mut self) -> Result<(), TransportError> {
        if self.child.is_some() {
            return Ok(());
        }
        let (program, args): (OsString, Vec<OsString>) = match self.launcher.split_first() {
            Some((program, options)) => {
                let mut args = options.to_vec();
                args.push(self.runner.clone().into_os_string());
                (program.clone(), args)
            }
            None => (self.runner.clone().into_os_string(), Vec::new()),
        };
        let spawn_err = |e: std::io::Error| TransportError::Spawn {
            path: PathBuf::from(&program),
            message: format!("{e}{}", self.spawn_hint),
        };
        // a runner written a moment ago can be "busy" (ETXTBSY) while another thread's fork
        // still holds its write descriptor until that child execs: try again briefly
        let mut tries = 0;
        let mut child = loop {
            match Command::new(&program)
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
            {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                r => break r.map_err(spawn_err)?,
            }
        };
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TransportError::Spawn {
                path: PathBuf::from(&program),
                message: "no pipes to the child".to_string(),
            });
        };
        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        let tail = Arc::clone(&stderr_tail);
        // The runner's log lines: passed on to our stderr, the last few kept for errors.
        let stderr_thread = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{RUNNER_NAME}: {line}");
                if let Ok(mut t) = tail.lock() {
                    if t.len() == STDERR_TAIL_LINES {
                        t.remove(0);
                    }
                    t.push(line);
                }
            }
        });
        self.child = Some(Running {
            child,
            stdin: BufWriter::new(stdin),
            stdout: BufReader::new(stdout),
            stderr_tail,
            stderr_thread: Some(stderr_thread),
        });
        Ok(())
    }

    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        let run = self.running()?;
        match write_frame(&mut run.stdin, msg) {
            Ok(()) => Ok(()),
            // A broken pipe means the runner is gone: say how it ended.
            Err(ProtocolError::Io { .. }) => Err(self.exited()),
            Err(e) => Err(e.into()),
        }
    }

    fn recv(&mut self) -> Result<Message, TransportError> {
        let run = self.running()?;
        match decode_frame(&mut run.stdout, MAX_FRAME_BYTES) {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) | Err(ProtocolError::Truncated { .. }) => Err(self.exited()),
            Err(e) => Err(e.into()),
        }
    }

    fn close(&mut self) -> Result<(), TransportError> {
        let Some(run) = self.child.take() else {
            return Ok(());
        };
        let Running {
            mut child, stdin, ..
        } = run;
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(());
                }
            }
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A runner built for another architecture, run on this machine under a user-mode emulator
/// (targets with `transport = "emulated"`): `<qemu> -L <sysroot> <runner>`, talking frames over its
/// stdin and stdout exactly like [`Local`]. The emulated board shares this machine's files, so
/// [`Transport::send_file`] returns the local path. Timings under emulation say nothing about a
/// real board.
pub struct Emulated(Local);

impl Emulated {
    /// A transport that starts `runner` as `<emulator> [-L <sysroot>] <runner>`.
    pub fn new(
        emulator: impl Into<OsString>,
        sysroot: Option<&Path>,
        runner: impl Into<PathBuf>,
    ) -> Self {
        let emulator = emulator.into();
        let mut launcher = vec![emulator.clone()];
        if let Some(root) = sysroot {
            launcher.push("-L".into());
            launcher.push(root.as_os_str().to_owned());
        }
        Emulated(Local {
            launcher,
            runner: runner.into(),
            spawn_hint: format!(
                " (is {} installed? `just setup-cross` installs qemu-user)",
                emulator.to_string_lossy()
            ),
            child: None,
        })
    }

    /// The transport for an emulated target: its `qemu` emulator and `sysroot`, and the runner
    /// built for its triple ([`Local::find_runner_for`]).
    pub fn for_target(target: &Target) -> Result<Self, TransportError> {
        let Connection::Emulated(link) = &target.connection else {
            return Err(wrong_transport(target, "emulated"));
        };
        let runner = Local::find_runner_for(&target.triple)?;
        Ok(Emulated::new(
            link.qemu.clone(),
            link.sysroot.as_deref(),
            runner,
        ))
    }

    /// The command line that starts the runner.
    pub fn command_line(&self) -> String {
        let mut parts: Vec<String> = self
            .0
            .launcher
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        parts.push(self.0.runner.display().to_string());
        parts.join(" ")
    }
}

impl Transport for Emulated {
    fn send_file(&mut self, local: &Path) -> Result<PathBuf, TransportError> {
        self.0.send_file(local)
    }
    fn start(&mut self) -> Result<(), TransportError> {
        self.0.start()
    }
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.0.send(msg)
    }
    fn recv(&mut self) -> Result<Message, TransportError> {
        self.0.recv()
    }
    fn close(&mut self) -> Result<(), TransportError> {
        self.0.close()
    }
}

/// A board reached with the system OpenSSH client (targets with `transport = "ssh"`).
///
/// The runner built for the board's triple is copied with `scp -O` into the target's `remote_dir`
/// (created with `mkdir -p`) and made executable; each model is copied there once per session.
/// The runner is started as `ssh ... -p PORT user@host -- <remote_dir>/whittle-runner` and talks
/// frames over ssh's stdin and stdout, with [`Local`]'s code. ssh always runs with
/// `BatchMode=yes` (no password prompts) and `StrictHostKeyChecking=yes` (an unknown or changed host
/// key is refused); its failures become one-line [`TransportError::Ssh`] errors.
pub struct Ssh {
    host: String,
    port: u16,
    user: Option<String>,
    identity: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    remote_dir: String,
    /// The runner binary on this machine.
    local_runner: PathBuf,
    /// Whether `remote_dir` exists and holds the runner.
    prepared: bool,
    /// Files copied this session.
    sent: Sent,
    /// The runner through ssh: the launcher is `ssh <options> <dest> --`, the "runner" its path on
    /// the board.
    inner: Local,
}

/// Added to errors starting ssh or scp.
const SSH_HINT: &str = " (is the OpenSSH client installed? `just setup-ssh` installs it)";

impl Ssh {
    /// A transport to `host` that runs the local runner binary `local_runner` there, from
    /// `remote_dir` (an absolute path; [`Target`] checks it). `user`, `identity` and `known_hosts`
    /// default to ssh's own.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        user: Option<String>,
        identity: Option<PathBuf>,
        known_hosts: Option<PathBuf>,
        remote_dir: impl Into<String>,
        local_runner: impl Into<PathBuf>,
    ) -> Self {
        let remote_dir = remote_dir.into().trim_end_matches('/').to_string();
        let remote_dir = if remote_dir.is_empty() {
            "/".to_string()
        } else {
            remote_dir
        };
        let mut ssh = Ssh {
            host: host.into(),
            port,
            user,
            identity,
            known_hosts,
            remote_dir,
            local_runner: local_runner.into(),
            prepared: false,
            sent: Sent::default(),
            inner: Local::new(PathBuf::new()),
        };
        let mut launcher: Vec<OsString> = vec!["ssh".into()];
        launcher.extend(ssh.options());
        launcher.extend(["-p".into(), ssh.port.to_string().into(), ssh.login().into()]);
        launcher.push("--".into());
        ssh.inner = Local {
            launcher,
            runner: PathBuf::from(ssh.remote_path(RUNNER_NAME)),
            spawn_hint: SSH_HINT.to_string(),
            child: None,
        };
        ssh
    }

    /// The transport for an ssh target: its `host`, `port`, `user`, `identity`, `known_hosts` and
    /// `remote_dir`, and the runner built for its triple ([`Local::find_runner_for`]).
    pub fn for_target(target: &Target) -> Result<Self, TransportError> {
        let Connection::Ssh(link) = &target.connection else {
            return Err(wrong_transport(target, "ssh"));
        };
        let ssh = Ssh::new(
            link.host.clone(),
            link.port_or_default(),
            link.user.clone(),
            link.identity.clone(),
            link.known_hosts.clone(),
            link.remote_dir_or_default(),
            PathBuf::new(),
        );
        for (what, file) in [
            ("identity (private key) file", &ssh.identity),
            ("known_hosts file", &ssh.known_hosts),
        ] {
            if let Some(f) = file
                && !f.is_file()
            {
                return Err(ssh.error(format!("the {what} {} does not exist", f.display())));
            }
        }
        let runner = Local::find_runner_for(&target.triple)?;
        Ok(Ssh {
            local_runner: runner,
            ..ssh
        })
    }

    /// `user@host`, or `host`.
    fn login(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// `user@host:port`, for messages.
    pub fn destination(&self) -> String {
        format!("{}:{}", self.login(), self.port)
    }

    /// Options shared by ssh and scp (the port flag differs: `-p` and `-P`).
    fn options(&self) -> Vec<OsString> {
        let mut o: Vec<OsString> = [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=20",
        ]
        .map(OsString::from)
        .to_vec();
        if let Some(k) = &self.known_hosts {
            let mut v = OsString::from("UserKnownHostsFile=");
            v.push(k);
            o.extend(["-o".into(), v]);
        }
        if let Some(key) = &self.identity {
            o.extend(["-i".into(), key.clone().into_os_string()]);
            o.extend(["-o".into(), "IdentitiesOnly=yes".into()]);
        }
        o
    }

    /// `<remote_dir>/<name>`.
    fn remote_path(&self, name: &str) -> String {
        if self.remote_dir == "/" {
            format!("/{name}")
        } else {
            format!("{}/{name}", self.remote_dir)
        }
    }

    /// The command line that starts the runner on the board.
    pub fn command_line(&self) -> String {
        format!(
            "ssh -p {} {} -- {}",
            self.port,
            self.login(),
            self.inner.runner.display()
        )
    }

    fn error(&self, message: impl Into<String>) -> TransportError {
        TransportError::Ssh {
            dest: self.destination(),
            message: message.into(),
        }
    }

    /// One line naming why ssh (or scp) failed, from its stderr.
    fn diagnose(&self, what: &str, status: &str, stderr: &str) -> TransportError {
        let kh = self
            .known_hosts
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "~/.ssh/known_hosts".to_string());
        let scan = format!("ssh-keyscan -p {} {}", self.port, self.host);
        let message = if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
            format!(
                "host key verification failed: the host's key is not the one {kh} holds for it (if the board was reinstalled, check its new key and replace the line: {scan})"
            )
        } else if stderr.contains("Host key verification failed") {
            format!(
                "host key verification failed: the host's key is not in {kh} (check it, then add it: {scan} >> {kh})"
            )
        } else if stderr.contains("Permission denied") {
            let key = self
                .identity
                .as_ref()
                .map(|k| format!("the key {}", k.display()))
                .unwrap_or_else(|| "ssh's default keys".to_string());
            let who = self.user.as_deref().unwrap_or("the login user");
            format!(
                "permission denied (publickey): {who} does not accept {key} (is its public key in the board's ~/.ssh/authorized_keys?)"
            )
        } else if stderr.contains("Connection refused") {
            format!(
                "connection refused: nothing accepts ssh connections on {} port {}",
                self.host, self.port
            )
        } else if stderr.contains("Could not resolve hostname") {
            format!("cannot resolve the host name {}", self.host)
        } else if stderr.contains("timed out") {
            format!("connection to {} port {} timed out", self.host, self.port)
        } else if stderr.contains("No route to host") || stderr.contains("Network is unreachable") {
            format!("no route to {}", self.host)
        } else {
            let said = one_line(stderr);
            if said.is_empty() {
                format!("{what} failed ({status})")
            } else {
                format!("{what} failed ({status}): {said}")
            }
        };
        self.error(message)
    }

    /// Runs `command` on the board through the remote shell and waits for it.
    fn run_remote(&self, command: &str) -> Result<(), TransportError> {
        let out = Command::new("ssh")
            .args(self.options())
            .arg("-p")
            .arg(self.port.to_string())
            .arg(self.login())
            .arg("--")
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| TransportError::Spawn {
                path: "ssh".into(),
                message: format!("{e}{SSH_HINT}"),
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(self.diagnose(
            &format!("`{command}`"),
            &out.status.to_string(),
            &String::from_utf8_lossy(&out.stderr),
        ))
    }

    /// Copies `local` to `remote` (a path on the board) with `scp -O`.
    fn copy(&self, local: &Path, remote: &str) -> Result<(), TransportError> {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let login = match &self.user {
            Some(u) => format!("{u}@{host}"),
            None => host,
        };
        let out = Command::new("scp")
            .arg("-O")
            .arg("-q")
            .args(self.options())
            .arg("-P")
            .arg(self.port.to_string())
            .arg(local)
            .arg(format!("{login}:{remote}"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| TransportError::Spawn {
                path: "scp".into(),
                message: format!("{e}{SSH_HINT}"),
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(self.diagnose(
            &format!("scp {} to {remote}", local.display()),
            &out.status.to_string(),
            &String::from_utf8_lossy(&out.stderr),
        ))
    }

    /// Creates `remote_dir` on the board and copies the runner there, once.
    fn prepare(&mut self) -> Result<(), TransportError> {
        if self.prepared {
            return Ok(());
        }
        if !self.local_runner.is_file() {
            return Err(TransportError::RunnerNotFound {
                looked: self.local_runner.display().to_string(),
                build: "cargo build --release -p whittle-runner --no-default-features --target <the board's triple>".into(),
            });
        }
        let runner = self.remote_path(RUNNER_NAME);
        // Copied beside its final name and renamed, so a runner still running from an earlier
        // session is not overwritten in place ("Text file busy"); a stale copy is removed first
        // (scp cannot overwrite a file left read-only).
        let part = format!("{runner}.part");
        self.run_remote(&format!("mkdir -p {} && rm -f {part}", self.remote_dir))?;
        self.copy(&self.local_runner, &part)?;
        self.run_remote(&format!("chmod 755 {part} && mv -f {part} {runner}"))?;
        self.prepared = true;
        Ok(())
    }

    /// Maps a runner that stopped into ssh's own failures (exit status 255) or a missing runner
    /// (127 from the board's shell).
    fn explain(&self, e: TransportError) -> TransportError {
        match e {
            TransportError::RunnerExited { status, stderr } if status.ends_with("255") => {
                self.diagnose("ssh", &status, &stderr)
            }
            TransportError::RunnerExited { status, .. } if status.ends_with(" 127") => {
                self.error(format!(
                    "the runner is missing on the board at {}",
                    self.inner.runner.display()
                ))
            }
            other => other,
        }
    }
}

/// The files sent to a board this session: local path -> (size, mtime, path on the board), so
/// that an unchanged file is sent once.
#[derive(Default)]
pub(crate) struct Sent(HashMap<PathBuf, (u64, Option<std::time::SystemTime>, PathBuf)>);

/// A local file to send: its canonical path and its (size, mtime) stamp.
pub(crate) struct Outgoing {
    pub(crate) canonical: PathBuf,
    stamp: (u64, Option<std::time::SystemTime>),
}

impl Sent {
    /// `Ok(remote)` when `local` was sent unchanged this session, else `Err` with what to send.
    pub(crate) fn lookup(&self, local: &Path) -> Result<Result<PathBuf, Outgoing>, TransportError> {
        let canonical = std::fs::canonicalize(local).map_err(|e| send_err(local, e))?;
        let meta = std::fs::metadata(&canonical).map_err(|e| send_err(local, e))?;
        let stamp = (meta.len(), meta.modified().ok());
        Ok(match self.0.get(&canonical) {
            Some((len, modified, remote)) if (*len, *modified) == stamp => Ok(remote.clone()),
            _ => Err(Outgoing { canonical, stamp }),
        })
    }

    /// The file's name on the board: its safe name cut to `max_chars`, numbered (`1-name`) when
    /// another local file of this session has it or it is `reserved`.
    pub(crate) fn remote_name(&self, o: &Outgoing, max_chars: usize, reserved: &str) -> String {
        let base = safe_name(
            &o.canonical
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let base: String = base.chars().take(max_chars).collect();
        let taken = |name: &str| {
            name == reserved
                || self
                    .0
                    .iter()
                    .any(|(k, (_, _, r))| k != &o.canonical && r.file_name() == Some(name.as_ref()))
        };
        let mut name = base.clone();
        let mut n = 1;
        while taken(&name) {
            name = format!("{n}-{base}");
            n += 1;
        }
        name
    }

    /// Records that `o` is now at `remote` on the board.
    pub(crate) fn insert(&mut self, o: Outgoing, remote: PathBuf) {
        self.0.insert(o.canonical, (o.stamp.0, o.stamp.1, remote));
    }
}

/// A file that could not be read or sent.
pub(crate) fn send_err(local: &Path, e: std::io::Error) -> TransportError {
    TransportError::SendFile {
        path: local.to_path_buf(),
        message: e.to_string(),
    }
}

/// A file name that passes through the board's shell unquoted.
pub(crate) fn safe_name(name: &str) -> String {
    let n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if n.is_empty() || n.starts_with('.') || n.starts_with('-') {
        format!("f{n}")
    } else {
        n
    }
}

impl Transport for Ssh {
    /// Copies the file into `remote_dir` (once per session for an unchanged file) and returns its
    /// path on the board.
    fn send_file(&mut self, local: &Path) -> Result<PathBuf, TransportError> {
        let out = match self.sent.lookup(local)? {
            Ok(remote) => return Ok(remote),
            Err(out) => out,
        };
        self.prepare()?;
        // Two local files with one name get different remote names.
        let name = self.sent.remote_name(&out, usize::MAX, RUNNER_NAME);
        let remote = self.remote_path(&name);
        // scp keeps the source's mode: a read-only model copied in an earlier session could not
        // be overwritten by a user other than root.
        self.run_remote(&format!("rm -f {remote}"))?;
        self.copy(&out.canonical, &remote)?;
        let remote = PathBuf::from(remote);
        self.sent.insert(out, remote.clone());
        Ok(remote)
    }

    /// Prepares the board (once: `mkdir -p remote_dir`, the runner copied and made executable),
    /// then starts the runner through ssh.
    fn start(&mut self) -> Result<(), TransportError> {
        self.prepare()?;
        self.inner.start()
    }
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.inner.send(msg).map_err(|e| self.explain(e))
    }
    fn recv(&mut self) -> Result<Message, TransportError> {
        self.inner.recv().map_err(|e| self.explain(e))
    }
    fn close(&mut self) -> Result<(), TransportError> {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_request() -> RunRequest {
        RunRequest::new(1, "m", ModelSource::Bytes(Vec::new()), RuntimeKind::OrtCpu)
    }

    #[test]
    fn a_missing_runner_is_a_spawn_error_naming_it() {
        let mut t = Local::new("/nonexistent/whittle-runner");
        let err = t.request(&any_request(), &mut |_, _| {}).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/whittle-runner"), "{msg}");
        assert!(matches!(t.recv(), Err(TransportError::NotRunning)));
    }

    #[test]
    fn a_runner_that_dies_is_reported_with_its_status_and_stderr() {
        // `sh -c` stands in for a runner that fails at once.
        let script =
            std::env::temp_dir().join(format!("whittle-fake-runner-{}", std::process::id()));
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'cannot load libonnxruntime' >&2\nexit 3\n",
        )
        .expect("write script");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let mut t = Local::new(&script);
        let err = t.request(&any_request(), &mut |_, _| {}).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("cannot load libonnxruntime"), "{msg}");
        let _ = std::fs::remove_file(&script);
    }

    #[test]
    fn emulated_starts_the_emulator_with_the_runner_after_its_options() {
        // `sh -c '...' ARGS` stands in for the emulator: it reports its arguments and exits.
        let t = Emulated::new(
            "/nonexistent/qemu-aarch64",
            Some(Path::new("/usr/aarch64-linux-gnu")),
            "/r/whittle-runner",
        );
        assert_eq!(
            t.command_line(),
            "/nonexistent/qemu-aarch64 -L /usr/aarch64-linux-gnu /r/whittle-runner"
        );
        let mut t = t;
        let msg = t
            .request(&any_request(), &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/nonexistent/qemu-aarch64"), "{msg}");
        assert!(msg.contains("just setup-cross"), "{msg}");

        let mut t = Emulated(Local {
            launcher: vec![
                "sh".into(),
                "-c".into(),
                "echo \"args: $0 $1\" >&2; exit 4".into(),
                "-L".into(),
            ],
            runner: "/r/whittle-runner".into(),
            spawn_hint: String::new(),
            child: None,
        });
        let msg = t
            .request(&any_request(), &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(msg.contains("args: -L /r/whittle-runner"), "{msg}");
        assert!(msg.contains("exit status: 4"), "{msg}");
    }

    #[test]
    fn ssh_builds_its_command_line_and_names_ssh_failures() {
        let t = Ssh::new(
            "raspberrypi.local",
            2222,
            Some("pi".into()),
            Some("/k/id".into()),
            Some("/k/known_hosts".into()),
            "/tmp/whittle/",
            "/r/whittle-runner",
        );
        assert_eq!(
            t.command_line(),
            "ssh -p 2222 pi@raspberrypi.local -- /tmp/whittle/whittle-runner"
        );
        let launcher: Vec<String> = t
            .inner
            .launcher
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            launcher.join(" "),
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=20 -o UserKnownHostsFile=/k/known_hosts -i /k/id -o IdentitiesOnly=yes -p 2222 pi@raspberrypi.local --"
        );
        let msg = |stderr: &str| t.diagnose("ssh", "exit status: 255", stderr).to_string();
        let m = msg(
            "@@@\nWARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!\n...\nHost key verification failed.\n",
        );
        assert!(m.starts_with("ssh pi@raspberrypi.local:2222: host key verification failed: the host's key is not the one /k/known_hosts holds"), "{m}");
        assert!(!m.contains('\n'), "{m}");
        let m = msg("Host key verification failed.\n");
        assert!(m.contains("is not in /k/known_hosts"), "{m}");
        let m = msg("pi@raspberrypi.local: Permission denied (publickey).\n");
        assert!(
            m.contains("permission denied (publickey): pi does not accept the key /k/id"),
            "{m}"
        );
        let m = msg("ssh: connect to host raspberrypi.local port 2222: Connection refused\n");
        assert!(m.contains("connection refused"), "{m}");
        let m = msg("something\nelse\n");
        assert!(
            m.ends_with("ssh failed (exit status: 255): something else"),
            "{m}"
        );
        // A runner that is missing on the board: the remote shell's 127.
        let e = t.explain(TransportError::RunnerExited {
            status: "exit status: 127".into(),
            stderr: "sh: 1: /tmp/whittle/whittle-runner: not found".into(),
        });
        assert!(
            e.to_string()
                .contains("runner is missing on the board at /tmp/whittle/whittle-runner"),
            "{e}"
        );
        assert_eq!(safe_name("a b;c.onnx"), "a_b_c.onnx");
        assert_eq!(safe_name(".x"), "f.x");
    }

    #[test]
    fn a_missing_ssh_target_file_is_named() {
        let text = "name = \"s\"\ntriple = \"host\"\ntransport = \"ssh\"\nruntimes = [\"ort-cpu\"]\nhost = \"127.0.0.1\"\nidentity = \"/nonexistent/id\"\n";
        let target = Target::parse(text, Path::new("s.toml")).unwrap();
        let err = Ssh::for_target(&target).err().expect("a missing key file");
        assert!(
            err.to_string()
                .contains("identity (private key) file /nonexistent/id does not exist"),
            "{err}"
        );
    }
}
