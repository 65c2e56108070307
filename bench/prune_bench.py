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
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ASSETS = REPO / ".." / "shared" / "assets"

BUDGETS = [0.9, 0.75, 0.6, 0.5]  # fraction of MACs kept
QUICK_BUDGETS = [0.75]
CALIB_ITEMS = 128

# Per run, beyond the expected time: loading, and a loaded machine.
COMPRESS_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 900


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


def default_whittle() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR") or str(REPO / "target")
    return Path(target) / "release" / "whittle"


def split_image_folder(src: Path, work: Path) -> tuple[Path, Path, dict]:
    """Two folders of links to src's class folders: sorted by name, alternating calib, eval."""
    src = src.resolve()
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    calib, evald = work / "calib", work / "eval"
    for d in (calib, evald):
        d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(classes):
        (calib if i % 2 == 0 else evald).joinpath(name).symlink_to(src / name, target_is_directory=True)

    def count(d: Path) -> int:
        return sum(1 for c in d.iterdir() for f in c.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))

    info = {"source": str(src), "classes": len(classes), "calib_classes": len(classes[0::2]),
            "eval_classes": len(classes[1::2]), "calib_images": count(calib), "eval_images": count(evald),
            "rule": "sorted class folders, alternating: even positions calibrate, odd evaluate"}
    return calib, evald, info


class RunError(RuntimeError):
    pass


