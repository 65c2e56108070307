#!/usr/bin/env python3
"""Transformer compression, measured on MiniLM: blocks removed (plain and with a linear replacement),
FFN neurons and attention heads pruned.

Model and data (../shared/assets beside the repo):
  minilm-l6-v2  $WHITTLE_ASSETS_CACHE/minilm-l6-v2.opset17.onnx (default ~/.cache/whittle/assets;
                ../shared/assets/fetch.sh fetches it); tokenizer models/minilm-l6-v2-tokenizer;
                calibration: all 11,498 sentences of data/sts/sts-train.tsv, tokenised by
                `whittle tokenize --max-length 64`, of which compress draws a deterministic sample of
                --calib-items (2048; a sample of the whole file covers its genres: the first 1024
                lines, image captions only, kept 98.0% at 2 blocks, this sample 99.96% at 4096 items);
                evaluation: data/sts/sts-dev.tsv
                (1500 scored sentence pairs; --quick: a deterministic sample of 300).
                When the model is not fetched, the bench says so (exit 2 in CI, a skip otherwise).

Rows (each compressed model is written to a temporary folder, or --keep):
  original
  K blocks removed, K = 1, 2, 3: `whittle compress MODEL -o OUT --calib TRAIN.npz --calib-items 2048
      --holdout-items 0 --drop-blocks K [--linear-replace] --json`, plain removal and with the span
      replaced by one least-squares affine map (ReplaceMe); the removed blocks are compress's
      `drop_blocks.removed`
  attention sub-modules removed (2SSP stage 2), 1 and 2 blocks: `--drop-attention K`; "blocks
      removed" is then `drop_attention.removed`, whose attention went
  FFN neurons pruned, 25 % and 50 %: the same calibration flags and `--prune-ffn 0.25` / `0.5`
  attention heads pruned, 25 % and 50 %: `--prune-heads 0.25` / `0.5`
  int8 (layers): `--quantize int8` (a transformer's MatMul inputs and weights; the rest float);
      and 3 blocks replaced then int8, one `--recipe` of two steps
  ONNX Runtime quantize_dynamic (QInt8): the peer, `onnxruntime.quantization.quantize_dynamic(MODEL,
      OUT, weight_type=QInt8)` run in the peers venv (`just setup-peers`; without it the row says so)
A compress that fails (e.g. a flag this whittle does not have yet) becomes a row saying so with its
first error line; it is not a failure of this bench.

Columns:
  params       `params` of `whittle compress --json` (after; and the fraction of the original's kept)
  latency      `whittle bench --json` p50 in ONNX Runtime (ort-cpu) and tract at batch 1, sequence 128
               (`--input input_ids=1,128` and the same for attention_mask and token_type_ids; `whittle
               bench` feeds synthetic inputs: every token id 1 and a full mask, which costs what any
               128-token sentence costs in this dense encoder), original and compressed measured
               INTERLEAVED in one run (benchlib.bench_pair: each round runs both once, a fresh
               process every time, the one going first alternating); speedup = median p50 of the
               original / median p50 of the compressed model (> 1: faster). In the JSON, bench_pair's
               "pruned" key is the compressed model.
  Spearman     `whittle verify ORIG OUT --data sts-dev.tsv --tokenizer DIR --json`: the compressed
               model's Spearman correlation with the gold STS-dev scores (candidate_spearman), the
               fraction of the original's it keeps (kept = candidate / reference), and the mean cosine
               similarity of the two models' sentence embeddings (mean_cosine)

After the table, three lines state what this run measured against issue 6's goals (statements, not
assertions): whether linear replacement beats plain removal (higher STS-dev Spearman) at 1, 2 and 3
blocks; the Spearman kept and ort-cpu speedup with 3 blocks replaced (goal >= 97 %, >= 1.7x); the
Spearman kept with 2 blocks replaced (goal >= 99 %). Exit status: 0, or 1 when a bench or verify run
failed, 2 when the binary, model or data are missing.

    python3 bench/transformer_bench.py [--quick] [--json] [--keep DIR] [--whittle PATH] [--rows NAME,..]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from functools import partial
import time
from pathlib import Path

import benchlib
import prune_bench
from benchlib import ASSETS, COMPRESS_TIMEOUT_S, RUN_TIMEOUT_S, RunError, first_line, fmt, minilm_path, run_json

SEQ = 128  # tokens per sentence in the latency runs
CALIB_ITEMS = 2048
CALIB_MAX_LENGTH = 64
QUICK_VERIFY_LIMIT = 300
STS = ASSETS / "data" / "sts"
TOKENIZER = ASSETS / "models" / "minilm-l6-v2-tokenizer"
BENCH_ARGS = tuple(x for n in ("input_ids", "attention_mask", "token_type_ids") for x in ("--input", f"{n}=1,{SEQ}"))


def variants(quick: bool) -> list[dict]:
    """The compressed rows: name, file stem, the compress flags that make them."""
    out = []
    for k in ((3,) if quick else (1, 2, 3)):
        for replace in (False, True):
            out.append({"name": f"drop {k} block{'s' * (k > 1)}, {'linear replace' if replace else 'plain'}",
                        "kind": "drop", "blocks": k, "linear_replace": replace,
                        "stem": f"drop{k}_{'replace' if replace else 'plain'}",
                        "flags": ["--drop-blocks", str(k)] + ["--linear-replace"] * replace})
    for k in ((1,) if quick else (1, 2)):
        out.append({"name": f"attention of {k} block{'s' * (k > 1)} removed", "kind": "drop-attention",
               "blocks": k, "stem": f"drop_attention{k}", "flags": ["--drop-attention", str(k)]})
    for flag, what in (("--prune-ffn", "FFN"), ("--prune-heads", "heads")):
        for frac in ((0.25,) if quick else (0.25, 0.5)):
            out.append({"name": f"{what} {frac:.0%} pruned", "kind": flag[2:], "fraction": frac,
                        "stem": f"{flag[2:]}_{frac}", "flags": [flag, str(frac)]})
    out.append({"name": "int8 (layers)", "kind": "int8", "stem": "int8", "flags": ["--quantize", "int8"]})
    out.append({"name": "drop 3 blocks, linear replace + int8", "kind": "drop+int8", "blocks": 3,
                "linear_replace": True, "stem": "drop3_replace_int8", "flags": [],
                "recipe": '[[step]]\nmethod = "drop_blocks"\ncount = 3\nlinear_replace = true\n\n'
                          '[[step]]\nmethod = "quantize"\nprecision = "int8"\n'})
    out.append({"name": "ONNX Runtime quantize_dynamic (QInt8)", "kind": "ort-dynamic", "stem": "ort_dynamic",
                "flags": []})
    return out


# ONNX Runtime's dynamic quantization (the peer for a transformer), run in the peers venv, which has
# the `onnx` package it needs (`just setup-peers`); argv: model, out. Prints the seconds it took.
ORT_DYNAMIC = """
import sys, time
from onnxruntime.quantization import QuantType, quantize_dynamic
t0 = time.monotonic()
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8)
print(round(time.monotonic() - t0, 3))
"""


def peers_python() -> Path:
    return Path(os.environ.get("WHITTLE_CACHE", Path.home() / ".cache" / "whittle")) / "peers-venv" / "bin" / "python"


def ort_dynamic(model: Path, out: Path) -> dict:
    """The ONNX Runtime quantize_dynamic row's `compress` figures (its tool seconds; params as the
    original's: the weights are the same count, in int8)."""
    py = peers_python()
    if not py.is_file():
        raise RunError(f"no peers venv at {py} (`just setup-peers` makes it)")
    cmd = [str(py), "-c", ORT_DYNAMIC, str(model), str(out)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPRESS_TIMEOUT_S)
    if r.returncode != 0:
        raise RunError(f"quantize_dynamic: {(r.stderr or r.stdout).strip()[-2000:]}")
    return {"command": ["quantize_dynamic", str(model), str(out), "weight_type=QInt8"],
            "seconds": float(r.stdout.strip().splitlines()[-1]), "wall_s": round(time.monotonic() - t0, 2),
            "params": [None, None], "params_kept": None, "removed": None}


