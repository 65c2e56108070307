#!/usr/bin/env python3
"""Low-rank factorisation, measured: `whittle compress --low-rank` at several MAC budgets, plain and data-aware.

For each budget (10, 20, 30, 40 % of MACs removed: `--target macs=0.9/0.8/0.7/0.6`), the model is
compressed twice (plain SVD of the weights, and `--data-aware`), each with `--calib-items 128`, and
each result is measured against the original with the helpers of bench/benchlib.py:

  size        MACs and params before/after, from `whittle compress --json` (`macs`, `params` pairs),
              and how many layers were factorised (`low_rank.factored`)
  compress s  the `seconds` field of `whittle compress --json`
  latency     `whittle bench --json` p50 in ONNX Runtime (ort-cpu) and tract, original and compressed
              measured INTERLEAVED in the same run (benchlib.bench_pair: each round runs both once,
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
from functools import partial
from pathlib import Path

import benchlib
import prune_bench
from benchlib import ASSETS, RUN_TIMEOUT_S, RunError, fmt, minilm_path, run_json

BUDGETS = [0.9, 0.8, 0.7, 0.6]  # fraction of MACs kept
QUICK_BUDGETS = [0.7]
MINILM_SEQ = 64  # tokens per sentence in the latency runs
EVAL_SENTENCES = 512


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
        rep = run_json([str(a.whittle), "tokenize", str(t[key]), "--tokenizer", str(t["tokenizer"]),
                        "--limit", str(limit), "-o", str(out), "--json"], RUN_TIMEOUT_S)
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
    rep, figures = benchlib.compress_json(cmd)
    lr = rep.get("low_rank") or {}
    return {
        **figures,
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
        return benchlib.compress_failed(row, e, log)
    c = row["compress"]
    log(f"    compress {c['seconds']:.1f} s: MACs kept {c['macs_kept']:.1%}, params kept {c['params_kept']:.1%}, "
        f"{c['factored']} layers factorised, {c['skipped']} skipped")
    try:
        row["verify"] = v = benchlib.verify(spec, spec["eval"], out, a)
        if spec["metric"] == "cosine":
            v["top1_agreement"] = v["reference_accuracy"] = v["candidate_accuracy"] = None
            log(f"    verify on {v['items']} eval items: {v['output']} mean cosine {v['mean_cosine']:.4f}")
        else:
            log(f"    verify on {v['items']} eval items: agreement {v['top1_agreement']:.3f}, accuracy "
                f"{v['reference_accuracy']:.3f} -> {v['candidate_accuracy']:.3f}")
    except (RunError, KeyError, IndexError, TypeError) as e:
        benchlib.verify_failed(row, e, log)
    benchlib.latency(row, spec["path"], out, a.iters, a, log, spec["bench_args"])
    return row


DATA_AWARE = ("agreement_data_aware", "agreement_plain")


def data_aware_verdict(rows: list[dict], metric: str) -> dict:
    """Per budget: does data-aware give higher quality (top-1 agreement, or mean cosine) than plain?"""
    key = "mean_cosine" if metric == "cosine" else "top1_agreement"
    per = benchlib.per_budget(rows, "data_aware", key, DATA_AWARE)
    return {"metric": key, "beats_at_every_budget": benchlib.every_budget(per), "per_budget": per}


def verdict_line(name: str, v: dict) -> str:
    cosine = v["metric"] == "mean_cosine"
    return benchlib.verdict_line(name, "data-aware beats plain", v, DATA_AWARE, ".4f" if cosine else ".3f",
                                 "mean cosine" if cosine else "top-1 agreement", "data-aware vs plain")


def table(model: dict) -> str:
    head = ["MACs removed", "method", "MACs kept", "params kept", "layers", "ort orig p50", "ort lr p50",
            "ort speedup", "tract orig p50", "tract lr p50", "tract speedup", "agreement", "cosine", "acc orig", "acc lr",
            "compress s"]

    def cells(r: dict) -> list[str]:
        c, v = r["compress"], r.get("verify") or {}
        return [f"{c['macs_kept']:.1%}", f"{c['params_kept']:.1%}", str(c["factored"]),
                *benchlib.latency_cells(r.get("latency") or {}),
                fmt(v.get("top1_agreement"), ".3f"), fmt(v.get("mean_cosine"), ".4f"),
                fmt(v.get("reference_accuracy"), ".3f"), fmt(v.get("candidate_accuracy"), ".3f"),
                fmt(c.get("seconds"), ".1f")]

    return benchlib.rows_table(head, model["rows"], lambda r: [f"{r['removed_pct']}%", method(r["data_aware"])], cells)


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
    out.append(benchlib.took_line(result))
    return "\n".join(out)


def add_args(ap: argparse.ArgumentParser) -> None:
    benchlib.add_measure_args(ap, rounds="interleaved latency rounds per row (default 3)",
                              iters="timed runs per bench run, ort-cpu and tract (default 50; --quick 20)")
    benchlib.add_budget_args(ap, "fractions of MACs kept", BUDGETS, QUICK_BUDGETS)
    benchlib.add_output_args(ap, keep="write the compressed models here and keep them "
                                      "(default: a temporary folder, removed)",
                             quick="only the 30 %% budget, fewer bench iterations",
                             json_help="print one JSON object instead of the table")


def run(a: argparse.Namespace, log) -> tuple[dict, int]:
    """Runs the low-rank bench; returns (result, exit status)."""
    specs = model_specs()
    missing = [sp for sp in specs if not sp["path"].is_file()]
    if missing and os.environ.get("CI") == "true":
        return {"error": f"{missing[0]['name']}: missing {missing[0]['path']} (../shared/assets/fetch.sh)"}, 2
    present = [sp for sp in specs if sp not in missing]
    why = benchlib.check(a, present) or benchlib.counts_error(a)
    if why:
        return {"error": why}, 2
    budgets = a.budgets or (QUICK_BUDGETS if a.quick else BUDGETS)
    clock = benchlib.started(log, f"low-rank bench: budgets {', '.join(f'macs={b}' for b in budgets)}, "
                             "plain and data-aware", a)
    models, status = [], 0
    with benchlib.workdir(a.keep, "whittle-lowrank-bench-") as work:
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
                rows = [run_row(spec, keep, data_aware, work, a, log) for keep in budgets
                        for data_aware in (False, True)]
                status = max(status, 0 if all(r["ok"] for r in rows) else 1)
                models.append({"model": spec["name"], "path": str(spec["path"].resolve()),
                               "profile": spec["profile"], "calib": str(spec["calib"].resolve()),
                               "eval": str(spec["eval"].resolve()), "output": spec["output"] or "first",
                               "eval_items": next((r["verify"]["items"] for r in rows if "verify" in r), None),
                               "rows": rows, "data_aware_vs_plain": data_aware_verdict(rows, spec["metric"])})
        except RunError as e:
            return {"error": benchlib.first_line(str(e))}, 1
    return {"settings": benchlib.settings(a, work, budgets_macs_kept=budgets), "models": models,
            **clock.end(status)}, status


# the command line: parse, run, print the tables or --json
main = partial(benchlib.cli_main, "lowrank_bench", "Low-rank factorisation at several MAC budgets, plain and "
               "data-aware: size, latency, agreement (reports; asserts nothing)",
               add_args, prune_bench.settle, run, render)

if __name__ == "__main__":
    sys.exit(main())
