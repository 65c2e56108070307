#!/usr/bin/env python3
"""Compare the quality figures of two bench runs, row by row: are they identical?

    python3 bench/compare.py OLD.json NEW.json

OLD and NEW are `bench/bench.py --json` results (`just bench --json`, with or without --quick), or
`bench/peers/peers_bench.py`'s results.json. Every row of a compression method (channel pruning,
low rank, transformer, depth merging, onnxsim peers) is matched by its name in both files, and its
quality figures are compared exactly (JSON floats read back bit for bit): top-1 agreement, accuracy,
mean cosine, Spearman, and the MACs and params kept. One line per row prints the row's main figure
old and new and "identical" or "differs" (naming what differs). Latency figures are not compared:
they are noise on a shared machine.

Depth merging picks its plan from measured latencies, so a plan may differ between two runs of the
same binary; a merge row whose plan (the segments merged, or the unreachable budget's message)
differs says so and is not counted as a difference. Rows only one file has are listed and count
as differences. Rows whose compress failed alike in both are identical.

Exit status: 0 when every row both files have is identical and none is missing, 1 otherwise, 2 when
a file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The figures compared per row; the first is the row's main figure (printed old / new).
Row = dict  # {"main": name, "figures": {name: value}, "plan": value or None, "error": text or None}


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _row(main: str, figures: dict, error: str | None = None, plan=None, chosen: bool = False) -> Row:
    """chosen: the row's model follows measured latencies (a merge plan), so it may differ between runs."""
    return {"main": main, "figures": figures, "error": error, "plan": plan, "chosen": chosen}


def prune_rows(res: dict) -> dict[str, Row]:
    out = {}
    for m in res.get("models") or []:
        for r in m.get("rows") or []:
            key = f"prune {m['model']} {r['removed_pct']}% recon {'on' if r['reconstruct'] else 'off'}"
            v, c = r.get("verify") or {}, r.get("compress") or {}
            out[key] = _row("agreement", {
                "agreement": v.get("top1_agreement"), "acc pruned": v.get("candidate_accuracy"),
                "acc orig": v.get("reference_accuracy"), "MACs kept": c.get("macs_kept"),
                "params kept": c.get("params_kept")}, r.get("compress_error"))
    return out


def lowrank_rows(res: dict) -> dict[str, Row]:
    out = {}
    for m in res.get("models") or []:
        if "skipped" in m:
            continue
        cosine = _get(m, "data_aware_vs_plain", "metric") == "mean_cosine"
        for r in m.get("rows") or []:
            key = f"lowrank {m['model']} {r['removed_pct']}% {'data-aware' if r['data_aware'] else 'plain'}"
            v, c = r.get("verify") or {}, r.get("compress") or {}
            out[key] = _row("cosine" if cosine else "agreement", {
                "agreement": v.get("top1_agreement"), "cosine": v.get("mean_cosine"),
                "acc lr": v.get("candidate_accuracy"), "MACs kept": c.get("macs_kept"),
                "params kept": c.get("params_kept"), "layers": c.get("factored")}, r.get("compress_error"))
    return out


def transformer_rows(res: dict) -> dict[str, Row]:
    out = {}
    for r in res.get("rows") or []:
        v, c = r.get("verify") or {}, r.get("compress") or {}
        out[f"transformer {r['name']}"] = _row("kept", {
            "kept": v.get("kept"), "Spearman": v.get("candidate_spearman"), "cosine": v.get("mean_cosine"),
            "params kept": c.get("params_kept"), "removed": c.get("removed")}, r.get("compress_error"))
    return out


def merge_rows(res: dict) -> dict[str, Row]:
    out = {}
    for m in res.get("models") or []:
        for rt, r in (m.get("runtimes") or {}).items():
            for p in r.get("points") or []:
                c = p.get("refit") or {}
                out[f"merge {m['model']} {rt} latency={p['target_latency']}"] = _row("agree refit", {
                    "agree refit": _get(p, "verify_refit", "top1_agreement"),
                    "agree no refit": _get(p, "verify_norefit", "top1_agreement"),
                    "MACs kept": c.get("macs_kept"), "params kept": c.get("params_kept")},
                    p.get("compress_error"), plan=c.get("merged"), chosen=True)
    return out