def compress(model: Path, calib: Path, out: Path, v: dict, a) -> dict:
    flags = list(v["flags"])
    if "recipe" in v:
        recipe = out.with_suffix(".toml")
        recipe.write_text(v["recipe"])
        flags += ["--recipe", str(recipe)]
    cmd = [str(a.whittle), "compress", str(model), "-o", str(out), "--calib", str(calib),
           "--calib-items", str(a.calib_items), "--holdout-items", "0", *flags,
           "--threads", str(a.threads), "--json"]
    t0 = time.monotonic()
    rep = run_json(cmd, COMPRESS_TIMEOUT_S)
    wall = time.monotonic() - t0
    params0, params1 = rep["params"]
    # the blocks a row removed: whole blocks, or their attention sub-modules
    db = rep.get("drop_blocks") or rep.get("drop_attention") or {}
    fit = db.get("fit") or {}
    return {
        "command": cmd,
        "seconds": rep.get("seconds"),
        "wall_s": round(wall, 2),
        "params": [params0, params1],
        "params_kept": benchlib.kept([params0, params1]),
        "macs": rep.get("macs"),
        "blocks": db.get("blocks") or len(db.get("importance") or []) or None,
        "removed": db.get("removed"),
        "linear_replace": db.get("linear_replace"),
        "fit_rel_error": [fit.get("rel_error_before"), fit.get("rel_error_after")] if fit else None,
    }


