//! The report of a deployment: the measured rows (`results.json`), the results table, `report.md`
//! and its plot (`plot.svg`, see [`crate::plot`]).
//!
//! Everything here renders text; writing the files (atomically) is the caller's job.

use serde::Serialize;
use whittle_runtime::BenchReport;

use crate::plot;
use crate::table::{Table, pct, si};

/// The plot's file name in the report folder (`report.md` links to it).
pub const PLOT_FILE: &str = "plot.svg";

/// The Markdown report's file name in the report folder.
pub const MARKDOWN_FILE: &str = "report.md";

/// The folder, inside a report's, of the main job's search (`whittle auto`'s own report).
pub const AUTO_DIR: &str = "auto";

/// The machine-readable results of a deployment (`results.json`, `whittle deploy --json`).
///
/// `C` is the summary of the compression that made the variants, when one ran.
#[derive(Debug, Clone, Serialize)]
pub struct Results<C, A = ()> {
    /// The target's name.
    pub target: String,
    /// The target's triple (`host` for this machine).
    pub triple: String,
    /// The transport's name (`local`, `emulated`, `ssh`, `serial`).
    pub transport: String,
    /// When the deployment started, `YYYYMMDD-HHMMSS` UTC (the report folder's name).
    pub started: String,
    /// Set when the latencies cannot stand for the board's (measured under emulation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timing_note: Option<String>,
    /// The compression of the main job, when it ran.
    pub compression: Option<C>,
    /// The main job's INT8 quantization, when it ran.
    pub quantization: Option<C>,
    /// The main job's search (`whittle auto`), when it chose the compressed model; its own
    /// report is in [`AUTO_DIR`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto: Option<A>,
    /// What happened to the link (serial: drops, reopenings, resumed uploads), one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub link_events: Vec<String>,
    /// False while rows are still being measured: `results.json` is rewritten (atomically) after
    /// each row, so an interrupted or failed run keeps the rows it finished.
    pub complete: bool,
    /// One row per model and runtime measured.
    pub rows: Vec<Row>,
    /// Models the board could not run (the board's error text), while the others went on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Failure>,
}

/// One model measured on one runtime of the target.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The model's file name.
    pub model: String,
    /// The variant's label (`original`, `pruned (...)`, `given`).
    pub variant: String,
    /// Parameters of the model.
    pub params: u64,
    /// Multiply-accumulates of one inference.
    pub macs: u64,
    /// The runner's benchmark.
    pub bench: BenchReport,
    /// p50 of the original on the same runtime divided by this row's p50.
    pub speedup: Option<f64>,
    /// Top-1 agreement with the original on the held-apart items (compressed variants).
    pub agreement: Option<f64>,
    /// Top-1 accuracy on the held-apart items, where the data is labelled.
    pub accuracy: Option<f64>,
    /// The number of held-apart items checked.
    pub items: usize,
    /// Peak resident memory of the runner while it served this row's model (where known).
    pub peak_rss_bytes: Option<u64>,
    /// The runner's output checksums for its synthetic inputs (compare across boards).
    pub outputs: Vec<OutputSum>,
    /// Milliseconds to create the session in the runner (with TensorRT and no cached engine: the
    /// engine build), apart from the timed runs.
    pub load_ms: Option<f64>,
    /// Milliseconds of the first run in the runner, apart from the timed runs.
    pub first_run_ms: Option<f64>,
    /// For a quantized model, why (part of) it ran in float on this runtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs_in_float: Option<String>,
}

/// One output checksum from the runner (see [`crate::protocol::output_checksum`]).
#[derive(Debug, Clone, Serialize)]
pub struct OutputSum {
    /// The graph output's name.
    pub name: String,
    /// Its element type, as ONNX names it.
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// The sum of its elements.
    pub sum: f64,
    /// The sum of their squares.
    pub sum_squares: f64,
}

/// A model and runtime that failed on the board or in the check against the original.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The model's file name.
    pub model: String,
    /// The runtime's name.
    pub runtime: String,
    /// The error, on one line.
    pub error: String,
}

/// The plot could not be drawn (plotters' message).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PlotError(pub String);

/// A rendered report: what the caller prints and writes.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The results table, as printed and as `report.md` quotes it.
    pub table: String,
    /// The text of `report.md`.
    pub markdown: String,
    /// The SVG text of `plot.svg`.
    pub svg: String,
}

