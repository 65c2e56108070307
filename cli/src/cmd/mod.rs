//! One module per subcommand.

pub mod auto;
pub mod bench;
pub mod compress;
pub mod convert;
pub mod deploy;
pub mod inspect;
pub mod profile;
pub mod tokenize;
pub mod verify;

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use whittle_calib::Preprocess;
use whittle_core::Model;

/// Parse `--input name=1x3x224x224` flags.
pub fn parse_overrides(flags: &[String]) -> Result<Vec<(String, Vec<i64>)>> {
    flags
        .iter()
        .map(|s| whittle_core::shape::parse_override(s).map_err(anyhow::Error::from))
        .collect()
}

/// The model read (never written) and the file written (atomically).
#[derive(clap::Args)]
pub struct Files {
    /// The ONNX model (never written).
    pub model: PathBuf,
    /// Where to write the result (atomically).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// How calibration data is read and split, shared by `compress` and `auto`.
#[derive(clap::Args)]
pub struct DataArgs {
    /// Preprocessing: a built-in profile or a TOML file (default: `<model>.profile.toml`).
    #[arg(long)]
    pub profile: Option<String>,
    /// Calibration items the methods use [default: 128; for a large input fewer, each giving
    /// more sampled positions: the summary says how many].
    #[arg(long)]
    pub calib_items: Option<usize>,
    /// Held-apart calibration items for the fidelity report [default: 128; fewer for a large
    /// input].
    #[arg(long)]
    pub holdout_items: Option<usize>,
    /// Give an input its shape, e.g. `x=1x3x48x320` (repeatable): binds its symbolic dims for
    /// costs, budgets and the passes. Without it they are bound to the calibration data's item
    /// shape; a batch axis stays symbolic (costs are per item). The written model keeps the
    /// original's dynamic dims.
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    pub inputs: Vec<String>,
}

/// Refuse to write `output` when it is the input `model` (same path or same file).
pub fn not_the_input(output: &Path, model: &Path) -> Result<()> {
    let same = output == model
        || matches!((output.canonicalize(), model.canonicalize()), (Ok(x), Ok(y)) if x == y);
    if same {
        anyhow::bail!(
            "output {} is the input model; whittle never overwrites its input",
            output.display()
        );
    }
    Ok(())
}

/// Load a model with a message naming the file.
pub fn load_model(path: &Path) -> Result<Model> {
    Ok(Model::load(path)?)
}

/// The preprocessing to use: `--profile` (a built-in name or a TOML file), else a
/// `<model stem>.profile.toml` beside the model, else none (values as stored, 0..255 for images).
/// The missing-profile warning is only printed when `data` holds images (arrays are fed as stored).
pub fn resolve_profile(flag: Option<&str>, model: &Path, data: &Path) -> Result<Preprocess> {
    if let Some(p) = flag {
        return Preprocess::from_name_or_path(p).with_context(|| format!("profile '{p}'"));
    }
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let side = model.with_file_name(format!("{stem}.profile.toml"));
    if side.is_file() {
        eprintln!("using preprocessing profile {}", side.display());
        return Ok(Preprocess::from_toml_file(&side)?);
    }
    let arrays = data.extension().is_some_and(|e| {
        ["npy", "npz", "bin"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    });
    if !arrays {
        eprintln!(
            "no --profile and no {} beside the model: images are fed as raw 0..255 values",
            side.display()
        );
    }
    Ok(Preprocess::default())
}

/// Concrete input shapes for the runtimes from `--input` overrides.
pub fn runtime_shapes(ov: &[(String, Vec<i64>)]) -> Vec<(String, Vec<usize>)> {
    ov.iter()
        .map(|(n, d)| (n.clone(), d.iter().map(|&v| v as usize).collect()))
        .collect()
}

/// Why a cost cannot be counted, for one line of output: `dims x_dim2 (input x axis 2), x_dim3
/// (input x axis 3) not bound; give --input x=1x3x?x? (numbers for ?)`. Empty when it can.
pub fn unknown_dims_text(c: &whittle_core::cost::ModelCost) -> String {
    if c.is_exact() {
        return String::new();
    }
    let dims: Vec<String> = c.unknown_dims.iter().map(|d| d.to_string()).collect();
    let noun = if dims.len() == 1 { "dim" } else { "dims" };
    let hint = c.binding_hint();
    if hint.is_empty() {
        format!("{noun} {} not inferred", dims.join(", "))
    } else {
        format!(
            "{noun} {} not bound; give --input {hint} (numbers for ?)",
            dims.join(", ")
        )
    }
}
