//! Calibration text: sentences read from a text file and tokenised into the three int64 inputs
//! of a BERT-style encoder (`input_ids`, `attention_mask`, `token_type_ids`), to be stored as an
//! `.npz` file that [`crate::Dataset`] reads like any other tensor data.
//!
//! A `.txt` file holds one sentence per line. In a `.tsv` file every tab-separated field is a
//! sentence except fields that parse as numbers (an STS-benchmark line `score<TAB>s1<TAB>s2`
//! gives two sentences). Empty lines and fields are skipped.
//!
//! Every sentence is padded (with the tokenizer's padding token, mask 0) to one length: the
//! longest tokenised sentence, capped at `max_len` (longer ones are truncated, and counted).

use std::io::{Cursor, Seek, Write};
use std::path::{Path, PathBuf};

use ndarray::Array2;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams, TruncationStrategy};

use crate::Error;

/// Sentences tokenised to one length.
#[derive(Debug, Clone)]
pub struct Tokenized {
    /// Token ids, `[sentences, seq_len]`.
    pub input_ids: Array2<i64>,
    /// 1 for a token, 0 for padding.
    pub attention_mask: Array2<i64>,
    /// Segment ids (0 for a single sentence).
    pub token_type_ids: Array2<i64>,
    /// How many sentences were longer than the length and were truncated.
    pub truncated: usize,
    /// Mean tokens per sentence (padding excluded).
    pub mean_tokens: f64,
}

/// The sentences of a `.txt` or `.tsv` file (see the module docs).
pub fn read_sentences(path: &Path) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let tsv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = if tsv {
            line.split('\t').collect()
        } else {
            vec![line]
        };
        for f in fields {
            let f = f.trim();
            if !f.is_empty() && (!tsv || f.parse::<f64>().is_err()) {
                out.push(f.to_string());
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Text {
            path: path.to_path_buf(),
            reason: "holds no sentences".into(),
        });
    }
    Ok(out)
}

/// The pairs of an STS-style file: one `score<TAB>sentence<TAB>sentence` per line (empty lines
/// skipped). Any other line is an error naming its number.
pub fn read_pairs(path: &Path) -> Result<Vec<(f64, String, String)>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let score = f.first().and_then(|s| s.trim().parse::<f64>().ok());
        match (score, f.len()) {
            (Some(s), 3) if s.is_finite() && !f[1].trim().is_empty() && !f[2].trim().is_empty() => {
                out.push((s, f[1].trim().to_string(), f[2].trim().to_string()))
            }
            _ => {
                return Err(Error::Text {
                    path: path.to_path_buf(),
                    reason: format!("line {} is not score<TAB>sentence<TAB>sentence", i + 1),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Text {
            path: path.to_path_buf(),
            reason: "holds no sentence pairs".into(),
        });
    }
    Ok(out)
}

/// Tokenises `sentences` with the tokenizer file (`tokenizer.json` of Hugging Face tokenizers),
/// special tokens added, padded to the longest (at most `max_len` tokens).
pub fn tokenize(
    sentences: &[String],
    tokenizer: &Path,
    max_len: usize,
) -> Result<Tokenized, Error> {
    let fail = |reason: String| Error::Text {
        path: tokenizer.to_path_buf(),
        reason,
    };
    if max_len < 2 {
        return Err(fail(format!(
            "a length of {max_len} tokens leaves no room for a sentence"
        )));
    }
    let mut tok =
        Tokenizer::from_file(tokenizer).map_err(|e| fail(format!("not a tokenizer.json: {e}")))?;
    let pad = tok.get_padding().cloned().unwrap_or_default();
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..pad
    }));
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        strategy: TruncationStrategy::LongestFirst,
        ..Default::default()
    }))
    .map_err(|e| fail(e.to_string()))?;
    // count the sentences truncation shortens: their untruncated length exceeds max_len
    let mut plain = tok.clone();
    plain
        .with_truncation(None)
        .map_err(|e| fail(e.to_string()))?;
    plain.with_padding(None);
    let inputs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let full = plain
        .encode_batch(inputs.clone(), true)
        .map_err(|e| fail(e.to_string()))?;
    let truncated = full.iter().filter(|e| e.get_ids().len() > max_len).count();
    let enc = tok
        .encode_batch(inputs, true)
        .map_err(|e| fail(e.to_string()))?;
    let seq = enc.first().map_or(0, |e| e.get_ids().len());
    let n = enc.len();
    let mut ids = Array2::<i64>::zeros((n, seq));
    let mut mask = Array2::<i64>::zeros((n, seq));
    let mut types = Array2::<i64>::zeros((n, seq));
    let mut tokens = 0usize;
    for (i, e) in enc.iter().enumerate() {
        for j in 0..seq {
            ids[[i, j]] = i64::from(e.get_ids()[j]);
            mask[[i, j]] = i64::from(e.get_attention_mask()[j]);
            types[[i, j]] = i64::from(e.get_type_ids()[j]);
        }
        tokens += e.get_attention_mask().iter().filter(|&&m| m == 1).count();
    }
    Ok(Tokenized {
        input_ids: ids,
        attention_mask: mask,
        token_type_ids: types,
        truncated,
        mean_tokens: tokens as f64 / n.max(1) as f64,
    })
}

