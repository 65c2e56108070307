//! `whittle convert`: load a model into the IR and write it back (normalised, optionally with
//! external data). The round trip keeps outputs identical; it is how the IR's losslessness is
//! checked from the outside.

use anyhow::Result;
use serde::Serialize;

use crate::Outcome;

/// Arguments of `whittle convert`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    files: super::Files,
    /// Store tensors of 1 KiB and more in `<output>.data` beside the model.
    #[arg(long)]
    external_data: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    input: String,
    written: Vec<String>,
    bytes: u64,
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    let m = super::load_model(&a.files.model)?;
    let written =
        whittle_export::save_model(&m, &a.files.output, Some(&a.files.model), a.external_data)?;
    let bytes = written
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let r = Report {
        input: a.files.model.display().to_string(),
        written: written.iter().map(|p| p.display().to_string()).collect(),
        bytes,
    };
    if a.json {
        outln!("{}", serde_json::to_string(&r)?);
    } else {
        outln!("wrote {} ({} bytes)", r.written.join(", "), r.bytes);
    }
    Ok(Outcome::Ok)
}
