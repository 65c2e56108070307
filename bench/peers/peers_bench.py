#!/usr/bin/env python3
"""whittle's channel pruning beside onnxsim 0.8.1's pruning API: same models, MAC budgets and images.

For each model and budget (10, 25, 40, 50 % of MACs removed), one whittle row and sixteen onnxsim
rows, each measured against the original model:

  whittle   `whittle compress MODEL --calib CALIB --profile P --target macs=<kept> --calib-items 128`
            (channel pruning, least-squares reconstruction on), run as bench/prune_bench.py runs it
  onnxsim   `onnxsim.simplify` first (folds BatchNormalization), its Constant nodes then made
            initializers (lossless; see below; --no-lift-constants leaves them), then one of 8 configs:
            magnitude = `apply_structured_pruning_cpp`, wanda = `apply_structured_wanda_pruning_cpp`,
            each with importance_norm l1 or l2 and global_sparsity off ("local") or on ("global");
            each config once as it is and once followed by `apply_pruning_finetune_cpp`.
            onnxsim's `sparsity` is a fraction of channels, not of MACs: it is bisected (at most
            --steps + 1 tries, after one try at 0.99 that tells whether the budget is reachable)
            until the MACs removed reach the target: the closest result at or above it.

Why the Constant nodes are lifted: onnxsim's structured pruning does not follow a chain through a
Clip (ReLU6) whose min/max come from a Constant node, and onnxsim.simplify leaves exactly those in
efficientnet_lite0_224 (its own pruning then reaches 32 of the 49 Convs, the linear bottlenecks,
never the expansion layers; with them lifted it reaches all 49). The simplified model is checked
against the original with `whittle verify` before any onnxsim row.

Calibration: whittle compress's own 128 items (`Dataset::split(128 / n, seed 0)`, the splitmix64
shuffle ported below) of the calibration images, preprocessed in numpy as whittle's built-in
profile does (Pillow decodes), fed to onnxsim in batches of 16. Before any row, a check runs a
probe model through `whittle verify --limit 128` on those images: it compares whittle's own input
tensors with these arrays item by item (PNG: identical; JPEG: within a few 8-bit levels, as Pillow's
libjpeg-turbo and whittle's zune-jpeg decode differently); above 8 levels the bench stops.

Per row:
  MACs removed, params   `whittle inspect --json` for every model (one counter for every tool),
                         relative to the original model
  agreement, accuracy    `whittle verify ORIGINAL PRUNED --data EVAL --profile P --json`: top-1
                         agreement with the original, top-1 accuracy against the labels
  ort-cpu speedup        `whittle bench --runtime ort-cpu --json` p50, original / pruned, interleaved
                         over --rounds rounds as bench/prune_bench.py does; measured once per
                         distinct architecture (same ops and tensor shapes: the same compute), and
                         rows that share a measurement say so
  tool s                 whittle: the `seconds` of `whittle compress --json`; onnxsim: simplify +
                         every pruning call of the bisection (+ the fine-tune), inside onnxsim only

Models and data are bench/prune_bench.py's (resnet8_cifar10 calibrates on cifar10/test-b and is
evaluated on test-a; efficientnet_lite0_224 splits imagenet/ by alternating sorted class folders).
Each onnxsim step runs in its own process (bench/peers/onnxsim_worker.py), so an onnxsim crash, an
exception, an unreachable budget or a model ONNX Runtime or whittle refuses is a row saying
"failed: <reason>", never the end of the bench. After each budget one line names the best onnxsim
row and whittle's margin over it in agreement points, saying so plainly where whittle does not win.

Writes reports/peers/<UTC time>/ (table.md, results.json, plot.svg: agreement against MACs removed,
one line per tool and config). The whittle binary is copied into the work folder first, so a
rebuild during the run cannot change it. Exit status: 0 when the bench ran (whatever it found), 1
when a whittle row's verify or bench failed or the preprocessing check did not pass, 2 when the
binary, models or data are missing.

    python bench/peers/peers_bench.py [--quick] [--json] [--whittle PATH]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import html
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
import benchlib  # noqa: E402  (bench/benchlib.py: running whittle, interleaved latency, work folders)
import prune_bench as pb  # noqa: E402  (bench/prune_bench.py: models, budgets, compress)
from benchlib import RUN_TIMEOUT_S, RunError, first_line, fmt, run_json, verify  # noqa: E402

WORKER = HERE / "onnxsim_worker.py"
PINNED = ("onnxsim", "onnx", "onnxruntime", "numpy", "pillow")  # requirements.txt: versions go in the report
CALIB_BATCH = 16
STEPS = 11
WORKER_TIMEOUT_S = 1800
# Largest difference from whittle's own input tensors the preprocessing check accepts, in 8-bit levels.
CHECK_MAX_LEVELS = 8.0
CHECK_MEAN_LEVELS = 1.0

# onnxsim configs: (method, importance_norm, global_sparsity).
CONFIGS = [(m, n, g) for m in ("magnitude", "wanda") for n in ("l1", "l2") for g in (False, True)]

# whittle's built-in profiles used here, as calib/src/profile.rs defines them: resize of the short
# side ("resize") or to an exact (width, height) ("size"), bilinear; center crop; RGB;
# (v * scale - mean) / std (scale 1 when absent; mean and std one value or one per channel); NCHW.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PROFILES = {
    "resnet8": {"resize": None, "crop": None, "mean": 128.0, "std": 128.0},
    "efficientnet": {"resize": 256, "crop": 224, "mean": 127.5, "std": 127.5},
    "resnet-large": {"resize": None, "crop": None, "scale": 1.0 / 255.0, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "vww": {"resize": None, "size": (96, 96), "crop": None, "mean": 0.0, "std": 1.0},
}


def default_whittle() -> Path:
    return benchlib.default_whittle(Path.home() / ".cache" / "whittle" / "target")


# ---------------------------------------------------------------- calibration data, as whittle reads it

def image_folder(folder: Path) -> list[Path]:
    """An image-folder dataset's items in whittle's order: sorted class folders, sorted images in each."""
    def visible(p: Path) -> bool:
        return not p.name.startswith(".")
    items = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and visible(p)):
        items += sorted(f for f in d.iterdir()
                        if f.is_file() and visible(f) and f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return items


def whittle_calib_indices(n: int, k: int) -> list[int]:
    """The items `whittle compress --calib-items k` calibrates on (and `whittle verify --limit k`
    picks): Dataset::split(k / n, 0) in calib/src/dataset.rs, a seeded splitmix64 Fisher-Yates."""
    mask = (1 << 64) - 1
    state = 0
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        j = (z * (i + 1)) >> 64
        order[i], order[j] = order[j], order[i]
    keep = min(int(min(k, n) / n * n + 0.5), n)
    return sorted(order[:keep])


def preprocess(path: Path, profile: dict) -> np.ndarray:
    """One image as whittle's profile makes it: [C, H, W] float32."""
    img = Image.open(path).convert("RGB")
    if profile["resize"]:
        s = profile["resize"]
        w, h = img.size
        size = (s, h * s // w) if w <= h else (w * s // h, s)
        if size != img.size:
            img = img.resize(size, Image.BILINEAR)
    elif profile.get("size") and tuple(profile["size"]) != img.size:
        img = img.resize(tuple(profile["size"]), Image.BILINEAR)
    a = np.asarray(img)
    if profile["crop"]:
        c = profile["crop"]
        h, w = a.shape[:2]
        top, left = round((h - c) / 2), round((w - c) / 2)  # half to even, as whittle rounds
        a = a[top:top + c, left:left + c]
    v = a.astype(np.float32)
    if profile.get("scale", 1.0) != 1.0:
        v = v * np.float32(profile["scale"])
    x = (v - np.asarray(profile["mean"], np.float32)) / np.asarray(profile["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def calibration_arrays(spec: dict, calib: Path, items: int) -> tuple[np.ndarray, list[Path]]:
    paths = image_folder(calib)
    picked = [paths[i] for i in whittle_calib_indices(len(paths), items)]
    return np.stack([preprocess(p, PROFILES[spec["profile"]]) for p in picked]), picked


def check_preprocessing(spec: dict, calib: Path, x: np.ndarray, work: Path, a) -> dict:
    """Compares x with whittle's own input tensors for the same items, by a probe model that holds
    x as a constant: `whittle verify PROBE ZERO --limit k` on the calibration images reports per-item
    max and mean |whittle's input - x| as max_abs_diff against an all-zero twin."""
    k = len(x)

    def probe(zero: bool) -> Path:
        nodes = [helper.make_node("Sub", ["input", "x"], ["d"]), helper.make_node("Abs", ["d"], ["a"])]
        outs = []
        for op, name in (("ReduceMax", "max_abs"), ("ReduceMean", "mean_abs")):
            nodes.append(helper.make_node(op, ["a"], [f"{name}_r"], axes=[1, 2, 3], keepdims=0))
            nodes.append(helper.make_node("Unsqueeze", [f"{name}_r", "one"], [name if not zero else f"{name}_u"]))
            if zero:
                nodes.append(helper.make_node("Mul", [f"{name}_u", "zero"], [name]))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1]))
        inits = [numpy_helper.from_array(x, "x"), numpy_helper.from_array(np.array([1], np.int64), "one"),
                 numpy_helper.from_array(np.zeros((), np.float32), "zero")]
        graph = helper.make_graph(nodes, "preprocessing_probe",
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *x.shape[1:]])],
                                  outs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        path = work / f"{spec['name']}_probe{'_zero' if zero else ''}.onnx"
        onnx.save(model, path)
        return path

    ref, cand = probe(False), probe(True)
    cmd = [str(a.whittle), "verify", str(ref), str(cand), "--data", str(calib), "--profile", spec["profile"],
           "--limit", str(k), "--batch", str(k), "--threads", str(a.threads), "--json"]
    rep = run_json(cmd, RUN_TIMEOUT_S)
    ref.unlink()
    cand.unlink()
    got = {o["name"]: o["max_abs_diff"] for o in rep["outputs"]}
    # one 8-bit level is scale / std in input units; with a std per channel, the largest std / scale
    # (an upper bound on every channel's levels)
    prof = PROFILES[spec["profile"]]
    levels = float(np.max(np.asarray(prof["std"], np.float64))) / prof.get("scale", 1.0)
    res = {"items": rep["items"], "max_abs_levels": got["max_abs"] * levels,
           "worst_item_mean_abs_levels": got["mean_abs"] * levels}
    res["ok"] = (res["items"] == k and res["max_abs_levels"] <= CHECK_MAX_LEVELS
                 and res["worst_item_mean_abs_levels"] <= CHECK_MEAN_LEVELS)
    return res


