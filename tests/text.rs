//! Calibration text for transformer encoders: `whittle tokenize` turns STS-B sentences into an
//! `.npz` of token ids, which `compress --calib` and `verify --data` read like any tensor data.

use crate::common::*;

#[test]
fn tokenize_writes_encoder_inputs_and_refuses_bad_requests() {
    let Some(assets) = shared_assets() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tok = assets.join("models/minilm-l6-v2-tokenizer");
    let sts = assets.join("data/sts/sts-dev.tsv");
    let out = dir.path().join("dev.npz");
    let tokenize = "tokenize {} --tokenizer {} -o {}";
    let j = cli(
        &format!("{tokenize} --limit 40 --json"),
        &[&sts, &tok, &out],
    )
    .ok()
    .json();
    // 20 STS pairs give 40 sentences; each padded to the longest
    assert_eq!(j["sentences"], 40);
    let seq = j["seq_len"].as_u64().unwrap();
    assert!(
        seq >= 5 && j["mean_tokens"].as_f64().unwrap() <= seq as f64,
        "{j}"
    );
    let mut npz = ndarray_npy::NpzReader::new(std::fs::File::open(&out).unwrap()).unwrap();
    let mut names = npz.names().unwrap();
    names.sort();
    assert_eq!(names, ["attention_mask", "input_ids", "token_type_ids"]);
    let ids: ndarray::Array2<i64> = npz.by_name("input_ids").unwrap();
    assert_eq!(ids.shape(), [40, seq as usize]);
    assert!(ids.column(0).iter().all(|&t| t == 101), "[CLS] first");

    // bad requests: one line each, nothing written
    let bad = dir.path().join("bad.npz");
    cli(tokenize, &[&sts, &sts, &bad]).error(&["not a tokenizer.json"]);
    let npy = dir.path().join("x.npy");
    cli(tokenize, &[&sts, &tok, &npy]).error(&["must end in .npz"]);
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    cli(tokenize, &[&empty, &tok, &bad]).error(&["holds no sentences"]);
    assert!(!bad.exists());
}

#[test]
fn minilm_data_aware_low_rank_beats_plain_on_held_apart_sentences() {
    let (Some(assets), Some(model)) = (shared_assets(), minilm()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tok = assets.join("models/minilm-l6-v2-tokenizer");
    let tokenize = |tsv: &str, n: &str, out: &str| {
        let (p, sts) = (dir.path().join(out), assets.join("data/sts").join(tsv));
        cli(
            "tokenize {} --tokenizer {} --limit {} -o {}",
            &[&sts, &tok, &n, &p],
        )
        .ok();
        p
    };
    // calibrate on STS-B train sentences, judge on dev sentences the compress never saw
    let calib = tokenize("sts-train.tsv", "160", "train.npz");
    let eval = tokenize("sts-dev.tsv", "200", "dev.npz");
    let mut cosine = vec![];
    for data_aware in [false, true] {
        let out = dir.path().join(format!("lr{data_aware}.onnx"));
        let flags = "--low-rank --target macs=0.8 --calib {} --calib-items 128 --json";
        let j = compress_json_if(&model, &out, flags, (data_aware, "--data-aware"), &[&calib]);
        let (m0, m1) = (
            j["macs"][0].as_f64().unwrap(),
            j["macs"][1].as_f64().unwrap(),
        );
        assert!(m1 <= 0.8 * m0 + 1.0, "{m0} -> {m1}");
        let v = cli("verify {} {} --data {} --json", &[&model, &out, &eval])
            .ok()
            .json();
        let emb = v["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "sentence_embedding")
            .unwrap()["mean_cosine"]
            .as_f64()
            .unwrap();
        cosine.push(emb);
    }
    eprintln!(
        "MiniLM, 20% of MACs removed by low rank: mean cosine of sentence_embedding on 200 dev sentences: plain {:.4}, data-aware {:.4}",
        cosine[0], cosine[1]
    );
    assert!(cosine[1] > cosine[0], "{cosine:?}");
    assert!(cosine[1] > 0.85, "{cosine:?}");
}
