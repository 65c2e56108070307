//! How `whittle compress` prints: the channel groups of `--explain`, and the summary (a table of
//! the layers that changed, then costs, each step's lines, fidelity, speed and warnings).

use whittle_compress::groups::Groups;
use whittle_compress::job::Summary;

use crate::table::{Table, pct, si};

pub(super) fn print_groups(gs: &Groups, json: bool) {
    if json {
        outln!("{}", serde_json::to_string(gs).unwrap_or_default());
        return;
    }
    let mut t = Table::new(&["group", "channels", "members", "producers", "status"]);
    for g in &gs.groups {
        let prods = g.producers();
        let shown = if prods.len() > 3 {
            format!("{}, ... ({} in all)", prods[..3].join(", "), prods.len())
        } else {
            prods.join(", ")
        };
        t.row(vec![
            g.id.to_string(),
            g.size.to_string(),
            g.members.len().to_string(),
            shown,
            g.frozen
                .as_ref()
                .map(|r| format!("frozen: {r}"))
                .unwrap_or_else(|| "prunable".into()),
        ]);
    }
    out!("{}", t.render());
    outln!();
}

pub(super) fn print_summary(s: &Summary) {
    let mut t = Table::new(&["layer", "op", "channels", "params", "MACs"]);
    for l in &s.layers {
        t.row(vec![
            l.name.clone(),
            l.op.clone(),
            format!("{} -> {}", l.channels_before, l.channels_after),
            format!("{} -> {}", si(l.params_before), si(l.params_after)),
            format!("{} -> {}", si(l.macs_before), si(l.macs_after)),
        ]);
    }
    out!("{}", t.render());
    let macs = if s.unknown_dims.is_empty() {
        format!(
            "MACs {} -> {} ({} kept) at {}",
            si(s.macs.0),
            si(s.macs.1),
            pct(s.macs_kept),
            s.costed_at
        )
    } else {
        format!(
            "MACs not counted: {} unknown (give --input)",
            s.unknown_dims.join(", ")
        )
    };
    outln!(
        "\nparams {} -> {} ({}), {macs}; {:.1} s",
        si(s.params.0),
        si(s.params.1),
        pct(s.params.1 as f64 / s.params.0.max(1) as f64),
        s.seconds
    );
    if let Some(l) = &s.large_input {
        outln!("{l}");
    }
    for r in &s.steps {
        for l in &r.lines {
            outln!("{l}");
        }
        if r.subnormals_flushed > 0 {
            outln!(
                "{}: {} subnormal weights flushed to zero",
                r.method,
                r.subnormals_flushed
            );
        }
    }
    if let Some(f) = &s.fidelity {
        for o in &f.outputs {
            outln!(
                "fidelity on {} held-apart items: {}",
                f.items,
                fidelity_line(o)
            );
        }
    }
    if let Some(v) = &s.speed {
        outln!(
            "speed on {}: {:.2}x ({:.3} -> {:.3} ms per item, {} side-by-side rounds)",
            v.runtime,
            v.speedup,
            v.original_ms,
            v.result_ms,
            v.rounds
        );
    }
    for w in &s.warnings {
        outln!("warning: {w}");
    }
    if let Some(o) = &s.output {
        outln!("wrote {o}");
    }
}

/// One output's fidelity: its task (and why), the task metric, the cosine, accuracies.
fn fidelity_line(o: &whittle_export::OutputReport) -> String {
    let task = match (o.task, o.metric) {
        (Some(t), Some(v)) => format!(
            ", {} {} (task {t}: {})",
            t.metric_name(),
            pct(v),
            o.task_reason
        ),
        _ => format!(" (no task metric: {})", o.task_reason),
    };
    format!(
        "output '{}' mean cosine {:.4}{task}{}",
        o.name,
        o.mean_cosine,
        match (o.reference_accuracy, o.candidate_accuracy) {
            (Some(r), Some(c)) => format!(", accuracy {} -> {}", pct(r), pct(c)),
            _ => String::new(),
        }
    )
}
