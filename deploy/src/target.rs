//! Board descriptions: one TOML file per target in `targets/`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use whittle_runtime::RuntimeKind;

/// How whittle reaches a target (the `transport` key), without the fields that go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// This machine: the runner as a child process ([`crate::transport::Local`]).
    Local,
    /// A runner built for the target's triple, under a user-mode emulator (qemu-user) on this
    /// machine ([`crate::transport::Emulated`]).
    Emulated,
    /// ssh and scp through the system OpenSSH client.
    Ssh,
    /// A runner listening on a serial port of the board, reached through a serial device on this
    /// machine ([`crate::serial::Serial`]).
    Serial,
}

impl Transport {
    /// The name a target file gives it (`local`, `emulated`, `ssh`, `serial`).
    pub fn name(self) -> &'static str {
        match self {
            Transport::Local => "local",
            Transport::Emulated => "emulated",
            Transport::Ssh => "ssh",
            Transport::Serial => "serial",
        }
    }
}

/// How whittle reaches a target, with the fields of its transport: a target file's `transport`
/// key picks the variant, and a field of another transport is refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "transport", rename_all = "lowercase")]
pub enum Connection {
    /// `transport = "local"`.
    Local(LocalConnection),
    /// `transport = "emulated"`.
    Emulated(EmulatedConnection),
    /// `transport = "ssh"`.
    Ssh(SshConnection),
    /// `transport = "serial"`.
    Serial(SerialConnection),
}

/// `transport = "local"`: no fields of its own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConnection {}

/// `transport = "emulated"`: the runner under a user-mode emulator on this machine.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatedConnection {
    /// The user-mode emulator that runs the runner (`qemu-aarch64`).
    pub qemu: String,
    /// The folder holding the target's dynamic loader and libraries, given to the emulator as
    /// `-L` (`/usr/aarch64-linux-gnu`).
    #[serde(default)]
    pub sysroot: Option<PathBuf>,
}

/// `transport = "ssh"`: a board reached with the system OpenSSH client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConnection {
    /// The board's host name or address (`raspberrypi.local`).
    pub host: String,
    /// The board's ssh port (default [`DEFAULT_SSH_PORT`], see [`SshConnection::port`]).
    #[serde(default, deserialize_with = "port")]
    pub port: Option<u16>,
    /// The user to log in as (default: ssh's own choice, this user or `~/.ssh/config`).
    #[serde(default)]
    pub user: Option<String>,
    /// The private key file on this machine (`ssh -i`; default: ssh's own keys). A leading `~/`
    /// stands for `$HOME`.
    #[serde(default)]
    pub identity: Option<PathBuf>,
    /// The known_hosts file on this machine holding the board's host key (default:
    /// `~/.ssh/known_hosts`). Unknown and changed host keys are always refused.
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
    /// The folder on the board that the runner and models are copied into (default
    /// [`DEFAULT_REMOTE_DIR`], see [`SshConnection::remote_dir`]).
    #[serde(default)]
    pub remote_dir: Option<String>,
}

/// `transport = "serial"`: a runner listening on a serial port of the board.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConnection {
    /// The serial device on this machine that reaches the board (`/dev/ttyUSB0`).
    pub device: PathBuf,
    /// The line rate, 50 to 16000000 (default [`DEFAULT_BAUD`]).
    #[serde(default, deserialize_with = "baud")]
    pub baud: Option<u32>,
    /// Seconds to wait for an acknowledgement before the link counts as dropped (default
    /// [`DEFAULT_SERIAL_TIMEOUT_S`]).
    #[serde(default)]
    pub timeout_s: Option<f64>,
    /// The longest silence, in seconds, from a runner loading and measuring a model (default
    /// [`DEFAULT_RUN_TIMEOUT_S`]).
    #[serde(default)]
    pub run_timeout_s: Option<f64>,
    /// Times the port is reopened after the link drops, per upload or measurement, 0 to 100
    /// (default [`DEFAULT_RECONNECTS`]).
    #[serde(default, deserialize_with = "reconnects")]
    pub reconnects: Option<u32>,
    /// Bytes per upload chunk, 64 to 1048576 (default [`DEFAULT_CHUNK_BYTES`]).
    #[serde(default, deserialize_with = "chunk_bytes")]
    pub chunk_bytes: Option<usize>,
}

