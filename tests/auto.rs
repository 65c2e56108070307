//! `whittle auto` on the bundled ResNet-8 and its CIFAR-10 images: the choice, what rebuilds it,
//! the report, the time budget and refusals.

use crate::common::*;

/// `whittle auto` on ResNet-8 writing `name` in a new temp folder, with `flags` and `--json`: it
/// must succeed; the folder, the output and the JSON.
fn auto_json(
    name: &str,
    flags: &str,
) -> (tempfile::TempDir, std::path::PathBuf, serde_json::Value) {
    let (dir, out) = temp_path(name);
    let r = auto(&out, &format!("{flags} --json")).ok().json();
    (dir, out, r)
}

/// `whittle auto` on ResNet-8 writing `out` (and `out.auto/`), with `flags`.
fn auto(out: &std::path::Path, flags: &str) -> Run {
    cli(
        &format!("auto {{}} -o {{}} --calib {{}} --profile resnet8 --threads 1 {flags}"),
        &[&resnet8(), &out, &cifar10()],
    )
}

#[test]
fn auto_chooses_the_fastest_over_the_floor_and_writes_what_rebuilds_it() {
    let (dir, out, r) = auto_json("chosen.onnx", "--min-agreement 0.9 --rounds 5");
    let cands = r["candidates"].as_array().unwrap();
    assert!(cands.len() >= 4, "{r}");
    let chosen = &cands[r["chosen"].as_u64().unwrap() as usize];
    assert!(chosen["meets_floor"].as_bool().unwrap(), "{r}");
    assert!(chosen["fidelity"].as_f64().unwrap() >= 0.9, "{r}");
    // nothing over the floor measured as long is faster beyond the spreads (successive halving:
    // the contenders are measured again for all the rounds; the others only screened); one
    // faster by its median is a tie, and then the choice is at least as faithful
    let speed = |c: &serde_json::Value| c["latency"]["speedup"].as_f64();
    let spread = |c: &serde_json::Value, k: usize| c["latency"]["spread"][k].as_f64().unwrap();
    let fidelity = |c: &serde_json::Value| c["fidelity"].as_f64().unwrap();
    assert_eq!(chosen["rounds"].as_u64(), Some(5), "{r}");
    for c in cands
        .iter()
        .filter(|c| c["meets_floor"] == true && c["rounds"] == chosen["rounds"])
    {
        assert!(
            spread(c, 0) <= spread(chosen, 1),
            "{c} beats the choice\n{r}"
        );
        if speed(c) > speed(chosen) {
            assert!(fidelity(c) <= fidelity(chosen), "{c}\n{r}");
        }
    }
    for c in cands.iter().filter(|c| !c["latency"].is_null()) {
        assert!(
            c["rounds"].as_u64() == Some(3) || c["rounds"].as_u64() == Some(5),
            "screened (3 rounds) or a contender (5): {c}"
        );
    }
    // the chosen one is on the front; every measured candidate has a spread around its speedup
    assert_eq!(chosen["on_front"], true, "{r}");
    for c in cands.iter().filter(|c| !c["latency"].is_null()) {
        let (lo, hi) = (
            c["latency"]["spread"][0].as_f64().unwrap(),
            c["latency"]["spread"][1].as_f64().unwrap(),
        );
        let s = speed(c).unwrap();
        assert!(lo <= s && s <= hi, "{c}");
    }
    let report = dir.path().join("chosen.auto");
    for f in [
        "recipe.toml",
        "plan.json",
        "results.json",
        "report.md",
        "plot.svg",
    ] {
        assert!(
            report.join(f).is_file(),
            "{f} missing: {:?}",
            listing(&report)
        );
    }
    let svg = std::fs::read_to_string(report.join("plot.svg")).unwrap();
    assert!(svg.contains("front") && svg.contains("chosen"), "{svg}");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("(chosen)"), "{md}");
    // the plan rebuilds the written model byte for byte
    let again = dir.path().join("again.onnx");
    cli(
        "compress {} -o {} --calib {} --profile resnet8 --apply-plan {} --no-speed-check",
        &[&resnet8(), &again, &cifar10(), &report.join("plan.json")],
    )
    .ok();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&again).unwrap(),
        "the plan does not rebuild the choice"
    );
    // the recipe runs as a recipe
    let recipe_out = dir.path().join("recipe.onnx");
    cli(
        "compress {} -o {} --calib {} --profile resnet8 --recipe {} --no-speed-check",
        &[
            &resnet8(),
            &recipe_out,
            &cifar10(),
            &report.join("recipe.toml"),
        ],
    )
    .ok();
}