def run_json(cmd: list[str], timeout: int) -> dict:
    """Runs cmd, returns the JSON object on its last stdout line, or raises RunError saying why not."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RunError(f"timed out after {timeout} s: {' '.join(cmd)}")
    except OSError as e:
        raise RunError(f"could not start {cmd[0]}: {e}")
    if p.returncode != 0:
        text = (p.stderr.strip() or p.stdout.strip())
        raise RunError(text or f"exit {p.returncode} with no output")
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise RunError(f"unreadable output ({e}): {' '.join(cmd)}\n{p.stdout[-2000:]}")


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def compress(spec: dict, calib: Path, out: Path, keep: float, reconstruct: bool, a) -> dict:
    cmd = [str(a.whittle), "compress", str(spec["path"]), "-o", str(out), "--calib", str(calib),
           "--profile", spec["profile"], "--target", f"macs={keep}", "--calib-items", str(a.calib_items),
           "--threads", str(a.threads), "--json"]
    if not reconstruct:
        cmd.append("--no-reconstruct")
    t0 = time.monotonic()
    rep = run_json(cmd, COMPRESS_TIMEOUT_S)
    wall = time.monotonic() - t0
    (macs0, macs1), (params0, params1) = rep["macs"], rep["params"]
    fid = rep.get("fidelity") or {}
    outs = fid.get("outputs") or [{}]
    return {
        "command": cmd,
        "seconds": rep.get("seconds"),
        "wall_s": round(wall, 2),
        "macs": [macs0, macs1],
        "params": [params0, params1],
        "macs_kept": macs1 / macs0 if macs0 else None,
        "params_kept": params1 / params0 if params0 else None,
        "reconstructed": rep.get("reconstructed"),
        "groups": rep.get("groups"),
        "prunable_groups": rep.get("prunable_groups"),
        "refit_layers": len(rep.get("refit") or []),
        "holdout_fidelity": {"items": fid.get("items"), **outs[0]},
    }


def verify(spec: dict, data: Path, candidate: Path, a) -> dict:
    """`whittle verify` on data; the figures of spec["output"] (default: the first output)."""
    cmd = [str(a.whittle), "verify", str(spec["path"]), str(candidate), "--data", str(data),
           "--threads", str(a.threads), "--json"]
    if spec.get("profile"):
        cmd[-1:-1] = ["--profile", spec["profile"]]
    rep = run_json(cmd, RUN_TIMEOUT_S)
    o = next((o for o in rep["outputs"] if o.get("name") == spec.get("output")), rep["outputs"][0])
    return {"items": rep["items"], "output": o.get("name"), "top1_agreement": o.get("top1_agreement"),
            "reference_accuracy": o.get("reference_accuracy"), "candidate_accuracy": o.get("candidate_accuracy"),
            "mean_cosine": o.get("mean_cosine"), "max_abs_diff": o.get("max_abs_diff")}


def bench_once(model: Path, runtime: str, iters: int, a, extra: tuple[str, ...] = ()) -> dict:
    cmd = [str(a.whittle), "bench", str(model), "--runtime", runtime, "--threads", str(a.threads),
           "--warmup", str(a.warmup), "--iters", str(iters), *extra, "--json"]
    rep = run_json(cmd, RUN_TIMEOUT_S)
    prov = rep.get("provider") or {}
    if runtime == "ort-cpu" and (prov.get("actual") != "CPUExecutionProvider" or prov.get("fallback")):
        raise RunError(f"ran on {prov.get('actual')!r} (fallback {prov.get('fallback')}), not CPUExecutionProvider")
    return rep["stats"]


def bench_pair(original: Path, pruned: Path, runtime: str, iters: int, a, log,
               extra: tuple[str, ...] = ()) -> dict:
    """Original and pruned, interleaved over a.rounds rounds; median of each one's p50s. `extra`:
    more `whittle bench` arguments (input shapes)."""
    p50 = {"original": [], "pruned": []}
    paths = {"original": original, "pruned": pruned}
    for r in range(a.rounds):
        order = ["original", "pruned"] if r % 2 == 0 else ["pruned", "original"]
        for which in order:
            st = bench_once(paths[which], runtime, iters, a, extra)
            p50[which].append(st["p50_ms"])
    med = {k: statistics.median(v) for k, v in p50.items()}
    speedup = med["original"] / med["pruned"] if med["pruned"] else None
    log(f"      {runtime:<7} p50 original {med['original']:9.3f} ms, pruned {med['pruned']:9.3f} ms, "
        f"speedup {speedup:.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in p50['original'])} | "
        f"{', '.join(f'{x:.2f}' for x in p50['pruned'])})")
    return {"median_p50_ms": med, "round_p50_ms": p50, "speedup": speedup, "iters": iters}


def run_row(spec: dict, calib: Path, evald: Path, keep: float, reconstruct: bool, work: Path, a, log) -> dict:
    row = {"model": spec["name"], "target_macs_kept": keep, "removed_pct": round((1 - keep) * 100),
           "reconstruct": reconstruct, "ok": True}
    out = work / f"{spec['name']}_macs{keep}_{'recon' if reconstruct else 'norecon'}.onnx"
    tag = f"{row['removed_pct']}% MACs removed, {'with' if reconstruct else 'without'} reconstruction"
    log(f"  {tag}: compressing ...")
    try:
        row["compress"] = compress(spec, calib, out, keep, reconstruct, a)
    except (RunError, KeyError, TypeError, ValueError) as e:
        row["compress_error"] = first_line(str(e))
        row["compress_error_full"] = str(e)[-4000:]
        log(f"    compress FAILED: {row['compress_error']}")
        return row
    c = row["compress"]
    log(f"    compress {c['seconds']:.1f} s: MACs kept {c['macs_kept']:.1%}, params kept {c['params_kept']:.1%}")
    try:
        row["verify"] = verify(spec, evald, out, a)
        v = row["verify"]
        log(f"    verify on {v['items']} eval items: agreement {v['top1_agreement']:.3f}, accuracy "
            f"{v['reference_accuracy']:.3f} -> {v['candidate_accuracy']:.3f}")
    except (RunError, KeyError, IndexError, TypeError) as e:
        row["verify_error"] = str(e)[-4000:]
        row["ok"] = False
        log(f"    verify FAILED: {first_line(str(e))}")
    row["latency"] = {}
    for runtime in ("ort-cpu", "tract"):
        iters = spec["ort_iters"] if runtime == "ort-cpu" else spec["tract_iters"]
        try:
            row["latency"][runtime] = bench_pair(spec["path"], out, runtime, iters, a, log)
        except (RunError, KeyError, TypeError) as e:
            row.setdefault("bench_errors", {})[runtime] = str(e)[-4000:]
            row["ok"] = False
            log(f"      {runtime} bench FAILED: {first_line(str(e))}")
    return row


def recon_verdict(rows: list[dict]) -> dict:
    """Per budget: does reconstruction give higher top-1 agreement than no reconstruction?"""
    per = []
    for keep in sorted({r["target_macs_kept"] for r in rows}, reverse=True):
        by = {r["reconstruct"]: r for r in rows if r["target_macs_kept"] == keep}
        ag = {k: (by[k].get("verify") or {}).get("top1_agreement") if k in by else None for k in (True, False)}
        if ag[True] is None or ag[False] is None:
            outcome = "unmeasured"
        elif ag[True] > ag[False]:
            outcome = "beats"
        elif ag[True] == ag[False]:
            outcome = "ties"
        else:
            outcome = "loses"
        per.append({"removed_pct": round((1 - keep) * 100), "agreement_recon": ag[True],
                    "agreement_no_recon": ag[False], "outcome": outcome})
    every = bool(per) and all(p["outcome"] == "beats" for p in per)
    return {"beats_at_every_budget": every, "per_budget": per}


def verdict_line(name: str, v: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{x:.3f}"
    detail = "; ".join(f"{p['removed_pct']}%: {pct(p['agreement_recon'])} vs {pct(p['agreement_no_recon'])}"
                       + ("" if p["outcome"] == "beats" else f" ({p['outcome'].upper()})") for p in v["per_budget"])
    budgets = ", ".join(f"{p['removed_pct']}%" for p in v["per_budget"])
    verb = "YES" if v["beats_at_every_budget"] else "NO"
    return (f"{name}: reconstruction beats no reconstruction at every budget ({budgets}) of this run: {verb} "
            f"[top-1 agreement with the original, recon vs no recon: {detail}]")


def fmt(x, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + suffix


def table(model: dict) -> str:
    head = ["MACs removed", "recon", "MACs kept", "params kept", "ort orig p50", "ort pruned p50", "ort speedup",
            "tract orig p50", "tract pruned p50", "tract speedup", "agreement", "acc orig", "acc pruned",
            "compress s"]
    rows = [head]
    notes = []
    for r in model["rows"]:
        cells = [f"{r['removed_pct']}%", "on" if r["reconstruct"] else "off"]
        if "compress_error" in r:
            rows.append(cells + ["compress failed: " + r["compress_error"]])
            continue
        c, v, lat = r["compress"], r.get("verify") or {}, r.get("latency") or {}
        o, t = lat.get("ort-cpu") or {}, lat.get("tract") or {}
        om, tm = o.get("median_p50_ms") or {}, t.get("median_p50_ms") or {}
        cells += [
            f"{c['macs_kept']:.1%}", f"{c['params_kept']:.1%}",
            fmt(om.get("original"), ".2f", " ms"), fmt(om.get("pruned"), ".2f", " ms"), fmt(o.get("speedup"), ".2f", "x"),
            fmt(tm.get("original"), ".1f", " ms"), fmt(tm.get("pruned"), ".1f", " ms"), fmt(t.get("speedup"), ".2f", "x"),
            fmt(v.get("top1_agreement"), ".3f"), fmt(v.get("reference_accuracy"), ".3f"),
            fmt(v.get("candidate_accuracy"), ".3f"), fmt(c.get("seconds"), ".1f"),
        ]
        rows.append(cells)
        if "verify_error" in r:
            notes.append(f"  {r['removed_pct']}% recon {'on' if r['reconstruct'] else 'off'}: verify failed: "
                         f"{first_line(r['verify_error'])}")
        for rt, why in (r.get("bench_errors") or {}).items():
            notes.append(f"  {r['removed_pct']}% recon {'on' if r['reconstruct'] else 'off'}: {rt} bench failed: "
                         f"{first_line(why)}")
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
    out.append(f"took {result['elapsed_s']:.0f} s; load average at the end: "
               f"{' '.join(f'{x:.2f}' for x in result['loadavg_end'])}")
    return "\n".join(out)


def budget_list(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}")
    if not vals:
        raise argparse.ArgumentTypeError("no budgets")
    return vals


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads everywhere (default 2)")
    ap.add_argument("--rounds", type=int, help="interleaved latency rounds per row (default 3)")
    ap.add_argument("--warmup", type=int, help="untimed runs per bench run (default 5; --quick 2)")
    ap.add_argument("--iters", type=int, help="timed runs per bench run (default 50; --quick 20), times 10 "
                                              "for resnet8; tract on efficientnet at most 10 (--quick 5)")
    ap.add_argument("--calib-items", type=int, default=CALIB_ITEMS, help=f"default {CALIB_ITEMS}")
    ap.add_argument("--budgets", type=budget_list,
                    help="comma-separated fractions of MACs kept (default 0.9,0.75,0.6,0.5; --quick 0.75)")
    ap.add_argument("--models", help="comma-separated subset of: resnet8_cifar10, efficientnet_lite0_224")
    ap.add_argument("--keep", type=Path, help="write the pruned models and data splits here and keep them "
                                              "(default: a temporary folder, removed)")
    ap.add_argument("--quick", action="store_true", help="only the 25 %% budget, fewer bench iterations")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    ap.add_argument("--whittle", type=Path, default=default_whittle(),
                    help="the whittle binary (default $CARGO_TARGET_DIR/release/whittle)")


def settle(a: argparse.Namespace, rounds: int = 3) -> None:
    """Defaults of the flags left unset (--quick: 3 rounds, fewer runs)."""
    defaults = {"rounds": 3, "warmup": 2, "iters": 20} if a.quick else {"rounds": rounds, "warmup": 5, "iters": 50}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)


@contextlib.contextmanager
def workdir(keep: Path | None, prefix: str):
    """Where a bench writes: --keep's folder (kept), or a temporary one (removed afterwards)."""
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as d:
            yield Path(d)


