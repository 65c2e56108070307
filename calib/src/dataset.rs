//! Datasets: image folders, flat image folders and raw tensor files, turned into model inputs.
//!
//! [`Dataset::open`] detects the kind from the path:
//!
//! - a folder whose sub-folders hold images: an **image folder** with one class per sub-folder
//!   (only images directly inside each class folder are read). If every class folder name is an
//!   integer, that integer is the label (`imagenet/0001/...` has label 1); otherwise the label is
//!   the folder's index in sorted name order (CIFAR-10's `airplane` .. `truck` gives the standard
//!   class order 0..9);
//! - a folder of images: a **flat** image dataset without labels;
//! - a `.npy` file: one array whose first axis is the items (float32, float64 converted to
//!   float32, int64, int32 or bool);
//! - a `.npz` file: one array per model input, keyed by input name, first axis the items;
//! - a `.bin` file: raw little-endian values, opened with [`Dataset::open_bin`] because the
//!   element type and item shape are not in the file.
//!
//! Images are files ending in `.png`, `.jpg` or `.jpeg` (any case); other files and hidden
//! entries (names starting with `.`) are ignored. Items are in sorted path order, so indices mean
//! the same item on every machine.

use std::fs;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Axis, IxDyn};
use ndarray_npy::npy::header::Header;
use ndarray_npy::{ReadNpyError, ReadNpyExt};
use std::fs::File;
use whittle_core::Value;

use crate::error::Error;
use crate::profile::{Preprocess, decode_image};

/// An element type of a raw tensor dataset or of a model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit float (ONNX `float`).
    F32,
    /// 64-bit float (ONNX `double`); read from files and converted to 32-bit floats.
    F64,
    /// 64-bit signed integer (ONNX `int64`).
    I64,
    /// 32-bit signed integer (ONNX `int32`).
    I32,
    /// Boolean stored as one byte, 0 or 1 (ONNX `bool`).
    Bool,
}

impl Dtype {
    /// Parses an element type name: ONNX names (`float`, `double`, `int64`, `int32`, `bool`) and
    /// the NumPy-style aliases `float32`, `f32`, `float64`, `f64`, `i64`, `i32`, any case.
    pub fn from_name(name: &str) -> Option<Dtype> {
        match name.to_ascii_lowercase().as_str() {
            "float" | "float32" | "f32" => Some(Dtype::F32),
            "double" | "float64" | "f64" => Some(Dtype::F64),
            "int64" | "i64" => Some(Dtype::I64),
            "int32" | "i32" => Some(Dtype::I32),
            "bool" => Some(Dtype::Bool),
            _ => None,
        }
    }

    /// The ONNX name of the type (`float`, `double`, `int64`, `int32`, `bool`).
    pub fn onnx_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float",
            Dtype::F64 => "double",
            Dtype::I64 => "int64",
            Dtype::I32 => "int32",
            Dtype::Bool => "bool",
        }
    }

    /// The size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::Bool => 1,
        }
    }
}

/// One model input a batch is made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    /// The graph input name.
    pub name: String,
    /// The element type as ONNX names it (`float`, `int64`, ...; see [`Dtype::from_name`]).
    pub dtype: String,
    /// The shape of one item, without the batch axis (e.g. `[3, 32, 32]`).
    pub item_shape: Vec<usize>,
}

/// Model inputs for a list of items, and their labels when the dataset has them.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// One value per [`InputSpec`], in the same order, with the batch axis first.
    pub inputs: Vec<Value>,
    /// The label of each item, for labelled datasets (image folders).
    pub labels: Option<Vec<usize>>,
}

/// The kind of a dataset, as detected by [`Dataset::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// A folder of class folders of images, with labels.
    ImageFolder,
    /// A folder of images, without labels.
    Images,
    /// A `.npy` file.
    Npy,
    /// A `.npz` file.
    Npz,
    /// A raw `.bin` file.
    Bin,
}

/// A dataset: a list of items that can be turned into model inputs in batches.
#[derive(Debug, Clone)]
pub struct Dataset {
    path: PathBuf,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    ImageFolder {
        items: Vec<PathBuf>,
        labels: Vec<usize>,
        classes: Vec<String>,
    },
    Images {
        items: Vec<PathBuf>,
    },
    Tensors {
        kind: DatasetKind,
        /// (array name, array with the items on the first axis); loaded at open.
        arrays: Vec<(String, Value)>,
        len: usize,
    },
}