/// The fields of each transport, for the message that refuses one under another transport.
const CONNECTION_FIELDS: [(Transport, &[&str]); 3] = [
    (Transport::Emulated, &["qemu", "sysroot"]),
    (
        Transport::Ssh,
        &[
            "host",
            "port",
            "user",
            "identity",
            "known_hosts",
            "remote_dir",
        ],
    ),
    (
        Transport::Serial,
        &[
            "device",
            "baud",
            "timeout_s",
            "run_timeout_s",
            "reconnects",
            "chunk_bytes",
        ],
    ),
];

/// The field each transport cannot do without, and what to put there.
const REQUIRED: [(&str, &str); 3] = [
    (
        "qemu",
        "transport \"emulated\" needs `qemu`, the emulator to run the runner with (e.g. \"qemu-aarch64\")",
    ),
    (
        "host",
        "transport \"ssh\" needs `host`, the board's host name or address (e.g. \"raspberrypi.local\")",
    ),
    (
        "device",
        "transport \"serial\" needs `device`, the serial device on this machine that reaches the board (e.g. \"/dev/ttyUSB0\")",
    ),
];

impl Connection {
    /// Which transport this is.
    pub fn transport(&self) -> Transport {
        match self {
            Connection::Local(_) => Transport::Local,
            Connection::Emulated(_) => Transport::Emulated,
            Connection::Ssh(_) => Transport::Ssh,
            Connection::Serial(_) => Transport::Serial,
        }
    }
}

/// The fields every target has, whatever its transport: a target file's keys that are not its
/// transport's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Common {
    name: String,
    triple: String,
    #[serde(default)]
    notes: String,
    runtimes: Vec<RuntimeKind>,
    #[serde(default)]
    threads: Option<usize>,
    #[serde(default)]
    allow_fallback: bool,
    #[serde(default)]
    ort_library: Option<PathBuf>,
    #[serde(default)]
    tensorrt_fp16: Option<bool>,
    #[serde(default)]
    tensorrt_cache_dir: Option<String>,
    #[serde(default, deserialize_with = "workspace_mb")]
    tensorrt_workspace_mb: Option<u64>,
}

/// A board description.
#[derive(Debug, Clone)]
pub struct Target {
    /// Short name (the file stem).
    pub name: String,
    /// Rust target triple of the board (`host` for this machine).
    pub triple: String,
    /// Free text: OS, glibc, JetPack version.
    pub notes: String,
    /// How to reach the board, with that transport's fields.
    pub connection: Connection,
    /// Runtimes to measure, in order.
    pub runtimes: Vec<RuntimeKind>,
    /// Intra-op threads (`None`: the runtime's default).
    pub threads: Option<usize>,
    /// Run on CPU when a requested execution provider is missing, and report it.
    pub allow_fallback: bool,
    /// Where ONNX Runtime's library lives on the board (`None`: whittle's own lookup). A leading
    /// `{cache}` stands for whittle's cache on this machine (`$WHITTLE_CACHE`, default
    /// `~/.cache/whittle`), where `just setup-cross` puts the emulated targets' libraries.
    pub ort_library: Option<PathBuf>,
    /// For `ort-tensorrt` only: build fp16 engines (default `true`).
    pub tensorrt_fp16: Option<bool>,
    /// For `ort-tensorrt` only: the folder, on the board, where TensorRT caches its engines
    /// (created when missing; default: no cache, every session builds its engine again).
    pub tensorrt_cache_dir: Option<String>,
    /// For `ort-tensorrt` only: the most memory TensorRT may use while building an engine, in MiB
    /// (default: ONNX Runtime's).
    pub tensorrt_workspace_mb: Option<u64>,
}

/// The serial line rate when a target names none.
pub const DEFAULT_BAUD: u32 = 115_200;

/// Seconds to wait for a serial acknowledgement when a target names none.
pub const DEFAULT_SERIAL_TIMEOUT_S: f64 = 5.0;

/// The longest silence from a measuring serial runner when a target names none.
pub const DEFAULT_RUN_TIMEOUT_S: f64 = 600.0;

/// Reopenings of a dropped serial link when a target names none.
pub const DEFAULT_RECONNECTS: u32 = 5;

/// Upload chunk size when a serial target names none.
pub const DEFAULT_CHUNK_BYTES: usize = 4096;