/// Renders the table, `report.md` and the plot of `results`. `held_out` is the number of items
/// agreement and accuracy were measured on.
pub fn render<C, A>(results: &Results<C, A>, held_out: usize) -> Result<Rendered, PlotError> {
    let table = table(results);
    let points: Vec<plot::Point> = results
        .rows
        .iter()
        .filter_map(|r| {
            Some(plot::Point {
                variant: r.variant.clone(),
                runtime: r.bench.runtime.to_string(),
                agreement: r.agreement?,
                p50_ms: r.bench.stats.p50_ms,
            })
        })
        .collect();
    let unplotted = results.rows.len() - points.len();
    let svg = plot::svg(
        &format!("whittle deploy: {} ({})", results.target, results.started),
        &points,
    )?;
    let markdown = markdown(results, held_out, &table, unplotted);
    Ok(Rendered {
        table,
        markdown,
        svg,
    })
}

/// The results table: one line per row.
pub fn table<C, A>(r: &Results<C, A>) -> String {
    let mut t = Table::new(&[
        "model",
        "variant",
        "params",
        "MACs",
        "runtime",
        "EP",
        "p50 ms",
        "p90 ms",
        "fps",
        "speedup",
        "agreement",
        "accuracy",
    ]);
    let opt = |v: Option<f64>| v.map(pct).unwrap_or_else(|| "-".into());
    for row in &r.rows {
        let b = &row.bench;
        t.row(vec![
            row.model.clone(),
            row.variant.clone(),
            si(row.params),
            si(row.macs),
            b.runtime.to_string(),
            b.provider.actual.clone(),
            format!("{:.3}", b.stats.p50_ms),
            format!("{:.3}", b.stats.p90_ms),
            format!("{:.1}", b.stats.fps),
            row.speedup
                .map(|v| format!("{v:.2}x"))
                .unwrap_or_else(|| "-".into()),
            opt(row.agreement),
            opt(row.accuracy),
        ]);
    }
    t.render()
}

