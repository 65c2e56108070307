//! Without the ONNX Runtime library, `ort-*` loads fail with a typed error (every time, never a
//! panic) and tract still works. Its own test binary, because the library choice is per process.

use std::path::PathBuf;

use whittle_runtime::{Error, RuntimeKind, RuntimeOptions, load};

#[test]
fn missing_ort_library_is_a_typed_error_every_time_and_tract_still_runs() {
    let missing = "/nonexistent/whittle-test/libonnxruntime.so.1.31.1";
    // SAFETY: the only test of this binary, set before any thread reads the environment.
    unsafe { std::env::set_var("ORT_DYLIB_PATH", missing) };

    let model = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/assets/models/mnist-8.onnx"
    ));
    let bytes = match std::fs::read(&model) {
        Ok(b) => b,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "{} cannot be read: {e} (CI=true, so this is a failure)",
                model.display()
            )
        }
        Err(e) => {
            eprintln!("SKIPPED: {} cannot be read: {e}", model.display());
            return;
        }
    };
    for _ in 0..2 {
        for kind in [RuntimeKind::OrtCpu, RuntimeKind::OrtCuda] {
            let err = load(kind, &bytes, &RuntimeOptions::default())
                .err()
                .expect("no library, no session");
            assert!(
                matches!(err, Error::OrtLibraryNotFound { .. }),
                "{kind}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(missing), "{msg}");
            assert!(
                msg.contains("set ORT_DYLIB_PATH or run `just setup`"),
                "{msg}"
            );
        }
    }
    assert!(load(RuntimeKind::Tract, &bytes, &RuntimeOptions::default()).is_ok());
}