# ---------------------------------------------------------------- measuring one pruned model

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def architecture(path: Path) -> str:
    """A digest of what a runtime computes, weights' values aside: ops, attributes, tensor shapes."""
    m = onnx.load(str(path))
    h = hashlib.sha256()
    for n in m.graph.node:
        attrs = [(x.name, str(helper.get_attribute_value(x))) for x in n.attribute]
        h.update(repr((n.domain, n.op_type, list(n.input), list(n.output), attrs)).encode())
    for t in m.graph.initializer:
        h.update(repr((t.name, t.data_type, list(t.dims))).encode())
    return h.hexdigest()


def count(path: Path, a) -> dict:
    rep = run_json([str(a.whittle), "inspect", str(path), "--json", "--brief"], RUN_TIMEOUT_S)
    return {"macs": rep["macs"], "params": rep["params"]}


def verified(row: dict, spec: dict, evald: Path, path: Path, a) -> bool:
    """Whether row["verify"] (`whittle verify` of path on evald) is there; else row["error"] says why."""
    try:
        row["verify"] = verify(spec, evald, path, a)
        return True
    except (RunError, KeyError, IndexError, TypeError) as e:
        row["error"] = f"whittle verify: {first_line(str(e))}"
        return False


def measure(row: dict, spec: dict, evald: Path, path: Path, base: dict, caches: dict, a, log) -> None:
    """Fills row with counts, verify and latency; a failure marks the row failed with its reason."""
    try:
        c = count(path, a)
    except (RunError, KeyError) as e:
        row["error"] = f"whittle inspect: {first_line(str(e))}"
        return
    row.update(macs=[base["macs"], c["macs"]], params=[base["params"], c["params"]],
               macs_removed=1 - c["macs"] / base["macs"])
    digest = sha256(path)
    if digest in caches["verify"]:
        row["verify"], row["verify_shared_with"] = caches["verify"][digest]
    else:
        if not verified(row, spec, evald, path, a):
            return
        caches["verify"][digest] = (row["verify"], row["label"])
    v = row["verify"]
    log(f"    {row['label']}: {row['macs_removed']:.1%} MACs removed, agreement {v['top1_agreement']:.3f}, "
        f"accuracy {v['candidate_accuracy']:.3f}" + (f" (same file as {row['verify_shared_with']})"
                                                     if row.get("verify_shared_with") else ""))
    arch = architecture(path)
    if arch in caches["latency"]:
        row["latency"], row["latency_shared_with"] = caches["latency"][arch]
        return
    try:
        row["latency"] = benchlib.bench_pair(spec["path"], path, "ort-cpu", spec["ort_iters"], a, log)
    except (RunError, KeyError, TypeError) as e:
        row["error"] = f"whittle bench: {first_line(str(e))}"
        return
    caches["latency"][arch] = (row["latency"], row["label"])