/// The ssh port when a target names none.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// The folder on an ssh board that whittle copies into when a target names none.
pub const DEFAULT_REMOTE_DIR: &str = "/tmp/whittle";

/// A port number, refused with a message naming the field when out of range.
fn port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Number(i64),
        Text(String),
    }
    let n = match Port::deserialize(d)? {
        Port::Number(n) => n,
        Port::Text(t) => {
            return Err(serde::de::Error::custom(format!(
                "`port` is the ssh port number, not {t:?} (a serial target names its device in `device`)"
            )));
        }
    };
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(Some(p)),
        _ => Err(serde::de::Error::custom(format!(
            "`port` must be 1 to 65535, not {n}"
        ))),
    }
}

/// An integer from `lo` to `hi`, refused with a message naming `key` otherwise.
fn int_in<'de, D: serde::Deserializer<'de>>(
    d: D,
    key: &str,
    lo: i64,
    hi: i64,
) -> Result<i64, D::Error> {
    let n = i64::deserialize(d)?;
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(serde::de::Error::custom(format!(
            "`{key}` must be {lo} to {hi}, not {n}"
        )))
    }
}

fn baud<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    int_in(d, "baud", 50, 16_000_000).map(|n| Some(n as u32))
}

fn reconnects<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    int_in(d, "reconnects", 0, 100).map(|n| Some(n as u32))
}

fn workspace_mb<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    int_in(d, "tensorrt_workspace_mb", 1, 1 << 20).map(|n| Some(n as u64))
}

fn chunk_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    int_in(d, "chunk_bytes", 64, 1 << 20).map(|n| Some(n as usize))
}

/// Whether `s` is safe to pass through a remote shell unquoted: letters, digits and `._/-+`.
fn shell_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-' | '+'))
}

/// What `{cache}` at the start of a path stands for.
const CACHE_PLACEHOLDER: &str = "{cache}";

/// whittle's cache folder: `$WHITTLE_CACHE`, else `$HOME/.cache/whittle`.
fn cache_dir() -> Option<PathBuf> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    non_empty("WHITTLE_CACHE")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|h| PathBuf::from(h).join(".cache").join("whittle")))
}

/// Errors reading a target file.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// No such target.
    #[error("no target '{name}': neither a file nor {dir}/{name}.toml (known: {known})")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The folder searched.
        dir: String,
        /// The targets there.
        known: String,
    },
    /// The file is unreadable or invalid.
    #[error("target {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (unknown key, missing field, bad runtime).
        reason: String,
    },
}

impl Target {
    /// Load a target by name (from `dir`) or by path.
    pub fn load(name_or_path: &str, dir: &Path) -> Result<Target, TargetError> {
        let as_path = Path::new(name_or_path);
        let path = if as_path.is_file() {
            as_path.to_path_buf()
        } else {
            dir.join(format!("{name_or_path}.toml"))
        };
        if !path.is_file() {
            let mut known: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let p = e.path();
                    if p.extension()? != "toml" {
                        return None;
                    }
                    Some(p.file_stem()?.to_string_lossy().into_owned())
                })
                .collect();
            known.sort();
            return Err(TargetError::NotFound {
                name: name_or_path.into(),
                dir: dir.display().to_string(),
                known: known.join(", "),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| TargetError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path)
    }

