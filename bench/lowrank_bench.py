#!/usr/bin/env python3
"""Low-rank factorisation, measured: `whittle compress --low-rank` at several MAC budgets, plain and data-aware.

For each budget (10, 20, 30, 40 % of MACs removed: `--target macs=0.9/0.8/0.7/0.6`), the model is
compressed twice (plain SVD of the weights, and `--data-aware`), each with `--calib-items 128`, and
each result is measured against the original with the helpers of bench/prune_bench.py:

  size        MACs and params before/after, from `whittle compress --json` (`macs`, `params` pairs),
              and how many layers were factorised (`low_rank.factored`)
  compress s  the `seconds` field of `whittle compress --json`
  latency     `whittle bench --json` p50 in ONNX Runtime (ort-cpu) and tract, original and compressed
              measured INTERLEAVED in the same run (prune_bench.bench_pair: each round runs both once,
              a fresh process every time, the one going first alternating); the median over rounds of
              each one's p50 is reported, and original/compressed is the speedup (> 1: the compressed
              model is faster). In the JSON, bench_pair's "pruned" key is the compressed model.
  quality     `whittle verify --json` on evaluation images the compress never saw: top-1 agreement of
              the compressed model with the original, and the top-1 accuracy of both

Models and data (../shared/assets beside the repo):
  resnet_large_cifar10    models/resnet_large_cifar10.onnx, profile resnet-large; calibrates on
                          cifar10/test-b, evaluates on cifar10/test-a; quality = top-1 agreement
  minilm-l6-v2            $WHITTLE_ASSETS_CACHE/minilm-l6-v2.opset17.onnx (../shared/assets/fetch.sh);
                          `whittle tokenize` turns STS-B train sentences (calibration) and the first
                          512 STS-B dev sentences (evaluation) into .npz token ids (tokenizer
                          models/minilm-l6-v2-tokenizer); quality = mean cosine similarity of
                          `sentence_embedding` with the original's; latency at batch 1, 64 tokens.
                          When the model is not fetched, its rows say so.

A compress that fails (e.g. an unreachable budget) becomes a row saying so; it is not a failure of
this bench. After the table, one line states whether data-aware beat plain (higher top-1 agreement
with the original) at every budget of this run: a statement of what was measured, not an
assertion (for MiniLM: higher mean cosine). Exit status: 0, or 1 when a bench or verify run failed, 2 when the binary, model or data
are missing.

    python3 bench/lowrank_bench.py [--quick] [--json] [--whittle PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import prune_bench
from prune_bench import ASSETS, CALIB_ITEMS, RunError, first_line, fmt

BUDGETS = [0.9, 0.8, 0.7, 0.6]  # fraction of MACs kept
QUICK_BUDGETS = [0.7]
MINILM_SEQ = 64  # tokens per sentence in the latency runs
EVAL_SENTENCES = 512


def minilm_path() -> Path:
    cache = os.environ.get("WHITTLE_ASSETS_CACHE") or str(Path.home() / ".cache" / "whittle" / "assets")
    return Path(cache) / "minilm-l6-v2.opset17.onnx"


def model_specs() -> list[dict]:
    cifar = ASSETS / "data" / "cifar10"
    sts = ASSETS / "data" / "sts"
    shape = f"1,{MINILM_SEQ}"
    return [
        {"name": "resnet_large_cifar10", "path": ASSETS / "models" / "resnet_large_cifar10.onnx",
         "profile": "resnet-large", "calib": cifar / "test-b", "eval": cifar / "test-a", "split": None,
         "metric": "agreement", "output": None, "bench_args": ()},
        {"name": "minilm-l6-v2", "path": minilm_path(), "profile": None, "split": None,
         "calib": None, "eval": None, "metric": "cosine", "output": "sentence_embedding",
         "text": {"calib": sts / "sts-train.tsv", "eval": sts / "sts-dev.tsv",
                  "tokenizer": ASSETS / "models" / "minilm-l6-v2-tokenizer"},
         "bench_args": tuple(x for n in ("input_ids", "attention_mask", "token_type_ids")
                             for x in ("--input", f"{n}={shape}"))},
    ]


def tokenize(spec: dict, work: Path, a, log) -> None:
    """Writes the calibration and evaluation .npz of a text model with `whittle tokenize`."""
    t = spec["text"]
    for key, limit in (("calib", a.calib_items * 2), ("eval", EVAL_SENTENCES)):
        out = work / f"{spec['name']}-{key}.npz"
        rep = prune_bench.run_json([str(a.whittle), "tokenize", str(t[key]), "--tokenizer", str(t["tokenizer"]),
                                    "--limit", str(limit), "-o", str(out), "--json"], prune_bench.RUN_TIMEOUT_S)
        log(f"  {key}: {rep['sentences']} sentences of {t[key].name}, {rep['seq_len']} tokens each "
            f"({rep['mean_tokens']:.1f} before padding)")
        spec[key] = out


def compress(spec: dict, out: Path, keep: float, data_aware: bool, a) -> dict:
    cmd = [str(a.whittle), "compress", str(spec["path"]), "-o", str(out), "--calib", str(spec["calib"]),
           "--low-rank", "--target", f"macs={keep}",
           "--calib-items", str(a.calib_items), "--threads", str(a.threads), "--json"]
    if spec["profile"]:
        cmd[-1:-1] = ["--profile", spec["profile"]]
    if data_aware:
        cmd.insert(cmd.index("--low-rank") + 1, "--data-aware")
    t0 = time.monotonic()
    rep = prune_bench.run_json(cmd, prune_bench.COMPRESS_TIMEOUT_S)
    wall = time.monotonic() - t0
    (macs0, macs1), (params0, params1) = rep["macs"], rep["params"]
    lr = rep.get("low_rank") or {}
    return {
        "command": cmd,
        "seconds": rep.get("seconds"),
        "wall_s": round(wall, 2),
        "macs": [macs0, macs1],
        "params": [params0, params1],
        "macs_kept": macs1 / macs0 if macs0 else None,
        "params_kept": params1 / params0 if params0 else None,
        "factored": len(lr.get("factored") or []),
        "skipped": len(lr.get("skipped") or []),
        "data_aware": lr.get("data_aware"),
    }


def method(data_aware: bool) -> str:
    return "data-aware" if data_aware else "plain"


def run_row(spec: dict, keep: float, data_aware: bool, work: Path, a, log) -> dict:
    row = {"model": spec["name"], "target_macs_kept": keep, "removed_pct": round((1 - keep) * 100),
           "data_aware": data_aware, "ok": True}
    out = work / f"{spec['name']}_macs{keep}_{method(data_aware)}.onnx"
    log(f"  {row['removed_pct']}% MACs removed, {method(data_aware)}: compressing ...")
    try:
        row["compress"] = compress(spec, out, keep, data_aware, a)
    except (RunError, KeyError, TypeError, ValueError) as e:
        row["compress_error"] = first_line(str(e))
        row["compress_error_full"] = str(e)[-4000:]
        log(f"    compress FAILED: {row['compress_error']}")
        return row
    c = row["compress"]
    log(f"    compress {c['seconds']:.1f} s: MACs kept {c['macs_kept']:.1%}, params kept {c['params_kept']:.1%}, "
        f"{c['factored']} layers factorised, {c['skipped']} skipped")
    try:
        row["verify"] = v = prune_bench.verify(spec, spec["eval"], out, a)
        if spec["metric"] == "cosine":
            v["top1_agreement"] = v["reference_accuracy"] = v["candidate_accuracy"] = None
            log(f"    verify on {v['items']} eval items: {v['output']} mean cosine {v['mean_cosine']:.4f}")
        else:
            log(f"    verify on {v['items']} eval items: agreement {v['top1_agreement']:.3f}, accuracy "
                f"{v['reference_accuracy']:.3f} -> {v['candidate_accuracy']:.3f}")
    except (RunError, KeyError, IndexError, TypeError) as e:
        row["verify_error"] = str(e)[-4000:]
        row["ok"] = False
        log(f"    verify FAILED: {first_line(str(e))}")
    row["latency"] = {}
    for runtime in ("ort-cpu", "tract"):
        try:
            row["latency"][runtime] = prune_bench.bench_pair(spec["path"], out, runtime, a.iters, a, log,
                                                             spec["bench_args"])
        except (RunError, KeyError, TypeError) as e:
            row.setdefault("bench_errors", {})[runtime] = str(e)[-4000:]
            row["ok"] = False
            log(f"      {runtime} bench FAILED: {first_line(str(e))}")
    return row


def data_aware_verdict(rows: list[dict], metric: str) -> dict:
    """Per budget: does data-aware give higher quality (top-1 agreement, or mean cosine) than plain?"""
    key = "mean_cosine" if metric == "cosine" else "top1_agreement"
    per = []
    for keep in sorted({r["target_macs_kept"] for r in rows}, reverse=True):
        by = {r["data_aware"]: r for r in rows if r["target_macs_kept"] == keep}
        ag = {k: (by[k].get("verify") or {}).get(key) if k in by else None for k in (True, False)}
        if ag[True] is None or ag[False] is None:
            outcome = "unmeasured"
        elif ag[True] > ag[False]:
            outcome = "beats"
        elif ag[True] == ag[False]:
            outcome = "ties"
        else:
            outcome = "loses"
        per.append({"removed_pct": round((1 - keep) * 100), "agreement_data_aware": ag[True],
                    "agreement_plain": ag[False], "outcome": outcome})
    every = bool(per) and all(p["outcome"] == "beats" for p in per)
    return {"metric": key, "beats_at_every_budget": every, "per_budget": per}


def verdict_line(name: str, v: dict) -> str:
    digits = ".4f" if v["metric"] == "mean_cosine" else ".3f"
    detail = "; ".join(f"{p['removed_pct']}%: {fmt(p['agreement_data_aware'], digits)} vs {fmt(p['agreement_plain'], digits)}"
                       + ("" if p["outcome"] == "beats" else f" ({p['outcome'].upper()})") for p in v["per_budget"])
    budgets = ", ".join(f"{p['removed_pct']}%" for p in v["per_budget"])
    verb = "YES" if v["beats_at_every_budget"] else "NO"
    return (f"{name}: data-aware beats plain at every budget ({budgets}) of this run: {verb} "
            f"[{'mean cosine' if v['metric'] == 'mean_cosine' else 'top-1 agreement'} with the original, "
            f"data-aware vs plain: {detail}]")


def table(model: dict) -> str:
    head = ["MACs removed", "method", "MACs kept", "params kept", "layers", "ort orig p50", "ort lr p50",
            "ort speedup", "tract orig p50", "tract lr p50", "tract speedup", "agreement", "cosine", "acc orig", "acc lr",
            "compress s"]
    rows = [head]
    notes = []
    for r in model["rows"]:
        cells = [f"{r['removed_pct']}%", method(r["data_aware"])]
        if "compress_error" in r:
            rows.append(cells + ["compress failed: " + r["compress_error"]])
            continue
        c, v, lat = r["compress"], r.get("verify") or {}, r.get("latency") or {}
        o, t = lat.get("ort-cpu") or {}, lat.get("tract") or {}
        om, tm = o.get("median_p50_ms") or {}, t.get("median_p50_ms") or {}
        cells += [
            f"{c['macs_kept']:.1%}", f"{c['params_kept']:.1%}", str(c["factored"]),
            fmt(om.get("original"), ".2f", " ms"), fmt(om.get("pruned"), ".2f", " ms"), fmt(o.get("speedup"), ".2f", "x"),
            fmt(tm.get("original"), ".1f", " ms"), fmt(tm.get("pruned"), ".1f", " ms"), fmt(t.get("speedup"), ".2f", "x"),
            fmt(v.get("top1_agreement"), ".3f"), fmt(v.get("mean_cosine"), ".4f"), fmt(v.get("reference_accuracy"), ".3f"),
            fmt(v.get("candidate_accuracy"), ".3f"), fmt(c.get("seconds"), ".1f"),
        ]
        rows.append(cells)
        tag = f"  {r['removed_pct']}% {method(r['data_aware'])}"
        if "verify_error" in r:
            notes.append(f"{tag}: verify failed: {first_line(r['verify_error'])}")
        for rt, why in (r.get("bench_errors") or {}).items():
            notes.append(f"{tag}: {rt} bench failed: {first_line(why)}")
    full = [r for r in rows if len(r) == len(head)]
    widths = [max(len(r[i]) for r in full) for i in range(len(head))]
    lines = []
    for j, r in enumerate(rows):
        if len(r) == len(head):
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:2], widths)) + "  " + r[2])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + notes)


def render(result: dict) -> str:
    s = result["settings"]
    out = [f"low-rank factorisation (whittle compress --low-rank [--data-aware] --calib-items {s['calib_items']}; "
           f"latency: median over {s['rounds']} interleaved rounds of p50, {s['threads']} threads, warmup "
           f"{s['warmup']}, {s['iters']} timed runs per bench run; speedup = original / low-rank; layers = layers "
           "factorised; agreement = top-1 agreement with the original, cosine = mean cosine similarity of the "
           "output with the original's, both on the evaluation data):"]
    for m in result["models"]:
        out.append("")
        if "skipped" in m:
            out.append(f"{m['model']}: not measured: {m['skipped']}")
            continue
        ev = m["eval_items"]
        out += [f"{m['model']} (profile {m['profile'] or 'none (token ids)'}; calibration {m['calib']}; evaluation {m['eval']}"
                f"{f', {ev} items' if ev else ''}; quality output {m['output']}):",
                table(m), "", verdict_line(m["model"], m["data_aware_vs_plain"])]
    out.append(f"took {result['elapsed_s']:.0f} s; load average at the end: "
               f"{' '.join(f'{x:.2f}' for x in result['loadavg_end'])}")
    return "\n".join(out)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads everywhere (default 2)")
    ap.add_argument("--rounds", type=int, help="interleaved latency rounds per row (default 3)")
    ap.add_argument("--warmup", type=int, help="untimed runs per bench run (default 5; --quick 2)")
    ap.add_argument("--iters", type=int, help="timed runs per bench run, ort-cpu and tract (default 50; --quick 20)")
    ap.add_argument("--calib-items", type=int, default=CALIB_ITEMS, help=f"default {CALIB_ITEMS}")
    ap.add_argument("--budgets", type=prune_bench.budget_list,
                    help="comma-separated fractions of MACs kept (default 0.9,0.8,0.7,0.6; --quick 0.7)")
    ap.add_argument("--keep", type=Path, help="write the compressed models here and keep them "
                                              "(default: a temporary folder, removed)")
    ap.add_argument("--quick", action="store_true", help="only the 30 %% budget, fewer bench iterations")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--whittle", type=Path, default=prune_bench.default_whittle(),
                    help="the whittle binary (default $CARGO_TARGET_DIR/release/whittle)")


def run(a: argparse.Namespace, log) -> tuple[dict, int]:
    """Runs the low-rank bench; returns (result, exit status)."""
    specs = model_specs()
    missing = [sp for sp in specs if not sp["path"].is_file()]
    if missing and os.environ.get("CI") == "true":
        return {"error": f"{missing[0]['name']}: missing {missing[0]['path']} (../shared/assets/fetch.sh)"}, 2
    present = [sp for sp in specs if sp not in missing]
    why = prune_bench.check(a, present)
    if why:
        return {"error": why}, 2
    if a.rounds < 1 or a.iters < 1 or a.warmup < 0 or a.threads < 1 or a.calib_items < 1:
        return {"error": "--rounds, --iters, --threads, --calib-items must be >= 1, --warmup >= 0"}, 2
    budgets = a.budgets or (QUICK_BUDGETS if a.quick else BUDGETS)
    started = time.monotonic()
    load0 = [round(x, 2) for x in os.getloadavg()]
    log(f"low-rank bench: budgets {', '.join(f'macs={b}' for b in budgets)}, plain and data-aware, "
        f"--calib-items {a.calib_items}; {a.threads} threads, {a.rounds} interleaved rounds x (warmup {a.warmup} + "
        f"{a.iters} timed runs) per row; load average {' '.join(map(str, load0))}")
    tmp = None
    if a.keep:
        work = a.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="whittle-lowrank-bench-")
        work = Path(tmp.name)
    models, status = [], 0
    try:
        for spec in specs:
            if spec in missing:
                why = f"{spec['path']} is not there (../shared/assets/fetch.sh fetches it)"
                log(f"{spec['name']}: not measured: {why}")
                models.append({"model": spec["name"], "skipped": why})
                continue
            log(f"{spec['name']}:")
            if "text" in spec:
                tokenize(spec, work, a, log)
            rows = [run_row(spec, keep, data_aware, work, a, log) for keep in budgets for data_aware in (False, True)]
            status = max(status, 0 if all(r["ok"] for r in rows) else 1)
            models.append({"model": spec["name"], "path": str(spec["path"].resolve()), "profile": spec["profile"],
                           "calib": str(spec["calib"].resolve()), "eval": str(spec["eval"].resolve()),
                           "output": spec["output"] or "first",
                           "eval_items": next((r["verify"]["items"] for r in rows if "verify" in r), None),
                           "rows": rows, "data_aware_vs_plain": data_aware_verdict(rows, spec["metric"])})
    except RunError as e:
        return {"error": first_line(str(e))}, 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    result = {
        "settings": {"budgets_macs_kept": budgets, "calib_items": a.calib_items, "threads": a.threads,
                     "rounds": a.rounds, "warmup": a.warmup, "iters": a.iters, "quick": a.quick,
                     "whittle": str(a.whittle), "work": str(work) if a.keep else None},
        "loadavg_start": load0, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "models": models, "elapsed_s": round(time.monotonic() - started, 1),
        "ok": status == 0,
    }
    return result, status


def main(argv: list[str] | None = None) -> int:
    return prune_bench.cli_main("lowrank_bench", "Low-rank factorisation at several MAC budgets, plain and "
                                "data-aware: size, latency, agreement (reports; asserts nothing)",
                                add_args, prune_bench.settle, run, render, argv)


if __name__ == "__main__":
    sys.exit(main())