# ---------------------------------------------------------------- the two tools

def whittle_row(spec: dict, calib: Path, evald: Path, keep: float, base: dict, caches: dict, work: Path, a,
                log) -> dict:
    row = {"model": spec["name"], "target_removed": round(1 - keep, 4), "tool": "whittle",
           "config": "activation importance, reconstruction", "label": "whittle"}
    out = work / f"{spec['name']}_{row['target_removed']}_whittle.onnx"
    log(f"  whittle compress --target macs={keep} ...")
    try:
        rep = pb.compress(spec, calib, out, keep, True, a)
    except (RunError, KeyError, TypeError, ValueError) as e:
        row["error"] = f"whittle compress: {first_line(str(e))}"
        return row
    row["command"] = rep["command"]
    row["tool_seconds"] = rep["seconds"]
    measure(row, spec, evald, out, base, caches, a, log)
    return row


class WorkerError(RuntimeError):
    """A worker step (onnxsim, a peer quantizer) that gave no result; the message is its one-line
    reason."""


def run_worker(args: list[str]) -> dict:
    """Runs one onnxsim_worker.py step; its JSON, or WorkerError with a one-line reason."""
    return worker_json([sys.executable, str(WORKER), *args], "onnxsim crashed")


def worker_json(cmd: list[str], crashed: str = "crashed", timeout_s: int = WORKER_TIMEOUT_S) -> dict:
    """Runs a worker process; the JSON of its last stdout line, or WorkerError with a one-line
    reason (a timeout, a crash by signal, a non-zero exit with its last stderr line)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"timed out after {timeout_s} s")
    last = next((ln.strip() for ln in reversed(p.stderr.splitlines()) if ln.strip()), "")
    if p.returncode < 0:
        raise WorkerError(f"{crashed} ({signal.Signals(-p.returncode).name})" + (f": {last}" if last else ""))
    if p.returncode != 0:
        raise WorkerError(last or f"exit {p.returncode} with no output")
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise WorkerError(f"unreadable worker output: {p.stdout[-300:]!r}")


def config_name(method: str, norm: str, glob: bool) -> str:
    return f"{method} {norm} {'global' if glob else 'local'}"


def onnxsim_rows(spec: dict, sim: dict, calib_npy: Path, evald: Path, keep: float, base: dict, caches: dict,
                 work: Path, a, log) -> list[dict]:
    rows = []
    target = round(1 - keep, 4)
    for method, norm, glob in CONFIGS:
        name = config_name(method, norm, glob)
        plain = {"model": spec["name"], "target_removed": target, "tool": "onnxsim", "config": name,
                 "label": f"onnxsim {name}"}
        tuned = dict(plain, config=f"{name} + finetune", label=f"onnxsim {name} + finetune")
        rows += [plain, tuned]
        if "error" in sim:
            plain["error"] = tuned["error"] = f"simplify: {sim['error']}"
            continue
        stem = f"{spec['name']}_{target}_{method}_{norm}_{'global' if glob else 'local'}"
        out, out_ft = work / f"{stem}.onnx", work / f"{stem}_ft.onnx"
        args = ["prune", "--model", str(sim["path"]), "--method", method, "--norm", norm, "--target", str(target),
                "--base-macs", str(base["macs"]), "--steps", str(a.steps), "--whittle", str(a.whittle),
                "--batch", str(CALIB_BATCH), "--calib", str(calib_npy), str(out)]
        if glob:
            args.insert(1, "--global")
        log(f"  onnxsim {name}: bisecting sparsity ...")
        try:
            rep = run_worker(args)
        except WorkerError as e:
            plain["error"] = str(e)
            tuned["error"] = f"not pruned: {e}"
            log(f"    {plain['label']}: failed: {e}")
            continue
        plain.update(sparsity=rep["sparsity"], steps=rep["steps"], bisection=rep["tried"],
                     tool_seconds=round(sim["seconds"] + rep["seconds"], 2))
        measure(plain, spec, evald, out, base, caches, a, log)
        tuned.update(sparsity=rep["sparsity"], steps=rep["steps"])
        try:
            ft = run_worker(["finetune", "--model", str(sim["path"]), "--pruned", str(out), "--calib", str(calib_npy),
                             "--batch", str(CALIB_BATCH), str(out_ft)])
        except WorkerError as e:
            tuned["error"] = str(e)
            log(f"    {tuned['label']}: failed: {e}")
            continue
        tuned["tool_seconds"] = round(sim["seconds"] + rep["seconds"] + ft["seconds"], 2)
        tuned["finetune_seconds"] = ft["seconds"]
        measure(tuned, spec, evald, out_ft, base, caches, a, log)
    return rows


# ---------------------------------------------------------------- verdicts, table, plot

def ok(row: dict) -> bool:
    return "error" not in row and "verify" in row


def budget_verdicts(rows: list[dict]) -> list[dict]:
    """Per budget: the onnxsim row with the highest agreement, and whittle's margin over it."""
    out = []
    for target in sorted({r["target_removed"] for r in rows}):
        at = [r for r in rows if r["target_removed"] == target]
        w = next((r for r in at if r["tool"] == "whittle" and ok(r)), None)
        peers = [r for r in at if r["tool"] == "onnxsim" and ok(r)]
        best = max(peers, key=lambda r: r["verify"]["top1_agreement"], default=None)
        v = {"target_removed": target, "whittle_agreement": w["verify"]["top1_agreement"] if w else None,
             "best_peer": best["label"] if best else None,
             "best_peer_agreement": best["verify"]["top1_agreement"] if best else None,
             "best_peer_macs_removed": best["macs_removed"] if best else None}
        if w and best:
            v["margin_points"] = round(100 * (v["whittle_agreement"] - v["best_peer_agreement"]), 1)
            v["whittle_wins"] = v["margin_points"] > 0
        out.append(v)
    return out