/// The `.npz` bytes of the three arrays, named as BERT-style ONNX exports name their inputs.
pub fn to_npz(t: &Tokenized) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    write_npz(t, &mut buf).expect("writing an npz to memory");
    buf.into_inner()
}

fn write_npz<W: Write + Seek>(t: &Tokenized, w: W) -> Result<(), ndarray_npy::WriteNpzError> {
    let mut npz = ndarray_npy::NpzWriter::new(w);
    npz.add_array("input_ids", &t.input_ids)?;
    npz.add_array("attention_mask", &t.attention_mask)?;
    npz.add_array("token_type_ids", &t.token_type_ids)?;
    npz.finish()?;
    Ok(())
}

/// `tokenizer.json` in the folder, or the file itself.
pub fn tokenizer_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm_tokenizer() -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/assets/models/minilm-l6-v2-tokenizer/tokenizer.json");
        if p.is_file() {
            Some(p)
        } else {
            assert!(std::env::var_os("CI").is_none(), "{} missing", p.display());
            None
        }
    }

    #[test]
    fn tsv_fields_are_sentences_and_numbers_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pairs.tsv");
        std::fs::write(&p, "4.2\tA man plays.\tSomeone plays.\n\n0.5\tOne.\t\n").unwrap();
        assert_eq!(
            read_sentences(&p).unwrap(),
            ["A man plays.", "Someone plays.", "One."]
        );
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "\n  \n").unwrap();
        let e = read_sentences(&empty).unwrap_err().to_string();
        assert!(e.ends_with("holds no sentences"), "{e}");
    }

    #[test]
    fn tokenises_like_the_reference_ids() {
        let Some(tok) = minilm_tokenizer() else {
            return;
        };
        // minilm-l6-v2-reference.json holds the token ids of its sentences
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tok.parent().unwrap().join("../minilm-l6-v2-reference.json"))
                .unwrap(),
        )
        .unwrap();
        let items = reference["sentences"].as_array().unwrap();
        let sentences: Vec<String> = items
            .iter()
            .map(|s| s["text"].as_str().unwrap().to_string())
            .collect();
        let t = tokenize(&sentences, &tok, 128).unwrap();
        for (i, s) in items.iter().enumerate() {
            let want: Vec<i64> = s["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let got: Vec<i64> = t
                .input_ids
                .row(i)
                .iter()
                .zip(t.attention_mask.row(i))
                .filter(|(_, m)| **m == 1)
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(got, want, "sentence {i}");
        }
        // truncation: 4 tokens at most, every sentence longer is counted
        let t = tokenize(&sentences, &tok, 4).unwrap();
        assert_eq!(t.input_ids.ncols(), 4);
        assert_eq!(t.truncated, sentences.len());
        let e = tokenize(&sentences, Path::new("/nonexistent/tokenizer.json"), 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a tokenizer.json"), "{e}");
    }
}
