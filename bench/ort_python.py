#!/usr/bin/env python3
"""Benchmark a model with ONNX Runtime's own Python API, the way `whittle bench --runtime ort-cpu` does.

Same session settings as whittle's ort-cpu session (graph optimisation ORT_ENABLE_ALL, intra-op
threads N, CPUExecutionProvider; inter-op threads 1; arena and memory patterns at Python's
defaults), the same deterministic input (floats `-1 + ((i mod 251) / 251) * 2` over the flattened
tensor in float32, int64/int32 all 1, bool all true, symbolic dims 1), each `sess.run` timed with
time.perf_counter, and the same stats as whittle (nearest-rank percentiles).

Run with the bench venv's python (`just setup-bench`), e.g.
    ort_python.py model.onnx --threads 2 --warmup 10 --iters 100 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import onnxruntime as ort

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def probe_tensor(shape: list[int]) -> np.ndarray:
    """whittle's probe pattern in float32: `lo + ((i % 251) / 251) * (hi - lo)` over [-1, 1)."""
    n = math.prod(shape)
    k = (np.arange(n, dtype=np.int64) % 251).astype(np.float32)
    flat = np.float32(-1.0) + (k / np.float32(251.0)) * np.float32(2.0)
    return flat.astype(np.float32).reshape(shape)


def synthetic_inputs(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    """One input per graph input; symbolic (or unknown) dims are 1."""
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else 1 for d in inp.shape]
        if inp.type not in _DTYPES:
            raise SystemExit(f"ort_python: input '{inp.name}' has type {inp.type} (float, int64, int32, bool only)")
        if inp.type == "tensor(float)":
            feeds[inp.name] = probe_tensor(shape)
        else:
            feeds[inp.name] = np.ones(shape, dtype=_DTYPES[inp.type])
    return feeds


def stats(samples_ms: list[float]) -> dict:
    """The same fields and method as whittle's BenchStats (nearest-rank percentiles)."""
    s = sorted(samples_ms)
    n = len(s)

    def rank(p: float) -> float:
        r = math.ceil((p / 100.0) * n)
        return s[min(max(r, 1), n) - 1]

    mean = sum(s) / n
    return {
        "iters": n,
        "mean_ms": mean,
        "p50_ms": rank(50.0),
        "p90_ms": rank(90.0),
        "p99_ms": rank(99.0),
        "min_ms": s[0],
        "max_ms": s[-1],
        "fps": 1000.0 / mean if mean > 0 else math.inf,
    }


def make_session(model: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Python's defaults, stated: whittle's ort session leaves both at ORT's defaults too.
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    ap.add_argument("--iters", type=int, default=100, help="timed runs (default 100)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    if a.iters < 1 or a.warmup < 0 or a.threads < 1:
        ap.error("--iters and --threads must be >= 1, --warmup >= 0")

    sess = make_session(a.model, a.threads)
    feeds = synthetic_inputs(sess)
    for _ in range(a.warmup):
        sess.run(None, feeds)
    samples = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        out = sess.run(None, feeds)
        samples.append((time.perf_counter() - t0) * 1000.0)
        del out
    st = stats(samples)
    providers = sess.get_providers()
    result = {
        "model": a.model,
        "runtime": "ort-python",
        "provider": {
            "requested": "CPUExecutionProvider",
            "actual": providers[0] if providers else None,
            "fallback": False,
            "reason": None,
        },
        "input_shapes": [[name, list(v.shape)] for name, v in feeds.items()],
        "stats": st,
        "onnxruntime": ort.__version__,
    }
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"{a.model}: onnxruntime {ort.__version__} python, {a.threads} threads, {st['iters']} iters: "
            f"p50 {st['p50_ms']:.3f} ms, p90 {st['p90_ms']:.3f} ms, p99 {st['p99_ms']:.3f} ms, "
            f"mean {st['mean_ms']:.3f} ms, fps {st['fps']:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