def verdict_line(model: str, v: dict) -> str:
    head = f"{model}, {v['target_removed']:.0%} MACs removed:"
    if v["best_peer"] is None:
        return f"{head} no onnxsim row measured; whittle {fmt(v['whittle_agreement'], '.3f')}"
    peer = (f"best onnxsim row {v['best_peer']} (agreement {v['best_peer_agreement']:.3f} at "
            f"{v['best_peer_macs_removed']:.1%} MACs removed)")
    if v["whittle_agreement"] is None:
        return f"{head} {peer}; whittle has no result"
    if v["whittle_wins"]:
        return f"{head} {peer}; whittle {v['whittle_agreement']:.3f}: whittle ahead by {v['margin_points']:+.1f} points"
    return (f"{head} {peer}; whittle {v['whittle_agreement']:.3f}: whittle does NOT win here "
            f"({v['margin_points']:+.1f} points)")


def table(model: dict) -> str:
    head = ["target", "tool", "config", "MACs removed", "params", "agreement", "accuracy", "ort-cpu speedup",
            "tool s", "onnxsim sparsity (tries)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shared = {}  # label of the row whose latency measurement others share -> footnote number
    for r in model["rows"]:
        cells = [f"{r['target_removed']:.0%}", r["tool"], r["config"]]
        if "error" in r:
            cells += ["failed: " + r["error"].replace("|", "/")] + [""] * (len(head) - 4)
        else:
            lat = r.get("latency") or {}
            speed = fmt(lat.get("speedup"), ".2f", "x")
            if r.get("latency_shared_with"):
                speed += f" [{shared.setdefault(r['latency_shared_with'], len(shared) + 1)}]"
            v = r["verify"]
            cells += [f"{r['macs_removed']:.1%}", f"{r['params'][1]:,}", f"{v['top1_agreement']:.3f}",
                      f"{v['candidate_accuracy']:.3f}", speed, fmt(r.get("tool_seconds"), ".1f"),
                      f"{r['sparsity']:.4f} ({r['steps']})" if "sparsity" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return table_end(lines, shared, " (same budget)")


def table_end(lines: list[str], shared: dict, scope: str = "") -> str:
    """A table's lines, then a note for each row whose latency another (shared: its label -> the
    note's number) measured: one measurement for models of the same ops and tensor shapes."""
    if shared:
        lines.append("")
    lines += [f"[{n}] same ops and tensor shapes as {label}{scope}: latency measured once for both  "
              for label, n in shared.items()]
    return "\n".join(lines)


def simplify_line(sim: dict) -> str:
    v = sim["verify"]
    return f"agreement {v['top1_agreement']:.3f}, max |diff| {v['max_abs_diff']:.2g} on the evaluation images"


def check_line(chk: dict) -> str:
    if "error" in chk:
        return f"preprocessing check FAILED: {chk['error']}"
    return (f"preprocessing check (numpy arrays vs whittle's input tensors, {chk['items']} calibration items): "
            f"max |diff| {chk['max_abs_levels']:.2f} 8-bit levels, worst item mean |diff| "
            f"{chk['worst_item_mean_abs_levels']:.3f} levels: {'ok' if chk['ok'] else 'FAILED'}")


def run_lines(result: dict, others: tuple[str, ...]) -> list[str]:
    """A report's `- date`, `- command` and `- whittle: VERSION (sha256 ...); ` lines, the versions of
    others (packages of PINNED, as named in the report) after whittle's."""
    v = result["versions"]
    return [f"- date: {result['date']}", f"- command: `{result['command']}`",
            f"- whittle: {v['whittle']} (sha256 {result['whittle_sha256'][:16]}); "
            + ", ".join(f"{name} {v[name.lower()]}" for name in others)]


def wall_line(result: dict) -> str:
    return (f"- total wall time {result['elapsed_s'] / 60:.1f} min; load average (1, 5, 15 min) at the start "
            f"{' '.join(map(str, result['loadavg_start']))}, at the end {' '.join(map(str, result['loadavg_end']))}")


def render(result: dict) -> str:
    s = result["settings"]
    out = [f"# whittle vs onnxsim {result['versions']['onnxsim']}: channel pruning at equal MAC budgets", "",
           *run_lines(result, ("onnxruntime", "numpy", "Pillow")),
           f"- {s['calib_items']} calibration items for every tool; onnxsim bisects `sparsity` (at most "
           f"{s['steps'] + 1} tries) to the closest MACs removed at or above the target; agreement = top-1 "
           "agreement with the original on the evaluation images; accuracy = pruned model's top-1 vs labels",
           f"- ort-cpu speedup = p50 original / p50 pruned (`whittle bench`, median over {s['rounds']} "
           f"interleaved rounds, {s['threads']} threads, warmup {s['warmup']})",
           f"- onnxsim gets the simplified model{'' if s['lift_constants'] else ' as it is'}"
           f"{' with its Constant nodes lifted to initializers' if s['lift_constants'] else ''}",
           "- tool s: whittle = `whittle compress` `seconds`; onnxsim = simplify + all pruning calls of the "
           "bisection (+ finetune), time inside onnxsim only",
           wall_line(result)]
    for m in result["models"]:
        out += ["", f"## {m['model']}", "",
                f"profile {m['profile']}; calibration {m['calib_desc']}; evaluation {m['eval_desc']}; original "
                f"{m['base']['macs']:,} MACs, {m['base']['params']:,} params, accuracy "
                f"{fmt(m['reference_accuracy'], '.3f')}; ort-cpu timed runs per bench run {m['ort_iters']}",
                "", check_line(m["preprocessing_check"]), ""]
        sim = m["simplify"]
        if "error" in sim:
            out += [f"onnxsim.simplify failed: {sim['error']}", ""]
        else:
            out += [f"onnxsim.simplify: {sim['seconds']:.2f} s, {sim['constants_lifted']} Constant nodes lifted to "
                    f"initializers; simplified model vs the original: {simplify_line(sim)}", ""]
        out += [table(m), ""]
        out += [f"- {verdict_line(m['model'], v)}" for v in m["verdicts"]]
    losses = [f"{m['model']} {v['target_removed']:.0%} ({v['margin_points']:+.1f} points)"
              for m in result["models"] for v in m["verdicts"] if v.get("whittle_wins") is False]
    unmeasured = [f"{m['model']} {v['target_removed']:.0%}" for m in result["models"] for v in m["verdicts"]
                  if "whittle_wins" not in v]
    out += ["", "whittle wins every budget of this run on top-1 agreement." if not losses and not unmeasured else
            "whittle does NOT win: " + (", ".join(losses) if losses else "no losses") +
            (f"; not compared (a side has no result): {', '.join(unmeasured)}" if unmeasured else "")]
    return "\n".join(out)


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def svg_plot(result: dict) -> str:
    """Agreement against MACs removed, one panel per model, one line per tool and config."""
    series = [("whittle", "#000000", "", 2.5)]
    for i, (m, n, g) in enumerate(CONFIGS):
        name = config_name(m, n, g)
        series += [(f"onnxsim {name}", COLORS[i], "", 1.5), (f"onnxsim {name} + finetune", COLORS[i], "5,3", 1.5)]
    pw, ph, ml, mr, mt, mb = 460, 320, 55, 15, 40, 45
    models = result["models"]
    xmax = 60.0
    width = pw * len(models)
    legend = series[:1] + series[1::2]  # whittle, then each onnxsim config's solid line
    ncol = max(1, width // 300)
    nrow = -(-len(legend) // ncol)
    height = ph + 18 * (nrow + 1) + 10
    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for k, m in enumerate(models):
        x0, y0, w, h = k * pw + ml, mt, pw - ml - mr, ph - mt - mb

        def px(v):
            return x0 + w * v / xmax

        def py(v):
            return y0 + h * (1 - v)
        out.append(f'<text x="{x0 + w / 2}" y="20" text-anchor="middle" font-size="13" font-weight="bold">'
                   f'{e(m["model"])}</text>')
        for t in range(0, int(xmax) + 1, 10):
            out.append(f'<line x1="{px(t)}" y1="{y0}" x2="{px(t)}" y2="{y0 + h}" stroke="#e0e0e0"/>')
            out.append(f'<text x="{px(t)}" y="{y0 + h + 15}" text-anchor="middle">{t}%</text>')
        for t in range(0, 11, 2):
            out.append(f'<line x1="{x0}" y1="{py(t / 10)}" x2="{x0 + w}" y2="{py(t / 10)}" stroke="#e0e0e0"/>')
            out.append(f'<text x="{x0 - 6}" y="{py(t / 10) + 4}" text-anchor="end">{t / 10:.1f}</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#404040"/>')
        out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 32}" text-anchor="middle">MACs removed</text>')
        out.append(f'<text transform="translate({x0 - 40},{y0 + h / 2}) rotate(-90)" text-anchor="middle">'
                   'top-1 agreement with the original</text>')
        for label, color, dash, sw in series:
            pts = sorted((100 * r["macs_removed"], r["verify"]["top1_agreement"]) for r in m["rows"]
                         if r["label"] == label and ok(r))
            pts = [(x, y) for x, y in pts if x <= xmax]
            if not pts:
                continue
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{sw}"{dash_attr}>'
                       f'<title>{e(label)}</title></polyline>')
            for x, y in pts:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{3 if label == "whittle" else 2.2}" '
                           f'fill="{color}"><title>{e(label)}: {x:.1f}%, {y:.3f}</title></circle>')
    for i, (label, color, dash, sw) in enumerate(legend):
        lx, ly = 20 + (i // nrow) * (width / ncol), ph + 10 + 18 * (i % nrow)
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 28}" y2="{ly}" stroke="{color}" stroke-width="{sw}"/>')
        out.append(f'<text x="{lx + 34}" y="{ly + 4}">{e(label)}</text>')
    out.append(f'<text x="20" y="{ph + 14 + 18 * nrow}">dashed: the config + apply_pruning_finetune_cpp</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the run

class Report:
    """What a peers report says of its run beside the rows: the clock, the UTC time (its folder is
    named by it), the command line, the versions, and the binary, copied into the work folder."""

    def __init__(self, reports: Path, pinned: tuple[str, ...]) -> None:
        self.clock = benchlib.Clock()
        self.now = datetime.datetime.now(datetime.timezone.utc)
        self.dir = reports / self.now.strftime("%Y%m%d-%H%M%S")
        self.pinned = pinned

    def own_copy(self, a, work: Path, log, what: str) -> None:
        """benchlib.own_copy (a.whittle becomes the copy), its hash; logs what, the copy and the load."""
        self.origin, self.version = benchlib.own_copy(a, work)
        self.sha256 = sha256(a.whittle)
        log(self.clock.line(f"{what}; {self.origin} copied to {a.whittle}"))

    def result(self, settings: dict, models: list[dict]) -> dict:
        return {
            "date": self.now.isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, os.path.relpath(Path(sys.argv[0]).resolve(), REPO),
                                   *sys.argv[1:]]),
            "versions": {"whittle": self.version, **{k: importlib.metadata.version(k) for k in self.pinned}},
            "whittle_sha256": self.sha256, "whittle_binary": str(self.origin),
            "settings": settings, "models": models, "report_dir": str(self.dir), **self.clock.end(),
        }

    def write(self, files: dict[str, str]) -> None:
        """The report's files (name: text) into its folder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (self.dir / name).write_text(text)


def prepare_calib(s: dict, work: Path, a, log) -> dict:
    """Data split (an earlier --keep run's links removed first), the calibration arrays (saved) and
    their check (logged)."""
    if s["split"] is not None:
        shutil.rmtree(work / f"{s['name']}_split", ignore_errors=True)
        calib, evald, info = benchlib.split_image_folder(s["split"], work / f"{s['name']}_split")
        calib_desc = f"{a.calib_items} of the {info['calib_images']} images in the even sorted class folders of " \
                     f"{s['split'].resolve()}"
        eval_desc = f"the other {info['eval_images']} (odd class folders)"
    else:
        calib, evald = s["calib"], s["eval"]
        calib_desc, eval_desc = f"{a.calib_items} of {calib.resolve()}", str(evald.resolve())
    x, picked = calibration_arrays(s, calib, a.calib_items)
    calib_npy = work / f"{s['name']}_calib.npy"
    np.save(calib_npy, x)
    try:
        check = check_preprocessing(s, calib, x, work, a)
    except (RunError, KeyError, IndexError) as e:
        check = {"ok": False, "error": first_line(str(e))}
    log(f"  {check_line(check)}")
    return {"calib": calib, "eval": evald, "calib_desc": calib_desc, "eval_desc": eval_desc, "calib_npy": calib_npy,
            "calib_files": [str(p) for p in picked], "check": check}


def prepare_model(s: dict, work: Path, a, log) -> dict:
    """prepare_calib's, then the base counts and the simplified model."""
    prep = prepare_calib(s, work, a, log)
    sim_path = work / f"{s['name']}_simplified.onnx"
    try:
        lift = [] if a.no_lift_constants else ["--lift-constants"]
        sim = run_worker(["simplify", str(s["path"]), str(sim_path), *lift]) | {"path": sim_path}
        sim["verify"] = verify(s, prep["eval"], sim_path, a)
        log(f"  onnxsim.simplify: {sim['seconds']:.2f} s, {sim['constants_lifted']} Constant nodes lifted; against "
            f"the original: {simplify_line(sim)}")
    except (WorkerError, RunError, KeyError, IndexError, TypeError) as e:
        sim = {"error": first_line(str(e)), "seconds": None}
        log(f"  onnxsim.simplify FAILED: {sim['error']}")
    return {**prep, "simplify": sim, "base": count(s["path"], a)}


def run(a: argparse.Namespace, log) -> tuple[dict, int]:
    specs, why = benchlib.select(pb.model_specs(), a.models, sort=True)
    if why:
        return {"error": why}, 2
    if a.quick and not a.models:
        specs = [s for s in specs if s["name"] == "resnet8_cifar10"]
    why = benchlib.check(a, specs) or benchlib.counts_error(a, "steps")
    if why:
        return {"error": why}, 2
    budgets = a.budgets or (pb.QUICK_BUDGETS if a.quick else pb.BUDGETS)
    report = Report(a.reports, PINNED)
    status = 0
    models = []
    with benchlib.workdir(a.keep, "whittle-peers-bench-") as work:
        report.own_copy(a, work, log, f"peers bench: {len(specs)} model(s), budgets "
                                      f"{', '.join(f'{1 - b:.0%}' for b in budgets)} of MACs removed")
        for s in specs:
            log(f"{s['name']}:")
            s = dict(s, ort_iters=a.iters * s["iters_scale"])
            prep = prepare_model(s, work, a, log)
            rows = []
            if not prep["check"]["ok"]:
                status = 1
                log("  the calibration arrays are not shown to match whittle's inputs: no rows for this model")
            else:
                for keep in budgets:
                    caches = {"verify": {}, "latency": {}}  # shared by identical models of one budget
                    log(f" {1 - keep:.0%} of MACs removed:")
                    w = whittle_row(s, prep["calib"], prep["eval"], keep, prep["base"], caches, work, a, log)
                    if "error" in w and not w["error"].startswith("whittle compress"):
                        status = 1
                    rows.append(w)
                    rows += onnxsim_rows(s, prep["simplify"], prep["calib_npy"], prep["eval"], keep, prep["base"],
                                         caches, work, a, log)
            ref_acc = next((r["verify"]["reference_accuracy"] for r in rows if "verify" in r), None)
            models.append({"model": s["name"], "path": str(s["path"].resolve()), "profile": s["profile"],
                           "calib_desc": prep["calib_desc"], "eval_desc": prep["eval_desc"],
                           "calib_files": prep["calib_files"], "preprocessing_check": prep["check"],
                           "simplify": {k: str(v) if isinstance(v, Path) else v for k, v in prep["simplify"].items()},
                           "base": prep["base"], "reference_accuracy": ref_acc, "ort_iters": s["ort_iters"],
                           "rows": rows, "verdicts": budget_verdicts(rows)})
    result = report.result({"budgets_macs_kept": budgets, "calib_items": a.calib_items, "calib_batch": CALIB_BATCH,
                            "steps": a.steps, "lift_constants": not a.no_lift_constants, "threads": a.threads,
                            "rounds": a.rounds, "warmup": a.warmup, "iters": a.iters, "quick": a.quick,
                            "work": str(work) if a.keep else None}, models)
    report.write({"table.md": render(result) + "\n", "results.json": json.dumps(result, indent=1) + "\n",
                  "plot.svg": svg_plot(result)})
    return result, status


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="resnet8 at the 25 %% budget only, fewer bench iterations")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--whittle", type=Path, default=default_whittle(),
                    help="the whittle binary (default $CARGO_TARGET_DIR/release/whittle, else "
                         "~/.cache/whittle/target/release/whittle)")
    ap.add_argument("--models", help="comma-separated subset of: resnet8_cifar10, efficientnet_lite0_224")
    ap.add_argument("--budgets", type=benchlib.budget_list,
                    help="comma-separated fractions of MACs kept (default 0.9,0.75,0.6,0.5; --quick 0.75)")
    ap.add_argument("--calib-items", type=int, default=benchlib.CALIB_ITEMS, help=f"every tool (default {benchlib.CALIB_ITEMS})")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"onnxsim sparsity bisection steps (default {STEPS})")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for whittle's runs (default 2)")
    ap.add_argument("--rounds", type=int, help="interleaved latency rounds per architecture (default 3)")
    ap.add_argument("--warmup", type=int, help="untimed runs per bench run (default 5; --quick 2)")
    ap.add_argument("--iters", type=int, help="timed runs per bench run (default 50; --quick 20), times 10 for resnet8")
    ap.add_argument("--no-lift-constants", action="store_true",
                    help="give onnxsim the simplified model as it is (its Constant nodes left in place)")
    ap.add_argument("--keep", type=Path, help="keep the pruned models and data here (default: a temporary folder)")
    ap.add_argument("--reports", type=Path, default=REPO / "reports" / "peers",
                    help="a <UTC time>/ folder is made here (default reports/peers)")


def printed(result: dict) -> str:
    """The tables, then where the report was written."""
    return render(result) + f"\n\nwritten: {result['report_dir']}/table.md, results.json, plot.svg"


def main(argv: list[str] | None = None) -> int:
    return benchlib.cli_main("peers_bench", "whittle's channel pruning beside onnxsim's pruning API at equal MAC "
                             "budgets: agreement, accuracy, latency, time (reports; asserts nothing)",
                             add_args, pb.settle, run, printed, argv)


if __name__ == "__main__":
    sys.exit(main())