/// The text of `report.md`: the table, startup times, link events, the plot and the failures.
fn markdown<C, A>(
    results: &Results<C, A>,
    held_out: usize,
    table: &str,
    unplotted: usize,
) -> String {
    let note = results
        .timing_note
        .as_ref()
        .map(|n| format!("**Note: {n}.**\n\n"))
        .unwrap_or_default();
    let link = if results.link_events.is_empty() {
        String::new()
    } else {
        let lines: Vec<String> = results
            .link_events
            .iter()
            .map(|e| format!("- {e}\n"))
            .collect();
        format!("\nThe link:\n\n{}", lines.concat())
    };
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let startup_rows: Vec<String> = results
        .rows
        .iter()
        .map(|r| {
            format!(
                "| {} | {} | {} | {} | {} |\n",
                r.model,
                r.bench.runtime,
                r.bench.provider.actual,
                ms(r.load_ms),
                ms(r.first_run_ms)
            )
        })
        .collect();
    let startup = format!(
        "\nStartup, apart from the timed runs: session creation (with TensorRT and no cached engine, the engine build) and the first run.\n\n| model | runtime | EP | session ms | first run ms |\n|---|---|---|---|---|\n{}",
        startup_rows.concat()
    );
    let in_float: Vec<String> = results
        .rows
        .iter()
        .filter_map(|r| {
            let why = r.runs_in_float.as_ref()?;
            Some(format!(
                "- {} ({}) on {}: {why}\n",
                r.model, r.variant, r.bench.runtime
            ))
        })
        .collect();
    let startup = if in_float.is_empty() {
        startup
    } else {
        format!(
            "{startup}\nQuantized models that ran (partly) in float:\n\n{}",
            in_float.concat()
        )
    };
    let unplotted = if unplotted > 0 {
        format!(" ({unplotted} rows without an agreement are not plotted)")
    } else {
        String::new()
    };
    let search = if results.auto.is_some() {
        format!(
            "The compressed model is `whittle auto`'s choice: every candidate it tried, the front and its plot are in [{AUTO_DIR}/report.md]({AUTO_DIR}/report.md), with the recipe that rebuilds it.\n\n"
        )
    } else {
        String::new()
    };
    let md = format!(
        "# whittle deploy: {} ({})\n\nstarted {}\n\n{note}{search}Accuracy and agreement with the original are measured on {held_out} held-apart images.\n\n```\n{table}```\n{startup}{link}\n![p50 latency against top-1 agreement, one point per variant and runtime]({PLOT_FILE}){unplotted}\n",
        results.target, results.triple, results.started,
    );
    let failed: Vec<String> = results
        .failures
        .iter()
        .map(|f| format!("- {} on {}: {}\n", f.model, f.runtime, f.error))
        .collect();
    if failed.is_empty() {
        md
    } else {
        format!(
            "{md}\nFailed on the board (the other rows were measured):\n\n{}",
            failed.concat()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whittle_runtime::{BenchStats, ProviderInfo, RuntimeKind};

    fn row(variant: &str, agreement: Option<f64>) -> Row {
        Row {
            model: "m.onnx".into(),
            variant: variant.into(),
            params: 78_000,
            macs: 12_500_000,
            bench: BenchReport {
                model: "m.onnx".into(),
                runtime: RuntimeKind::OrtCpu,
                provider: ProviderInfo {
                    requested: "CPUExecutionProvider".into(),
                    actual: "CPUExecutionProvider".into(),
                    fallback: false,
                    reason: None,
                },
                input_shapes: vec![("input".into(), vec![1, 3, 32, 32])],
                stats: BenchStats::from_samples(&[1.0, 2.0, 3.0]).expect("stats"),
            },
            speedup: Some(1.0),
            agreement,
            accuracy: None,
            items: 10,
            peak_rss_bytes: None,
            outputs: Vec::new(),
            load_ms: Some(12.34),
            first_run_ms: None,
            runs_in_float: None,
        }
    }

    fn results(rows: Vec<Row>, failures: Vec<Failure>) -> Results<()> {
        Results {
            target: "host".into(),
            triple: "host".into(),
            transport: "local".into(),
            started: "20260101-000000".into(),
            timing_note: Some("timings are emulated".into()),
            compression: None,
            quantization: None,
            auto: None,
            link_events: vec!["the link dropped".into()],
            complete: true,
            rows,
            failures,
        }
    }

    #[test]
    fn the_markdown_quotes_the_table_and_lists_what_the_plot_leaves_out() {
        let r = results(
            vec![row("original", Some(1.0)), row("given", None)],
            vec![Failure {
                model: "big.onnx".into(),
                runtime: "tract".into(),
                error: "out of memory".into(),
            }],
        );
        let out = render(&r, 150).expect("renders");
        assert!(out.table.starts_with("model"), "{}", out.table);
        assert_eq!(out.table.lines().count(), 3, "{}", out.table);
        let md = &out.markdown;
        assert!(md.starts_with("# whittle deploy: host (host)\n"), "{md}");
        assert!(md.contains("**Note: timings are emulated.**"), "{md}");
        assert!(md.contains("measured on 150 held-apart images"), "{md}");
        assert!(md.contains(&format!("```\n{}```\n", out.table)), "{md}");
        assert!(md.contains("| m.onnx | ort-cpu | CPUExecutionProvider | 12.3 | - |"));
        assert!(md.contains("- the link dropped\n"), "{md}");
        assert!(md.contains("(plot.svg) (1 rows without an agreement are not plotted)"));
        assert!(md.ends_with("- big.onnx on tract: out of memory\n"), "{md}");
        assert!(out.svg.starts_with("<svg"), "{}", &out.svg[..40]);
    }

    #[test]
    fn results_serialise_without_empty_optional_fields() {
        let mut r = results(vec![row("original", Some(1.0))], Vec::new());
        r.timing_note = None;
        r.link_events.clear();
        let json = serde_json::to_string(&r).expect("serialises");
        for absent in ["timing_note", "link_events", "failures", "runs_in_float"] {
            assert!(!json.contains(absent), "{json}");
        }
        assert!(
            json.contains(r#""compression":null,"quantization":null,"complete":true"#),
            "{json}"
        );
        let json: serde_json::Value = serde_json::from_str(&json).expect("parses");
        assert_eq!(json["rows"][0]["bench"]["runtime"], "ort-cpu");
    }
}
