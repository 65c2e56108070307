//! The bundled models (in the repository) and the shared assets (`../shared/assets` beside the
//! workspace, MiniLM in a cache). A missing shared asset is a note and `None`, so the test
//! returns early; under `CI=true` it is a failure, never a silent skip.

use std::path::{Path, PathBuf};

use prost::Message;
use whittle_core::onnx::ModelProto;

/// True under `CI=true`, where anything a test needs must be there.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Something a test needs is not there: a failure under `CI=true`, otherwise a `skipped: ...`
/// note on stderr (the caller then returns).
pub fn unavailable(what: &str) {
    assert!(!in_ci(), "{what} (CI=true: a missing piece is a failure)");
    eprintln!("skipped: {what}");
}

/// The workspace root (the folder holding `models/`, `data/`, `targets/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support/ has a parent")
        .to_path_buf()
}

/// The bundled ResNet-8 (`models/resnet8_cifar10.onnx` in the repository: never missing).
pub fn resnet8() -> PathBuf {
    repo_root().join("models/resnet8_cifar10.onnx")
}

/// A missing asset: `hint` (may be empty) says how to get it.
fn missing(what: &str, p: &Path, hint: &str) -> Option<PathBuf> {
    unavailable(&format!("{what} missing at {}{hint}", p.display()));
    None
}

/// The convolutional models of `../shared/assets/models` (`<name>.onnx`), smallest first but for
/// MNIST.
pub const CNN_MODELS: [&str; 6] = [
    "resnet8_cifar10",
    "resnet_large_cifar10",
    "mobilenetv1_025_vww96",
    "dscnn_kws",
    "efficientnet_lite0_224",
    "mnist-8",
];

/// `../shared/assets` next to the workspace.
pub fn shared_assets() -> Option<PathBuf> {
    let p = repo_root().join("../shared/assets");
    if p.is_dir() {
        Some(p)
    } else {
        missing("shared assets", &p, "")
    }
}

/// A file or folder inside the shared assets, e.g. `models/mnist-8.onnx`.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = shared_assets()?.join(rel);
    if p.exists() {
        Some(p)
    } else {
        missing("shared asset", &p, "")
    }
}

/// Every model with weights in `../shared/assets/models` (`*.onnx` but the `noweights` ones),
/// sorted; `None` (after the note) when the shared assets are missing.
pub fn shared_models() -> Option<Vec<PathBuf>> {
    let dir = shared_assets()?.join("models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "onnx") && !p.to_string_lossy().contains("noweights")
        })
        .collect();
    v.sort();
    Some(v)
}

/// MiniLM, rebuilt into `$WHITTLE_ASSETS_CACHE` (default `~/.cache/whittle/assets`) by
/// `../shared/assets/fetch.sh` (`just setup` runs it).
pub fn minilm() -> Option<PathBuf> {
    let cache = std::env::var_os("WHITTLE_ASSETS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/whittle/assets")
        });
    let p = cache.join("minilm-l6-v2.opset17.onnx");
    if p.is_file() {
        Some(p)
    } else {
        missing("MiniLM", &p, "; run ../shared/assets/fetch.sh")
    }
}

/// True when a test's system pieces are all there (`missing` is `None`); else it prints
/// "skipped: missing ..." naming `setup`, the recipe that installs them, or fails under `CI=true`.
pub fn ready(missing: Option<String>, setup: &str) -> bool {
    let Some(what) = missing else { return true };
    unavailable(&format!("missing {what}; run `{setup}`"));
    false
}

/// Element count of every weight stored in the file, decoded independently of whittle's IR:
/// initializers plus the tensors held by `Constant` nodes (anywhere in the main graph).
pub fn weight_elements(path: &Path) -> u64 {
    let m = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    let g = m.graph.unwrap();
    let mut n: u64 = g
        .initializer
        .iter()
        .map(|t| t.dims.iter().product::<i64>() as u64)
        .sum();
    for node in g.node.iter().filter(|n| n.op_type() == "Constant") {
        for a in &node.attribute {
            match a.name() {
                "value" => {
                    n +=
                        a.t.as_ref()
                            .map_or(0, |t| t.dims.iter().product::<i64>() as u64)
                }
                "value_floats" => n += a.floats.len() as u64,
                "value_ints" => n += a.ints.len() as u64,
                "value_float" | "value_int" => n += 1,
                _ => {}
            }
        }
    }
    n
}