def verify(model: Path, candidate: Path, a) -> dict:
    cmd = [str(a.whittle), "verify", str(model), str(candidate), "--data", str(STS / "sts-dev.tsv"),
           "--tokenizer", str(TOKENIZER), "--threads", str(a.threads), "--json"]
    if a.verify_limit:
        cmd[-1:-1] = ["--limit", str(a.verify_limit)]
    rep = run_json(cmd, RUN_TIMEOUT_S)
    return {"pairs": rep["pairs"], "reference_spearman": rep["reference_spearman"],
            "candidate_spearman": rep["candidate_spearman"], "kept": rep["kept"],
            "mean_cosine": rep["mean_cosine"], "embedding": rep.get("embedding")}


def run_row(model: Path, calib: Path, v: dict, work: Path, a, log) -> dict:
    row = {k: v[k] for k in v if k not in ("stem", "flags")}
    row["ok"] = True
    out = work / f"minilm_{v['stem']}.onnx"
    log(f"  {v['name']}: compressing ...")
    try:
        row["compress"] = c = (ort_dynamic(model, out) if v["kind"] == "ort-dynamic"
                               else compress(model, calib, out, v, a))
    except (RunError, KeyError, TypeError, ValueError, OSError, subprocess.TimeoutExpired) as e:
        return benchlib.compress_failed(row, e, log)
    log(f"    compress {fmt(c['seconds'], '.1f')} s: params kept {fmt(c['params_kept'], '.1%')}"
        + (f", blocks removed {c['removed']} of {c['blocks']}" if c["removed"] is not None else ""))
    try:
        row["verify"] = r = verify(model, out, a)
        log(f"    verify on {r['pairs']} STS-dev pairs: Spearman {r['reference_spearman']:.4f} -> "
            f"{r['candidate_spearman']:.4f} (kept {r['kept']:.1%}), mean cosine {r['mean_cosine']:.4f}")
    except (RunError, KeyError, TypeError) as e:
        benchlib.verify_failed(row, e, log)
    benchlib.latency(row, model, out, a.iters, a, log, BENCH_ARGS)
    if v["kind"] == "ort-dynamic" and set(row.get("bench_errors") or {}) == {"tract"}:
        # tract not running a peer's model is the peer's row, not a failure of this bench
        row["ok"] = "latency" in row and "ort-cpu" in row["latency"]
    return row


