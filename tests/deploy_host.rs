//! `whittle deploy --target host` from the repository root: the main job searches (`whittle
//! auto`) for the fastest ResNet-8 keeping 97% agreement and measures the original and its
//! choice on each runtime; with `--no-auto` it prunes and quantizes the bundled ResNet-8 and
//! measures original, pruned and int8; either way it writes `<reports>/host/<stamp>/results.json`
//! + `report.md` + `plot.svg` (+ the compressed models).

use crate::common::*;

#[test]
fn deploy_host_main_job_measures_autos_choice() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&deploy_args("host", 5, dir.path(), &[])).ok();
    // the search's table, the front marked, then the measurements
    r.stdout_has("# whittle auto");
    r.stdout_has("(chosen)");
    let report = report_dir(&dir.path().join("host"), &r);
    let results = results_json(&report);
    let search = &results["auto"];
    let chosen = &search["candidates"][search["chosen"].as_u64().unwrap() as usize];
    assert!(
        chosen["fidelity"].as_f64().unwrap() >= 0.97 && chosen["meets_floor"] == true,
        "{search:#}"
    );
    assert_eq!(search["floor"].as_f64(), Some(0.97));
    assert!(
        search["candidates"].as_array().unwrap().len() >= 4,
        "{search:#}"
    );
    assert_eq!(chosen["on_front"], true, "the choice is on the front");
    let rows = results["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "original and the choice on two runtimes");
    let label = format!("auto: {}", chosen["name"].as_str().unwrap());
    for row in rows {
        let v = row["variant"].as_str().unwrap();
        assert!(v == "original" || v == label, "{v}");
        assert_eq!(
            row["items"].as_u64(),
            Some(172),
            "judged on the images held apart"
        );
        if v != "original" {
            assert_eq!(row["model"].as_str(), Some("resnet8_cifar10.auto.onnx"));
            // the search's floor, judged on 128 of these images, holds on all 172 within a few
            assert!(row["agreement"].as_f64().unwrap() > 0.93, "{row:#}");
        }
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("[auto/report.md](auto/report.md)"), "{md}");
    let stamp = report.file_name().unwrap().to_string_lossy().into_owned();
    let auto_files: Vec<String> = [
        "plan.json",
        "plot.svg",
        "recipe.toml",
        "report.md",
        "results.json",
    ]
    .iter()
    .map(|f| format!("host/{stamp}/auto/{f}"))
    .collect();
    let listed = listing(dir.path());
    for f in auto_files
        .iter()
        .chain([&format!("host/{stamp}/resnet8_cifar10.auto.onnx")])
    {
        assert!(listed.contains(f), "{f} missing: {listed:?}");
    }
    // the recipe rebuilds the choice's steps
    let recipe = std::fs::read_to_string(report.join("auto/recipe.toml")).unwrap();
    assert!(recipe.contains("min_agreement = 0.97"), "{recipe}");
}

#[test]
fn deploy_host_pins_a_recipe_or_refuses_a_bad_floor() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = s(&repo_root().join("recipes/int8.toml"));
    let r = run(&deploy_args(
        "host",
        3,
        dir.path(),
        &["--recipe".into(), recipe],
    ))
    .ok();
    let results = results_json(&report_dir(&dir.path().join("host"), &r));
    let variants: Vec<&str> = results["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        variants,
        [
            "original",
            "original",
            "recipe (int8.toml)",
            "recipe (int8.toml)"
        ]
    );
    assert!(results.get("auto").is_none(), "no search: {results:#}");
    // refused before any work: nothing written
    let other = tempfile::tempdir().unwrap();
    for (bad, words) in [
        ("--min-agreement=1.5", &["--min-agreement 1.5"][..]),
        (
            "--recipe=no-such.toml",
            &["no-such.toml", "no such file"][..],
        ),
    ] {
        run(&deploy_args("host", 3, other.path(), &[bad.into()])).error(words);
    }
    assert!(
        listing(other.path()).is_empty(),
        "{:?}",
        listing(other.path())
    );
}