def peers_rows(res: dict) -> dict[str, Row]:
    out = {}
    for m in res.get("models") or []:
        for r in m.get("rows") or []:
            v = r.get("verify") or {}
            out[f"peers {m['model']} {r['target_removed']:.0%} {r['label']}"] = _row("agreement", {
                "agreement": v.get("top1_agreement"), "accuracy": v.get("candidate_accuracy"),
                "MACs removed": r.get("macs_removed"), "params": (r.get("params") or [None, None])[1]},
                r.get("error"))
    return out


SECTIONS = {"prune": prune_rows, "lowrank": lowrank_rows, "transformer": transformer_rows, "merge": merge_rows}


def rows_of(result: dict) -> dict[str, Row]:
    """Every compared row of a bench.py --json result, or of a peers results.json."""
    if "onnxsim" in (result.get("versions") or {}):
        return peers_rows(result)
    out = {}
    for name, rows in SECTIONS.items():
        if isinstance(result.get(name), dict) and "error" not in result[name]:
            out.update(rows(result[name]))
    return out


def show(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 10 else f"{x:.1f}"
    if isinstance(x, list):
        return ",".join(map(str, x))
    return str(x)


def compare(old: dict[str, Row], new: dict[str, Row]) -> tuple[list[list[str]], int, int]:
    """Table rows (row, main figure, old, new, verdict), the number of differences, and the number of
    rows not compared (a latency-chosen plan that differs)."""
    lines, differ, other = [], 0, 0
    for key in list(old) + [k for k in new if k not in old]:
        o, n = old.get(key), new.get(key)
        if o is None or n is None:
            differ += 1
            have = o or n
            lines.append([key, have["main"], show(have["figures"][have["main"]]) if o else "-",
                          "-" if o else show(have["figures"][have["main"]]), f"only in {'OLD' if o else 'NEW'}"])
            continue
        main = o["main"]
        cells = [key, main, show(o["figures"].get(main)), show(n["figures"].get(main))]
        if o["chosen"] and (o["plan"] != n["plan"] or o["error"] != n["error"]):
            other += 1
            lines.append(cells + ["other plan (chosen from measured latencies; not compared)"])
            continue
        if o["error"] or n["error"]:
            same = o["error"] == n["error"]
            cells[2:4] = ["failed" if o["error"] else cells[2], "failed" if n["error"] else cells[3]]
            verdict = "identical (both failed alike)" if same else "differs (failure: " + (
                n["error"] or o["error"])[:80] + ")"
        else:
            diff = [f for f in o["figures"] if o["figures"][f] != n["figures"].get(f)]
            same = not diff
            verdict = "identical" if same else "differs: " + ", ".join(
                f"{f} {o['figures'][f]!r} -> {n['figures'].get(f)!r}" for f in diff)
        differ += not same
        lines.append(cells + [verdict])
    return lines, differ, other


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"compare: {path}: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare two bench --json results' quality figures row by row "
                                             "(identical or differs; latency is not compared)")
    ap.add_argument("old", type=Path, help="the earlier run's JSON (e.g. the baseline)")
    ap.add_argument("new", type=Path, help="the later run's JSON")
    a = ap.parse_args(argv)
    try:
        old, new = rows_of(load(a.old)), rows_of(load(a.new))
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if not old and not new:
        print("compare: neither file has a compression row (prune, lowrank, transformer, merge, peers)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import layout  # noqa: E402  (bench/benchlib.py; the bench venv is not needed)

    lines, differ, other = compare(old, new)
    print("\n".join(layout([["row", "figure", "old", "new", "verdict"]] + lines, align="llrrl")))
    print()
    same = len(lines) - differ - other
    print(f"{same} of {len(lines)} rows identical" + (f", {differ} differ" if differ else "")
          + (f", {other} with another latency-chosen plan (not compared)" if other else "")
          + f" ({a.old} -> {a.new}): " + ("DIFFERENT" if differ else "identical"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