def kept_of(row: dict | None) -> float | None:
    return ((row or {}).get("verify") or {}).get("kept")


def statements(rows: list[dict]) -> dict:
    """What this run measured against issue 6's goals (no assertion)."""
    drop = {(r["blocks"], r["linear_replace"]): r for r in rows if r["kind"] == "drop"}
    per = []
    for k in (1, 2, 3):
        plain, repl = kept_of(drop.get((k, False))), kept_of(drop.get((k, True)))
        outcome = ("unmeasured" if plain is None or repl is None
                   else "beats" if repl > plain else "ties" if repl == plain else "loses")
        per.append({"blocks": k, "kept_replace": repl, "kept_plain": plain, "outcome": outcome})
    if all(p["outcome"] == "beats" for p in per):
        every = "yes"
    elif any(p["outcome"] in ("loses", "ties") for p in per):
        every = "no"
    else:
        every = "not measured at every count"
    r3, r2 = drop.get((3, True)), drop.get((2, True))
    sp3 = (((r3 or {}).get("latency") or {}).get("ort-cpu") or {}).get("speedup")
    k3, k2 = kept_of(r3), kept_of(r2)
    by_kind = {r["kind"]: r for r in rows}

    def speed(r):
        return (((r or {}).get("latency") or {}).get("ort-cpu") or {}).get("speedup")

    q, qd = by_kind.get("int8"), by_kind.get("ort-dynamic")
    return {
        "int8": {"kept": kept_of(q), "ort_cpu_speedup": speed(q), "goal_kept": 0.99, "goal_speedup": 1.5,
                 "met": None if kept_of(q) is None or speed(q) is None else (kept_of(q) >= 0.99 and speed(q) >= 1.5),
                 "ort_dynamic_kept": kept_of(qd), "ort_dynamic_speedup": speed(qd)},
        "replace_beats_plain": {"at_1_2_3": every, "per_blocks": per},
        "three_blocks_replaced": {"kept": k3, "ort_cpu_speedup": sp3, "goal_kept": 0.97, "goal_speedup": 1.7,
                                  "met": None if k3 is None or sp3 is None else (k3 >= 0.97 and sp3 >= 1.7)},
        "two_blocks_replaced": {"kept": k2, "goal_kept": 0.99, "met": None if k2 is None else k2 >= 0.99},
    }


def statement_lines(s: dict) -> list[str]:
    def pct(x):
        return "unmeasured" if x is None else f"{x:.1%}"

    def met(x):
        return "not measured" if x is None else ("met" if x else "NOT met")

    rb = s["replace_beats_plain"]
    detail = "; ".join(f"{p['blocks']}: unmeasured" if p["outcome"] == "unmeasured" else
                       f"{p['blocks']}: {pct(p['kept_replace'])} vs {pct(p['kept_plain'])}"
                       + ("" if p["outcome"] == "beats" else f" ({p['outcome']})") for p in rb["per_blocks"])
    t3, t2 = s["three_blocks_replaced"], s["two_blocks_replaced"]
    return [
        f"linear replacement beats plain removal at 1, 2 and 3 blocks: {rb['at_1_2_3']} "
        f"(Spearman kept, replace vs plain, by blocks removed: {detail})",
        f"3 blocks removed with replacement: {pct(t3['kept'])} of Spearman kept, ort-cpu speedup "
        f"{fmt(t3['ort_cpu_speedup'], '.2f', 'x')} (goal: >= 97% and >= 1.7x: {met(t3['met'])})",
        f"2 blocks removed with replacement: {pct(t2['kept'])} kept (goal >= 99%: {met(t2['met'])})",
        f"int8 (layers): {pct(s['int8']['kept'])} of Spearman kept, ort-cpu speedup "
        f"{fmt(s['int8']['ort_cpu_speedup'], '.2f', 'x')} (goal: >= 99% and >= 1.5x: {met(s['int8']['met'])}); "
        f"ONNX Runtime quantize_dynamic: {pct(s['int8']['ort_dynamic_kept'])} kept, "
        f"{fmt(s['int8']['ort_dynamic_speedup'], '.2f', 'x')}",
    ]


