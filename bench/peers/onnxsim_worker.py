#!/usr/bin/env python3
"""One onnxsim step of `bench/peers/peers_bench.py`, run in its own process so that a crash in
onnxsim's C++ code ends this process and not the bench.

  simplify MODEL OUT [--lift-constants]
      `onnxsim.simplify` (folds BatchNormalization into the Convs); with --lift-constants, the
      top-level Constant nodes it leaves become initializers (lossless): onnxsim's structured
      pruning does not follow a chain through a Clip (ReLU6) whose min/max come from a Constant
      node, and simplify keeps exactly those. Writes OUT.
  prune --model SIMPLIFIED --method magnitude|wanda --norm l1|l2 [--global] --target REMOVED ...
      Bisects onnxsim's `sparsity` (a fraction of channels) until the MACs removed, relative to
      --base-macs and counted by `whittle inspect --json`, reach REMOVED: the closest result at or
      above it. magnitude = `apply_structured_pruning_cpp`, wanda =
      `apply_structured_wanda_pruning_cpp` with --calib's items in batches of --batch. Writes OUT.
  finetune --model SIMPLIFIED --pruned PRUNED --calib NPY OUT
      `apply_pruning_finetune_cpp(SIMPLIFIED, PRUNED, calibration_data)`; writes OUT.

Each prints one JSON object on its last stdout line; `seconds` is the time spent inside onnxsim's
calls only (model saving and MAC counting excluded). On an error the last stderr line is a
one-line reason and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxsim

SPARSITY_MAX = 0.99  # onnxsim accepts [0, 1); each chain keeps at least one channel anyway
TOLERANCE = 0.001  # stop bisecting once within 0.1 points above the target


class StepError(Exception):
    """A reason this step gives itself (printed as it is, without an exception type)."""


def calibration_batches(npy: Path, input_name: str, batch: int) -> list[dict]:
    x = np.load(npy)
    return [{input_name: np.ascontiguousarray(x[i:i + batch])} for i in range(0, len(x), batch)]


def count(whittle: str, path: Path) -> dict:
    p = subprocess.run([whittle, "inspect", str(path), "--json", "--brief"], capture_output=True, text=True,
                       timeout=600, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise StepError(f"whittle inspect: {' '.join((p.stderr.strip() or p.stdout.strip()).splitlines()[-1:])}")
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    return {"macs": rep["macs"], "params": rep["params"]}


def lift_constants(model: onnx.ModelProto) -> int:
    """Turns the graph's Constant nodes holding a tensor `value` into initializers; returns how many."""
    kept, lifted = [], 0
    for n in model.graph.node:
        if n.op_type == "Constant" and [x.name for x in n.attribute] == ["value"]:
            t = onnx.helper.get_attribute_value(n.attribute[0])
            t.name = n.output[0]
            model.graph.initializer.append(t)
            lifted += 1
        else:
            kept.append(n)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return lifted


def simplify(a) -> dict:
    t0 = time.monotonic()
    model, check_ok = onnxsim.simplify(onnx.load(a.model))
    seconds = time.monotonic() - t0
    lifted = lift_constants(model) if a.lift_constants else 0
    onnx.save(model, a.out)
    return {"seconds": round(seconds, 3), "check_ok": bool(check_ok), "constants_lifted": lifted}


def prune(a) -> dict:
    model = onnx.load(a.model)
    calib = None
    if a.method == "wanda":
        calib = calibration_batches(a.calib, model.graph.input[0].name, a.batch)
    scratch = a.out.with_suffix(".try.onnx")
    spent = 0.0
    tried = []  # (sparsity, removed, counts)
    best = None  # (removed, sparsity, model, counts): closest at or above the target

    def attempt(s: float) -> float:
        nonlocal spent, best
        t0 = time.monotonic()
        if a.method == "magnitude":
            pruned = onnxsim.apply_structured_pruning_cpp(model, sparsity=s, importance_norm=a.norm,
                                                          global_sparsity=a.global_sparsity)
        else:
            pruned = onnxsim.apply_structured_wanda_pruning_cpp(
                model, calibration_data=calib, num_samples=len(calib), seed=0, sparsity=s,
                importance_norm=a.norm, global_sparsity=a.global_sparsity)
        spent += time.monotonic() - t0
        onnx.save(pruned, scratch)
        c = count(a.whittle, scratch)
        removed = 1 - c["macs"] / a.base_macs
        tried.append({"sparsity": s, "macs_removed": removed})
        if removed >= a.target and (best is None or (removed, s) < (best[0], best[1])):
            best = (removed, s, pruned, c)
        return removed

    try:
        top = attempt(SPARSITY_MAX)
        if top < a.target:
            raise StepError(f"unreachable: at most {top:.1%} of MACs removed (sparsity {SPARSITY_MAX})")
        lo, hi = 0.0, SPARSITY_MAX
        for _ in range(a.steps):
            if best[0] - a.target <= TOLERANCE:
                break
            mid = (lo + hi) / 2
            if attempt(mid) >= a.target:
                hi = mid
            else:
                lo = mid
    finally:
        scratch.unlink(missing_ok=True)
    removed, s, pruned, c = best
    onnx.save(pruned, a.out)
    return {"sparsity": s, "macs_removed": removed, **c, "steps": len(tried), "seconds": round(spent, 3),
            "tried": tried}


def finetune(a) -> dict:
    original = onnx.load(a.model)
    calib = calibration_batches(a.calib, original.graph.input[0].name, a.batch)
    t0 = time.monotonic()
    tuned = onnxsim.apply_pruning_finetune_cpp(original, onnx.load(a.pruned), calibration_data=calib,
                                               num_samples=len(calib), seed=0)
    seconds = time.monotonic() - t0
    onnx.save(tuned, a.out)
    return {"seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="One onnxsim step of the peers bench (JSON on stdout)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simplify")
    s.add_argument("model", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--lift-constants", action="store_true", help="Constant nodes become initializers")
    p = sub.add_parser("prune")
    p.add_argument("--model", type=Path, required=True, help="the simplified model")
    p.add_argument("--method", choices=["magnitude", "wanda"], required=True)
    p.add_argument("--norm", choices=["l1", "l2"], required=True)
    p.add_argument("--global", dest="global_sparsity", action="store_true")
    p.add_argument("--target", type=float, required=True, help="fraction of --base-macs to remove")
    p.add_argument("--base-macs", type=int, required=True, help="MACs of the original model")
    p.add_argument("--steps", type=int, required=True, help="bisection steps at most")
    p.add_argument("--calib", type=Path, help="calibration items (.npy, NCHW float32; wanda only)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--whittle", required=True)
    p.add_argument("out", type=Path)
    f = sub.add_parser("finetune")
    f.add_argument("--model", type=Path, required=True, help="the simplified (pre-pruning) model")
    f.add_argument("--pruned", type=Path, required=True)
    f.add_argument("--calib", type=Path, required=True)
    f.add_argument("--batch", type=int, default=16)
    f.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "prune" and a.method == "wanda" and a.calib is None:
        ap.error("--method wanda needs --calib")
    try:
        rep = {"simplify": simplify, "prune": prune, "finetune": finetune}[a.cmd](a)
    except Exception as e:  # any failure of onnxsim (or of counting) is this step's one-line reason
        text = " ".join(str(e).split()) or "(no message)"
        print(text[:500] if isinstance(e, StepError) else f"{type(e).__name__}: {text[:500]}", file=sys.stderr)
        return 1
    print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
