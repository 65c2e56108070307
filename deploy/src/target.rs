//! Board descriptions: one TOML file per target in `targets/`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::runtime::RuntimeKind;

/// How whittle reaches a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// This machine: the runner as a child process ([`crate::transport::Local`]).
    Local,
    /// A runner built for the target's triple, under a user-mode emulator (qemu-user) on this
    /// machine ([`crate::transport::Emulated`]).
    Emulated,
    /// ssh and scp through the system OpenSSH client.
    Ssh,
    /// A serial port.
    Serial,
}

/// A board description.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Short name (the file stem).
    pub name: String,
    /// Rust target triple of the board (`host` for this machine).
    pub triple: String,
    /// Free text: OS, glibc, JetPack version.
    #[serde(default)]
    pub notes: String,
    /// How to reach the board.
    pub transport: Transport,
    /// Runtimes to measure, in order.
    pub runtimes: Vec<RuntimeKind>,
    /// Intra-op threads (`None`: the runtime's default).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Run on CPU when a requested execution provider is missing, and report it.
    #[serde(default)]
    pub allow_fallback: bool,
    /// Where ONNX Runtime's library lives on the board (`None`: whittle's own lookup). A leading
    /// `{cache}` stands for whittle's cache on this machine (`$WHITTLE_CACHE`, default
    /// `~/.cache/whittle`), where `just setup-cross` puts the emulated targets' libraries.
    #[serde(default)]
    pub ort_library: Option<PathBuf>,
    /// `emulated` only, required: the user-mode emulator that runs the runner (`qemu-aarch64`).
    #[serde(default)]
    pub qemu: Option<String>,
    /// `emulated` only: the folder holding the target's dynamic loader and libraries, given to the
    /// emulator as `-L` (`/usr/aarch64-linux-gnu`).
    #[serde(default)]
    pub sysroot: Option<PathBuf>,
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
    pub fn parse(text: &str, path: &Path) -> Result<Target, TargetError> {
        let invalid = |reason: String| TargetError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut t: Target = toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
        if t.runtimes.is_empty() {
            return Err(invalid("runtimes is empty".into()));
        }
        if t.transport == Transport::Emulated {
            if t.qemu.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    "transport \"emulated\" needs `qemu`, the emulator to run the runner with (e.g. \"qemu-aarch64\")".into(),
                ));
            }
            if t.triple == "host" {
                return Err(invalid(
                    "transport \"emulated\" needs the board's triple (e.g. \"aarch64-unknown-linux-gnu\"), not \"host\"".into(),
                ));
            }
        } else {
            for (key, set) in [("qemu", t.qemu.is_some()), ("sysroot", t.sysroot.is_some())] {
                if set {
                    return Err(invalid(format!(
                        "`{key}` is only for transport \"emulated\""
                    )));
                }
            }
        }
        if let Some(lib) = &t.ort_library
            && let Ok(rest) = lib.strip_prefix(CACHE_PLACEHOLDER)
        {
            let cache = cache_dir().ok_or_else(|| {
                invalid(format!(
                    "ort_library starts with {CACHE_PLACEHOLDER}, but neither WHITTLE_CACHE nor HOME is set"
                ))
            })?;
            t.ort_library = Some(cache.join(rest));
        }
        Ok(t)
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
        assert_eq!(t.transport, Transport::Emulated);
        assert_eq!(t.qemu.as_deref(), Some("qemu-aarch64"));
        assert_eq!(
            t.sysroot.as_deref(),
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
    fn shipped_targets_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets");
        for name in ["host", "qemu-aarch64"] {
            let t = Target::load(name, &dir).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(t.name, name);
        }
        // `just setup-cross` installs the version `just setup` pins (ORT_VERSION).
        let q = Target::load("qemu-aarch64", &dir).unwrap();
        let v = crate::ORT_VERSION;
        let lib = q.ort_library.expect("qemu-aarch64 names its library");
        assert!(
            lib.ends_with(format!("ort-aarch64/{v}/libonnxruntime.so.{v}")),
            "{}",
            lib.display()
        );
    }
}