#[test]
fn deploy_host_measures_resnet8_on_both_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&deploy_args("host", 5, dir.path(), &["--no-auto".into()])).ok();
    let rows = r.rows("resnet8_cifar10");
    assert_eq!(rows.len(), 6, "{}", r.dump());
    assert!(
        rows.iter()
            .any(|l| l.split_whitespace().any(|w| w == "ort-cpu")),
        "{}",
        r.dump()
    );
    assert!(
        rows.iter()
            .any(|l| l.split_whitespace().any(|w| w == "tract")),
        "{}",
        r.dump()
    );

    // Exactly one <stamp> folder, named YYYYMMDD-HHMMSS.
    let report = report_dir(&dir.path().join("host"), &r);
    let stamp = report.file_name().unwrap().to_string_lossy().into_owned();
    let b = stamp.as_bytes();
    assert!(
        b.len() == 15
            && b[8] == b'-'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 8 || c.is_ascii_digit()),
        "stamp {stamp:?} is not YYYYMMDD-HHMMSS"
    );
    assert!(
        r.stderr.contains(&s(&report)),
        "stderr should name the report folder\n{}",
        r.dump()
    );

    let results = results_json(&report);
    assert_eq!(results["target"].as_str(), Some("host"));
    assert_eq!(results["started"].as_str(), Some(stamp.as_str()));
    assert_eq!(results["complete"], true, "a finished run says so");
    let jrows = results["rows"].as_array().unwrap();
    assert_eq!(jrows.len(), 6, "{results:#}");
    let mut runtimes: Vec<&str> = jrows
        .iter()
        .map(|row| row["bench"]["runtime"].as_str().unwrap())
        .collect();
    runtimes.sort();
    assert_eq!(runtimes, [["ort-cpu"; 3], ["tract"; 3]].concat());
    let compression = &results["compression"];
    assert!(
        compression["macs_kept"].as_f64().unwrap() <= 0.75 + 1e-6,
        "{compression:#}"
    );
    // the int8 variant, calibrated on the same split
    let q = &results["quantization"]["quantize"];
    let kept_float = |op: &str| q["kept_float"][op].as_u64().unwrap_or(0);
    assert_eq!(
        q["weights"].as_u64().unwrap() + kept_float("Conv") + kept_float("Gemm"),
        10,
        "every layer int8 or listed as kept float: {q:#}"
    );
    for row in jrows {
        let variant = row["variant"].as_str().unwrap();
        let expect_model = match variant {
            "original" => "resnet8_cifar10.onnx",
            "int8" => "resnet8_cifar10.int8.onnx",
            _ => "resnet8_cifar10.pruned.onnx",
        };
        assert_eq!(row["model"].as_str(), Some(expect_model));
        match variant {
            "original" => {
                assert_eq!(row["params"].as_u64(), Some(78_666));
                assert_eq!(row["agreement"].as_f64(), Some(1.0));
            }
            "int8" => {
                assert_eq!(row["macs"].as_u64(), Some(12_501_632));
                assert!(row["agreement"].as_f64().unwrap() > 0.9, "{row:#}");
                // tract runs Q/DQ in float, and the report says so; ONNX Runtime fuses them
                let in_float = row.get("runs_in_float").and_then(|v| v.as_str());
                if row["bench"]["runtime"] == "tract" {
                    assert!(in_float.is_some_and(|w| w.contains("in float")), "{row:#}");
                } else {
                    assert_eq!(in_float, None, "{row:#}");
                }
            }
            _ => {
                assert!(row["macs"].as_u64().unwrap() as f64 <= 0.75 * 12_501_632.0 + 1.0);
                // held-apart images: the pruned model keeps most predictions
                assert!(row["agreement"].as_f64().unwrap() > 0.6, "{row:#}");
            }
        }
        assert_eq!(
            row["items"].as_u64(),
            Some(172),
            "the 300 bundled images less the recipe's 128 calibration images"
        );
        let acc = row["accuracy"].as_f64().expect("accuracy present");
        assert!((0.4..0.9).contains(&acc), "accuracy {acc}");
        assert_eq!(row["bench"]["stats"]["iters"].as_u64(), Some(5));
        assert!(row["bench"]["stats"]["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(row["speedup"].as_f64().unwrap() > 0.0);
        // session creation and the first run, timed apart from the timed runs
        for key in ["load_ms", "first_run_ms"] {
            assert!(row[key].as_f64().unwrap_or(0.0) > 0.0, "{key}\n{row:#}");
        }
        // measured in whittle-runner, which reports its own peak memory
        assert!(
            row["peak_rss_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "{row:#}"
        );
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("host"), "{md}");
    assert!(md.contains("ort-cpu") && md.contains("tract"), "{md}");
    assert!(
        md.contains("](plot.svg)"),
        "the report shows the plot\n{md}"
    );
    assert!(
        md.contains("| model | runtime | EP | session ms | first run ms |"),
        "{md}"
    );
    assert_eq!(
        md.lines()
            .filter(|l| l.starts_with("| resnet8_cifar10"))
            .count(),
        6,
        "a startup line per row\n{md}"
    );
    assert!(
        md.contains("Quantized models that ran (partly) in float:\n\n- resnet8_cifar10.int8.onnx (int8) on tract"),
        "{md}"
    );

    // The plot: well-formed SVG, one point (circle) per variant and runtime, each labelled.
    let svg = std::fs::read_to_string(report.join("plot.svg")).unwrap();
    let elements = xml_elements(&svg).unwrap_or_else(|e| panic!("plot.svg is not XML: {e}"));
    assert_eq!(elements.first().map(String::as_str), Some("svg"), "{svg}");
    let circles = elements.iter().filter(|e| *e == "circle").count();
    assert_eq!(circles, jrows.len(), "one point per row\n{svg}");
    for variant in jrows.iter().map(|r| r["variant"].as_str().unwrap()) {
        let label = format!(">\n{variant}\n</text>");
        assert_eq!(
            svg.matches(&label).count(),
            2,
            "{variant} labels a point on each runtime\n{svg}"
        );
    }
    for rt in ["ort-cpu", "tract"] {
        assert!(
            svg.contains(&format!("\n{rt}\n</text>")),
            "legend {rt}\n{svg}"
        );
    }
    // Nothing but the report files and the compressed models.
    assert_eq!(
        listing(dir.path()),
        vec![
            "host".to_string(),
            format!("host/{stamp}"),
            format!("host/{stamp}/plot.svg"),
            format!("host/{stamp}/report.md"),
            format!("host/{stamp}/resnet8_cifar10.int8.onnx"),
            format!("host/{stamp}/resnet8_cifar10.pruned.onnx"),
            format!("host/{stamp}/results.json"),
        ]
    );
}

/// The element names of an XML document in document order, after checking that it is well formed
/// as far as tags go: every start tag closed in order, attribute values quoted, `&` only in
/// entities, no text outside the root element.
fn xml_elements(text: &str) -> Result<Vec<String>, String> {
    let mut open: Vec<String> = Vec::new();
    let mut names = Vec::new();
    let mut rest = text;
    let mut closed_root = false;
    while let Some(lt) = rest.find('<') {
        let between = &rest[..lt];
        if (open.is_empty() && !between.trim().is_empty()) || between.contains('>') {
            return Err(format!("stray text {between:?}"));
        }
        for (i, _) in between.match_indices('&') {
            let ent = &between[i..];
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#"]
                .iter()
                .any(|e| ent.starts_with(e));
            if !ok {
                return Err(format!("bare & in {between:?}"));
            }
        }
        rest = &rest[lt..];
        if let Some(body) = rest.strip_prefix("<!--") {
            let end = body.find("-->").ok_or("unclosed comment")?;
            rest = &body[end + 3..];
            continue;
        }
        if let Some(body) = rest.strip_prefix("<?") {
            let end = body.find("?>").ok_or("unclosed declaration")?;
            rest = &body[end + 2..];
            continue;
        }
        let gt = rest.find('>').ok_or("unclosed tag")?;
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            match open.pop() {
                Some(o) if o == name.trim() => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
            closed_root |= open.is_empty();
            continue;
        }
        if closed_root {
            return Err(format!("<{tag}> after the root element"));
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name: String = tag.chars().take_while(|c| !c.is_whitespace()).collect();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_:".contains(c))
        {
            return Err(format!("bad element name in <{tag}>"));
        }
        // Attributes: name="value" pairs.
        let mut attrs = tag[name.len()..].trim();
        while !attrs.is_empty() {
            let eq = attrs
                .find('=')
                .ok_or(format!("attribute without value in <{tag}>"))?;
            let value = attrs[eq + 1..].trim_start();
            let quote = value.chars().next().filter(|q| *q == '"' || *q == '\'');
            let quote = quote.ok_or(format!("unquoted attribute in <{tag}>"))?;
            let end = value[1..]
                .find(quote)
                .ok_or(format!("unclosed attribute in <{tag}>"))?;
            attrs = value[end + 2..].trim_start();
        }
        names.push(name.clone());
        if !self_closing {
            open.push(name);
        } else {
            closed_root |= open.is_empty();
        }
    }
    if !open.is_empty() || !rest.trim().is_empty() || names.is_empty() {
        return Err(format!("unclosed elements {open:?} or trailing text"));
    }
    Ok(names)
}

#[test]
fn the_xml_check_tells_good_from_bad() {
    let good = "<?xml version=\"1.0\"?>\n<svg a=\"1\"><g><circle cx=\"1\"/></g><text x='2'>a &amp; b</text></svg>\n";
    assert_eq!(
        xml_elements(good).unwrap(),
        vec!["svg", "g", "circle", "text"]
    );
    for bad in [
        "<svg><g></svg>",
        "<svg><circle cx=1/></svg>",
        "<svg>a & b</svg>",
        "<svg></svg><svg></svg>",
        "<svg>",
        "text<svg></svg>",
    ] {
        assert!(xml_elements(bad).is_err(), "{bad}");
    }
}

#[test]
fn deploy_unknown_target_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&[
        "deploy",
        "--target",
        "no-such-board",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--reports",
        &s(dir.path()),
    ]);
    r.error(&["no-such-board", "known", "host"]);
    assert!(listing(dir.path()).is_empty(), "a report was written");
}

#[test]
fn deploy_host_without_the_runner_says_how_to_build_it() {
    // The local transport measures in whittle-runner; a missing one fails before any work.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-runner");
    let reports = dir.path().join("reports");
    let out = std::process::Command::new(whittle())
        .args(["deploy", "--target", "host", "--reports", &s(&reports)])
        .current_dir(repo_root())
        .env("WHITTLE_RUNNER", &missing)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run whittle");
    let r = Run {
        cmd: format!(
            "WHITTLE_RUNNER={} whittle deploy --target host",
            s(&missing)
        ),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    r.error(&[
        "runner not found",
        "no-runner",
        "cargo build --release -p whittle-runner",
    ]);
    assert!(!reports.exists(), "a report folder was made");
}

#[test]
fn a_model_the_board_cannot_load_is_reported_and_the_others_are_measured() {
    // ResNet-8 with one node turned into an op no runtime has: whittle reads it, the runner
    // cannot load it; the deploy still measures the good model, reports the runner's error text
    // for the bad one, and exits non-zero
    let dir = tempfile::tempdir().unwrap();
    let mut m = whittle_core::Model::load(&resnet8()).unwrap();
    let n = m
        .graph_mut()
        .node
        .iter_mut()
        .find(|n| n.op_type() == "Relu")
        .unwrap();
    n.op_type = Some("NoSuchOp".into());
    let bad = dir.path().join("broken.onnx");
    std::fs::write(&bad, m.to_bytes()).unwrap();
    let reports = dir.path().join("reports");
    let r = run(&deploy_args("host", 3, &reports, &[s(&resnet8()), s(&bad)]));
    // the good rows' table is printed, then one error line naming the bad model and the cause
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("resnet8_cifar10.onnx"), "{}", r.stdout);
    let last = r.stderr.lines().last().unwrap_or_default();
    for needle in ["2 of 4 measurements failed", "broken.onnx", "NoSuchOp"] {
        assert!(last.contains(needle), "{needle} in {last}");
    }
    let folder = report_dir(&reports.join("host"), &r);
    let res = results_json(&folder);
    assert_eq!(res["complete"], true);
    let rows = res["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "the good model on both runtimes");
    assert!(rows.iter().all(|r| r["model"] == "resnet8_cifar10.onnx"));
    let failures = res["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2);
    for f in failures {
        assert_eq!(f["model"], "broken.onnx");
        assert!(f["error"].as_str().unwrap().contains("NoSuchOp"), "{f}");
    }
    let md = std::fs::read_to_string(folder.join("report.md")).unwrap();
    assert!(md.contains("Failed on the board"), "{md}");
}

#[test]
fn a_model_with_symbolic_height_and_width_is_measured_at_the_data_shape() {
    // ResNet-8 with -1 height and width (as paddle2onnx writes them): the runner runs it at the
    // data's item shape and the report counts its MACs there, as inspect does at that shape
    let Some(src) = crate::shapes::dynamic::shared_model("resnet8_cifar10.onnx") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hw = dir.path().join("hw.onnx");
    crate::shapes::dynamic::write_proto(
        &hw,
        &crate::shapes::dynamic::symbolic_hw(&src, "-1", "-1"),
    );
    let reports = dir.path().join("reports");
    let r = run(&deploy_args("host", 3, &reports, &[s(&hw)])).ok();
    let res = results_json(&report_dir(&reports.join("host"), &r));
    let rows = res["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{res:#}");
    let at = inspect_json(&hw, &["--input", "input=1x3x32x32"]);
    for row in rows {
        assert_eq!(row["macs"], at["macs"], "{res:#}");
        assert_eq!(
            row["bench"]["input_shapes"],
            serde_json::json!([["input", [1, 3, 32, 32]]]),
            "{res:#}"
        );
    }
}
