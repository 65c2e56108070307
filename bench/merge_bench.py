#!/usr/bin/env python3
"""Depth merging, measured: the latency-versus-agreement curve of `whittle compress --merge`.

For each model and runtime (ort-cpu, tract):

  table       `whittle profile MODEL --merge --runtime RT`: every merge candidate's latency in the
              model, merged and not, side by side in 11 rounds (5 for EfficientNet on tract; the
              latency table the plans are chosen from);
              the bench prints how many candidates pay at all and the largest savings, which is
              what says why a budget cannot be met on a runtime
  plans       for each budget (`--target latency=0.97/0.94/0.9/0.85/0.8`), `whittle compress --merge
              --latency-table TABLE` picks merges by dynamic programme and refits each merged conv
              by least squares, in sequence; the first compress judges every paying candidate's
              damage, the later ones reuse those judgements (`--candidates PLAN`) and judge only
              candidates not judged yet
  no refit    the same plan replayed without the least-squares refit (`--apply-plan PLAN
              --no-reconstruct`): the merged convs as composed, with the activations simply gone
  latency     `whittle bench --json` p50 on the plan's runtime, original and merged INTERLEAVED in
              the same run (benchlib.bench_pair: each round runs both once, a fresh process
              each time, the one going first alternating); the median over rounds of each one's
              p50; speedup = original / merged. The plan without refit has the same graph, hence
              the same latency: it is not measured again
  quality     `whittle verify --json` on evaluation images the compress never saw: top-1
              agreement with the original (refit and no refit)
  size        MACs and params before/after (`whittle compress --json`)

Models and data (../shared/assets beside the repo), imagenet/ split in two by sorted class folder,
alternating (benchlib.split_image_folder: even folders calibrate, odd ones evaluate):
  efficientnet_lite0_224  stands in for MobileNetV2 (which could not be had), profile efficientnet
  mobilenetv1_025_vww96   the VWW MobileNetV1, profile vww (photos resized to 96x96; VWW's own
                          images are not in the assets)

A budget no plan reaches is a row saying so (with the best reachable latency whittle names); the
bench goes on. The statements at the end say what was measured, they assert nothing: whether
the refit beat no refit at every point, and whether some ort-cpu plan ran >= 1.1x faster with
>= 85% agreement (and if not, what the latency table shows). Exit status: 0, or 1 when a bench or
verify run failed, 2 when the binary, models or data are missing.

    python3 bench/merge_bench.py [--quick] [--json] [--whittle PATH]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
import time
from pathlib import Path

import benchlib
import prune_bench
from benchlib import ASSETS, COMPRESS_TIMEOUT_S, RunError, first_line, fmt, kept, run_json

BUDGETS = [0.97, 0.94, 0.9, 0.85, 0.8]  # fraction of the latency kept
QUICK_BUDGETS = [0.9]
RUNTIMES = ["ort-cpu", "tract"]
GOAL_SPEEDUP, GOAL_AGREEMENT = 1.1, 0.85


def model_specs() -> list[dict]:
    photos = ASSETS / "data" / "imagenet"
    return [
        {"name": "efficientnet_lite0_224", "path": ASSETS / "models" / "efficientnet_lite0_224.onnx",
         "profile": "efficientnet", "split": photos, "iters_scale": 1, "tract_iters": 10,
         # tract runs it at ~100-250 ms a call: fewer side-by-side rounds per candidate
         "merge_rounds": {"tract": 5}, "note": "stands in for MobileNetV2"},
        {"name": "mobilenetv1_025_vww96", "path": ASSETS / "models" / "mobilenetv1_025_vww96.onnx",
         "profile": "vww", "split": photos, "iters_scale": 10, "tract_iters": None,
         "note": "VWW MobileNetV1 0.25, 96x96"},
    ]


def profile(spec: dict, runtime: str, out: Path, a) -> dict:
    cmd = [str(a.whittle), "profile", str(spec["path"]), "--merge", "--runtime", runtime,
           "--threads", str(a.threads), "-o", str(out), "--json"]
    rounds = spec.get("merge_rounds", {}).get(runtime)
    if rounds:
        cmd[-1:-1] = ["--merge-rounds", str(rounds)]
    t0 = time.monotonic()
    t = run_json(cmd, COMPRESS_TIMEOUT_S)
    ms = t["model_ms"]
    saved = sorted(((m["before_ms"] - m["after_ms"]) / ms, " + ".join(m["convs"])) for m in t["merges"])
    paying = [s for s in saved if s[0] > 0]
    return {"command": cmd, "wall_s": round(time.monotonic() - t0, 1), "model_ms": ms,
            "candidates": len(saved), "paying": len(paying),
            "paying_sum_share": sum(s for s, _ in paying),
            "best": [{"saved_share": s, "segment": n} for s, n in reversed(saved[-5:])]}


def compress(spec: dict, calib: Path, out: Path, extra: list[str], a) -> dict:
    cmd = [str(a.whittle), "compress", str(spec["path"]), "-o", str(out), "--calib", str(calib),
           "--profile", spec["profile"], "--merge", "--calib-items", str(a.calib_items),
           "--threads", str(a.threads), "--json", *extra]
    rep = run_json(cmd, COMPRESS_TIMEOUT_S)
    m = rep["merge"]
    predicted = sum(g["saved_ms"] for g in m["merged"])
    return {"command": cmd, "seconds": rep.get("seconds"), "macs": list(rep["macs"]), "params": list(rep["params"]),
            "macs_kept": kept(rep["macs"]), "params_kept": kept(rep["params"]),
            "merged": [" + ".join(g["convs"]) for g in m["merged"]],
            "inexact": sum(1 for g in m["merged"] if not g["exact"]),
            "refitted": sum(1 for g in m["merged"] if g.get("refit") and not g["exact"]),
            "predicted_latency": (m["model_ms"] - predicted) / m["model_ms"] if m["model_ms"] else None,
            "plan_latency": m.get("plan_latency"),
            "damage_sum": sum(g["damage"] for g in m["merged"]), "combined_damage": m.get("combined_damage")}


def point(spec: dict, rt: str, keep: float, table: Path, calib: Path, evald: Path, work: Path,
          state: dict, a, log) -> dict:
    """One budget on one runtime's table: plan + refit, the same plan without refit, both judged."""
    row = {"runtime": rt, "target_latency": keep, "ok": True}
    tag = f"{spec['name']}_{rt}_{keep}"
    plan, out, plain = work / f"{tag}.plan.json", work / f"{tag}.onnx", work / f"{tag}.norefit.onnx"
    log(f"  {rt} latency={keep}: compressing ...")
    extra = ["--latency-table", str(table), "--target", f"latency={keep}", "--plan-out", str(plan)]
    if state.get("candidates"):
        extra += ["--candidates", str(state["candidates"])]
    try:
        row["refit"] = compress(spec, calib, out, extra, a)
    except (RunError, KeyError, TypeError, ValueError) as e:
        row["compress_error"] = first_line(str(e))
        log(f"    no plan: {row['compress_error']}")
        return row
    state["candidates"] = plan
    c = row["refit"]
    log(f"    {len(c['merged'])} segment(s) merged, predicted latency {c['predicted_latency']:.3f}, "
        f"damage {c['combined_damage']:.4f} ({c['seconds']:.0f} s)")
    same = next((p for p in state["points"] if p.get("refit", {}).get("merged") == c["merged"]), None)
    if same is not None:
        row["same_plan_as"] = same["target_latency"]
        for k in ("norefit", "verify_refit", "verify_norefit", "latency"):
            if k in same:
                row[k] = same[k]
        log(f"    the same plan as latency={same['target_latency']}: its measurements stand")
        return row
    try:
        row["norefit"] = compress(spec, calib, plain, ["--apply-plan", str(plan), "--no-reconstruct"], a)
    except (RunError, KeyError, TypeError, ValueError) as e:
        row["norefit_error"] = first_line(str(e))
        row["ok"] = False
        log(f"    replay without refit FAILED: {row['norefit_error']}")
    for key, model in (("verify_refit", out), ("verify_norefit", plain)):
        if not model.exists():
            continue
        try:
            row[key] = benchlib.verify(spec, evald, model, a)
        except (RunError, KeyError, IndexError, TypeError) as e:
            row[key + "_error"] = first_line(str(e))
            row["ok"] = False
    vr, vn = row.get("verify_refit") or {}, row.get("verify_norefit") or {}
    log(f"    agreement on {vr.get('items')} eval images: refit {fmt(vr.get('top1_agreement'), '.3f')}, "
        f"no refit {fmt(vn.get('top1_agreement'), '.3f')}")
    iters = spec["ort_iters"] if rt == "ort-cpu" else spec["tract_iters"]
    try:
        row["latency"] = benchlib.bench_pair(spec["path"], out, rt, iters, a, log)
    except (RunError, KeyError, TypeError) as e:
        row["bench_error"] = first_line(str(e))
        row["ok"] = False
        log(f"      {rt} bench FAILED: {row['bench_error']}")
    return row


