//! whittle's fuzz entry points: one function per cargo-fuzz target in `fuzz/`.
//!
//! Each function takes arbitrary bytes and must never panic, abort or run out of memory: a
//! malformed input is an error, which is returned by the library and dropped here. A few
//! invariants are asserted on top (a loaded model passes the graph check and survives a save and
//! reload byte for byte), so a broken invariant is a crash as well.
//!
//! The fuzz targets (`fuzz/fuzz_targets/<name>.rs`) only call these functions, and
//! `tests/replay.rs` replays every file under `fuzz/regressions/<name>/` through them in the
//! normal test run, so a crash found once stays fixed.
//!
//! | target | what it feeds |
//! |---|---|
//! | [`onnx_load`] | raw bytes as an ONNX file: load, graph check, shape inference, cost, save and reload |
//! | [`shape_infer`] | a small ONNX graph built from the bytes ([`graph`]), with input-shape overrides |
//! | [`target_toml`] | a board target file (`whittle_deploy::target::Target::parse`) |
//! | [`profile_toml`] | a preprocessing profile, then applied to a small fixed image |
//! | [`calib_npy`] | a `.npy` file (or a `.npz` archive when it starts with `PK`) as a dataset |
//! | [`calib_bin`] | a raw `.bin` dataset (element type and item shape from the first bytes) |
//! | [`calib_image`] | an image file with a built-in preprocessing profile (picked by the first byte) |
//! | [`runner_protocol`] | host <-> runner frames (`whittle_deploy::protocol`): one frame, a payload under a valid header, a stream |

pub mod graph;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use whittle_calib::dataset::{Dataset, Dtype, InputSpec};
use whittle_calib::profile::{BUILTIN_PROFILES, Preprocess, Resize};
use whittle_core::{LoadOptions, Model, check, cost, shape};
use whittle_deploy::protocol::{
    HEADER_BYTES, Message, ProtocolError, decode_frame, decode_message, encode_frame,
};
use whittle_deploy::target::Target;

/// An entry function: takes any bytes, never panics.
pub type Entry = fn(&[u8]);

/// Every target: its name (as in `fuzz/fuzz_targets/` and `fuzz/regressions/`) and its function.
pub const TARGETS: &[(&str, Entry)] = &[
    ("onnx_load", onnx_load),
    ("shape_infer", shape_infer),
    ("target_toml", target_toml),
    ("profile_toml", profile_toml),
    ("calib_npy", calib_npy),
    ("calib_bin", calib_bin),
    ("calib_image", calib_image),
    ("runner_protocol", runner_protocol),
];

/// The largest tensor a fuzzed model may declare (16 MiB; the inputs are far smaller).
const MAX_TENSOR_BYTES: u64 = 16 << 20;

fn load_options() -> LoadOptions {
    LoadOptions {
        max_tensor_bytes: MAX_TENSOR_BYTES,
    }
}

/// Raw bytes as an ONNX file: load (no external data), then [`exercise_model`].
pub fn onnx_load(data: &[u8]) {
    if let Ok(model) = Model::from_bytes(data, None, "fuzz.onnx", &load_options()) {
        exercise_model(&model, &[]);
    }
}

/// A small graph built by [`graph::build`] from the bytes, loaded like a file and exercised with
/// the input-shape overrides the bytes choose (positive sizes only, as `--input` allows).
pub fn shape_infer(data: &[u8]) {
    let built = graph::build(data);
    if let Ok(model) = Model::from_bytes(&built.model, None, "fuzz.onnx", &load_options()) {
        exercise_model(&model, &built.overrides);
    }
}

/// What whittle does with every model it reads: graph check, shape inference, params and MACs,
/// and a save and reload that must give the same bytes again.
pub fn exercise_model(model: &Model, overrides: &[(String, Vec<i64>)]) {
    check::check_graph(model.graph())
        .expect("a loaded model passes the graph check (load runs it)");
    if let Ok(shapes) = shape::infer(model, overrides) {
        let total = cost::count(model, &shapes);
        std::hint::black_box(total);
    }
    let saved = model.to_bytes();
    let again = Model::from_bytes(&saved, None, "saved.onnx", &load_options())
        .expect("a model whittle loaded and saved loads again");
    assert!(
        again.to_bytes() == saved,
        "save, reload and save again changed the bytes"
    );
}

