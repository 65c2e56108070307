//! `whittle tokenize`: sentences from a `.txt` / `.tsv` file into an `.npz` of `input_ids`,
//! `attention_mask` and `token_type_ids`, the calibration data of a text encoder
//! (`--calib sentences.npz`).

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;
use whittle_calib::text;

use crate::Outcome;

/// Arguments of `whittle tokenize`.
#[derive(clap::Args)]
pub struct Args {
    /// Sentences: `.txt` (one per line) or `.tsv` (every non-numeric field, e.g. STS pairs).
    text: PathBuf,
    /// The tokenizer: a `tokenizer.json` (Hugging Face tokenizers) or a folder holding one.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Tokens per sentence at most, special tokens included (longer ones are truncated).
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// Keep only the first N sentences.
    #[arg(long)]
    limit: Option<usize>,
    /// Where to write the `.npz` (atomically).
    #[arg(short, long)]
    output: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    input: String,
    output: String,
    sentences: usize,
    seq_len: usize,
    mean_tokens: f64,
    truncated: usize,
}

/// Run the command.
pub fn run(a: Args) -> Result<Outcome> {
    if !a
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
    {
        bail!(
            "the output {} must end in .npz (it holds three arrays)",
            a.output.display()
        );
    }
    let mut sentences = text::read_sentences(&a.text)?;
    if let Some(n) = a.limit {
        if n == 0 {
            bail!("--limit must be at least 1");
        }
        sentences.truncate(n);
    }
    let t = text::tokenize(
        &sentences,
        &text::tokenizer_file(&a.tokenizer),
        a.max_length,
    )?;
    whittle_export::write_atomic(&a.output, &text::to_npz(&t))?;
    let r = Report {
        input: a.text.display().to_string(),
        output: a.output.display().to_string(),
        sentences: sentences.len(),
        seq_len: t.input_ids.ncols(),
        mean_tokens: t.mean_tokens,
        truncated: t.truncated,
    };
    if a.json {
        outln!("{}", serde_json::to_string(&r)?);
    } else {
        outln!(
            "wrote {}: {} sentences, {} tokens each ({:.1} before padding on average, {} truncated)",
            r.output,
            r.sentences,
            r.seq_len,
            r.mean_tokens,
            r.truncated
        );
    }
    Ok(Outcome::Ok)
}