impl Dataset {
    /// Opens a dataset, detecting its kind from the path (see the module documentation).
    ///
    /// Image files are only listed here; they are decoded by [`load_batch`](Self::load_batch).
    /// Tensor files are read whole. An empty dataset is an error.
    pub fn open(path: &Path) -> Result<Dataset, Error> {
        let meta = fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let source = if meta.is_dir() {
            open_folder(path)?
        } else {
            match lower_extension(path).as_deref() {
                Some("npy") => open_npy(path)?,
                Some("npz") => open_npz(path)?,
                Some("bin") => {
                    return Err(Error::BinNeedsShape {
                        path: path.to_path_buf(),
                    });
                }
                _ => {
                    return Err(Error::UnknownKind {
                        path: path.to_path_buf(),
                    });
                }
            }
        };
        Ok(Dataset {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Opens a raw file of little-endian values: items of `item_shape` (no batch axis) and
    /// element type `dtype`, one after the other. `double` values are converted to `float`.
    ///
    /// A file size that is not a whole number of items is an error naming both sizes.
    pub fn open_bin(path: &Path, dtype: Dtype, item_shape: &[usize]) -> Result<Dataset, Error> {
        let invalid_shape = |reason: &str| Error::InvalidItemShape {
            path: path.to_path_buf(),
            item_shape: item_shape.to_vec(),
            reason: reason.to_string(),
        };
        let item_size = item_shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid_shape("the item size overflows"))?;
        if item_size == 0 {
            return Err(invalid_shape("an item has no elements"));
        }
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file_size = fs::metadata(path).map_err(io)?.len();
        if file_size == 0 {
            return Err(Error::Empty {
                path: path.to_path_buf(),
                reason: "the file is empty".into(),
            });
        }
        if !file_size.is_multiple_of(item_size as u64) {
            return Err(Error::BinSize {
                path: path.to_path_buf(),
                file_size,
                item_size: item_size as u64,
                dtype: dtype.onnx_name().to_string(),
                item_shape: item_shape.to_vec(),
            });
        }
        let bytes = fs::read(path).map_err(io)?;
        let len = bytes.len() / item_size;
        let mut shape = vec![len];
        shape.extend_from_slice(item_shape);
        let value = bin_value(&bytes, dtype, &shape).map_err(|reason| Error::Array {
            path: path.to_path_buf(),
            format: ".bin",
            reason,
        })?;
        Ok(Dataset {
            path: path.to_path_buf(),
            source: Source::Tensors {
                kind: DatasetKind::Bin,
                arrays: vec![(file_name(path), value)],
                len,
            },
        })
    }

    /// For tensor datasets: the shape of one item (no batch axis) of the array that feeds
    /// `input` (the array of that name, or the only array). `None` for images.
    pub fn item_shape(&self, input: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Tensors { arrays, .. } => {
                let v = arrays
                    .iter()
                    .find(|(n, _)| n == input)
                    .or_else(|| (arrays.len() == 1).then(|| &arrays[0]))?;
                Some(v.1.shape().get(1..)?.to_vec())
            }
            _ => None,
        }
    }

    /// The shape of item `index` (no batch axis) as it feeds `input`: a tensor dataset's array
    /// shape, or an image after `pre` (decoded to learn its size when the profile does not fix
    /// it). What symbolic dims of a model are bound to when it is costed on this data.
    pub fn item_shape_with(
        &self,
        input: &str,
        pre: &Preprocess,
        index: usize,
    ) -> Result<Option<Vec<usize>>, Error> {
        match &self.source {
            Source::ImageFolder { items, .. } | Source::Images { items } => {
                let Some(path) = items.get(index) else {
                    return Ok(None);
                };
                let image = decode_image(path)?;
                Ok(Some(pre.item_shape(image.width(), image.height())))
            }
            Source::Tensors { .. } => Ok(self.item_shape(input)),
        }
    }

    /// The path the dataset was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kind of dataset.
    pub fn kind(&self) -> DatasetKind {
        match &self.source {
            Source::ImageFolder { .. } => DatasetKind::ImageFolder,
            Source::Images { .. } => DatasetKind::Images,
            Source::Tensors { kind, .. } => *kind,
        }
    }

    /// The number of items.
    pub fn len(&self) -> usize {
        match &self.source {
            Source::ImageFolder { items, .. } | Source::Images { items } => items.len(),
            Source::Tensors { len, .. } => *len,
        }
    }

    /// Whether the dataset has no items (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The label of every item, for image folders; `None` for unlabelled datasets.
    pub fn labels(&self) -> Option<Vec<usize>> {
        match &self.source {
            Source::ImageFolder { labels, .. } => Some(labels.clone()),
            _ => None,
        }
    }

    /// The class folder names of an image folder, in sorted order.
    pub fn classes(&self) -> Option<&[String]> {
        match &self.source {
            Source::ImageFolder { classes, .. } => Some(classes),
            _ => None,
        }
    }

    /// The file of item `index`, for image datasets.
    pub fn item_path(&self, index: usize) -> Option<&Path> {
        match &self.source {
            Source::ImageFolder { items, .. } | Source::Images { items } => {
                items.get(index).map(PathBuf::as_path)
            }
            Source::Tensors { .. } => None,
        }
    }

    /// A deterministic selection of `n` item indices, sorted: all items if `n >= len`, otherwise
    /// the first `n` of a seeded shuffle. The same seed gives the same indices on every machine,
    /// and `sample(k, seed)` is the calibration part of a [`split`](Self::split) that keeps `k`.
    pub fn sample(&self, n: usize, seed: u64) -> Vec<usize> {
        let len = self.len();
        if n >= len {
            return (0..len).collect();
        }
        let mut picked = permutation(len, seed);
        picked.truncate(n);
        picked.sort_unstable();
        picked
    }

    /// Splits the items into two disjoint sorted index lists: `round(fraction * len)` items for
    /// calibration and the rest held apart, using the same seeded shuffle as
    /// [`sample`](Self::sample). `fraction` must be in `[0, 1]`.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>), Error> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::InvalidFraction { fraction });
        }
        let len = self.len();
        let k = ((fraction * len as f64).round() as usize).min(len);
        let mut order = permutation(len, seed);
        let mut held = order.split_off(k);
        order.sort_unstable();
        held.sort_unstable();
        Ok((order, held))
    }

    /// Builds the model inputs for the items `indices` (in that order).
    ///
    /// Images feed exactly one `float` input: each image is decoded and preprocessed with `pre`,
    /// and its shape must equal the input's `item_shape`. Tensor datasets feed their arrays (a
    /// `.npy` or `.bin` its single array to the single input; a `.npz` the array named after each
    /// input, or its only array when both the file and the model have exactly one); item shape
    /// and element type must match the input (`pre` is not used).
    pub fn load_batch(
        &self,
        indices: &[usize],
        inputs: &[InputSpec],
        pre: &Preprocess,
    ) -> Result<Batch, Error> {
        let len = self.len();
        if let Some(&index) = indices.iter().find(|&&i| i >= len) {
            return Err(Error::IndexOutOfRange {
                path: self.path.clone(),
                index,
                len,
            });
        }
        match &self.source {
            Source::ImageFolder { items, labels, .. } => {
                let value = self.load_images(items, indices, inputs, pre)?;
                Ok(Batch {
                    inputs: vec![value],
                    labels: Some(indices.iter().map(|&i| labels[i]).collect()),
                })
            }
            Source::Images { items } => {
                let value = self.load_images(items, indices, inputs, pre)?;
                Ok(Batch {
                    inputs: vec![value],
                    labels: None,
                })
            }
            Source::Tensors { kind, arrays, .. } => {
                let values = self.select_tensors(*kind, arrays, indices, inputs)?;
                Ok(Batch {
                    inputs: values,
                    labels: None,
                })
            }
        }
    }

    fn single_input<'a>(
        &self,
        kind: &'static str,
        inputs: &'a [InputSpec],
    ) -> Result<&'a InputSpec, Error> {
        match inputs {
            [one] => Ok(one),
            _ => Err(Error::InputCount {
                path: self.path.clone(),
                kind,
                count: inputs.len(),
                names: names_of(inputs),
            }),
        }
    }

    fn load_images(
        &self,
        items: &[PathBuf],
        indices: &[usize],
        inputs: &[InputSpec],
        pre: &Preprocess,
    ) -> Result<Value, Error> {
        let input = self.single_input("image", inputs)?;
        let dtype = input_dtype(input)?;
        if dtype != Dtype::F32 {
            return Err(Error::DtypeMismatch {
                path: self.path.clone(),
                array: "images".into(),
                input: input.name.clone(),
                expected: input.dtype.clone(),
                found: "float".into(),
            });
        }
        pre.validate()?;
        let mut data = Vec::new();
        for &i in indices {
            let path = &items[i];
            let image = decode_image(path)?;
            let item = pre.apply(&image, path)?;
            if item.shape() != input.item_shape.as_slice() {
                return Err(Error::ImageShape {
                    path: path.clone(),
                    input: input.name.clone(),
                    expected: input.item_shape.clone(),
                    found: item.shape().to_vec(),
                });
            }
            if data.is_empty() {
                data.reserve(item.len().saturating_mul(indices.len()));
            }
            data.extend(item.iter().copied());
        }
        let mut shape = vec![indices.len()];
        shape.extend_from_slice(&input.item_shape);
        let array = ArrayD::from_shape_vec(IxDyn(&shape), data)
            .expect("every item was checked to have the input's item shape");
        Ok(Value::F32(array))
    }

    fn select_tensors(
        &self,
        kind: DatasetKind,
        arrays: &[(String, Value)],
        indices: &[usize],
        inputs: &[InputSpec],
    ) -> Result<Vec<Value>, Error> {
        let chosen: Vec<(&InputSpec, &(String, Value))> = match kind {
            DatasetKind::Npz => {
                let only = match (inputs, arrays) {
                    ([_], [array]) => Some(array),
                    _ => None,
                };
                inputs
                    .iter()
                    .map(|input| {
                        arrays
                            .iter()
                            .find(|(name, _)| *name == input.name)
                            .or(only)
                            .map(|array| (input, array))
                            .ok_or_else(|| Error::MissingArray {
                                path: self.path.clone(),
                                input: input.name.clone(),
                                available: arrays
                                    .iter()
                                    .map(|(n, _)| n.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", "),
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => {
                let label = if kind == DatasetKind::Bin {
                    ".bin"
                } else {
                    ".npy"
                };
                let input = self.single_input(label, inputs)?;
                arrays.iter().map(|array| (input, array)).collect()
            }
        };
        chosen
            .into_iter()
            .map(|(input, (name, value))| {
                let expected = input_dtype(input)?;
                if value.dtype_name() != expected.onnx_name() {
                    return Err(Error::DtypeMismatch {
                        path: self.path.clone(),
                        array: name.clone(),
                        input: input.name.clone(),
                        expected: input.dtype.clone(),
                        found: value.dtype_name().into(),
                    });
                }
                let found = &value.shape()[1..];
                if found != input.item_shape.as_slice() {
                    return Err(Error::TensorShape {
                        path: self.path.clone(),
                        array: name.clone(),
                        input: input.name.clone(),
                        expected: input.item_shape.clone(),
                        found: found.to_vec(),
                    });
                }
                Ok(select_items(value, indices))
            })
            .collect()
    }
}

impl InputSpec {
    /// An input spec from its parts.
    pub fn new(name: impl Into<String>, dtype: impl Into<String>, item_shape: &[usize]) -> Self {
        InputSpec {
            name: name.into(),
            dtype: dtype.into(),
            item_shape: item_shape.to_vec(),
        }
    }
}

fn input_dtype(input: &InputSpec) -> Result<Dtype, Error> {
    Dtype::from_name(&input.dtype).ok_or_else(|| Error::UnknownDtype {
        name: input.dtype.clone(),
        context: format!("model input '{}'", input.name),
    })
}

fn names_of(inputs: &[InputSpec]) -> String {
    if inputs.is_empty() {
        return "no inputs".into();
    }
    inputs
        .iter()
        .map(|i| format!("'{}'", i.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn select_items(value: &Value, indices: &[usize]) -> Value {
    match value {
        Value::F32(a) => Value::F32(a.select(Axis(0), indices)),
        Value::I64(a) => Value::I64(a.select(Axis(0), indices)),
        Value::I32(a) => Value::I32(a.select(Axis(0), indices)),
        Value::Bool(a) => Value::Bool(a.select(Axis(0), indices)),
    }
}

fn lower_extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn is_image_name(path: &Path) -> bool {
    matches!(
        lower_extension(path).as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The image files and the sub-folders of a folder, each sorted, hidden entries skipped.
fn list_folder(path: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut images = Vec::new();
    let mut dirs = Vec::new();
    for entry in fs::read_dir(path).map_err(io)? {
        let entry_path = entry.map_err(io)?.path();
        if is_hidden(&entry_path) {
            continue;
        }
        // Follows symbolic links; a dangling link is not a dataset entry.
        let Ok(meta) = fs::metadata(&entry_path) else {
            continue;
        };
        if meta.is_dir() {
            dirs.push(entry_path);
        } else if meta.is_file() && is_image_name(&entry_path) {
            images.push(entry_path);
        }
    }
    images.sort();
    dirs.sort();
    Ok((images, dirs))
}

fn open_folder(path: &Path) -> Result<Source, Error> {
    let (top_images, dirs) = list_folder(path)?;
    let mut classes = Vec::new();
    let mut empty_dirs = Vec::new();
    for dir in dirs {
        let (images, _) = list_folder(&dir)?;
        if images.is_empty() {
            empty_dirs.push(dir);
        } else {
            classes.push((file_name(&dir), images));
        }
    }
    if classes.is_empty() {
        if top_images.is_empty() {
            return Err(Error::Empty {
                path: path.to_path_buf(),
                reason: "no .png, .jpg or .jpeg images, nor class folders holding them".into(),
            });
        }
        return Ok(Source::Images { items: top_images });
    }
    if let Some(first) = top_images.first() {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            reason: format!(
                "holds both images ({}) and class folders ('{}'); use one layout",
                file_name(first),
                classes[0].0
            ),
        });
    }
    if let Some(dir) = empty_dirs.first() {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            reason: format!(
                "class folder '{}' holds no .png, .jpg or .jpeg images (every sub-folder of an \
                 image-folder dataset is a class)",
                file_name(dir)
            ),
        });
    }
    let numeric: Option<Vec<usize>> = classes.iter().map(|(n, _)| n.parse().ok()).collect();
    let class_labels = numeric.unwrap_or_else(|| (0..classes.len()).collect());
    let mut items = Vec::new();
    let mut labels = Vec::new();
    let mut names = Vec::new();
    for ((name, images), label) in classes.into_iter().zip(class_labels) {
        labels.extend(std::iter::repeat_n(label, images.len()));
        items.extend(images);
        names.push(name);
    }
    Ok(Source::ImageFolder {
        items,
        labels,
        classes: names,
    })
}

/// Why an array inside a `.npy` or `.npz` file could not be read.
enum ArrayError {
    /// The file is malformed; the reader's message.
    Malformed(String),
    /// The element type is not supported; NumPy's descriptor.
    Unsupported(String),
}

/// One step of `read_any_dtype!`: with the type alias `$T` set to `$ty`, evaluates `$read`;
/// returns the array wrapped by `$wrap`, or keeps the descriptor of a type mismatch in `$descr`.
macro_rules! attempt_dtype {
    ($T:ident, $ty:ty, $wrap:expr, $read:expr, $wrong:expr, $descr:ident) => {{
        type $T = $ty;
        match $read {
            Ok(a) => return Ok($wrap(a)),
            Err(e) => match $wrong(&e) {
                Some(d) => {
                    $descr.get_or_insert(d);
                }
                None => return Err(ArrayError::Malformed(e.to_string())),
            },
        }
    }};
}

/// Reads an array as each supported element type in turn (float32, float64 converted to
/// float32, int64, int32, bool), returning from the enclosing function. `$read` is an expression
/// reading an `ArrayD<$T>`; `$wrong` maps its error to the descriptor when the type mismatched.
macro_rules! read_any_dtype {
    ($T:ident => $read:expr, $wrong:expr) => {{
        let mut descr: Option<String> = None;
        attempt_dtype!($T, f32, Value::F32, $read, $wrong, descr);
        attempt_dtype!(
            $T,
            f64,
            |a: ArrayD<f64>| Value::F32(a.mapv(|v| v as f32)),
            $read,
            $wrong,
            descr
        );
        attempt_dtype!($T, i64, Value::I64, $read, $wrong, descr);
        attempt_dtype!($T, i32, Value::I32, $read, $wrong, descr);
        attempt_dtype!($T, bool, Value::Bool, $read, $wrong, descr);
        Err(ArrayError::Unsupported(descr.unwrap_or_default()))
    }};
}

fn read_npy_bytes(bytes: &[u8]) -> Result<Value, ArrayError> {
    check_npy_sizes(bytes).map_err(ArrayError::Malformed)?;
    let wrong = |e: &ReadNpyError| match e {
        ReadNpyError::WrongDescriptor(d) => Some(d.to_string()),
        _ => None,
    };
    read_any_dtype!(T => ArrayD::<T>::read_npy(Cursor::new(bytes)), wrong)
}

/// Checks the sizes a `.npy` header declares against the bytes that hold it, before
/// `ndarray-npy` allocates them: it allocates the header length and the element count as
/// declared, so a file of a hundred bytes could ask for gigabytes and abort the process. The
/// header must fit in the file, and the data after it must hold at least one byte per element.
/// Other defects are left to the reader, which reports them.
fn check_npy_sizes(bytes: &[u8]) -> Result<(), String> {
    // Magic string (6 bytes), version (2), header length: u16 in version 1, u32 after.
    let Some(&major) = bytes.get(6).filter(|_| bytes.starts_with(b"\x93NUMPY")) else {
        return Ok(());
    };
    let (len_bytes, prefix) = if major == 1 { (2, 10) } else { (4, 12) };
    let Some(raw) = bytes.get(8..8 + len_bytes) else {
        return Ok(());
    };
    let header_len = raw
        .iter()
        .rev()
        .fold(0usize, |acc, &b| acc << 8 | usize::from(b));
    let Some(data) = bytes.len().checked_sub(prefix + header_len) else {
        return Err(format!(
            "the header declares {header_len} bytes, more than the file's {} bytes",
            bytes.len()
        ));
    };
    let header = Header::from_reader(&mut Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let elements = header
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match elements {
        Some(n) if n <= data => Ok(()),
        _ => Err(format!(
            "the header declares shape {:?}, more elements than its {data} bytes of data hold",
            header.shape
        )),
    }
}

fn array_error(path: &Path, format: &'static str, array: &str, e: ArrayError) -> Error {
    match e {
        ArrayError::Malformed(reason) => Error::Array {
            path: path.to_path_buf(),
            format,
            reason: format!("array '{array}': {reason}"),
        },
        ArrayError::Unsupported(descr) => Error::UnsupportedArrayDtype {
            path: path.to_path_buf(),
            array: array.to_string(),
            descr,
        },
    }
}

/// The number of items of an array (its first axis); scalars and empty arrays are errors.
fn items_of(path: &Path, format: &'static str, array: &str, value: &Value) -> Result<usize, Error> {
    match value.shape().first() {
        None => Err(Error::Array {
            path: path.to_path_buf(),
            format,
            reason: format!("array '{array}' is a scalar, with no item axis"),
        }),
        Some(0) => Err(Error::Empty {
            path: path.to_path_buf(),
            reason: format!("array '{array}' has 0 items"),
        }),
        Some(&n) => Ok(n),
    }
}

fn open_npy(path: &Path) -> Result<Source, Error> {
    let bytes = fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let name = file_name(path);
    let value = read_npy_bytes(&bytes).map_err(|e| array_error(path, ".npy", &name, e))?;
    let len = items_of(path, ".npy", &name, &value)?;
    Ok(Source::Tensors {
        kind: DatasetKind::Npy,
        arrays: vec![(name, value)],
        len,
    })
}

fn open_npz(path: &Path) -> Result<Source, Error> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let malformed = |reason: String| Error::Array {
        path: path.to_path_buf(),
        format: ".npz",
        reason,
    };
    let mut zip = zip::ZipArchive::new(file).map_err(|e| malformed(e.to_string()))?;
    if zip.is_empty() {
        return Err(Error::Empty {
            path: path.to_path_buf(),
            reason: "the archive holds no arrays".into(),
        });
    }
    let mut arrays: Vec<(String, Value)> = Vec::with_capacity(zip.len());
    let mut len = 0;
    for index in 0..zip.len() {
        // Each member is read whole and then parsed like a `.npy` file (NumPy names the member
        // of array `x` `x.npy`), so that its header is checked against its real size.
        let mut member = zip.by_index(index).map_err(|e| malformed(e.to_string()))?;
        let name = member.name();
        let name = name.strip_suffix(".npy").unwrap_or(name).to_string();
        let mut bytes = Vec::new();
        member
            .read_to_end(&mut bytes)
            .map_err(|e| malformed(format!("array '{name}': {e}")))?;
        drop(member);
        let value = read_npy_bytes(&bytes).map_err(|e| array_error(path, ".npz", &name, e))?;
        let n = items_of(path, ".npz", &name, &value)?;
        match arrays.first() {
            None => len = n,
            Some((first, _)) if n != len => {
                return Err(Error::ItemCountMismatch {
                    path: path.to_path_buf(),
                    first: first.clone(),
                    first_len: len,
                    other: name,
                    other_len: n,
                });
            }
            Some(_) => {}
        }
        arrays.push((name, value));
    }
    Ok(Source::Tensors {
        kind: DatasetKind::Npz,
        arrays,
        len,
    })
}

/// Decodes little-endian values into a `shape`d value; `bytes` holds exactly that many.
fn bin_value(bytes: &[u8], dtype: Dtype, shape: &[usize]) -> Result<Value, String> {
    fn decode<T, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut b = [0u8; N];
                b.copy_from_slice(c);
                from(b)
            })
            .collect()
    }
    let shape = IxDyn(shape);
    let bad_shape = |e: ndarray::ShapeError| e.to_string();
    Ok(match dtype {
        Dtype::F32 => Value::F32(
            ArrayD::from_shape_vec(shape, decode(bytes, f32::from_le_bytes)).map_err(bad_shape)?,
        ),
        Dtype::F64 => Value::F32(
            ArrayD::from_shape_vec(shape, decode(bytes, |b| f64::from_le_bytes(b) as f32))
                .map_err(bad_shape)?,
        ),
        Dtype::I64 => Value::I64(
            ArrayD::from_shape_vec(shape, decode(bytes, i64::from_le_bytes)).map_err(bad_shape)?,
        ),
        Dtype::I32 => Value::I32(
            ArrayD::from_shape_vec(shape, decode(bytes, i32::from_le_bytes)).map_err(bad_shape)?,
        ),
        Dtype::Bool => {
            if let Some(pos) = bytes.iter().position(|&b| b > 1) {
                return Err(format!("byte {pos} is {}, not a bool (0 or 1)", bytes[pos]));
            }
            Value::Bool(
                ArrayD::from_shape_vec(shape, bytes.iter().map(|&b| b == 1).collect())
                    .map_err(bad_shape)?,
            )
        }
    })
}

/// A tiny deterministic generator (splitmix64), so shuffles are the same on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (multiply-shift; `n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// `0..len` in a seeded Fisher-Yates order.
fn permutation(len: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = SplitMix64(seed);
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_assets::assets;
    use image::{Rgb, RgbImage};
    use ndarray::{Array, Array3};
    use ndarray_npy::{NpzWriter, write_npy};

    fn float_input(shape: &[usize]) -> Vec<InputSpec> {
        vec![InputSpec::new("input", "float", shape)]
    }

    fn f32_of(value: &Value) -> &ArrayD<f32> {
        value.as_f32().expect("a float value")
    }

    /// The shared assets' dataset `rel`, and the assets' folder; `None` (`test` skipped, see
    /// `assets`) without the assets.
    fn shared_dataset(test: &str, rel: &str) -> Option<(Dataset, PathBuf)> {
        let assets = assets(test)?;
        Some((Dataset::open(&assets.join(rel)).unwrap(), assets))
    }

    /// The name of the folder that item `i` of `data` is in (its class).
    fn folder_of(data: &Dataset, i: usize) -> &str {
        let folder = data.item_path(i).unwrap().parent().unwrap();
        folder.file_name().unwrap().to_str().unwrap()
    }

    /// Items `items` of the shared dataset the built-in profile `profile` is for (resnet8: CIFAR-10
    /// test-a, mnist: the test digits, efficientnet: the imagenet photos), loaded with that profile
    /// for one float input of `shape`: the dataset, the batch and its input; `None` (the test
    /// `<profile>_profile` skipped, see `assets`) without the assets.
    fn profile_batch(
        profile: &str,
        items: &[usize],
        shape: &[usize],
    ) -> Option<(Dataset, Batch, ArrayD<f32>)> {
        let rel = match profile {
            "resnet8" => "data/cifar10/test-a",
            "mnist" => "data/mnist/test",
            "efficientnet" => "data/imagenet",
            _ => panic!("no shared dataset for {profile}"),
        };
        let (data, _) = shared_dataset(&format!("{profile}_profile"), rel)?;
        let pre = Preprocess::from_name_or_path(profile).unwrap();
        let batch = data.load_batch(items, &float_input(shape), &pre).unwrap();
        let x = f32_of(&batch.inputs[0]).clone();
        Some((data, batch, x))
    }

    /// `array` written as `dir/name`: its path and the dataset it opens as.
    fn npy_dataset(
        dir: &Path,
        name: &str,
        array: &impl ndarray_npy::WriteNpyExt,
    ) -> (PathBuf, Dataset) {
        let path = dir.join(name);
        write_npy(&path, array).unwrap();
        let data = Dataset::open(&path).unwrap();
        (path, data)
    }

    /// Items `items` of `data` for `inputs`, with no preprocessing.
    fn plain(data: &Dataset, items: &[usize], inputs: &[InputSpec]) -> Result<Batch, Error> {
        data.load_batch(items, inputs, &Preprocess::default())
    }

    /// Writes a `w` x `h` RGB PNG whose pixel (x, y) is (x, y, x + y) mod 256.
    fn write_png(path: &Path, w: u32, h: u32) {
        RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, (x + y) as u8]))
            .save(path)
            .expect("write test png");
    }

    #[test]
    fn cifar_image_folder_has_500_items_with_standard_class_order() {
        let Some((data, assets)) = shared_dataset("cifar_image_folder", "data/cifar10/test-a")
        else {
            return;
        };
        assert_eq!(data.kind(), DatasetKind::ImageFolder);
        assert_eq!(data.len(), 500);
        let classes = data.classes().unwrap().to_vec();
        let listed = fs::read_to_string(assets.join("data/cifar10/labels.txt")).unwrap();
        let expected: Vec<&str> = listed
            .lines()
            .map(|l| l.split('\t').nth(1).unwrap())
            .collect();
        assert_eq!(classes, expected);
        let labels = data.labels().unwrap();
        assert_eq!(labels.len(), 500);
        for (i, &label) in labels.iter().enumerate() {
            let class = folder_of(&data, i);
            assert_eq!(class, classes[label]);
            if class == "airplane" {
                assert_eq!(label, 0);
            }
            if class == "truck" {
                assert_eq!(label, 9);
            }
        }
        for class in 0..10 {
            assert_eq!(labels.iter().filter(|&&l| l == class).count(), 50);
        }
        assert_eq!(labels[0], 0);
        assert_eq!(labels[499], 9);
        // Items are in sorted path order.
        let paths: Vec<&Path> = (0..500).map(|i| data.item_path(i).unwrap()).collect();
        assert!(paths.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn imagenet_folder_labels_are_the_folder_integers() {
        let Some((data, _)) = shared_dataset("imagenet_folder", "data/imagenet") else {
            return;
        };
        assert_eq!(data.kind(), DatasetKind::ImageFolder);
        assert_eq!(data.len(), 400);
        let labels = data.labels().unwrap();
        for (i, &label) in labels.iter().enumerate() {
            let folder = folder_of(&data, i);
            assert_eq!(folder.parse::<usize>().unwrap(), label);
        }
        assert_eq!(labels[0], 1, "0001/n01443537_goldfish.jpg is class 1");
        assert_eq!(*labels.last().unwrap(), 999);
        assert!(
            labels.windows(2).all(|w| w[0] < w[1]),
            "one photo per class"
        );
    }

    #[test]
    fn efficientnet_profile_crops_an_imagenet_photo_to_224_in_unit_range() {
        let Some((data, batch, x)) = profile_batch("efficientnet", &[0, 17], &[3, 224, 224]) else {
            return;
        };
        assert_eq!(batch.labels, Some(vec![1, data.labels().unwrap()[17]]));
        assert_eq!(x.shape(), &[2, 3, 224, 224]);
        assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(x.iter().any(|&v| v < -0.5) && x.iter().any(|&v| v > 0.5));
        // The photos are 256x256, so only the crop applies: output (0, 0) is source (16, 16).
        let raw = image::open(data.item_path(0).unwrap()).unwrap().to_rgb8();
        assert_eq!(raw.dimensions(), (256, 256));
        for c in 0..3 {
            for (y, x_) in [(0, 0), (100, 37), (223, 223)] {
                let v = f32::from(raw.get_pixel(x_ + 16, y + 16)[c]);
                let want = (v - 127.5) / 127.5;
                assert_eq!(x[[0, c, y as usize, x_ as usize]], want);
            }
        }
    }

    #[test]
    fn resnet8_profile_matches_the_pixel_formula() {
        let Some((data, _, x)) = profile_batch("resnet8", &[123, 4], &[3, 32, 32]) else {
            return;
        };
        assert_eq!(x.shape(), &[2, 3, 32, 32]);
        let raw = image::open(data.item_path(123).unwrap()).unwrap().to_rgb8();
        let (px, py) = (5u32, 7u32);
        for c in 0..3 {
            let v = f32::from(raw.get_pixel(px, py)[c]);
            assert_eq!(x[[0, c, py as usize, px as usize]], (v - 128.0) / 128.0);
        }
        // And over the whole image.
        for (xx, yy, p) in raw.enumerate_pixels() {
            for c in 0..3 {
                let want = (f32::from(p[c]) - 128.0) / 128.0;
                assert_eq!(x[[0, c, yy as usize, xx as usize]], want);
            }
        }
    }

    #[test]
    fn mnist_profile_gives_one_gray_channel_and_digit_labels() {
        let Some((data, batch, x)) = profile_batch("mnist", &[0, 999], &[1, 28, 28]) else {
            return;
        };
        assert_eq!(data.len(), 1000);
        assert_eq!(batch.labels, Some(vec![0, 9]));
        assert_eq!(x.shape(), &[2, 1, 28, 28]);
        let raw = image::open(data.item_path(999).unwrap())
            .unwrap()
            .to_luma8();
        for (xx, yy, p) in raw.enumerate_pixels() {
            let want = f32::from(p[0]) * (1.0 / 255.0);
            assert_eq!(x[[1, 0, yy as usize, xx as usize]], want);
            assert!((want - f32::from(p[0]) / 255.0).abs() < 1e-7);
        }
    }

    #[test]
    fn sample_is_deterministic_and_split_is_disjoint() {
        let dir = tempfile::tempdir().unwrap();
        let items = Array::from_shape_fn((500, 2), |(i, j)| (i * 2 + j) as f32);
        let (_, data) = npy_dataset(dir.path(), "x.npy", &items);

        let a = data.sample(64, 7);
        assert_eq!(a, data.sample(64, 7));
        assert_eq!(a.len(), 64);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
        assert!(a.iter().all(|&i| i < 500));
        assert_ne!(a, data.sample(64, 8));
        assert_ne!(a, (0..64).collect::<Vec<_>>());
        assert_eq!(data.sample(500, 1), (0..500).collect::<Vec<_>>());
        assert_eq!(data.sample(10_000, 1), (0..500).collect::<Vec<_>>());
        assert!(data.sample(0, 1).is_empty());
        // Fixed across machines and releases: the shuffle is splitmix64 + Fisher-Yates.
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next(), 0xE220_A839_7B1D_CDAF);

        let (calib, held) = data.split(0.8, 3).unwrap();
        assert_eq!((calib.len(), held.len()), (400, 100));
        assert_eq!(calib, data.sample(400, 3));
        let mut all: Vec<usize> = calib.iter().chain(&held).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..500).collect::<Vec<_>>(), "disjoint and complete");
        assert_eq!(data.split(0.8, 3).unwrap(), (calib, held));
        assert_eq!(data.split(0.0, 3).unwrap().0.len(), 0);
        assert_eq!(data.split(1.0, 3).unwrap().1.len(), 0);
        for bad in [-0.1, 1.5, f64::NAN] {
            let err = data.split(bad, 0).unwrap_err();
            assert!(matches!(err, Error::InvalidFraction { .. }), "{err}");
        }
    }

    #[test]
    fn npy_round_trips_and_checks_shape_and_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let array = Array::from_shape_fn((5, 2, 3), |(i, j, k)| (i * 100 + j * 10 + k) as f32);
        let (path, data) = npy_dataset(dir.path(), "items.npy", &array);
        assert_eq!(
            (data.kind(), data.len(), data.labels()),
            (DatasetKind::Npy, 5, None)
        );
        let batch = plain(&data, &[4, 0], &float_input(&[2, 3])).unwrap();
        let want = array.select(Axis(0), &[4, 0]).into_dyn();
        assert_eq!(batch.inputs, vec![Value::F32(want)]);
        assert_eq!(batch.labels, None);

        let err = plain(&data, &[0], &float_input(&[3, 2])).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: items of 'items.npy' are [2,3], model input 'input' expects [3,2]",
                path.display()
            )
        );
        let err = plain(&data, &[5], &float_input(&[2, 3])).unwrap_err();
        assert!(
            matches!(
                err,
                Error::IndexOutOfRange {
                    index: 5,
                    len: 5,
                    ..
                }
            ),
            "{err}"
        );
        let two = vec![
            InputSpec::new("a", "float", &[2, 3]),
            InputSpec::new("b", "float", &[2, 3]),
        ];
        let err = plain(&data, &[0], &two).unwrap_err();
        assert!(err.to_string().contains("feeds exactly one input"), "{err}");

        // float64 becomes float32.
        let f64s = Array::from_shape_fn((3, 2), |(i, j)| (i + j) as f64 * 0.5);
        let (_, f64s) = npy_dataset(dir.path(), "f64.npy", &f64s);
        let batch = plain(&f64s, &[2], &float_input(&[2])).unwrap();
        assert_eq!(batch.inputs[0].to_f32_vec(), vec![1.0, 1.5]);

        // int64 stays int64 and must match the input's type.
        let ids = Array::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as i64);
        let (pi, ids) = npy_dataset(dir.path(), "ids.npy", &ids);
        let err = plain(&ids, &[0], &float_input(&[4])).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: items of 'ids.npy' are int64, model input 'input' expects float",
                pi.display()
            )
        );
        let batch = plain(&ids, &[1], &[InputSpec::new("input_ids", "int64", &[4])]).unwrap();
        assert_eq!(
            batch.inputs[0],
            Value::I64(Array::from_shape_vec(vec![1, 4], vec![4, 5, 6, 7]).unwrap())
        );

        // int32 is read as well; uint8 is refused with its descriptor.
        let i32s = Array::from_shape_fn((2, 2), |(i, j)| (i + j) as i32);
        let (_, i32s) = npy_dataset(dir.path(), "i32.npy", &i32s);
        let batch = plain(&i32s, &[0], &[InputSpec::new("x", "int32", &[2])]).unwrap();
        assert!(matches!(batch.inputs[0], Value::I32(_)));
        let pu8 = dir.path().join("u8.npy");
        write_npy(&pu8, &Array::from_shape_fn((2, 2), |(i, j)| (i + j) as u8)).unwrap();
        let err = Dataset::open(&pu8).unwrap_err();
        assert!(matches!(err, Error::UnsupportedArrayDtype { .. }), "{err}");
        assert!(err.to_string().contains("u8.npy"), "{err}");

        // A truncated file is an error naming it, not a panic.
        let bad = dir.path().join("bad.npy");
        fs::write(&bad, &fs::read(&path).unwrap()[..100]).unwrap();
        let err = Dataset::open(&bad).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {} as .npy", bad.display())),
            "{err}"
        );
    }

    /// A version 1.0 `.npy` file: the header dictionary (padded as NumPy pads it), then `data`.
    fn npy_bytes(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut header = dict.to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn declared_sizes_beyond_the_file_are_errors_not_allocations() {
        // Found by fuzzing (fuzz/regressions/calib_npy/): ndarray-npy allocates what the header
        // declares, so 136 bytes declaring 1e11 floats aborted with "memory allocation of
        // 400000000000 bytes failed", in a .npy file or inside a .npz archive.
        let dir = tempfile::tempdir().unwrap();
        let huge = npy_bytes(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000,), }",
            &[0; 8],
        );
        let path = dir.path().join("huge.npy");
        fs::write(&path, &huge).unwrap();
        let err = Dataset::open(&path).unwrap_err().to_string();
        assert!(
            err.contains(
                "the header declares shape [100000000000], more elements than its 8 bytes"
            ),
            "{err}"
        );
        let npz = dir.path().join("huge.npz");
        let mut zip = zip::ZipWriter::new(File::create(&npz).unwrap());
        zip.start_file("input.npy", zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, &huge).unwrap();
        zip.finish().unwrap();
        let err = Dataset::open(&npz).unwrap_err().to_string();
        assert!(
            err.contains("array 'input': the header declares shape [100000000000]"),
            "{err}"
        );

        // A version 3.0 header length of 0x8c8c8c27 bytes in a 109-byte file.
        let mut long_header = b"\x93NUMPY\x03\x00\x27\x8c\x8c\x8c".to_vec();
        long_header.extend_from_slice(&[0x8c; 97]);
        fs::write(&path, &long_header).unwrap();
        let err = Dataset::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("the header declares 2358021159 bytes, more than the file's 109 bytes"),
            "{err}"
        );

        // The check does not refuse what fits: one byte per element is enough for bool.
        let ok = npy_bytes(
            "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 3), }",
            &[1, 0, 1, 0, 1, 0],
        );
        fs::write(&path, &ok).unwrap();
        assert_eq!(Dataset::open(&path).unwrap().len(), 2);
    }

    #[test]
    fn npz_feeds_each_input_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.npz");
        let ids = Array::from_shape_fn((4, 8), |(i, j)| (i * 8 + j) as i64);
        let mask = Array::from_shape_fn((4, 8), |(i, j)| i64::from(j < i + 2));
        let mut npz = NpzWriter::new_compressed(File::create(&path).unwrap());
        npz.add_array("input_ids", &ids).unwrap();
        npz.add_array("attention_mask", &mask).unwrap();
        npz.finish().unwrap();

        let data = Dataset::open(&path).unwrap();
        assert_eq!((data.kind(), data.len()), (DatasetKind::Npz, 4));
        let inputs = vec![
            InputSpec::new("attention_mask", "int64", &[8]),
            InputSpec::new("input_ids", "int64", &[8]),
        ];
        let batch = plain(&data, &[3, 1], &inputs).unwrap();
        assert_eq!(
            batch.inputs[0],
            Value::I64(mask.select(Axis(0), &[3, 1]).into_dyn())
        );
        assert_eq!(
            batch.inputs[1],
            Value::I64(ids.select(Axis(0), &[3, 1]).into_dyn())
        );

        let err = plain(
            &data,
            &[0],
            &[InputSpec::new("token_type_ids", "int64", &[8])],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: no array for model input 'token_type_ids' (arrays: input_ids, attention_mask)",
                path.display()
            )
        );

        // Arrays with different item counts are refused at open.
        let uneven = dir.path().join("uneven.npz");
        let mut npz = NpzWriter::new(File::create(&uneven).unwrap());
        npz.add_array("a", &Array3::<f32>::zeros((3, 1, 1)))
            .unwrap();
        npz.add_array("b", &Array3::<f32>::zeros((2, 1, 1)))
            .unwrap();
        npz.finish().unwrap();
        let err = Dataset::open(&uneven).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ItemCountMismatch {
                    first_len: 3,
                    other_len: 2,
                    ..
                }
            ),
            "{err}"
        );

        // A file that is not a zip archive.
        let junk = dir.path().join("junk.npz");
        fs::write(&junk, b"not a zip").unwrap();
        let err = Dataset::open(&junk).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {} as .npz", junk.display())),
            "{err}"
        );
    }

    #[test]
    fn bin_needs_whole_items() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw.bin");
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.25).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(&path, &bytes).unwrap();

        let err = Dataset::open(&path).unwrap_err();
        assert!(matches!(err, Error::BinNeedsShape { .. }), "{err}");
        let data = Dataset::open_bin(&path, Dtype::F32, &[2, 2]).unwrap();
        assert_eq!((data.kind(), data.len()), (DatasetKind::Bin, 3));
        let batch = plain(&data, &[2], &float_input(&[2, 2])).unwrap();
        assert_eq!(batch.inputs[0].to_f32_vec(), values[8..].to_vec());

        let err = Dataset::open_bin(&path, Dtype::F32, &[5]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: file size 48 bytes is not a multiple of the item size 20 bytes (float [5])",
                path.display()
            )
        );
        fs::write(&path, &bytes[..13]).unwrap();
        let err = Dataset::open_bin(&path, Dtype::F32, &[2, 2]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::BinSize {
                    file_size: 13,
                    item_size: 16,
                    ..
                }
            ),
            "{err}"
        );
        let err = Dataset::open_bin(&path, Dtype::F32, &[2, 0]).unwrap_err();
        assert!(matches!(err, Error::InvalidItemShape { .. }), "{err}");
    }

    #[test]
    fn corrupt_image_is_a_decode_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("broken.png");
        let mut rng = SplitMix64(42);
        let noise: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
        fs::write(&bad, noise).unwrap();
        write_png(&dir.path().join("good.png"), 8, 8);

        let data = Dataset::open(dir.path()).unwrap();
        assert_eq!((data.kind(), data.len()), (DatasetKind::Images, 2));
        assert!(plain(&data, &[1], &float_input(&[3, 8, 8])).is_ok());
        let err = plain(&data, &[1, 0], &float_input(&[3, 8, 8])).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Decode { .. }), "{msg}");
        assert!(
            msg.starts_with(&format!("cannot decode image {}: ", bad.display())),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn wrong_image_size_without_resize_is_a_shape_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        write_png(&path, 64, 64);
        let data = Dataset::open(dir.path()).unwrap();
        let err = plain(&data, &[0], &float_input(&[3, 32, 32])).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "image {} gives [3,64,64] after preprocessing, model input 'input' expects [3,32,32]",
                path.display()
            )
        );
        // With a resize it fits.
        let pre = Preprocess {
            resize: Some(crate::profile::Resize::Exact(32, 32)),
            ..Preprocess::default()
        };
        let batch = data
            .load_batch(&[0], &float_input(&[3, 32, 32]), &pre)
            .unwrap();
        assert_eq!(batch.inputs[0].shape(), &[1, 3, 32, 32]);
        // Images feed one float input only.
        let refused = |dtype: &str| {
            let input = InputSpec::new("input", dtype, &[3, 32, 32]);
            data.load_batch(&[0], &[input], &pre).unwrap_err()
        };
        let err = refused("int64");
        assert!(matches!(err, Error::DtypeMismatch { .. }), "{err}");
        let err = refused("complex");
        assert!(matches!(err, Error::UnknownDtype { .. }), "{err}");
    }

    #[test]
    fn folder_listing_is_sorted_and_skips_hidden_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.png", "a.JPG", "c.jpeg", ".hidden.png"] {
            let p = dir.path().join(name);
            if name.ends_with("JPG") || name.ends_with("jpeg") {
                RgbImage::new(4, 4)
                    .save_with_format(&p, image::ImageFormat::Jpeg)
                    .unwrap();
            } else {
                write_png(&p, 4, 4);
            }
        }
        fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        fs::create_dir(dir.path().join("empty")).unwrap();
        fs::create_dir(dir.path().join(".cache")).unwrap();
        let data = Dataset::open(dir.path()).unwrap();
        assert_eq!(data.kind(), DatasetKind::Images);
        let names: Vec<String> = (0..data.len())
            .map(|i| file_name(data.item_path(i).unwrap()))
            .collect();
        assert_eq!(names, ["a.JPG", "b.png", "c.jpeg"]);
        assert_eq!(data.labels(), None);
        let batch = plain(&data, &[0, 1, 2], &float_input(&[3, 4, 4])).unwrap();
        assert_eq!(batch.inputs[0].shape(), &[3, 3, 4, 4]);
    }

    #[test]
    fn ambiguous_or_empty_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Dataset::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Empty { .. }), "{err}");

        fs::create_dir(dir.path().join("cat")).unwrap();
        fs::create_dir(dir.path().join("dog")).unwrap();
        write_png(&dir.path().join("cat/1.png"), 4, 4);
        let err = Dataset::open(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("class folder 'dog' holds no"),
            "{err}"
        );

        write_png(&dir.path().join("dog/1.png"), 4, 4);
        let data = Dataset::open(dir.path()).unwrap();
        assert_eq!(data.labels(), Some(vec![0, 1]));

        write_png(&dir.path().join("stray.png"), 4, 4);
        let err = Dataset::open(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("both images (stray.png) and class folders"),
            "{err}"
        );

        let err = Dataset::open(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        let txt = dir.path().join("x.csv");
        fs::write(&txt, "1,2").unwrap();
        assert!(matches!(
            Dataset::open(&txt).unwrap_err(),
            Error::UnknownKind { .. }
        ));
    }

    #[test]
    fn nhwc_and_bgr_layouts() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("a.png"), 5, 3);
        let data = Dataset::open(dir.path()).unwrap();
        let pre = Preprocess {
            color: crate::profile::Color::Bgr,
            layout: crate::profile::Layout::Nhwc,
            ..Preprocess::default()
        };
        assert_eq!(pre.item_shape(5, 3), vec![3, 5, 3]);
        let batch = data
            .load_batch(&[0], &float_input(&[3, 5, 3]), &pre)
            .unwrap();
        let x = f32_of(&batch.inputs[0]);
        // Pixel (x=4, y=2) is (r, g, b) = (4, 2, 6); BGR puts b first.
        assert_eq!(
            x.slice(ndarray::s![0, 2, 4, ..]).to_vec(),
            vec![6.0, 2.0, 4.0]
        );
    }
}