    /// Parse a target file's text (`path` names it in errors).
    ///
    /// The keys of the transport (`transport` and the fields of [`Connection`]'s variants) are read as
    /// a [`Connection`]; the others are the fields every target has, and an unknown key is refused there.
    pub fn parse(text: &str, path: &Path) -> Result<Target, TargetError> {
        let invalid = |reason: String| TargetError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let table: toml::Table =
            toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
        let is_link_key = |k: &str| {
            k == "transport" || CONNECTION_FIELDS.iter().any(|(_, keys)| keys.contains(&k))
        };
        let (link, common): (toml::Table, toml::Table) =
            table.into_iter().partition(|(k, _)| is_link_key(k));
        let common: Common = toml::Value::Table(common)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(e.message().to_string()))?;
        // A field of another transport: say whose it is (the variant would only call it unknown).
        if let Some(name) = link.get("transport").and_then(toml::Value::as_str) {
            for (transport, keys) in CONNECTION_FIELDS {
                if transport.name() == name {
                    continue;
                }
                if let Some(key) = keys.iter().find(|k| link.contains_key(**k)) {
                    let hint = if *key == "port" && name == Transport::Serial.name() {
                        " (a serial target names its device in `device`)"
                    } else {
                        ""
                    };
                    return Err(invalid(format!(
                        "`{key}` is only for transport \"{}\"{hint}",
                        transport.name()
                    )));
                }
            }
        }
        let mut connection: Connection =
            toml::Value::Table(link)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    let message = e.message();
                    let needs = REQUIRED
                        .iter()
                        .find(|(key, _)| message == format!("missing field `{key}`"));
                    invalid(
                        needs.map_or_else(|| message.to_string(), |(_, needs)| needs.to_string()),
                    )
                })?;
        let needs = |key: &str| {
            let (_, needs) = REQUIRED.iter().find(|(k, _)| *k == key).expect("listed");
            invalid(needs.to_string())
        };
        if common.runtimes.is_empty() {
            return Err(invalid("runtimes is empty".into()));
        }
        match &mut connection {
            Connection::Local(_) => {}
            Connection::Emulated(e) => {
                if e.qemu.is_empty() {
                    return Err(needs("qemu"));
                }
                if common.triple == "host" {
                    return Err(invalid(
                        "transport \"emulated\" needs the board's triple (e.g. \"aarch64-unknown-linux-gnu\"), not \"host\"".into(),
                    ));
                }
            }
            Connection::Ssh(s) => {
                if s.host.is_empty() {
                    return Err(needs("host"));
                }
                s.check().map_err(invalid)?;
            }
            Connection::Serial(s) => {
                if s.device.as_os_str().is_empty() {
                    return Err(needs("device"));
                }
                s.check().map_err(invalid)?;
            }
        }
        if matches!(connection, Connection::Ssh(_) | Connection::Serial(_))
            && common
                .ort_library
                .as_ref()
                .is_some_and(|l| l.starts_with(CACHE_PLACEHOLDER))
        {
            return Err(invalid(format!(
                "`ort_library` is a path on the board: {CACHE_PLACEHOLDER} (this machine's cache) means nothing there"
            )));
        }
        if !common.runtimes.contains(&RuntimeKind::OrtTensorRt) {
            for (key, set) in [
                ("tensorrt_fp16", common.tensorrt_fp16.is_some()),
                ("tensorrt_cache_dir", common.tensorrt_cache_dir.is_some()),
                (
                    "tensorrt_workspace_mb",
                    common.tensorrt_workspace_mb.is_some(),
                ),
            ] {
                if set {
                    return Err(invalid(format!(
                        "`{key}` is only for targets that measure \"ort-tensorrt\""
                    )));
                }
            }
        }
        if common
            .tensorrt_cache_dir
            .as_deref()
            .is_some_and(str::is_empty)
        {
            return Err(invalid("`tensorrt_cache_dir` is empty".into()));
        }
        let mut ort_library = common.ort_library;
        if let Some(lib) = &ort_library
            && let Ok(rest) = lib.strip_prefix(CACHE_PLACEHOLDER)
        {
            let cache = cache_dir().ok_or_else(|| {
                invalid(format!(
                    "ort_library starts with {CACHE_PLACEHOLDER}, but neither WHITTLE_CACHE nor HOME is set"
                ))
            })?;
            ort_library = Some(cache.join(rest));
        }
        Ok(Target {
            name: common.name,
            triple: common.triple,
            notes: common.notes,
            connection,
            runtimes: common.runtimes,
            threads: common.threads,
            allow_fallback: common.allow_fallback,
            ort_library,
            tensorrt_fp16: common.tensorrt_fp16,
            tensorrt_cache_dir: common.tensorrt_cache_dir,
            tensorrt_workspace_mb: common.tensorrt_workspace_mb,
        })
    }

    /// Which transport reaches the board.
    pub fn transport(&self) -> Transport {
        self.connection.transport()
    }

    /// The TensorRT workspace in bytes, from `tensorrt_workspace_mb`.
    pub fn tensorrt_workspace_bytes(&self) -> Option<u64> {
        self.tensorrt_workspace_mb.map(|mb| mb << 20)
    }
}

