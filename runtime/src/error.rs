//! The error type of `whittle-runtime`.

use std::path::PathBuf;

/// Everything that can go wrong while locating a runtime, loading a model, running or benchmarking it.
///
/// Every message is one line and names its cause; runtime messages are flattened to one line.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The ONNX Runtime shared library is not where we looked.
    #[error(
        "ONNX Runtime library not found at {} ({origin}); set ORT_DYLIB_PATH or run `just setup`",
        path.display()
    )]
    OrtLibraryNotFound {
        /// The path that was checked.
        path: PathBuf,
        /// Where that path came from (`ORT_DYLIB_PATH`, or the default cache location).
        origin: String,
    },

    /// No place to look for the ONNX Runtime library: neither `WHITTLE_CACHE` nor `HOME` is set.
    #[error(
        "cannot locate the ONNX Runtime library: ORT_DYLIB_PATH, WHITTLE_CACHE and HOME are all unset; set ORT_DYLIB_PATH or run `just setup`"
    )]
    OrtLibraryNoSearchPath,

    /// The ONNX Runtime library was found but could not be loaded or initialised.
    #[error("cannot initialise ONNX Runtime from {}: {message}", path.display())]
    OrtInit {
        /// The library that was loaded.
        path: PathBuf,
        /// What ONNX Runtime (or the loader) said.
        message: String,
    },

    /// An ONNX Runtime call failed.
    #[error("ONNX Runtime failed while {context}: {message}")]
    Ort {
        /// What we were doing (`creating the session`, `running the model`, ...).
        context: String,
        /// What ONNX Runtime said, on one line.
        message: String,
    },

    /// The requested execution provider is not compiled into the loaded ONNX Runtime library.
    #[error(
        "{provider} execution provider is not available in this ONNX Runtime build ({}); use an ONNX Runtime library built with {provider} (set ORT_DYLIB_PATH) or allow fallback to CPU",
        library.display()
    )]
    ProviderUnavailable {
        /// Short provider name (`CUDA`, `TensorRT`).
        provider: String,
        /// The ONNX Runtime library that lacks it.
        library: PathBuf,
    },

    /// The execution provider is compiled in but could not be registered (missing CUDA/cuDNN/TensorRT libraries, bad options).
    #[error("{provider} execution provider could not be registered: {message}")]
    ProviderFailed {
        /// Short provider name (`CUDA`, `TensorRT`).
        provider: String,
        /// What ONNX Runtime said, on one line.
        message: String,
    },

    /// A tract call failed.
    #[error("tract failed while {context}: {message}")]
    Tract {
        /// What we were doing (`optimising the model`, `running the model`, ...).
        context: String,
        /// tract's error chain, on one line.
        message: String,
    },

    /// The runtime was asked for but left out of this build (a cargo feature).
    #[error("this build has no {runtime} (built without the `{feature}` feature)")]
    RuntimeNotBuilt {
        /// The runtime's name (`tract`).
        runtime: &'static str,
        /// The cargo feature of `whittle-runtime` that brings it.
        feature: &'static str,
    },

    /// The model file cannot be used (not ONNX, no graph, an input without a type, ...).
    #[error("invalid model: {0}")]
    InvalidModel(String),

    /// An unknown runtime name.
    #[error("unknown runtime '{name}'; valid runtimes: {valid}")]
    UnknownRuntime {
        /// The name given.
        name: String,
        /// The valid names, comma separated.
        valid: String,
    },

    /// The values given to `run` do not fit the graph inputs (count, dtype or shape).
    #[error("{} expects {expected}, got {got}", subject(.input))]
    InputMismatch {
        /// The graph input concerned; `None` when the number of values is wrong.
        input: Option<String>,
        /// What the model expects, e.g. `float [N,3,32,32]`.
        expected: String,
        /// What was given, e.g. `float [1,3,64,64]`.
        got: String,
    },

    /// A requested input shape (`input_shapes`, synthetic input overrides) cannot apply to the model.
    #[error("shape for input '{input}': {reason}")]
    ShapeOverride {
        /// The input named by the override.
        input: String,
        /// Why it does not apply.
        reason: String,
    },

    /// A graph input or output has an element type or kind that whittle does not exchange.
    #[error("{io} '{name}' has type {dtype}, which whittle cannot {action}")]
    UnsupportedType {
        /// `input` or `output`.
        io: &'static str,
        /// The graph input or output name.
        name: String,
        /// Its type, as ONNX names it.
        dtype: String,
        /// What we tried (`feed`, `read back`, `synthesise`).
        action: &'static str,
    },

    /// A benchmark configuration that cannot run.
    #[error("invalid benchmark configuration: {0}")]
    InvalidBenchConfig(String),
}

fn subject(input: &Option<String>) -> String {
    match input {
        Some(name) => format!("input '{name}'"),
        None => "model".to_string(),
    }
}

/// Flattens a (possibly multi-line) runtime message to one line.
pub(crate) fn one_line(message: impl std::fmt::Display) -> String {
    let text = message.to_string();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Error {
    pub(crate) fn ort(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Ort {
            context: context.into(),
            message: one_line(err),
        }
    }

    /// tract errors are `anyhow` chains; `{:#}` prints the whole chain on one line.
    #[cfg(feature = "tract")]
    pub(crate) fn tract(context: impl Into<String>, err: &tract_onnx::prelude::TractError) -> Self {
        Error::Tract {
            context: context.into(),
            message: one_line(format!("{err:#}")),
        }
    }
}