def refit_verdict(points: list[dict]) -> dict:
    per = []
    for p in points:
        if "refit" not in p:
            continue
        r = (p.get("verify_refit") or {}).get("top1_agreement")
        n = (p.get("verify_norefit") or {}).get("top1_agreement")
        if p["refit"].get("inexact") == 0:
            outcome = "exact"  # only exact merges: nothing to refit, the two models are one
        else:
            outcome = benchlib.outcome(r, n)
        per.append({"target_latency": p["target_latency"], "refit": r, "no_refit": n, "outcome": outcome})
    judged = [x for x in per if x["outcome"] != "exact"]
    return {"beats_at_every_point": bool(judged) and all(x["outcome"] == "beats" for x in judged),
            "per_point": per}


def goal(models: list[dict]) -> dict:
    """The ort-cpu plans that ran >= 1.1x faster with >= 85% agreement, and the best of each."""
    hits, best = [], None
    for m in models:
        for p in m["runtimes"].get("ort-cpu", {}).get("points", []):
            sp = (p.get("latency") or {}).get("speedup")
            ag = (p.get("verify_refit") or {}).get("top1_agreement")
            if sp is None or ag is None:
                continue
            item = {"model": m["model"], "target_latency": p["target_latency"], "speedup": sp, "agreement": ag}
            if sp >= GOAL_SPEEDUP and ag >= GOAL_AGREEMENT:
                hits.append(item)
            if ag >= GOAL_AGREEMENT and (best is None or sp > best["speedup"]):
                best = item
    return {"met": bool(hits), "plans": hits, "fastest_at_85pct": best}


