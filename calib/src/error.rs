//! The error type of whittle-calib.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while reading a dataset or a preprocessing profile.
///
/// Each message is one line that names the cause and the file or folder involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or folder could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// A profile name is neither a built-in profile nor an existing file.
    #[error(
        "unknown preprocessing profile '{name}': no such file, and not a built-in profile ({builtins})"
    )]
    UnknownProfile {
        /// The name as given.
        name: String,
        /// The built-in profile names, comma separated.
        builtins: String,
    },

    /// A TOML profile could not be parsed (syntax error, unknown key, wrong value type).
    #[error("profile {path}{}: {reason}", .line.map(|l| format!(" line {l}")).unwrap_or_default())]
    ProfileSyntax {
        /// The profile file.
        path: PathBuf,
        /// The 1-based line of the offending text, when known.
        line: Option<usize>,
        /// What is wrong.
        reason: String,
    },

    /// A preprocessing specification is inconsistent (a mean of the wrong length, a zero std, ...).
    #[error("invalid preprocessing in {origin}: {reason}")]
    InvalidPreprocess {
        /// Where the specification came from: a profile file, or `preprocessing settings`.
        origin: String,
        /// What is wrong.
        reason: String,
    },

    /// A text file or a tokenizer could not be used for calibration text.
    #[error("{path}: {reason}")]
    Text {
        /// The text file or tokenizer.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// An image file could not be decoded.
    #[error("cannot decode image {path}: {reason}")]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },

    /// A center crop is larger than the (resized) image it applies to.
    #[error(
        "image {path} is {found_w}x{found_h} after resizing, smaller than the {crop_w}x{crop_h} center crop"
    )]
    CropTooLarge {
        /// The image file.
        path: PathBuf,
        /// Width of the image before cropping.
        found_w: u32,
        /// Height of the image before cropping.
        found_h: u32,
        /// Width of the crop.
        crop_w: u32,
        /// Height of the crop.
        crop_h: u32,
    },

    /// Resizing an image would make it larger than [`MAX_RESIZED_PIXELS`] pixels (an extreme
    /// aspect ratio with a short-side resize, or a huge resize setting).
    ///
    /// [`MAX_RESIZED_PIXELS`]: crate::profile::MAX_RESIZED_PIXELS
    #[error(
        "image {path} is {width}x{height}; resizing it to {resize_w}x{resize_h} would exceed the limit of {max_pixels} pixels"
    )]
    ResizeTooLarge {
        /// The image file.
        path: PathBuf,
        /// Width of the decoded image.
        width: u32,
        /// Height of the decoded image.
        height: u32,
        /// Width the resize asks for.
        resize_w: u64,
        /// Height the resize asks for.
        resize_h: u64,
        /// The limit, [`MAX_RESIZED_PIXELS`](crate::profile::MAX_RESIZED_PIXELS).
        max_pixels: u64,
    },

    /// A preprocessed image does not have the shape of the model input.
    #[error(
        "image {path} gives {} after preprocessing, model input '{input}' expects {}",
        shape(.found), shape(.expected)
    )]
    ImageShape {
        /// The image file.
        path: PathBuf,
        /// The model input name.
        input: String,
        /// The item shape the model input expects (without the batch axis).
        expected: Vec<usize>,
        /// The shape the image gives.
        found: Vec<usize>,
    },

    /// The items of a tensor dataset do not have the shape of the model input.
    #[error(
        "{path}: items of '{array}' are {}, model input '{input}' expects {}",
        shape(.found), shape(.expected)
    )]
    TensorShape {
        /// The dataset file.
        path: PathBuf,
        /// The array name inside the file (`.npz`), or the file name.
        array: String,
        /// The model input name.
        input: String,
        /// The item shape the model input expects (without the batch axis).
        expected: Vec<usize>,
        /// The item shape found in the file.
        found: Vec<usize>,
    },

    /// The element type of a dataset does not match the model input.
    #[error("{path}: items of '{array}' are {found}, model input '{input}' expects {expected}")]
    DtypeMismatch {
        /// The dataset file.
        path: PathBuf,
        /// The array name inside the file (`.npz`), or the file name.
        array: String,
        /// The model input name.
        input: String,
        /// The element type the model input expects.
        expected: String,
        /// The element type found.
        found: String,
    },

    /// An element type name is not one whittle knows.
    #[error(
        "unknown element type '{name}' for {context} (known: float, double, int64, int32, bool)"
    )]
    UnknownDtype {
        /// The name as given.
        name: String,
        /// What the type was for (a model input, a `.bin` file).
        context: String,
    },

    /// A `.npy` or `.npz` array holds an element type whittle does not read.
    #[error(
        "{path}: array '{array}' has element type {descr}; supported: float32, float64, int64, int32, bool"
    )]
    UnsupportedArrayDtype {
        /// The dataset file.
        path: PathBuf,
        /// The array name.
        array: String,
        /// NumPy's type descriptor.
        descr: String,
    },

    /// A `.npy` or `.npz` file is malformed.
    #[error("cannot read {path} as {format}: {reason}")]
    Array {
        /// The dataset file.
        path: PathBuf,
        /// `.npy` or `.npz`.
        format: &'static str,
        /// The reader's message.
        reason: String,
    },

    /// A `.bin` file's size is not a whole number of items.
    #[error(
        "{path}: file size {file_size} bytes is not a multiple of the item size {item_size} bytes ({dtype} {})",
        shape(.item_shape)
    )]
    BinSize {
        /// The dataset file.
        path: PathBuf,
        /// The file size in bytes.
        file_size: u64,
        /// The size of one item in bytes.
        item_size: u64,
        /// The element type.
        dtype: String,
        /// The item shape.
        item_shape: Vec<usize>,
    },

    /// A `.bin` file was opened without the element type and item shape it needs.
    #[error("{path}: a .bin dataset needs an element type and an item shape given separately")]
    BinNeedsShape {
        /// The dataset file.
        path: PathBuf,
    },

    /// An item shape is empty in size (a zero dimension) or too large to address.
    #[error("{path}: invalid item shape {}: {reason}", shape(.item_shape))]
    InvalidItemShape {
        /// The dataset file.
        path: PathBuf,
        /// The item shape.
        item_shape: Vec<usize>,
        /// What is wrong.
        reason: String,
    },

    /// A dataset holds no items.
    #[error("{path}: empty dataset: {reason}")]
    Empty {
        /// The dataset file or folder.
        path: PathBuf,
        /// What was looked for.
        reason: String,
    },

    /// A folder's layout is ambiguous or incomplete.
    #[error("{path}: {reason}")]
    Layout {
        /// The dataset folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A path is neither a folder nor a file kind whittle reads as a dataset.
    #[error(
        "{path}: not a dataset (expected a folder of images or of class folders, or a .npy, .npz or .bin file)"
    )]
    UnknownKind {
        /// The path.
        path: PathBuf,
    },

    /// A `.npz` file has no array for a model input.
    #[error("{path}: no array for model input '{input}' (arrays: {available})")]
    MissingArray {
        /// The dataset file.
        path: PathBuf,
        /// The model input name.
        input: String,
        /// The array names in the file, comma separated.
        available: String,
    },

    /// The arrays of a `.npz` file disagree on the number of items.
    #[error(
        "{path}: arrays disagree on the item count: '{first}' has {first_len}, '{other}' has {other_len}"
    )]
    ItemCountMismatch {
        /// The dataset file.
        path: PathBuf,
        /// The first array's name.
        first: String,
        /// The first array's item count.
        first_len: usize,
        /// The disagreeing array's name.
        other: String,
        /// The disagreeing array's item count.
        other_len: usize,
    },

    /// A dataset that feeds one input was used with a model of several inputs, or none.
    #[error("{path}: a {kind} dataset feeds exactly one input, the model has {count} ({names})")]
    InputCount {
        /// The dataset file or folder.
        path: PathBuf,
        /// The kind of dataset (`image`, `.npy`, `.bin`).
        kind: &'static str,
        /// The number of model inputs.
        count: usize,
        /// The model input names, comma separated.
        names: String,
    },

    /// An item index is past the end of the dataset.
    #[error("{path}: item index {index} is out of range: the dataset has {len} items")]
    IndexOutOfRange {
        /// The dataset file or folder.
        path: PathBuf,
        /// The index asked for.
        index: usize,
        /// The number of items.
        len: usize,
    },

    /// A split fraction is not a number in [0, 1].
    #[error("split fraction {fraction} is not in [0, 1]")]
    InvalidFraction {
        /// The fraction as given.
        fraction: f64,
    },

    /// The runtime failed to load or run a model during activation capture (its message).
    #[error("runtime: {0}")]
    Runtime(String),

    /// Activation capture cannot be done as asked: an unknown or non-float tensor, a model input
    /// a dataset cannot fill, no items.
    #[error("capture: {0}")]
    Capture(String),
}

/// Formats a shape compactly, as `[3,224,224]`.
pub(crate) fn shape(dims: &[usize]) -> String {
    let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(","))
}