impl SshConnection {
    /// What serde cannot say about the ssh fields: the host, user and folder go through a shell,
    /// and a leading `~` in the key files stands for `$HOME` (replaced here).
    fn check(&mut self) -> Result<(), String> {
        let host = &self.host;
        if host.starts_with('-') || host.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err(format!(
                "`host` {host:?} is not a host name or address (put the user in `user`)"
            ));
        }
        if let Some(user) = &self.user
            && (user.starts_with('-') || !shell_safe(user) || user.contains('/'))
        {
            return Err(format!(
                "`user` {user:?} is not a user name (letters, digits, `._-+`)"
            ));
        }
        if let Some(dir) = &self.remote_dir
            && (!dir.starts_with('/') || !shell_safe(dir))
        {
            return Err(format!(
                "`remote_dir` {dir:?} must be an absolute path of letters, digits and `._/-+` (it goes through the board's shell)"
            ));
        }
        for (key, field) in [
            ("identity", &mut self.identity),
            ("known_hosts", &mut self.known_hosts),
        ] {
            if let Some(p) = field.as_mut()
                && let Ok(rest) = p.strip_prefix("~")
            {
                let home = std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| format!("`{key}` starts with ~, but HOME is not set"))?;
                *p = PathBuf::from(home).join(rest);
            }
        }
        Ok(())
    }

    /// The ssh port: `port`, else [`DEFAULT_SSH_PORT`].
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(DEFAULT_SSH_PORT)
    }

    /// The folder on the board: `remote_dir`, else [`DEFAULT_REMOTE_DIR`].
    pub fn remote_dir_or_default(&self) -> &str {
        self.remote_dir.as_deref().unwrap_or(DEFAULT_REMOTE_DIR)
    }
}

impl SerialConnection {
    /// The timeouts' ranges (the integer fields are checked as they are read).
    fn check(&self) -> Result<(), String> {
        for (key, v, max) in [
            ("timeout_s", self.timeout_s, 3600.0),
            ("run_timeout_s", self.run_timeout_s, 86_400.0),
        ] {
            if let Some(v) = v
                && !(v > 0.0 && v <= max)
            {
                return Err(format!(
                    "`{key}` must be more than 0 and at most {max} seconds, not {v}"
                ));
            }
        }
        Ok(())
    }