#[test]
fn a_small_budget_starts_no_candidate_after_it_is_spent() {
    let (dir, out, r) = auto_json("quick.onnx", "--min-agreement 0.5 --budget 1s --rounds 3");
    let cands = r["candidates"].as_array().unwrap();
    // the first starts; once a second has gone by no other does
    assert!(cands[0]["error"].is_null(), "{r}");
    let skipped = cands
        .iter()
        .filter(|c| {
            c["error"]
                .as_str()
                .is_some_and(|e| e.contains("time budget"))
        })
        .count();
    assert!(skipped >= 1, "{r}");
    // a candidate starts only while the budget lasts: the compressions before it took less
    let mut before = 0.0;
    for c in cands.iter().filter(|c| c["error"].is_null()) {
        assert!(
            before < 1.0,
            "{c} started after {before} s of compressing\n{r}"
        );
        before += c["seconds"].as_f64().unwrap();
    }
    assert!(out.is_file() && dir.path().join("quick.auto/results.json").is_file());
}

#[test]
fn an_unreachable_floor_names_the_most_faithful_and_writes_nothing() {
    let (dir, out) = temp_path("none.onnx");
    let e = auto(&out, "--min-agreement 1.0 --rounds 3").error(&["floor", "most faithful"]);
    assert!(e.contains("x the original's speed"), "{e}");
    assert!(!out.exists(), "{:?}", listing(dir.path()));
    assert!(!dir.path().join("none.auto").exists());
}

#[test]
fn a_board_or_bad_floor_is_refused_before_any_work() {
    let (dir, out) = temp_path("x.onnx");
    auto(&out, "--min-agreement 0.9 --target pi4").error(&["pi4", "known"]);
    // emulated timings cannot rank candidates: a table from the real board is needed
    auto(&out, "--min-agreement 0.9 --target qemu-aarch64").error(&["emulation", "--latencies"]);
    auto(&out, "--min-agreement 1.5").error(&["--min-agreement 1.5"]);
    // clap's own refusal (with its usage hint)
    let r = cli(
        "auto {} -o {} --calib {} --min-agreement 0.9 --budget 5x",
        &[&resnet8(), &out, &cifar10()],
    );
    assert_eq!(r.code, 2, "{}", r.dump());
    r.stderr_has("'5x': the unit is s, m or h");
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
}

#[test]
fn a_latency_table_standing_in_for_a_board_changes_the_choice() {
    // a board where int8 kernels are slow and a pruned float model is fastest, and one where
    // int8 is fastest: the same candidates, judged alike, choose differently
    let (dir, _) = temp_path("x");
    let table = |int8: f64, pruned: f64| {
        format!(
            r#"{{"original": 1.0, "int8": {int8}, "int8, stem float": {int8}, "prune macs=0.9 + int8": 0.95, "prune macs=0.8 + int8": 0.95, "prune macs=0.7 + int8": 0.95, "prune macs=0.9": {pruned}, "prune macs=0.75": 0.9}}"#
        )
    };
    let chosen = |name: &str, text: &str| {
        let t = write_text(dir.path(), &format!("{name}.json"), text);
        let out = dir.path().join(format!("{name}.onnx"));
        let r = auto(
            &out,
            &format!("--min-agreement 0.5 --json --latencies {}", t.display()),
        )
        .ok()
        .json();
        assert!(
            r["runtime"].as_str().unwrap().contains("latency table"),
            "{r}"
        );
        let c = &r["candidates"][r["chosen"].as_u64().unwrap() as usize];
        (c["name"].as_str().unwrap().to_string(), r)
    };
    let (no_int8, r) = chosen("no-int8", &table(1.2, 0.5));
    assert_eq!(no_int8, "prune macs=0.9", "{r}");
    let (fast_int8, r) = chosen("fast-int8", &table(0.3, 0.5));
    assert!(fast_int8.starts_with("int8"), "{r}");
    // a table that lacks a candidate is refused before any work, naming it
    let t = write_text(
        dir.path(),
        "short.json",
        r#"{"original": 1.0, "int8": 0.5}"#,
    );
    let out = dir.path().join("short.onnx");
    auto(
        &out,
        &format!("--min-agreement 0.5 --latencies {}", t.display()),
    )
    .error(&["lacks", "prune macs=0.9"]);
    assert!(!out.exists());
}

