//! Sentence-similarity evaluation of a text encoder against a reference on STS-style pairs.
//!
//! Both models embed both sentences of every pair (tokenised with a `tokenizer.json`). The
//! embedding is the first `[batch, dim]` float output (a pooled, normalised sentence embedding),
//! else the first `[batch, seq, dim]` float output mean-pooled over the attention mask. Per model:
//! the Spearman rank correlation between the cosine similarity of each pair's embeddings and its
//! gold score; between the models: the mean cosine similarity of their embeddings of the same
//! sentence.

use std::path::Path;

use ndarray::{Array2, ArrayD};
use serde::Serialize;
use whittle_calib::text;
use whittle_core::Value;
use whittle_core::stats::cosine;
use whittle_runtime::{RuntimeKind, RuntimeOptions, Session};

use crate::{Error, VerifyOptions};

/// The result of an STS evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct StsReport {
    /// Sentence pairs evaluated.
    pub pairs: usize,
    /// The runtime used.
    pub runtime: String,
    /// The output the embeddings come from (and whether it was mean-pooled).
    pub embedding: String,
    /// Spearman correlation of the reference's pair similarities with the gold scores.
    pub reference_spearman: f64,
    /// The same for the candidate.
    pub candidate_spearman: f64,
    /// `candidate_spearman / reference_spearman`.
    pub kept: f64,
    /// Mean cosine similarity of the two models' embeddings of the same sentence.
    pub mean_cosine: f64,
}

/// Tokens per sentence at most (special tokens included).
const MAX_LEN: usize = 128;