/// A board target file's text.
pub fn target_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Target::parse(text, Path::new("fuzz.toml"));
    }
}

/// The largest resize or crop side the profile target applies to its fixed image: bigger ones
/// are legitimate settings that only cost memory (a 100000x100000 resize is asked for).
const MAX_APPLIED_SIDE: u32 = 1024;

/// A preprocessing profile's text; a valid profile of modest size is then applied to a fixed
/// 7x5 image (resize, crop, colour, normalisation, layout), and its shape must be the one
/// [`Preprocess::item_shape`] promises.
pub fn profile_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(pre) = Preprocess::from_toml_str(text, Path::new("fuzz.toml")) else {
        return;
    };
    pre.validate()
        .expect("a parsed profile passes its own validation");
    let _ = pre.to_string();
    let small = |(w, h): (u32, u32)| w <= MAX_APPLIED_SIDE && h <= MAX_APPLIED_SIDE;
    let resize_ok = match pre.resize {
        None => true,
        // The long side of a 7x5 image scaled to short side s is s * 7 / 5.
        Some(Resize::ShortSide(s)) => s <= MAX_APPLIED_SIDE / 2,
        Some(Resize::Exact(w, h)) => small((w, h)),
    };
    if !resize_ok || !pre.center_crop.is_none_or(small) {
        return;
    }
    let want = pre.item_shape(7, 5);
    with_file("fixture.png", FIXTURE_PNG, |path| {
        if let Ok(item) = pre.load_image(path) {
            assert_eq!(
                item.shape(),
                want.as_slice(),
                "item_shape and load_image agree"
            );
        }
    });
}

/// A 7x5 RGB PNG.
const FIXTURE_PNG: &[u8] = include_bytes!("fixture-7x5.png");

/// A `.npy` file as a dataset (a `.npz` archive when the bytes start with `PK`, as zip files
/// do), then batches, samples and splits of it.
pub fn calib_npy(data: &[u8]) {
    let name = if data.starts_with(b"PK") {
        "fuzz.npz"
    } else {
        "fuzz.npy"
    };
    with_file(name, data, |path| {
        if let Ok(dataset) = Dataset::open(path) {
            exercise_tensor_dataset(&dataset);
        }
    });
}

