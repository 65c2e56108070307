//! Writing ONNX files safely and verifying a candidate model against a reference.

pub mod sts;
pub mod task;
pub mod verify;
pub mod write;

pub use task::Task;
pub use verify::{OutputReport, VerifyOptions, VerifyReport, verify};
pub use write::{remove_partial_files_on_interrupt, save_model, write_atomic};

/// Errors of writing and verification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Writing a file failed; nothing was left at the destination.
    #[error("cannot write {path}: {cause}")]
    Write {
        /// The destination.
        path: std::path::PathBuf,
        /// The I/O error (its text only: temporary file names are not the user's business).
        cause: String,
    },
    /// The output path is the input model.
    #[error("output {0} is the input model; whittle never overwrites its input")]
    SameAsInput(std::path::PathBuf),
    /// A model error.
    #[error(transparent)]
    Model(Box<whittle_core::Error>),
    /// A runtime error.
    #[error(transparent)]
    Runtime(Box<whittle_runtime::Error>),
    /// A dataset error.
    #[error(transparent)]
    Data(Box<whittle_calib::Error>),
    /// Reference and candidate cannot be compared.
    #[error("{0}")]
    Mismatch(String),
}

impl From<whittle_core::Error> for Error {
    fn from(e: whittle_core::Error) -> Self {
        Error::Model(Box::new(e))
    }
}

impl From<whittle_runtime::Error> for Error {
    fn from(e: whittle_runtime::Error) -> Self {
        Error::Runtime(Box::new(e))
    }
}

impl From<whittle_calib::Error> for Error {
    fn from(e: whittle_calib::Error) -> Self {
        Error::Data(Box::new(e))
    }
}