def table(rt_result: dict) -> str:
    head = ["target", "merged", "pred. lat", "meas. lat", "MACs kept", "params kept", "orig p50", "merged p50", "speedup",
            "agree refit", "agree no refit", "damage", "compress s"]
    rows = [head]
    for p in rt_result["points"]:
        cells = [f"latency={p['target_latency']}"]
        if "refit" not in p:
            rows.append(cells + ["no plan: " + p.get("compress_error", "?")])
            continue
        c, lat = p["refit"], p.get("latency") or {}
        med = lat.get("median_p50_ms") or {}
        cells += [f"{len(c['merged'])} ({c.get('refitted', 0)} refit)", fmt(c["predicted_latency"], ".3f"),
                  fmt(c.get("plan_latency"), ".3f"), fmt(c["macs_kept"], ".1%"),
                  fmt(c["params_kept"], ".1%"), fmt(med.get("original"), ".3f", " ms"),
                  fmt(med.get("pruned"), ".3f", " ms"), fmt(lat.get("speedup"), ".3f", "x"),
                  fmt((p.get("verify_refit") or {}).get("top1_agreement"), ".3f"),
                  fmt((p.get("verify_norefit") or {}).get("top1_agreement"), ".3f"),
                  fmt(c.get("combined_damage"), ".4f"), fmt(c.get("seconds"), ".0f")]
        if "same_plan_as" in p:
            cells[1] += f" (= latency={p['same_plan_as']})"
        rows.append(cells)
    return "\n".join(benchlib.layout(rows))


def table_line(t: dict) -> str:
    best = "; ".join(f"{b['segment']} {b['saved_share']:+.1%}" for b in t["best"][:3])
    return (f"  latency table: model {t['model_ms']:.3f} ms; {t['paying']} of {t['candidates']} candidates are "
            f"faster merged (their savings sum to {t['paying_sum_share']:.1%} of the model, overlapping ones "
            f"included); largest: {best}")


def render(result: dict) -> str:
    s = result["settings"]
    out = [f"depth merging (whittle compress --merge --calib-items {s['calib_items']}; latency: median over "
           f"{s['rounds']} interleaved rounds of p50, {s['threads']} threads; agreement = top-1 agreement with "
           "the original on the evaluation images; pred. lat = the plan's latency predicted from the table, "
           "as a fraction of the original's, meas. lat = whittle's own side-by-side measurement of the whole plan "
           "(ort-cpu plans); merged = segments merged (those refitted; the others are exact or kept as composed, "
           "which judged better); damage = output damage of all merges together on calibration items):"]
    for m in result["models"]:
        out.append("")
        out.append(f"{m['model']} ({m['note']}; profile {m['profile']}; calibration {m['calib_desc']}; "
                   f"evaluation {m['eval_desc']}):")
        for rt, r in m["runtimes"].items():
            out.append(f"{rt}:")
            if "table_error" in r:
                out.append(f"  latency table FAILED: {r['table_error']}")
                continue
            out.append(table_line(r["table"]))
            out.append(table(r))
    out.append("")
    for m in result["models"]:
        for rt, r in m["runtimes"].items():
            if "refit_verdict" not in r:
                continue
            v = r["refit_verdict"]
            detail = "; ".join(f"latency={x['target_latency']}: {fmt(x['refit'], '.3f')} vs {fmt(x['no_refit'], '.3f')}"
                               + ("" if x["outcome"] == "beats" else " (exact merges only)" if x["outcome"] == "exact"
                                  else f" ({x['outcome'].upper()})") for x in v["per_point"])
            out.append(f"{m['model']} {rt}: the refit beats no refit at every point of this run where an "
                       "activation was removed: "
                       f"{'YES' if v['beats_at_every_point'] else 'NO'} [{detail}]")
    g = result["goal"]
    if g["met"]:
        out.append("some ort-cpu plan ran >= 1.1x faster than its original with >= 85% agreement: YES ("
                   + "; ".join(f"{h['model']} latency={h['target_latency']}: {h['speedup']:.3f}x, "
                               f"{h['agreement']:.1%}" for h in g["plans"]) + ")")
    else:
        b = g["fastest_at_85pct"]
        best = "none kept 85%" if b is None else (f"the fastest with >= 85% agreement: {b['model']} "
                                                    f"latency={b['target_latency']}, {b['speedup']:.3f}x, {b['agreement']:.1%}")
        out.append(f"some ort-cpu plan ran >= 1.1x faster than its original with >= 85% agreement: NO ({best}; "
                   "the latency tables above show what merging can save on each runtime)")
    out.append(benchlib.took_line(result))
    return "\n".join(out)