/// A raw `.bin` dataset. Byte 0 picks the element type, byte 1 the item rank (0 to 3), the next
/// `rank` bytes the item dimensions; the rest is the file.
pub fn calib_bin(data: &[u8]) {
    const DTYPES: [Dtype; 5] = [Dtype::F32, Dtype::F64, Dtype::I64, Dtype::I32, Dtype::Bool];
    let Some((&[d, r], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let dtype = DTYPES[usize::from(d) % DTYPES.len()];
    let rank = usize::from(r % 4).min(rest.len());
    let (dims, file) = rest.split_at(rank);
    let item_shape: Vec<usize> = dims.iter().map(|&x| usize::from(x)).collect();
    with_file("fuzz.bin", file, |path| {
        if let Ok(dataset) = Dataset::open_bin(path, dtype, &item_shape) {
            exercise_tensor_dataset(&dataset);
        }
    });
}

/// Batches of a tensor dataset as every input type, then a sample and a split.
fn exercise_tensor_dataset(dataset: &Dataset) {
    let len = dataset.len();
    assert!(len > 0, "an opened dataset is not empty");
    let item_shape = dataset.item_shape("input").unwrap_or_default();
    for dtype in ["float", "int64", "int32", "bool", "double"] {
        let spec = [InputSpec::new("input", dtype, &item_shape)];
        if let Ok(batch) = dataset.load_batch(&[len - 1, 0], &spec, &Preprocess::default()) {
            assert_eq!(batch.inputs.len(), 1);
            assert_eq!(batch.inputs[0].shape().first(), Some(&2));
        }
    }
    let picked = dataset.sample(3, 7);
    assert!(picked.len() == len.min(3) && picked.iter().all(|&i| i < len));
    let (calib, held) = dataset.split(0.5, 7).expect("0.5 is a valid fraction");
    assert_eq!(calib.len() + held.len(), len);
}

/// The most pixels an image given to [`calib_image`] may declare (4 Mi). Larger images are
/// legitimate and cost time in proportion (a 4 KB JPEG declaring 64000x256 decodes and resizes in
/// 0.35 s in a release build, over 15 s under the fuzzer's instrumentation): the fuzzer looks for
/// costs out of proportion to the image, not for big images.
const MAX_FUZZ_IMAGE_PIXELS: u64 = 1 << 22;

/// An image file, preprocessed with the built-in profile byte 0 picks (`BUILTIN_PROFILES`).
/// Byte 0 also picks the file extension (`.png` or `.jpg`; the format is guessed from the
/// content first); the rest is the file. Images declaring more than [`MAX_FUZZ_IMAGE_PIXELS`]
/// are skipped.
pub fn calib_image(data: &[u8]) {
    let Some((&first, file)) = data.split_first() else {
        return;
    };
    let declared = image::ImageReader::new(std::io::Cursor::new(file))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok());
    if declared.is_some_and(|(w, h)| u64::from(w) * u64::from(h) > MAX_FUZZ_IMAGE_PIXELS) {
        return;
    }
    let profile = BUILTIN_PROFILES[usize::from(first) % BUILTIN_PROFILES.len()];
    let pre = Preprocess::builtin(profile).expect("a built-in profile name");
    let name = if (first / 16) % 2 == 0 {
        "fuzz.png"
    } else {
        "fuzz.jpg"
    };
    with_file(name, file, |path| {
        if let Ok(item) = pre.load_image(path) {
            assert_eq!(item.shape().len(), 3);
        }
    });
}

thread_local! {
    /// A scratch folder per thread for the readers that take paths.
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// Writes `bytes` to the file `name` in this thread's scratch folder and calls `f` with its path.
fn with_file(name: &str, bytes: &[u8], f: impl FnOnce(&Path)) {
    let path: PathBuf = SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let dir = s.get_or_insert_with(|| {
            tempfile::Builder::new()
                .prefix("whittle-fuzz-")
                .tempdir()
                .expect("a scratch folder in the temporary directory")
        });
        dir.path().join(name)
    });
    std::fs::write(&path, bytes).expect("writing a scratch file");
    f(&path);
}

/// The payload cap of the stream reading in [`runner_protocol`] (the inputs are far smaller).
const MAX_STREAM_FRAME: u32 = 1 << 20;

/// Bytes from a board: as one frame ([`decode_message`]), as the payload of a frame with a
/// correct header (so that the checksum lets them through to the protobuf decoder), and as a
/// stream of frames ([`decode_frame`]). Every decoded message is encoded again and must decode to
/// the same bytes, and a result's conversions run.
pub fn runner_protocol(data: &[u8]) {
    if let Ok(msg) = decode_message(data) {
        exercise_message(&msg);
    }
    if let Ok(len) = u32::try_from(data.len()) {
        let mut framed = Vec::with_capacity(HEADER_BYTES + data.len());
        framed.extend_from_slice(&len.to_le_bytes());
        framed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
        framed.extend_from_slice(data);
        if let Ok(msg) = decode_message(&framed) {
            exercise_message(&msg);
        }
    }
    let mut stream = std::io::Cursor::new(data);
    loop {
        match decode_frame(&mut stream, MAX_STREAM_FRAME) {
            Ok(Some(msg)) => exercise_message(&msg),
            // A bad checksum or payload consumes its frame; the next one follows.
            Err(ProtocolError::Checksum { .. } | ProtocolError::Decode(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
}

fn exercise_message(msg: &Message) {
    let frame = encode_frame(msg);
    let again = decode_message(&frame).expect("an encoded frame decodes");
    assert!(
        encode_frame(&again) == frame,
        "decode and encode again changed the frame"
    );
    if let Message::Result(result) = msg {
        std::hint::black_box((result.stats(), result.provider_info(), result.shapes()));
    }
}