def table(result: dict) -> str:
    head = ["variant", "blocks removed", "params", "params kept", "ort orig p50", "ort comp p50", "ort speedup",
            "tract orig p50", "tract comp p50", "tract speedup", "Spearman", "kept", "cosine", "compress s"]
    o = result["original"]
    original = [["original", "-", fmt(o["params"], ",d"), "100.0%", fmt(o["ort_p50_ms"], ".2f", " ms"), "-",
               "1.00x", fmt(o["tract_p50_ms"], ".2f", " ms"), "-", "1.00x", fmt(o["spearman"], ".4f"),
               "100.0%", "1.0000", "-"]]

    def cells(r: dict) -> list[str]:
        c, v = r["compress"], r.get("verify") or {}
        removed = c.get("removed")
        return [",".join(map(str, removed)) if removed else "-", fmt(c["params"][1], ",d"), fmt(c["params_kept"], ".1%"),
                *benchlib.latency_cells(r.get("latency") or {}, ort=".2f", tract=".2f"),
                fmt(v.get("candidate_spearman"), ".4f"), fmt(v.get("kept"), ".1%"),
                fmt(v.get("mean_cosine"), ".4f"), fmt(c.get("seconds"), ".1f")]

    return benchlib.rows_table(head, result["rows"], lambda r: [r["name"]], cells, first=original)


def render(result: dict) -> str:
    if "skipped" in result:
        return f"transformers (minilm-l6-v2): not measured: {result['skipped']}"
    s = result["settings"]
    o = result["original"]
    out = [f"transformers: minilm-l6-v2 (whittle compress --calib {s['calib_items']} STS-B train sentences "
           f"(--max-length {CALIB_MAX_LENGTH}) --calib-items {s['calib_items']} --holdout-items 0; latency at batch 1, "
           f"sequence {SEQ}: median over {s['rounds']} interleaved rounds of p50, {s['threads']} threads, warmup "
           f"{s['warmup']}, {s['iters']} timed runs per bench run; speedup = original / compressed; Spearman on "
           f"{o['pairs']} STS-dev pairs (original {fmt(o['spearman'], '.4f')}), kept = compressed / original; "
           "cosine = mean cosine similarity of the sentence embeddings with the original's; original p50 = "
           "median of the rows' interleaved original runs):",
           table(result), ""]
    out += statement_lines(result["statements"])
    out.append(benchlib.took_line(result))
    return "\n".join(out)


def add_args(ap: argparse.ArgumentParser) -> None:
    benchlib.add_measure_args(ap, rounds="interleaved latency rounds per row (default 3)",
                              iters="timed runs per bench run, ort-cpu and tract (default 50; --quick 20)",
                              calib_items=CALIB_ITEMS)
    ap.add_argument("--rows", help="only the rows whose name contains one of these comma-separated strings")
    ap.add_argument("--verify-limit", type=int,
                    help=f"STS-dev pairs for verify (default all 1500; --quick {QUICK_VERIFY_LIMIT})")
    benchlib.add_output_args(ap, keep="write the compressed models and data here and keep them "
                                      "(default: a temporary folder, removed)",
                             quick=f"only 3 blocks (plain and replaced), FFN and heads at 25 %%, {QUICK_VERIFY_LIMIT} "
                                   "STS-dev pairs, fewer bench iterations",
                             json_help="print one JSON object instead of the table")


def settle(a: argparse.Namespace) -> None:
    prune_bench.settle(a)
    if a.verify_limit is None and a.quick:
        a.verify_limit = QUICK_VERIFY_LIMIT


