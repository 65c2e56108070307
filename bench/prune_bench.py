#!/usr/bin/env python3
"""Channel pruning, measured: `whittle compress` at several MAC budgets, with and without reconstruction.

For each model and budget (10, 25, 40, 50 % of MACs removed: `--target macs=0.9/0.75/0.6/0.5`),
the model is compressed twice (least-squares reconstruction on, and `--no-reconstruct`), each with
`--calib-items 128`, and each result is measured against the original:

  size        MACs and params before/after, from `whittle compress --json` (`macs`, `params` pairs)
  compress s  the `seconds` field of `whittle compress --json`
  latency     `whittle bench --json` p50 in ONNX Runtime (ort-cpu) and tract, original and pruned
              measured INTERLEAVED in the same run: each round runs original and pruned once each
              (a fresh process every time), the one going first alternating from round to round;
              the median over rounds of each one's p50 is reported, and original/pruned is the
              speedup (> 1: the pruned model is faster)
  quality     `whittle verify --json` on evaluation images the compress never saw: top-1 agreement
              of the pruned model with the original, and the top-1 accuracy of both

Models and data (../shared/assets beside the repo):
  resnet8_cifar10         models/resnet8_cifar10.onnx, profile resnet8; calibrates on
                          cifar10/test-b, evaluates on cifar10/test-a
  efficientnet_lite0_224  models/efficientnet_lite0_224.onnx (stands in for MobileNetV2, which
                          could not be had), profile efficientnet; imagenet/ is split in two by
                          its sorted class folders, alternating (1st, 3rd, ... calibrate; 2nd, 4th,
                          ... evaluate), as two folders of symbolic links in a temporary folder
                          that keep the ImageNet layout (class folders named by their integer label)

A compress that fails (e.g. an unreachable budget) becomes a row saying so; it is not a failure of
this bench. After each model's table, one line states whether reconstruction beat no
reconstruction (higher top-1 agreement with the original) at every budget of this run: a
statement of what was measured, not an assertion. Exit status: 0, or 1 when a bench or verify run
failed, 2 when the binary, models or data are missing.

    python3 bench/prune_bench.py [--quick] [--json] [--whittle PATH]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from functools import partial
from pathlib import Path

import benchlib
from benchlib import ASSETS, REPO, RunError, check, fmt, split_image_folder, verify, workdir

BUDGETS = [0.9, 0.75, 0.6, 0.5]  # fraction of MACs kept
QUICK_BUDGETS = [0.75]


def model_specs() -> list[dict]:
    """The models: path, profile, and where calibration and evaluation data come from."""
    cifar = ASSETS / "data" / "cifar10"
    return [
        {"name": "resnet8_cifar10", "path": REPO / "models" / "resnet8_cifar10.onnx", "profile": "resnet8",
         "calib": cifar / "test-b", "eval": cifar / "test-a", "split": None,
         # ~0.2 ms (ort) and ~2 ms (tract) a call: 10x the timed runs, to get above the timer's noise.
         "iters_scale": 10, "tract_iters": None, "note": "bundled in the repo"},
        {"name": "efficientnet_lite0_224", "path": ASSETS / "models" / "efficientnet_lite0_224.onnx",
         "profile": "efficientnet", "calib": None, "eval": None, "split": ASSETS / "data" / "imagenet",
         # tract runs this model at ~250 ms a call: few timed runs.
         "iters_scale": 1, "tract_iters": 10, "note": "shared asset; stands in for MobileNetV2"},
    ]


def with_iters(s: dict, a) -> dict:
    """The spec with its timed runs per bench run: --iters times the model's scale (resnet8: 10);
    tract's capped per model (efficientnet: 10, --quick 5)."""
    ort_iters = a.iters * s["iters_scale"]
    cap = s["tract_iters"]
    return dict(s, ort_iters=ort_iters,
                tract_iters=ort_iters if cap is None else min(ort_iters, max(1, cap // 2) if a.quick else cap))


def fresh_split(s: dict, work: Path) -> tuple[Path, Path, dict]:
    """s["split"] split in two under work (an earlier --keep run's links removed first: rmtree
    unlinks them, never follows)."""
    split_dir = work / f"{s['name']}_split"
    if split_dir.exists():
        shutil.rmtree(split_dir)
    return split_image_folder(s["split"], split_dir)


def compress(spec: dict, calib: Path, out: Path, keep: float, reconstruct: bool, a) -> dict:
    cmd = [str(a.whittle), "compress", str(spec["path"]), "-o", str(out), "--calib", str(calib),
           "--profile", spec["profile"], "--target", f"macs={keep}", "--calib-items", str(a.calib_items),
           "--threads", str(a.threads), "--json"]
    if not reconstruct:
        cmd.append("--no-reconstruct")
    rep, figures = benchlib.compress_json(cmd)
    fid = rep.get("fidelity") or {}
    outs = fid.get("outputs") or [{}]
    return {
        **figures,
        "reconstructed": rep.get("reconstructed"),
        "groups": rep.get("groups"),
        "prunable_groups": rep.get("prunable_groups"),
        "refit_layers": len(rep.get("refit") or []),
        "holdout_fidelity": {"items": fid.get("items"), **outs[0]},
    }


def run_row(spec: dict, calib: Path, evald: Path, keep: float, reconstruct: bool, work: Path, a, log) -> dict:
    row = {"model": spec["name"], "target_macs_kept": keep, "removed_pct": round((1 - keep) * 100),
           "reconstruct": reconstruct, "ok": True}
    out = work / f"{spec['name']}_macs{keep}_{'recon' if reconstruct else 'norecon'}.onnx"
    tag = f"{row['removed_pct']}% MACs removed, {'with' if reconstruct else 'without'} reconstruction"
    log(f"  {tag}: compressing ...")
    try:
        row["compress"] = compress(spec, calib, out, keep, reconstruct, a)
    except (RunError, KeyError, TypeError, ValueError) as e:
        return benchlib.compress_failed(row, e, log)
    c = row["compress"]
    log(f"    compress {c['seconds']:.1f} s: MACs kept {c['macs_kept']:.1%}, params kept {c['params_kept']:.1%}")
    try:
        row["verify"] = v = verify(spec, evald, out, a)
        log(f"    verify on {v['items']} eval items: agreement {v['top1_agreement']:.3f}, accuracy "
            f"{v['reference_accuracy']:.3f} -> {v['candidate_accuracy']:.3f}")
    except (RunError, KeyError, IndexError, TypeError) as e:
        benchlib.verify_failed(row, e, log)
    benchlib.latency(row, spec["path"], out, lambda rt: spec["ort_iters"] if rt == "ort-cpu" else spec["tract_iters"],
                     a, log)
    return row


RECON = ("agreement_recon", "agreement_no_recon")


def recon_verdict(rows: list[dict]) -> dict:
    """Per budget: does reconstruction give higher top-1 agreement than no reconstruction?"""
    per = benchlib.per_budget(rows, "reconstruct", "top1_agreement", RECON)
    return {"beats_at_every_budget": benchlib.every_budget(per), "per_budget": per}


def verdict_line(name: str, v: dict) -> str:
    return benchlib.verdict_line(name, "reconstruction beats no reconstruction", v, RECON, ".3f", "top-1 agreement",
                                 "recon vs no recon")


def table(model: dict) -> str:
    head = ["MACs removed", "recon", "MACs kept", "params kept", "ort orig p50", "ort pruned p50", "ort speedup",
            "tract orig p50", "tract pruned p50", "tract speedup", "agreement", "acc orig", "acc pruned",
            "compress s"]

    def cells(r: dict) -> list[str]:
        c, v = r["compress"], r.get("verify") or {}
        return [f"{c['macs_kept']:.1%}", f"{c['params_kept']:.1%}", *benchlib.latency_cells(r.get("latency") or {}),
                fmt(v.get("top1_agreement"), ".3f"), fmt(v.get("reference_accuracy"), ".3f"),
                fmt(v.get("candidate_accuracy"), ".3f"), fmt(c.get("seconds"), ".1f")]

    return benchlib.rows_table(head, model["rows"], lambda r: [f"{r['removed_pct']}%", recon(r)], cells,
                               tag=lambda r: f"{r['removed_pct']}% recon {recon(r)}")


def recon(row: dict) -> str:
    return "on" if row["reconstruct"] else "off"


def render(result: dict) -> str:
    s = result["settings"]
    out = [f"channel pruning (whittle compress --calib-items {s['calib_items']}; latency: median over {s['rounds']} "
           f"interleaved rounds of p50, {s['threads']} threads, warmup {s['warmup']}, timed runs per model below; "
           "speedup = original / pruned; agreement = top-1 agreement with the original on the evaluation images):"]
    for m in result["models"]:
        ev = m["eval_items"]
        out.append("")
        out.append(f"{m['model']} ({m['note']}; profile {m['profile']}; calibration {m['calib_desc']}; "
                   f"evaluation {m['eval_desc']}{f', {ev} items' if ev else ''}; timed runs per bench run: "
                   f"ort-cpu {m['ort_iters']}, tract {m['tract_iters']}):")
        out.append(table(m))
    out.append("")
    for m in result["models"]:
        out.append(verdict_line(m["model"], m["reconstruction"]))
    out.append(benchlib.took_line(result))
    return "\n".join(out)


def add_args(ap: argparse.ArgumentParser) -> None:
    benchlib.add_measure_args(ap, rounds="interleaved latency rounds per row (default 3)",
                              iters="timed runs per bench run (default 50; --quick 20), times 10 "
                                    "for resnet8; tract on efficientnet at most 10 (--quick 5)")
    benchlib.add_budget_args(ap, "fractions of MACs kept", BUDGETS, QUICK_BUDGETS, model_specs())
    benchlib.add_output_args(ap, keep="write the pruned models and data splits here and keep them "
                                      "(default: a temporary folder, removed)",
                             quick="only the 25 %% budget, fewer bench iterations",
                             json_help="print one JSON object instead of the tables")


def settle(a: argparse.Namespace, rounds: int = 3) -> None:
    """Defaults of the flags left unset (--quick: 3 rounds, fewer runs)."""
    benchlib.settle(a, quick={"rounds": 3, "warmup": 2, "iters": 20}, full={"rounds": rounds, "warmup": 5, "iters": 50})


def run(a: argparse.Namespace, log) -> tuple[dict, int]:
    """Runs the pruning bench; returns (result, exit status)."""
    specs, why = benchlib.select(model_specs(), a.models)
    if why:
        return {"error": why}, 2
    why = check(a, specs) or benchlib.counts_error(a)
    if why:
        return {"error": why}, 2
    budgets = a.budgets or (QUICK_BUDGETS if a.quick else BUDGETS)
    clock = benchlib.started(log, f"channel pruning bench: budgets {', '.join(f'macs={b}' for b in budgets)}, "
                             "reconstruction on and off", a, iters=False)
    models = []
    status = 0
    with workdir(a.keep, "whittle-prune-bench-") as work:
        for s in specs:
            split_info = None
            if s["split"] is not None:
                calib, evald, split_info = fresh_split(s, work)
                calib_desc = (f"{split_info['calib_images']} images of {s['split'].resolve()} "
                              f"(even sorted class folders)")
                eval_desc = f"the other {split_info['eval_images']} (odd class folders)"
            else:
                calib, evald = s["calib"], s["eval"]
                calib_desc, eval_desc = str(calib.resolve()), str(evald.resolve())
            spec = with_iters(s, a)
            log(f"{s['name']} ({s['note']}):")
            rows = []
            for keep in budgets:
                for reconstruct in (True, False):
                    row = run_row(spec, calib, evald, keep, reconstruct, work, a, log)
                    if not row["ok"]:
                        status = 1
                    rows.append(row)
            eval_items = next((r["verify"]["items"] for r in rows if "verify" in r), None)
            models.append({"model": s["name"], "path": str(s["path"].resolve()), "note": s["note"],
                           "profile": s["profile"], "calib": str(calib), "eval": str(evald), "split": split_info,
                           "calib_desc": calib_desc, "eval_desc": eval_desc, "eval_items": eval_items,
                           "ort_iters": spec["ort_iters"], "tract_iters": spec["tract_iters"], "rows": rows,
                           "reconstruction": recon_verdict(rows)})
    return {"settings": benchlib.settings(a, work, budgets_macs_kept=budgets), "models": models,
            **clock.end(status)}, status


# the command line: parse, run, print the tables or --json
main = partial(benchlib.cli_main, "prune_bench", "Channel pruning at several MAC budgets, with and without "
               "reconstruction: size, latency, agreement (reports; asserts nothing)",
               add_args, settle, run, render)

if __name__ == "__main__":
    sys.exit(main())
