//! Transformers end to end on MiniLM: `inspect` lists the blocks, `compress --drop-blocks` with
//! and without linear replacement, `verify --tokenizer` on STS-dev pairs, and the refusals.

use crate::common::*;

fn tokenizer() -> Option<std::path::PathBuf> {
    asset("models/minilm-l6-v2-tokenizer")
}

#[test]
fn inspect_lists_minilm_blocks() {
    let Some(m) = minilm() else { return };
    let j = inspect_json(&m, &[]);
    let b = j["transformer_blocks"].as_array().unwrap();
    assert_eq!(b.len(), 6);
    for x in b {
        assert_eq!(x["heads"], 12);
        assert_eq!(x["hidden"], 384);
        assert_eq!(x["ffn"], 1536);
        assert_eq!(x["layout"], "post-norm");
    }
    let text = run(&["inspect", &s(&m), "--brief"]).ok().stdout;
    assert!(text.contains("6 transformer blocks"), "{text}");
}

#[test]
fn three_blocks_replaced_by_a_linear_map_keep_sts_spearman() {
    let dir = tempfile::tempdir().unwrap();
    let Some((m, calib)) = minilm_and_calibration(dir.path(), "--limit 512") else {
        return;
    };
    let mut kept = vec![];
    for replace in [true, false] {
        let out = dir.path().join(format!("drop3_{replace}.onnx"));
        let flags = "--calib {} --calib-items 512 --holdout-items 0 --drop-blocks 3 --json";
        let j = compress_json_if(&m, &out, flags, (replace, "--linear-replace"), &[&calib]);
        let d = &j["drop_blocks"];
        assert_eq!(d["removed"].as_array().unwrap().len(), 3, "{d}");
        assert_eq!(d["linear_replace"], replace, "{d}");
        assert_eq!(d["importance"].as_array().unwrap().len(), 6);
        assert!(j["params"][1].as_u64() < j["params"][0].as_u64());
        // the smaller model has 3 blocks left
        let left = inspect_json(&out, &[]);
        assert_eq!(left["transformer_blocks"].as_array().unwrap().len(), 3);
        let v = sts_verify(&m, &out, 300);
        assert_eq!(v["pairs"], 300);
        let r = v["reference_spearman"].as_f64().unwrap();
        assert!(
            r > 0.8,
            "MiniLM itself correlates with the gold scores: {v}"
        );
        kept.push(v["kept"].as_f64().unwrap());
    }
    // the bench measures the whole dev set (README); on these 300 pairs with 512 calibration
    // sentences the replacement keeps at least 97% and beats plain removal
    assert!(kept[0] >= 0.97, "linear replacement kept {}", kept[0]);
    assert!(kept[0] > kept[1], "linear {} vs plain {}", kept[0], kept[1]);
}

#[test]
fn block_removal_refusals_name_the_cause_and_write_nothing() {
    let (dir, out) = temp_path("out.onnx");
    // a CNN: residual Adds, none with attention
    let r8 = resnet8();
    let calib = cifar10();
    compress(&r8, &out, "--calib {} --drop-blocks 1", &[&calib])
        .error(&["transformer blocks", "none whose branch holds a Softmax"]);
    compress(&r8, &out, "--linear-replace", &[]).error(&["go with --drop-blocks"]);
    if let (Some(m), Some(tok), Some(dev)) = (minilm(), tokenizer(), asset("data/sts/sts-dev.tsv"))
    {
        let calib = dir.path().join("c.npz");
        cli(
            "tokenize {} --tokenizer {} --limit 8 -o {}",
            &[&dev, &tok, &calib],
        )
        .ok();
        compress(&m, &out, "--calib {} --drop-blocks 7", &[&calib])
            .error(&["asked to drop 7 blocks, the model has 6"]);
        compress(&m, &out, "--drop-blocks 2", &[]).error(&["--calib"]);
        // a tokenizer file that does not parse, and a pair file that is not one
        let bad = dir.path().join("tokenizer.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let verify = "verify {} {} --data {} --tokenizer {}";
        cli(verify, &[&m, &m, &dev, &bad]).error(&["not a tokenizer.json"]);
        let pairs = dir.path().join("pairs.tsv");
        std::fs::write(&pairs, "4.0\tonly one sentence\n").unwrap();
        cli(verify, &[&m, &m, &pairs, &tok])
            .error(&["line 1 is not score<TAB>sentence<TAB>sentence"]);
    }
    assert!(!out.exists(), "nothing written");
}