#[test]
fn a_text_encoder_is_judged_by_the_sts_spearman_it_keeps() {
    // MiniLM calibrated on 64 STS-B train sentences, judged on 40 other train pairs; a 1 s
    // budget lets only the first candidate (int8 of the layers) start
    let dir = tempfile::tempdir().unwrap();
    let Some((model, calib)) = minilm_and_calibration(dir.path(), "--limit 64") else {
        return;
    };
    let (tok, train) = (
        asset("models/minilm-l6-v2-tokenizer").expect("the tokenizer"),
        asset("data/sts/sts-train.tsv").expect("sts-train"),
    );
    let text = std::fs::read_to_string(&train).unwrap();
    let judge = dir.path().join("judge.tsv");
    let lines: Vec<&str> = text.lines().skip(1000).take(40).collect();
    std::fs::write(&judge, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("mini.onnx");
    let r = cli(
        "auto {} -o {} --calib {} --judge-pairs {} --tokenizer {} --min-agreement 0.9 --budget 1s --rounds 3 --threads 1 --json",
        &[&model, &out, &calib, &judge, &tok],
    )
    .ok()
    .json();
    assert_eq!(r["metric"], "sts_spearman_kept", "{r}");
    assert!(
        r["judged_on"].as_str().unwrap().contains("judge.tsv"),
        "{r}"
    );
    let chosen = &r["candidates"][r["chosen"].as_u64().unwrap() as usize];
    assert_eq!(chosen["name"], "int8", "{r}");
    let kept = chosen["fidelity"].as_f64().unwrap();
    assert!((0.9..1.1).contains(&kept), "{r}");
    // the judge agrees with `whittle verify` on the same pairs
    let v = cli(
        "verify {} {} --data {} --tokenizer {} --json",
        &[&model, &out, &judge, &tok],
    )
    .ok()
    .json();
    assert!(
        (v["kept"].as_f64().unwrap() - kept).abs() < 1e-6,
        "{v}\n{r}"
    );
    // pairs that cannot be read are refused before any compression, nothing written
    let bad = dir.path().join("bad.tsv");
    std::fs::write(&bad, "not a pair\n").unwrap();
    let out2 = dir.path().join("none.onnx");
    cli(
        "auto {} -o {} --calib {} --judge-pairs {} --tokenizer {} --min-agreement 0.9",
        &[&model, &out2, &calib, &bad, &tok],
    )
    .error(&["--judge-pairs", "bad.tsv"]);
    assert!(!out2.exists() && !dir.path().join("none.auto").exists());
}

#[test]
fn a_model_no_method_applies_to_says_why() {
    // x [N,10] -> Relu -> Softmax: nothing to prune or quantize
    use whittle_test_support::{GraphBuilder, Lcg};
    let dir = tempfile::tempdir().unwrap();
    let mut g = GraphBuilder::new("plain", Lcg::seeded(1, 0));
    let x = g.input("x", &["N", "10"]);
    let r = g.node("Relu", "relu", &[&x], vec![]);
    g.node("Softmax", "soft", &[&r], vec![]);
    g.graph.node.last_mut().unwrap().output[0] = "y".into();
    g.output("y", &["N", "10"]);
    let model = dir.path().join("plain.onnx");
    write_model(&model, &g.model(8, &[("", 13)]));
    let data = npy(dir.path(), "x.npy", 64, &[10], -1.0, 1.0);
    let out = dir.path().join("out.onnx");
    let e = cli(
        "auto {} -o {} --calib {} --min-agreement 0.9",
        &[&model, &out, &data],
    )
    .error(&[
        "no method applies",
        "nothing to quantize",
        "nothing to prune",
    ]);
    assert_eq!(
        e.matches("nothing to prune").count(),
        1,
        "each reason once: {e}"
    );
    assert!(!out.exists() && !dir.path().join("out.auto").exists());
}
