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
    /// An emulator (qemu-user) on this machine.
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
    /// Where ONNX Runtime's library lives on the board (`None`: whittle's own lookup).
    #[serde(default)]
    pub ort_library: Option<PathBuf>,
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
        let t: Target = toml::from_str(text).map_err(|e| TargetError::Invalid {
            path: path.to_path_buf(),
            reason: e.message().to_string(),
        })?;
        if t.runtimes.is_empty() {
            return Err(TargetError::Invalid {
                path: path.to_path_buf(),
                reason: "runtimes is empty".into(),
            });
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
    }
}