def layout(rows: list[list[str]]) -> list[str]:
    """Aligned lines of a table whose first row is the header: the first two columns left, the
    others right; a shorter row (a label and a message) keeps its label and runs on."""
    n = len(rows[0])
    widths = [max(len(r[i]) for r in rows if len(r) == n) for i in range(n)]
    lines = []
    for j, r in enumerate(rows):
        if len(r) == n:
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        else:
            lines.append(r[0].ljust(widths[0]) + "  " + r[1])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def check(a: argparse.Namespace, specs: list[dict]) -> str | None:
    """Why the bench cannot run, or None."""
    if not (a.whittle.is_file() and os.access(a.whittle, os.X_OK)):
        return f"no whittle binary at {a.whittle} (`just build`, or pass --whittle)"
    if not ASSETS.is_dir():
        return f"the shared assets are missing: expected them at {ASSETS.resolve()} (../shared/assets beside the repo)"
    for s in specs:
        for p in (s["path"], s["calib"], s["eval"], s["split"]):
            if p is not None and not p.exists():
                return f"{s['name']}: missing {p.resolve()}"
    return None


def run(a: argparse.Namespace, log) -> tuple[dict, int]:
    """Runs the pruning bench; returns (result, exit status)."""
    specs = model_specs()
    if a.models:
        want = [m.strip() for m in a.models.split(",") if m.strip()]
        unknown = [m for m in want if m not in {s["name"] for s in specs}]
        if unknown:
            return {"error": f"unknown model(s): {', '.join(unknown)}"}, 2
        specs = [s for s in specs if s["name"] in want]
    why = check(a, specs)
    if why:
        return {"error": why}, 2
    if a.rounds < 1 or a.iters < 1 or a.warmup < 0 or a.threads < 1 or a.calib_items < 1:
        return {"error": "--rounds, --iters, --threads, --calib-items must be >= 1, --warmup >= 0"}, 2
    budgets = a.budgets or (QUICK_BUDGETS if a.quick else BUDGETS)
    started = time.monotonic()
    load0 = [round(x, 2) for x in os.getloadavg()]
    log(f"channel pruning bench: budgets {', '.join(f'macs={b}' for b in budgets)}, reconstruction on and off, "
        f"--calib-items {a.calib_items}; {a.threads} threads, {a.rounds} interleaved rounds x (warmup {a.warmup} + "
        f"timed runs) per row; load average {' '.join(map(str, load0))}")
    tmp = None
    if a.keep:
        work = a.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="whittle-prune-bench-")
        work = Path(tmp.name)
    models = []
    status = 0
    try:
        for s in specs:
            split_info = None
            if s["split"] is not None:
                split_dir = work / f"{s['name']}_split"
                if split_dir.exists():  # an earlier --keep run's links (rmtree unlinks them, never follows)
                    shutil.rmtree(split_dir)
                calib, evald, split_info = split_image_folder(s["split"], split_dir)
                calib_desc = (f"{split_info['calib_images']} images of {s['split'].resolve()} "
                              f"(even sorted class folders)")
                eval_desc = f"the other {split_info['eval_images']} (odd class folders)"
            else:
                calib, evald = s["calib"], s["eval"]
                calib_desc, eval_desc = str(calib.resolve()), str(evald.resolve())
            # Timed runs: --iters times the model's scale (resnet8: 10); tract's are capped per model
            # (efficientnet: 10, --quick 5).
            ort_iters = a.iters * s["iters_scale"]
            cap = s["tract_iters"]
            tract_iters = ort_iters if cap is None else min(ort_iters, max(1, cap // 2) if a.quick else cap)
            log(f"{s['name']} ({s['note']}):")
            rows = []
            for keep in budgets:
                for reconstruct in (True, False):
                    spec = dict(s, ort_iters=ort_iters, tract_iters=tract_iters)
                    row = run_row(spec, calib, evald, keep, reconstruct, work, a, log)
                    if not row["ok"]:
                        status = 1
                    rows.append(row)
            eval_items = next((r["verify"]["items"] for r in rows if "verify" in r), None)
            models.append({"model": s["name"], "path": str(s["path"].resolve()), "note": s["note"],
                           "profile": s["profile"], "calib": str(calib), "eval": str(evald), "split": split_info,
                           "calib_desc": calib_desc, "eval_desc": eval_desc, "eval_items": eval_items,
                           "ort_iters": ort_iters, "tract_iters": tract_iters, "rows": rows, "reconstruction": recon_verdict(rows)})
    finally:
        if tmp is not None:
            tmp.cleanup()
    result = {
        "settings": {"budgets_macs_kept": budgets, "calib_items": a.calib_items, "threads": a.threads,
                     "rounds": a.rounds, "warmup": a.warmup, "iters": a.iters, "quick": a.quick,
                     "whittle": str(a.whittle), "work": str(work) if a.keep else None},
        "loadavg_start": load0, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "models": models, "elapsed_s": round(time.monotonic() - started, 1), "ok": status == 0,
    }
    return result, status


def main(argv: list[str] | None = None) -> int:
    return cli_main("prune_bench", "Channel pruning at several MAC budgets, with and without "
                    "reconstruction: size, latency, agreement (reports; asserts nothing)",
                    add_args, settle, run, render, argv)


def cli_main(prog: str, description: str, add_args, settle, run, render, argv: list[str] | None) -> int:
    """The command line of a bench: parse, run, print the rendered tables (or --json's one object),
    and return the exit status (an error the bench names goes to stderr as `prog: why`)."""
    ap = argparse.ArgumentParser(description=description)
    add_args(ap)
    a = ap.parse_args(argv)
    settle(a)

    def log(msg: str) -> None:
        # progress goes to stderr with --json (stdout is the one JSON object), to stdout otherwise
        print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

    result, status = run(a, log)
    if "error" in result:
        print(f"{prog}: {result['error']}", file=sys.stderr)
        return status
    print(json.dumps(result) if a.json else "\n" + render(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
