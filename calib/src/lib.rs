//! whittle's datasets and preprocessing profiles: image folders, flat image folders and raw
//! tensor files (`.npy`, `.npz`, `.bin`) turned into batches of model inputs; and activation
//! capture ([`capture()`]), which runs a model over such batches and hands intermediate tensors to
//! a visitor.
//!
//! ```no_run
//! use std::path::Path;
//! use whittle_calib::{Dataset, InputSpec, Preprocess};
//!
//! let data = Dataset::open(Path::new("data/cifar10/test-a"))?;
//! let pre = Preprocess::from_name_or_path("resnet8")?;
//! let input = InputSpec::new("input", "float", &[3, 32, 32]);
//! let batch = data.load_batch(&data.sample(64, 0), &[input], &pre)?;
//! # Ok::<(), whittle_calib::Error>(())
//! ```

#![warn(missing_docs)]

pub mod capture;
pub mod dataset;
pub mod error;
pub mod profile;
pub mod text;

pub use capture::{CaptureSpec, capture, input_specs, pad_batch};
pub use dataset::{Batch, Dataset, DatasetKind, Dtype, InputSpec};
pub use error::Error;
pub use profile::{BUILTIN_PROFILES, Color, Layout, Preprocess, Resize};

/// Locating the shared test assets (`../shared/assets` next to the workspace).
#[cfg(test)]
pub(crate) mod test_assets {
    use std::path::PathBuf;

    /// The assets folder, or `None` (after printing a skip note) when it is missing outside CI.
    /// In CI (`CI=true`) a missing folder fails the test.
    pub(crate) fn assets(test: &str) -> Option<PathBuf> {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/assets"));
        if dir.is_dir() {
            return Some(dir);
        }
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "{test}: test assets not found at {} (CI=true, so this fails instead of skipping)",
                dir.display()
            );
        }
        eprintln!(
            "{test}: skipped, test assets not found at {}",
            dir.display()
        );
        None
    }
}
