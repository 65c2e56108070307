//! Reaching a board runner: a [`Transport`] puts files where the runner can read them, starts the
//! runner and exchanges [`protocol`](crate::protocol) frames with it. [`Local`] runs the runner as a
//! child process of this one and talks over its stdin and stdout; [`Emulated`] does the same with a
//! runner built for another architecture, started under a user-mode emulator (qemu-user).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{MAX_FRAME_BYTES, Message, ProtocolError, decode_frame, pb, write_frame};
use crate::target::Target;

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
}

fn stderr_note(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; its stderr ends: {}", crate::error::one_line(stderr))
    }
}

/// A way to reach a board and its runner.
pub trait Transport {
    /// Makes a local file readable by the runner and returns its path on the board.
    fn send_file(&mut self, local: &Path) -> Result<PathBuf, TransportError>;
    /// Starts the runner (a no-op when it is running).
    fn start(&mut self) -> Result<(), TransportError>;
    /// Sends one frame to the runner.
    fn send(&mut self, msg: &Message) -> Result<(), TransportError>;
    /// Receives the runner's next frame.
    fn recv(&mut self) -> Result<Message, TransportError>;
    /// Closes the runner's input and waits for it to exit.
    fn close(&mut self) -> Result<(), TransportError>;

    /// Sends `req` and waits for its answer: `on_progress(done, total)` for each Progress frame,
    /// then the Result, or [`TransportError::Remote`] with the runner's error text.
    fn request(
        &mut self,
        req: pb::Request,
        on_progress: &mut dyn FnMut(u64, u64),
    ) -> Result<pb::Result, TransportError> {
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
        std::fs::canonicalize(local).map_err(|e| TransportError::SendFile {
            path: local.to_path_buf(),
            message: e.to_string(),
        })
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
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
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
        let emulator = target.qemu.clone().ok_or_else(|| {
            TransportError::Unexpected(format!(
                "target '{}' names no emulator (the `qemu` field)",
                target.name
            ))
        })?;
        let runner = Local::find_runner_for(&target.triple)?;
        Ok(Emulated::new(emulator, target.sysroot.as_deref(), runner))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_runner_is_a_spawn_error_naming_it() {
        let mut t = Local::new("/nonexistent/whittle-runner");
        let err = t
            .request(pb::Request::default(), &mut |_, _| {})
            .unwrap_err();
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
        let err = t
            .request(pb::Request::default(), &mut |_, _| {})
            .unwrap_err();
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
            .request(pb::Request::default(), &mut |_, _| {})
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
            .request(pb::Request::default(), &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(msg.contains("args: -L /r/whittle-runner"), "{msg}");
        assert!(msg.contains("exit status: 4"), "{msg}");
    }
}