def add_args(ap: argparse.ArgumentParser) -> None:
    benchlib.add_measure_args(ap, rounds="interleaved latency rounds per plan (default 5; --quick 3)",
                              iters="timed runs per bench run (default 50; --quick 20), times 10 for "
                                    "the VWW model; tract on efficientnet at most 10")
    benchlib.add_budget_args(ap, "latency fractions kept", BUDGETS, QUICK_BUDGETS, model_specs())
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset of: ort-cpu, tract")
    benchlib.add_output_args(ap, keep="keep the tables, plans and models here (default: a temporary folder)",
                             quick="only latency=0.9, fewer bench iterations",
                             json_help="print one JSON object instead of the tables")


def settle(a: argparse.Namespace) -> None:
    prune_bench.settle(a, rounds=5)


def run(a: argparse.Namespace, log) -> tuple[dict, int]:
    specs, why = benchlib.select(model_specs(), a.models)
    if why:
        return {"error": why}, 2
    runtimes = [r.strip() for r in a.runtimes.split(",") if r.strip()]
    if not runtimes or any(r not in RUNTIMES for r in runtimes):
        return {"error": f"--runtimes: a subset of {', '.join(RUNTIMES)}"}, 2
    why = benchlib.check(a, [dict(s, calib=None, eval=None) for s in specs])
    if why:
        return {"error": why}, 2
    budgets = a.budgets or (QUICK_BUDGETS if a.quick else BUDGETS)
    clock = benchlib.Clock()
    log(clock.line(f"depth merging bench: budgets {', '.join(f'latency={b}' for b in budgets)} on "
                   f"{', '.join(runtimes)}; {a.threads} threads, {a.rounds} interleaved rounds per plan"))
    models, status = [], 0
    with benchlib.workdir(a.keep, "whittle-merge-bench-") as work:
        for s in specs:
            calib, evald, info = prune_bench.fresh_split(s, work)
            spec = prune_bench.with_iters(s, a)
            log(f"{s['name']} ({s['note']}):")
            state = {"candidates": None}
            per_rt = {}
            for rt in runtimes:
                table_path = work / f"{s['name']}_{rt}.latency.json"
                log(f"  {rt}: measuring the latency table ...")
                r = {}
                try:
                    r["table"] = profile(s, rt, table_path, a)
                    log(table_line(r["table"]))
                except (RunError, KeyError, TypeError, ValueError) as e:
                    r["table_error"] = first_line(str(e))
                    status = 1
                    log(f"    FAILED: {r['table_error']}")
                    per_rt[rt] = r
                    continue
                state["points"] = []
                for keep in budgets:
                    p = point(spec, rt, keep, table_path, calib, evald, work, state, a, log)
                    state["points"].append(p)
                    if not p["ok"]:
                        status = 1
                    if "compress_error" in p and "unreachable" in p["compress_error"]:
                        break  # smaller budgets are out of reach too
                r["points"] = state["points"]
                r["refit_verdict"] = refit_verdict(r["points"])
                per_rt[rt] = r
            models.append({"model": s["name"], "note": s["note"], "profile": s["profile"], "split": info,
                           "calib_desc": f"{info['calib_images']} photos (even class folders)",
                           "eval_desc": f"the other {info['eval_images']}", "runtimes": per_rt})
    return {"settings": benchlib.settings(a, work, budgets_latency_kept=budgets, runtimes=runtimes),
            "models": models, "goal": goal(models), **clock.end(status)}, status


# the command line: parse, run, print the tables or --json
main = partial(benchlib.cli_main, "merge_bench", "Depth merging: latency-versus-agreement curves on ort-cpu and tract, "
               "refit and not (reports; asserts nothing)",
               add_args, settle, run, render)

if __name__ == "__main__":
    sys.exit(main())
