//! Locating and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is linked at build time, and the library is opened at
//! run time with [`ort::init_from`]. `ort::init()` is never called, because it panics when the library
//! is missing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, one_line};

/// The ONNX Runtime version whittle is built and tested against (the `ort` crate targets its API).
pub const ORT_VERSION: &str = "1.31.1";

/// Where whittle looks for ONNX Runtime, in order:
///
/// 1. `ORT_DYLIB_PATH`, when set and not empty (an error if that file does not exist);
/// 2. `$WHITTLE_CACHE/ort/<ORT_VERSION>/libonnxruntime.so.<ORT_VERSION>`, where `WHITTLE_CACHE`
///    defaults to `$HOME/.cache/whittle` (this is where `just setup` puts it).
///
/// Returns the path of an existing file, or [`Error::OrtLibraryNotFound`] saying where it looked.
pub fn locate_ort_library() -> Result<PathBuf, Error> {
    locate_with(
        std::env::var_os("ORT_DYLIB_PATH"),
        std::env::var_os("WHITTLE_CACHE"),
        std::env::var_os("HOME"),
    )
}

/// [`locate_ort_library`] with the environment passed in, so that it can be tested.
fn locate_with(
    ort_dylib_path: Option<OsString>,
    whittle_cache: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, Error> {
    let non_empty = |v: Option<OsString>| v.filter(|s| !s.is_empty());
    let (path, origin) = if let Some(p) = non_empty(ort_dylib_path) {
        (PathBuf::from(p), "from ORT_DYLIB_PATH".to_string())
    } else {
        let cache = match (non_empty(whittle_cache), non_empty(home)) {
            (Some(c), _) => PathBuf::from(c),
            (None, Some(h)) => PathBuf::from(h).join(".cache").join("whittle"),
            (None, None) => return Err(Error::OrtLibraryNoSearchPath),
        };
        let path = cache
            .join("ort")
            .join(ORT_VERSION)
            .join(format!("libonnxruntime.so.{ORT_VERSION}"));
        (
            path,
            format!("default location for ONNX Runtime {ORT_VERSION}"),
        )
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::OrtLibraryNotFound { path, origin })
    }
}

/// The process-wide ONNX Runtime environment and the library it came from.
pub(crate) struct OrtRuntime {
    pub(crate) env: ort::environment::Environment,
    pub(crate) library: PathBuf,
}

static ORT: OnceLock<Result<OrtRuntime, Error>> = OnceLock::new();

/// Loads ONNX Runtime (once per process) and creates its environment.
///
/// The first call decides: the library found then stays loaded, and a failure is remembered and
/// returned again by every later call (a process cannot load a second copy of ONNX Runtime).
pub(crate) fn ort_runtime() -> Result<&'static OrtRuntime, Error> {
    ort_runtime_with(locate_ort_library)
}

/// [`ort_runtime`], with `locate` saying which library to load if none is loaded yet.
fn ort_runtime_with(
    locate: impl FnOnce() -> Result<PathBuf, Error>,
) -> Result<&'static OrtRuntime, Error> {
    ORT.get_or_init(|| {
        let library = locate()?;
        let env = ort::init_from(&library)
            .map_err(|e| Error::OrtInit {
                path: library.clone(),
                message: one_line(e),
            })?
            .with_name("whittle")
            .build()
            .map_err(|e| Error::OrtInit {
                path: library.clone(),
                message: one_line(e),
            })?;
        Ok(OrtRuntime { env, library })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Loads ONNX Runtime if it is not loaded yet, and returns the path of the library in use.
///
/// Useful to report which library a measurement used, or to fail early with a clear message.
pub fn init_ort() -> Result<&'static Path, Error> {
    ort_runtime().map(|rt| rt.library.as_path())
}

/// Loads ONNX Runtime from `library` (a board runner told where the library is) if it is not
/// loaded yet, and returns the path of the library in use.
///
/// Fails when the file does not exist, cannot be loaded, or when this process already loaded
/// ONNX Runtime from another file (a process cannot hold two copies).
pub fn init_ort_from(library: &Path) -> Result<&'static Path, Error> {
    let rt = ort_runtime_with(|| {
        if library.is_file() {
            Ok(library.to_path_buf())
        } else {
            Err(Error::OrtLibraryNotFound {
                path: library.to_path_buf(),
                origin: "given by the request".to_string(),
            })
        }
    })?;
    if rt.library != library {
        return Err(Error::OrtInit {
            path: library.to_path_buf(),
            message: format!(
                "this process already loaded ONNX Runtime from {}; start a new runner to use another library",
                rt.library.display()
            ),
        });
    }
    Ok(rt.library.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_that_does_not_exist_is_an_error_naming_it() {
        let err = locate_with(
            Some("/nonexistent/libonnxruntime.so".into()),
            None,
            Some("/root".into()),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/libonnxruntime.so"), "{msg}");
        assert!(msg.contains("ORT_DYLIB_PATH"), "{msg}");
        assert!(msg.contains("just setup"), "{msg}");
    }

    #[test]
    fn cache_location_follows_whittle_cache_then_home() {
        let dir = std::env::temp_dir().join(format!("whittle-ortlib-test-{}", std::process::id()));
        let lib_dir = dir.join("ort").join(ORT_VERSION);
        std::fs::create_dir_all(&lib_dir).expect("create temp dir");
        let lib = lib_dir.join(format!("libonnxruntime.so.{ORT_VERSION}"));
        std::fs::write(&lib, b"not really a library").expect("write temp file");

        let found = locate_with(
            None,
            Some(dir.clone().into()),
            Some("/nonexistent-home".into()),
        );
        assert_eq!(found.ok(), Some(lib.clone()));
        // An empty ORT_DYLIB_PATH counts as unset.
        let found = locate_with(Some("".into()), Some(dir.clone().into()), None);
        assert_eq!(found.ok(), Some(lib.clone()));

        let err = locate_with(None, None, Some("/nonexistent-home".into())).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent-home/.cache/whittle/ort/1.31.1/libonnxruntime.so.1.31.1"),
            "{msg}"
        );
        assert!(msg.contains("just setup"), "{msg}");

        assert!(matches!(
            locate_with(None, None, None),
            Err(Error::OrtLibraryNoSearchPath)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