/// Evaluates both models on the pairs of `pairs_file` (see [`text::read_pairs`]), tokenised with
/// `tokenizer`. `opts.limit` takes the first pairs; `progress(done, total)` counts pairs.
pub fn sts(
    reference: &[u8],
    candidate: &[u8],
    pairs_file: &Path,
    tokenizer: &Path,
    opts: &VerifyOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<StsReport, Error> {
    let data = |e: whittle_calib::Error| Error::Data(Box::new(e));
    let mut pairs = text::read_pairs(pairs_file).map_err(data)?;
    if let Some(n) = opts.limit {
        pairs.truncate(n);
    }
    // every sentence once per pair side: a0, b0, a1, b1, ...
    let sentences: Vec<String> = pairs
        .iter()
        .flat_map(|(_, a, b)| [a.clone(), b.clone()])
        .collect();
    let bs = opts.batch.max(1);
    let mut ropts = RuntimeOptions {
        threads: opts.threads,
        ..Default::default()
    };
    // tract plans for fixed shapes: pad every batch to `bs` x MAX_LEN
    let fixed = opts.runtime == RuntimeKind::Tract;
    if fixed {
        ropts.input_shapes = whittle_runtime::declared_inputs(reference)?
            .into_iter()
            .map(|io| (io.name, vec![bs, MAX_LEN]))
            .collect();
    }
    let mut r = whittle_runtime::load(opts.runtime, reference, &ropts)?;
    let mut c = whittle_runtime::load(opts.runtime, candidate, &ropts)?;
    let (out, pooled) = embedding_output(r.as_ref())?;
    let name = r.outputs()[out].name.clone();
    let (mut er, mut ec) = (Vec::new(), Vec::new());
    let mut done = 0;
    for chunk in sentences.chunks(bs) {
        let t = text::tokenize(chunk, &text::tokenizer_file(tokenizer), MAX_LEN).map_err(data)?;
        let (ids, mask, types) = if fixed {
            (
                pad(&t.input_ids, bs, MAX_LEN),
                pad(&t.attention_mask, bs, MAX_LEN),
                pad(&t.token_type_ids, bs, MAX_LEN),
            )
        } else {
            (t.input_ids, t.attention_mask, t.token_type_ids)
        };
        let feed = |s: &dyn Session| -> Result<Vec<Value>, Error> {
            s.inputs()
                .iter()
                .map(|io| {
                    let a = match io.name.as_str() {
                        n if n.contains("mask") => &mask,
                        n if n.contains("type") || n.contains("segment") => &types,
                        _ => &ids,
                    };
                    let a: ArrayD<i64> = a.clone().into_dyn();
                    match io.dtype.as_str() {
                        "int64" => Ok(Value::I64(a)),
                        "int32" => Ok(Value::I32(a.mapv(|v| v as i32))),
                        other => Err(Error::Mismatch(format!(
                            "input '{}' is {other}; a text encoder takes int64 or int32 token ids",
                            io.name
                        ))),
                    }
                })
                .collect()
        };
        let inputs = feed(r.as_ref())?;
        let ro = r.run(&inputs)?;
        let co = c.run(&feed(c.as_ref())?)?;
        for (outs, acc) in [(&ro, &mut er), (&co, &mut ec)] {
            let v = outs
                .get(out)
                .ok_or_else(|| Error::Mismatch(format!("the candidate has no output '{name}'")))?;
            acc.extend(embeddings(v, pooled.then_some(&mask), chunk.len())?);
        }
        done += chunk.len();
        progress(done / 2, pairs.len());
    }
    let sims = |e: &[Vec<f32>]| -> Vec<f64> { e.chunks(2).map(|p| cosine(&p[0], &p[1])).collect() };
    let gold: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let rs = spearman(&gold, &sims(&er));
    let cs = spearman(&gold, &sims(&ec));
    let mean_cosine =
        er.iter().zip(&ec).map(|(a, b)| cosine(a, b)).sum::<f64>() / er.len().max(1) as f64;
    Ok(StsReport {
        pairs: pairs.len(),
        runtime: opts.runtime.name().to_string(),
        embedding: if pooled {
            format!("{name} (mean-pooled over the attention mask)")
        } else {
            name
        },
        reference_spearman: rs,
        candidate_spearman: cs,
        kept: cs / rs,
        mean_cosine,
    })
}

/// The output holding the embedding, and whether it needs mean pooling.
fn embedding_output(s: &dyn Session) -> Result<(usize, bool), Error> {
    let outs = s.outputs();
    let float = |k: &usize| outs[*k].dtype == "float";
    if let Some(k) = (0..outs.len()).find(|k| float(k) && outs[*k].dims.len() == 2) {
        return Ok((k, false));
    }
    if let Some(k) = (0..outs.len()).find(|k| float(k) && outs[*k].dims.len() == 3) {
        return Ok((k, true));
    }
    Err(Error::Mismatch(
        "no float output of shape [batch, dim] or [batch, seq, dim] to take embeddings from".into(),
    ))
}

/// The first `items` embeddings of a batch output.
fn embeddings(v: &Value, mask: Option<&Array2<i64>>, items: usize) -> Result<Vec<Vec<f32>>, Error> {
    let shape = v.shape().to_vec();
    let flat = v.to_f32_vec();
    let dim = *shape.last().unwrap_or(&0);
    match (mask, shape.len()) {
        (None, 2) => Ok(flat.chunks(dim).take(items).map(<[f32]>::to_vec).collect()),
        (Some(m), 3) => {
            let seq = shape[1];
            Ok((0..items)
                .map(|i| {
                    let mut e = vec![0f32; dim];
                    let mut n = 0f32;
                    for t in 0..seq {
                        if m.get((i, t)).copied().unwrap_or(0) > 0 {
                            n += 1.0;
                            let row = &flat[(i * seq + t) * dim..(i * seq + t + 1) * dim];
                            e.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                        }
                    }
                    e.iter_mut().for_each(|a| *a /= n.max(1.0));
                    e
                })
                .collect())
        }
        _ => Err(Error::Mismatch(format!(
            "the embedding output came back as {shape:?}"
        ))),
    }
}

/// `a` padded with zeros to `rows` x `cols` (rows past the data repeat nothing: they are all
/// padding, mask 0).
fn pad(a: &Array2<i64>, rows: usize, cols: usize) -> Array2<i64> {
    let mut out = Array2::<i64>::zeros((rows, cols));
    for ((i, j), v) in a.indexed_iter() {
        if i < rows && j < cols {
            out[[i, j]] = *v;
        }
    }
    out
}

/// Ranks from 1, ties given their mean rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation (Pearson's on the ranks, ties averaged); NaN when either side is
/// constant.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        ab += (x - ma) * (y - mb);
        aa += (x - ma).powi(2);
        bb += (y - mb).powi(2);
    }
    ab / (aa * bb).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_known_rankings() {
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // a textbook case: d² = 0+1+1+0+... computed by hand: 1 - 6·Σd²/(n(n²-1))
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        let b = [2.0, 1.0, 4.0, 3.0, 5.0];
        assert!((spearman(&a, &b) - (1.0 - 6.0 * 4.0 / 120.0)).abs() < 1e-12);
        // ties take their mean rank
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
    }
}