def run(a: argparse.Namespace, log) -> tuple[dict, int]:
    """Runs the transformer bench; returns (result, exit status)."""
    model = minilm_path()
    if not (a.whittle.is_file() and os.access(a.whittle, os.X_OK)):
        return {"error": f"no whittle binary at {a.whittle} (`just build`, or pass --whittle)"}, 2
    if not model.is_file():
        why = f"{model} is not there (../shared/assets/fetch.sh fetches it)"
        if os.environ.get("CI") == "true":
            return {"error": f"minilm-l6-v2: missing {model}"}, 2
        log(f"minilm-l6-v2: not measured: {why}")
        return {"skipped": why, "ok": True}, 0
    for p in (STS / "sts-train.tsv", STS / "sts-dev.tsv", TOKENIZER):
        if not p.exists():
            return {"error": f"minilm-l6-v2: missing {p.resolve()}"}, 2
    why = benchlib.counts_error(a)
    if why:
        return {"error": why}, 2
    vs = variants(a.quick)
    if a.rows:
        vs = [v for v in vs if any(w.strip() in v["name"] for w in a.rows.split(","))]
    clock = benchlib.started(log, f"transformer bench (minilm-l6-v2): {len(vs)} compressed variants", a,
                             after=f" at batch 1, sequence {SEQ}")
    with benchlib.workdir(a.keep, "whittle-transformer-bench-") as work:
        try:
            calib = work / "sts-train-calib.npz"
            tok = run_json([str(a.whittle), "tokenize", str(STS / "sts-train.tsv"), "--tokenizer", str(TOKENIZER),
                            "--max-length", str(CALIB_MAX_LENGTH), "-o", str(calib), "--json"], RUN_TIMEOUT_S)
            log(f"  calibration: {tok['sentences']} sentences of sts-train.tsv, {tok['seq_len']} tokens each "
                f"({tok['mean_tokens']:.1f} before padding, {tok['truncated']} truncated)")
            rows = [run_row(model, calib, v, work, a, log) for v in vs]
            status = 0 if all(r["ok"] for r in rows) else 1
        except RunError as e:
            return {"error": f"tokenize: {first_line(str(e))}"}, 1
    params0 = next((r["compress"]["params"][0] for r in rows if "compress" in r), None)
    ver = next((r["verify"] for r in rows if "verify" in r), {})
    orig_p50 = {rt: [r["latency"][rt]["median_p50_ms"]["original"] for r in rows
                     if rt in (r.get("latency") or {})] for rt in ("ort-cpu", "tract")}
    original = {"params": params0, "spearman": ver.get("reference_spearman"), "pairs": ver.get("pairs"),
                "ort_p50_ms": statistics.median(orig_p50["ort-cpu"]) if orig_p50["ort-cpu"] else None,
                "tract_p50_ms": statistics.median(orig_p50["tract"]) if orig_p50["tract"] else None}
    return {
        "model": "minilm-l6-v2", "path": str(model.resolve()),
        "settings": {"calib_items": a.calib_items, "calib_max_length": CALIB_MAX_LENGTH, "seq": SEQ,
                     "threads": a.threads, "rounds": a.rounds, "warmup": a.warmup, "iters": a.iters,
                     "verify_limit": a.verify_limit, "quick": a.quick, "whittle": str(a.whittle),
                     "work": str(work) if a.keep else None},
        "calibration": tok, "original": original, "rows": rows, "statements": statements(rows),
        **clock.end(status),
    }, status


# the command line: parse, run, print the tables or --json
main = partial(benchlib.cli_main, "transformer_bench", "MiniLM: blocks removed (plain, linear replacement), FFN neurons "
               "and heads pruned: params, latency, STS-dev Spearman (reports; asserts nothing)",
               add_args, settle, run, render)

if __name__ == "__main__":
    sys.exit(main())