    /// How the serial transport waits, retries and cuts uploads: the fields, or the defaults.
    pub fn options(&self) -> crate::serial::SerialOptions {
        crate::serial::SerialOptions {
            baud: self.baud.unwrap_or(DEFAULT_BAUD),
            timeout: std::time::Duration::from_secs_f64(
                self.timeout_s.unwrap_or(DEFAULT_SERIAL_TIMEOUT_S),
            ),
            run_timeout: std::time::Duration::from_secs_f64(
                self.run_timeout_s.unwrap_or(DEFAULT_RUN_TIMEOUT_S),
            ),
            reconnects: self.reconnects.unwrap_or(DEFAULT_RECONNECTS),
            chunk_bytes: self.chunk_bytes.unwrap_or(DEFAULT_CHUNK_BYTES),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_runtime_and_keys_are_refused() {
        let p = Path::new("t.toml");
        let ok = "name = \"h\"\ntriple = \"host\"\ntransport = \"local\"\nruntimes = [\"ort-cpu\", \"tract\"]\n";
        let t = Target::parse(ok, p).unwrap();
        assert_eq!(t.runtimes, vec![RuntimeKind::OrtCpu, RuntimeKind::Tract]);
        let e = Target::parse(&ok.replace("tract", "tflite"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tflite"), "{e}");
        let e = Target::parse(&format!("{ok}colour = 1\n"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e = Target::parse(&ok.replace("triple = \"host\"\n", ""), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("triple"), "{e}");
        let e = Target::parse(&format!("{ok}qemu = \"qemu-aarch64\"\n"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only for transport \"emulated\""), "{e}");
    }

    #[test]
    fn emulated_targets_need_an_emulator_and_a_triple() {
        let p = Path::new("q.toml");
        let ok = "name = \"q\"\ntriple = \"aarch64-unknown-linux-gnu\"\ntransport = \"emulated\"\nruntimes = [\"ort-cpu\"]\nqemu = \"qemu-aarch64\"\nsysroot = \"/usr/aarch64-linux-gnu\"\nort_library = \"{cache}/ort-aarch64/lib.so\"\n";
        let t = Target::parse(ok, p).unwrap();
        assert_eq!(t.transport(), Transport::Emulated);
        let Connection::Emulated(e) = &t.connection else {
            panic!("{:?}", t.connection)
        };
        assert_eq!(e.qemu, "qemu-aarch64");
        assert_eq!(
            e.sysroot.as_deref(),
            Some(Path::new("/usr/aarch64-linux-gnu"))
        );
        let lib = t.ort_library.unwrap();
        assert!(lib.ends_with("ort-aarch64/lib.so"), "{}", lib.display());
        assert!(!lib.starts_with(CACHE_PLACEHOLDER), "{}", lib.display());
        assert_eq!(
            Some(lib.parent().unwrap().parent().unwrap()),
            cache_dir().as_deref()
        );

        let e = Target::parse(&ok.replace("qemu = \"qemu-aarch64\"\n", ""), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `qemu`"), "{e}");
        let e = Target::parse(&ok.replace("aarch64-unknown-linux-gnu", "host"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("board's triple"), "{e}");
    }

    #[test]
    fn ssh_targets_need_a_host_and_keep_ssh_fields_to_themselves() {
        let p = Path::new("s.toml");
        let ok = "name = \"s\"\ntriple = \"aarch64-unknown-linux-gnu\"\ntransport = \"ssh\"\nruntimes = [\"ort-cpu\"]\nhost = \"raspberrypi.local\"\n";
        let ssh = |text: &str| match Target::parse(text, p).unwrap().connection {
            Connection::Ssh(s) => s,
            other => panic!("{other:?}"),
        };
        let s = ssh(ok);
        assert_eq!(s.port_or_default(), 22);
        assert_eq!(s.remote_dir_or_default(), "/tmp/whittle");
        assert_eq!(s.user, None);

        let full = format!(
            "{ok}port = 2222\nuser = \"pi\"\nidentity = \"~/.ssh/id_ed25519\"\nknown_hosts = \"/k/known_hosts\"\nremote_dir = \"/home/pi/whittle\"\n"
        );
        let s = ssh(&full);
        assert_eq!(s.port_or_default(), 2222);
        assert_eq!(s.user.as_deref(), Some("pi"));
        assert_eq!(s.remote_dir_or_default(), "/home/pi/whittle");
        let key = s.identity.unwrap();
        assert!(key.ends_with(".ssh/id_ed25519"), "{}", key.display());
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            assert!(key.starts_with(home), "{}", key.display());
        }

        let refused = |text: &str, want: &str| {
            let e = Target::parse(text, p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        refused(
            &ok.replace("host = \"raspberrypi.local\"\n", ""),
            "needs `host`",
        );
        refused(&ok.replace("raspberrypi.local", ""), "needs `host`");
        refused(
            &ok.replace("raspberrypi.local", "pi@raspberrypi.local"),
            "put the user",
        );
        refused(&format!("{ok}port = 0\n"), "1 to 65535");
        refused(
            &format!("{ok}port = 70000\n"),
            "`port` must be 1 to 65535, not 70000",
        );
        refused(&format!("{ok}remote_dir = \"tmp/w\"\n"), "absolute");
        refused(&format!("{ok}remote_dir = \"/tmp/a b\"\n"), "remote_dir");
        refused(&format!("{ok}user = \"a;b\"\n"), "not a user name");
        refused(
            &format!("{ok}ort_library = \"{{cache}}/x.so\"\n"),
            "path on the board",
        );
        let local =
            "name = \"h\"\ntriple = \"host\"\ntransport = \"local\"\nruntimes = [\"ort-cpu\"]\n";
        for field in [
            "host = \"x\"",
            "port = 22",
            "user = \"pi\"",
            "identity = \"/k\"",
            "known_hosts = \"/k\"",
            "remote_dir = \"/tmp/w\"",
        ] {
            let key = field.split(' ').next().unwrap();
            refused(
                &format!("{local}{field}\n"),
                &format!("`{key}` is only for transport \"ssh\""),
            );
        }
    }

    #[test]
    fn serial_targets_need_a_device_and_keep_serial_fields_to_themselves() {
        let p = Path::new("serial.toml");
        let ok = "name = \"b\"\ntriple = \"aarch64-unknown-linux-gnu\"\ntransport = \"serial\"\nruntimes = [\"ort-cpu\"]\ndevice = \"/dev/ttyUSB0\"\n";
        let options = |text: &str| match Target::parse(text, p).unwrap().connection {
            Connection::Serial(s) => s.options(),
            other => panic!("{other:?}"),
        };
        let o = options(ok);
        assert_eq!(o.baud, 115_200);
        assert_eq!(o.timeout, std::time::Duration::from_secs(5));
        assert_eq!(o.reconnects, 5);
        assert_eq!(o.chunk_bytes, 4096);
        let full = format!(
            "{ok}baud = 921600\ntimeout_s = 0.5\nrun_timeout_s = 60\nreconnects = 2\nchunk_bytes = 1024\n"
        );
        let o = options(&full);
        assert_eq!(
            (o.baud, o.timeout.as_millis(), o.run_timeout.as_secs()),
            (921_600, 500, 60)
        );
        assert_eq!((o.reconnects, o.chunk_bytes), (2, 1024));

        let refused = |text: &str, want: &str| {
            let e = Target::parse(text, p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains('\n'), "{e}");
        };
        refused(
            &ok.replace("device = \"/dev/ttyUSB0\"\n", ""),
            "needs `device`",
        );
        refused(
            &format!("{ok}baud = 0\n"),
            "`baud` must be 50 to 16000000, not 0",
        );
        refused(
            &format!("{ok}baud = -5\n"),
            "`baud` must be 50 to 16000000, not -5",
        );
        refused(
            &format!("{ok}timeout_s = 0\n"),
            "`timeout_s` must be more than 0",
        );
        refused(&format!("{ok}timeout_s = nan\n"), "`timeout_s`");
        refused(
            &format!("{ok}reconnects = 1000\n"),
            "`reconnects` must be 0 to 100",
        );
        refused(
            &format!("{ok}chunk_bytes = 8\n"),
            "`chunk_bytes` must be 64",
        );
        refused(&format!("{ok}host = \"x\"\n"), "only for transport \"ssh\"");
        refused(
            &format!("{ok}port = \"/dev/ttyUSB0\"\n"),
            "a serial target names its device in `device`",
        );
        refused(
            &format!("{ok}ort_library = \"{{cache}}/x.so\"\n"),
            "path on the board",
        );
        let local =
            "name = \"h\"\ntriple = \"host\"\ntransport = \"local\"\nruntimes = [\"ort-cpu\"]\n";
        for field in [
            "device = \"/dev/ttyUSB0\"",
            "baud = 9600",
            "timeout_s = 1",
            "run_timeout_s = 1",
            "reconnects = 1",
            "chunk_bytes = 512",
        ] {
            let key = field.split(' ').next().unwrap();
            refused(
                &format!("{local}{field}\n"),
                &format!("`{key}` is only for transport \"serial\""),
            );
        }
    }

    #[test]
    fn tensorrt_fields_need_the_tensorrt_runtime() {
        let p = Path::new("trt.toml");
        let ok = "name = \"j\"\ntriple = \"host\"\ntransport = \"local\"\nruntimes = [\"ort-tensorrt\", \"ort-cpu\"]\ntensorrt_fp16 = false\ntensorrt_cache_dir = \"/var/cache/trt\"\ntensorrt_workspace_mb = 512\n";
        let t = Target::parse(ok, p).unwrap();
        assert_eq!(t.tensorrt_fp16, Some(false));
        assert_eq!(t.tensorrt_cache_dir.as_deref(), Some("/var/cache/trt"));
        assert_eq!(t.tensorrt_workspace_bytes(), Some(512 << 20));
        let refused = |text: &str, want: &str| {
            let e = Target::parse(text, p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        refused(
            &ok.replace("\"ort-tensorrt\", ", ""),
            "`tensorrt_fp16` is only for targets that measure \"ort-tensorrt\"",
        );
        refused(
            &ok.replace("512", "0"),
            "`tensorrt_workspace_mb` must be 1 to 1048576, not 0",
        );
        refused(
            &ok.replace("/var/cache/trt", ""),
            "`tensorrt_cache_dir` is empty",
        );
    }

    #[test]
    fn shipped_targets_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets");
        for name in [
            "host",
            "qemu-aarch64",
            "raspberry-pi-5",
            "serial-board",
            "jetson-orin-nano",
            "jetson-nano",
            "armv7-board",
        ] {
            let t = Target::load(name, &dir).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(t.name, name);
        }
        // `just setup-cross` installs the version `just setup` pins (ORT_VERSION).
        let q = Target::load("qemu-aarch64", &dir).unwrap();
        let v = whittle_runtime::ORT_VERSION;
        let lib = q.ort_library.expect("qemu-aarch64 names its library");
        assert!(
            lib.ends_with(format!("ort-aarch64/{v}/libonnxruntime.so.{v}")),
            "{}",
            lib.display()
        );
        let pi = Target::load("raspberry-pi-5", &dir).unwrap();
        let Connection::Ssh(s) = &pi.connection else {
            panic!("{:?}", pi.connection)
        };
        assert_eq!(pi.triple, "aarch64-unknown-linux-gnu");
        assert_eq!(s.host, "raspberrypi.local");
        assert_eq!(pi.runtimes, vec![RuntimeKind::OrtCpu]);
        let lib = pi.ort_library.expect("the Pi names its library");
        assert!(
            lib.ends_with(format!("libonnxruntime.so.{v}")),
            "{}",
            lib.display()
        );
        let orin = Target::load("jetson-orin-nano", &dir).unwrap();
        assert_eq!(orin.transport(), Transport::Ssh);
        assert_eq!(
            orin.runtimes,
            vec![
                RuntimeKind::OrtTensorRt,
                RuntimeKind::OrtCuda,
                RuntimeKind::OrtCpu,
                RuntimeKind::Tract
            ]
        );
        assert_eq!(orin.tensorrt_fp16, Some(true));
        assert!(orin.tensorrt_cache_dir.is_some());
        assert_eq!(orin.tensorrt_workspace_bytes(), Some(2048 << 20));
        assert!(!orin.allow_fallback, "a missing TensorRT must be an error");
        let nano = Target::load("jetson-nano", &dir).unwrap();
        assert_eq!(nano.triple, "aarch64-unknown-linux-gnu");
        assert!(nano.notes.contains("2.27"), "{}", nano.notes);
        let armv7 = Target::load("armv7-board", &dir).unwrap();
        assert_eq!(armv7.triple, "armv7-unknown-linux-gnueabihf");
        assert_eq!(armv7.runtimes, vec![RuntimeKind::Tract]);
        let serial = Target::load("serial-board", &dir).unwrap();
        let Connection::Serial(s) = &serial.connection else {
            panic!("{:?}", serial.connection)
        };
        assert_eq!(s.device, Path::new("/dev/ttyUSB0"));
        assert_eq!(s.options().baud, 115_200);
        let host = Target::load("host", &dir).unwrap();
        assert_eq!(host.connection, Connection::Local(LocalConnection {}));
    }

    #[test]
    fn a_transport_is_named_and_known_and_its_fields_are_listed() {
        let p = Path::new("t.toml");
        let base =
            "name = \"b\"\ntriple = \"aarch64-unknown-linux-gnu\"\nruntimes = [\"ort-cpu\"]\n";
        let e = Target::parse(base, p).unwrap_err().to_string();
        assert_eq!(e, "target t.toml: missing field `transport`");
        let e = Target::parse(&format!("{base}transport = \"usb\"\n"), p)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("target t.toml: unknown variant `usb`"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        // every field CONNECTION_FIELDS lists is one its variant takes (deny_unknown_fields would refuse
        // any other)
        let values = [
            ("qemu", "\"qemu-aarch64\""),
            ("sysroot", "\"/usr/aarch64-linux-gnu\""),
            ("host", "\"pi\""),
            ("port", "22"),
            ("user", "\"pi\""),
            ("identity", "\"/k\""),
            ("known_hosts", "\"/k\""),
            ("remote_dir", "\"/tmp/w\""),
            ("device", "\"/dev/ttyUSB0\""),
            ("baud", "9600"),
            ("timeout_s", "1"),
            ("run_timeout_s", "1"),
            ("reconnects", "1"),
            ("chunk_bytes", "512"),
        ];
        for (transport, keys) in CONNECTION_FIELDS {
            let mut text = format!("{base}transport = \"{}\"\n", transport.name());
            for key in keys {
                let (_, v) = values.iter().find(|(k, _)| k == key).expect("a value");
                text.push_str(&format!("{key} = {v}\n"));
            }
            let t = Target::parse(&text, p).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(t.transport(), transport);
        }
        let e = Target::parse(&format!("{base}transport = \"local\"\nsdk = 1\n"), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("target t.toml: unknown field `sdk`, expected one of `name`"),
            "{e}"
        );
    }
}
