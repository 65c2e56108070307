#!/usr/bin/env python3
"""whittle's latency against ONNX Runtime's own Python API (and tract), on the same models.

For each model, three contestants are measured INTERLEAVED in rounds: each round runs each of them
once (a fresh process: session load, warmup, timed runs) in an order that rotates from round to
round, so that the shared machine's noise falls on all of them alike. Per model it reports the
median over rounds of each contestant's p50, the ratio whittle-ort / python-ort (the median of
the per-round ratios: the two run back to back under the same load) and tract's p50 (measured in
the first rounds only: it is ~30x slower) and ratio tract / python-ort. It asserts nothing about the ratios: it reports them. It exits non-zero
when the shared assets are missing or any contestant fails.

Contestants (same model, same input, same intra-op threads):
  whittle-ort   `whittle bench MODEL --runtime ort-cpu --json` (libonnxruntime.so.1.31.1 via the ort crate)
  python-ort    bench/ort_python.py, onnxruntime==1.31.1's Python API (the bench venv)
  whittle-tract `whittle bench MODEL --runtime tract --json`

Then, unless --skip-prune, it runs bench/prune_bench.py (the channel pruning rows: `whittle compress`
at several MAC budgets with and without reconstruction, measured for size, interleaved latency of
original and pruned in ort-cpu and tract, and top-1 agreement and accuracy on evaluation images),
passing --quick, --threads and --whittle through; with --json its object is the "prune" field.
Then, unless --skip-lowrank, it runs bench/lowrank_bench.py the same way (the low-rank rows:
`whittle compress --low-rank` at several MAC budgets, plain and data-aware, measured likewise);
with --json its object is the "lowrank" field.
Then, unless --skip-transformer, it runs bench/transformer_bench.py the same way (MiniLM: 1, 2, 3 blocks
removed, plain and with a linear replacement, FFN neurons and attention heads pruned: params, latency
at batch 1 and sequence 128, STS-dev Spearman); with --json its object is the "transformer" field.
Then, unless --skip-merge, it runs bench/merge_bench.py the same way (depth merging: the
latency-versus-agreement curve of `whittle compress --merge` plans at several latency budgets on
ort-cpu and tract, refit and not, for EfficientNet-Lite0 and the VWW MobileNetV1); with --json its
object is the "merge" field.
Last, unless --skip-runner, bench/runner_bench.py: the aarch64 board runner's stripped size against
the 40 MB limit and the wall time of its cross build (with --quick: the size of the existing binary,
no build); with --json its object is the "runner" field.

Run it with the bench venv's python (`just bench`, which also builds whittle and the venv).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import benchlib
import lowrank_bench
import merge_bench
import prune_bench
import readme
import runner_bench
import transformer_bench
from benchlib import ASSETS, HERE, REPO, fmt

# (name, path, note). efficientnet_lite0_224 stands in for MobileNetV2, which could not be had.
MODELS = [
    ("efficientnet_lite0_224", ASSETS / "models" / "efficientnet_lite0_224.onnx",
     "shared asset; stands in for MobileNetV2"),
    ("resnet8_cifar10", REPO / "models" / "resnet8_cifar10.onnx", "bundled in the repo"),
]
CONTESTANTS = ["whittle-ort", "python-ort", "whittle-tract"]
TRACT_ROUNDS = 3
RUN_TIMEOUT_S = benchlib.RUN_TIMEOUT_S


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform says, else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": benchlib.loadavg(),
        "cpu": cpu_model(),
    }


def command(contestant: str, model: Path, a: argparse.Namespace) -> list[str]:
    common = ["--threads", str(a.threads), "--warmup", str(a.warmup), "--iters", str(a.iters), "--json"]
    if contestant == "python-ort":
        return [sys.executable, str(HERE / "ort_python.py"), str(model), *common]
    runtime = {"whittle-ort": "ort-cpu", "whittle-tract": "tract"}[contestant]
    return [str(a.whittle), "bench", str(model), "--runtime", runtime, *common]


def run_one(contestant: str, model: Path, a: argparse.Namespace) -> dict:
    """Runs one contestant once; returns its JSON report, or raises RuntimeError saying why not."""
    cmd = command(contestant, model, a)
    p = benchlib.spawn(cmd, RUN_TIMEOUT_S, RuntimeError)
    if p.returncode != 0:
        tail = (p.stderr.strip() or p.stdout.strip())[-2000:]
        raise RuntimeError(f"exit {p.returncode}: {' '.join(cmd)}\n{tail}")
    try:
        report = json.loads(p.stdout.strip().splitlines()[-1])
        stats = report["stats"]
        float(stats["p50_ms"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"unreadable output ({e}): {' '.join(cmd)}\n{p.stdout[-2000:]}")
    why = contestant != "whittle-tract" and benchlib.on_cpu_provider(report)
    if why:
        raise RuntimeError(f"{why}: {' '.join(cmd)}")
    return report


def paired_ratio(runs: list[dict]) -> float | None:
    """Median over rounds of whittle-ort p50 / python-ort p50 measured in the same round."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["contestant"]] = r["stats"]["p50_ms"]
    return benchlib.paired_ratio([(v["whittle-ort"], v.get("python-ort")) for v in by_round.values()
                                  if "whittle-ort" in v])


def bench_model(name: str, path: Path, note: str, a: argparse.Namespace, log) -> dict:
    p50s: dict[str, list[float]] = {c: [] for c in CONTESTANTS}
    runs: list[dict] = []
    failed: dict[str, str] = {}
    for r, order in benchlib.rotations(a.rounds, CONTESTANTS):
        for c in order:
            if c in failed:
                continue
            if c == "whittle-tract" and r >= TRACT_ROUNDS:
                # tract is ~30x slower; a few rounds give its p50, the ORT pair gets the rest
                continue
            t0 = time.monotonic()
            try:
                rep = run_one(c, path, a)
            except RuntimeError as e:
                failed[c] = str(e)
                log(f"  round {r + 1}/{a.rounds} {c:<13} FAILED: {str(e).splitlines()[0]}")
                continue
            st = rep["stats"]
            p50s[c].append(st["p50_ms"])
            runs.append({"round": r + 1, "contestant": c, "wall_s": round(time.monotonic() - t0, 2),
                         "loadavg_1m": round(os.getloadavg()[0], 2), "stats": st,
                         "input_shapes": rep.get("input_shapes")})
            log(f"  round {r + 1}/{a.rounds} {c:<13} p50 {st['p50_ms']:9.3f} ms  "
                f"(min {st['min_ms']:.3f}, p90 {st['p90_ms']:.3f}, load {os.getloadavg()[0]:.2f})")
    med = {c: (statistics.median(v) if v and c not in failed else None) for c, v in p50s.items()}
    spread = {c: (benchlib.spread(v) if c not in failed else None) for c, v in p50s.items()}
    return {
        "model": name,
        "path": str(path),
        "note": note,
        "median_p50_ms": med,
        "round_p50_ms": p50s,
        "p50_range_ms": spread,
        # paired: whittle and Python ran back to back in the same round, under the same load
        "ratio_whittle_ort_over_python_ort": paired_ratio(runs),
        "ratio_tract_over_python_ort": benchlib.ratio(med["whittle-tract"], med["python-ort"]),
        "failed": failed,
        "runs": runs,
    }


def table(results: list[dict]) -> str:
    head = ["model", "whittle-ort p50", "python-ort p50", "whittle/python", "tract p50", "tract/python"]
    rows = [head]
    for res in results:
        m = res["median_p50_ms"]
        rows.append([
            res["model"],
            fmt(m["whittle-ort"], ".3f", " ms", "FAILED"),
            fmt(m["python-ort"], ".3f", " ms", "FAILED"),
            fmt(res["ratio_whittle_ort_over_python_ort"], ".3f"),
            fmt(m["whittle-tract"], ".3f", " ms", "FAILED"),
            fmt(res["ratio_tract_over_python_ort"], ".2f"),
        ])
    return "\n".join(benchlib.layout(rows, left=1))


def spreads(results: list[dict]) -> list[str]:
    """Per model, each contestant's per-round p50 range."""
    out = []
    for r in results:
        spread = ", ".join(f"{c} {v[0]:.3f}-{v[1]:.3f}" for c, v in r["p50_range_ms"].items() if v)
        out.append(f"  {r['model']}: per-round p50 range (ms): {spread}")
    return out


def render(result: dict) -> str:
    """The latency table as the bench prints it, from its --json result."""
    s = result["settings"]
    return "\n".join([
        f"median over {s['rounds']} rounds of p50 latency (tract: first {min(TRACT_ROUNDS, s['rounds'])}; "
        f"{s['threads']} threads; whittle/python is the median of per-round ratios; "
        "ratios < 1 mean faster than ONNX Runtime's Python API):",
        table(result["results"]), *spreads(result["results"])])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="whittle's ONNX Runtime and tract latency against ONNX Runtime's "
                                             "Python API, interleaved in rounds (reports; asserts nothing)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every contestant (default 2)")
    ap.add_argument("--rounds", type=int, help="rounds (default 11, tract in the first 3; --quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed runs per contestant run (default 10; --quick 3)")
    ap.add_argument("--iters", type=int, help="timed runs per contestant run (default 100; --quick 20)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and iterations (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--readme", nargs="?", const=REPO / "README.md", type=Path, metavar="FILE",
                    help="then rewrite the benchmark tables of FILE (default README.md) from this run's "
                         "result (bench/readme.py; with --quick, the sections a quick run measures)")
    ap.add_argument("--skip-prune", action="store_true",
                    help="skip the channel pruning rows (bench/prune_bench.py; they take minutes, 15+ without --quick)")
    ap.add_argument("--skip-lowrank", action="store_true",
                    help="skip the low-rank rows (bench/lowrank_bench.py; they take minutes, ~10 without --quick)")
    ap.add_argument("--skip-transformer", action="store_true",
                    help="skip the MiniLM rows (bench/transformer_bench.py; minutes, ~15 without --quick)")
    ap.add_argument("--skip-merge", action="store_true",
                    help="skip the depth merging rows (bench/merge_bench.py; ~40 minutes without --quick)")
    ap.add_argument("--skip-runner", action="store_true",
                    help="skip the aarch64 runner's size and timed cross build (bench/runner_bench.py; "
                         "the build takes a minute or so; --quick measures the size only)")
    ap.add_argument("--whittle", type=Path, default=benchlib.default_whittle(),
                    help="the whittle binary (default $CARGO_TARGET_DIR/release/whittle)")
    a = ap.parse_args(argv)
    benchlib.settle(a, quick={"rounds": 3, "warmup": 3, "iters": 20}, full={"rounds": 11, "warmup": 10, "iters": 100})
    if a.rounds < 1 or a.iters < 1 or a.warmup < 0 or a.threads < 1:
        ap.error("--rounds, --iters and --threads must be >= 1, --warmup >= 0")
    log = benchlib.logger(a.json)

    if not ASSETS.is_dir():
        print(f"bench: the shared assets are missing: expected them at {ASSETS.resolve()} "
              "(../shared/assets beside the repo)", file=sys.stderr)
        return 2
    missing = [str(p) for _, p, _ in MODELS if not p.is_file()]
    if missing:
        print("bench: model(s) missing: " + ", ".join(missing), file=sys.stderr)
        return 2
    if not (a.whittle.is_file() and os.access(a.whittle, os.X_OK)):
        print(f"bench: no whittle binary at {a.whittle} (`just build`, or pass --whittle)", file=sys.stderr)
        return 2
    try:
        import onnxruntime  # noqa: F401  (the venv must have it; ort_python.py runs with this python)
        ort_version = onnxruntime.__version__
    except ImportError:
        print(f"bench: {sys.executable} has no onnxruntime: run it with the bench venv (`just setup-bench`)",
              file=sys.stderr)
        return 2

    started = time.monotonic()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    mach = machine()
    log(f"machine: {mach['cores']} cores ({mach['cores_usable']} usable), load average "
        f"{' '.join(f'{x:.2f}' for x in mach['loadavg'])} (1/5/15 min)")
    log("note: this box is shared and noisy; contestants are interleaved in rotating order and the "
        "median over rounds is reported, but other jobs can move single figures by tens of % between runs")
    if mach["cores"] and mach["loadavg"][0] >= 0.5 * mach["cores"]:
        log(f"warning: the 1-min load average ({mach['loadavg'][0]:.2f}) is already high for "
            f"{mach['cores']} cores: other work is running, so latencies will be inflated and noisy")
    log(f"settings: {a.threads} intra-op threads, {a.rounds} rounds x (warmup {a.warmup} + {a.iters} timed runs) "
        f"per contestant; onnxruntime {ort_version} (python), whittle {a.whittle}")
    results = []
    for name, path, note in MODELS:
        log(f"{name} ({note}):")
        results.append(bench_model(name, path, note, a, log))
    elapsed = time.monotonic() - started
    mach_end = machine()
    failed = any(r["failed"] for r in results)
    result = {
        "date": date, "machine": mach, "loadavg_end": mach_end["loadavg"],
        "settings": {"threads": a.threads, "rounds": a.rounds, "warmup": a.warmup, "iters": a.iters,
                     "whittle": str(a.whittle), "python": sys.executable, "onnxruntime_python": ort_version,
                     "quick": a.quick},
        "results": results, "elapsed_s": round(elapsed, 1),
    }

    subs = {}
    if not a.json:
        print()
        print(render(result))
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in mach_end['loadavg'])}; "
              f"took {elapsed:.0f} s")
    for name, (module, _, _) in SUBS.items():
        subs[name] = run_sub(name, a, log)
        r = subs[name][0]
        if not a.json and r is not None and "error" not in r:
            print()
            print(module.render(r))
    result["ok"] = not failed and all(st == 0 for _, st in subs.values())
    result.update({name: r for name, (r, _) in subs.items()})
    if a.json:
        print(json.dumps(result))
    for r in results:
        for c, why in r["failed"].items():
            print(f"bench: {r['model']}: {c} failed: {why}", file=sys.stderr)
    for name, (r, st) in subs.items():
        if r is not None and "error" in r:
            print(f"bench: {SUBS[name][2]}: {r['error']}", file=sys.stderr)
        elif name == "runner" and st:
            print("bench: runner: the cross build or the strip failed (see above)", file=sys.stderr)
    if a.readme:
        done = readme.rewrite(a.readme, result)
        log(f"{a.readme}: rewrote the tables {', '.join(done) or '(none: no marker matched)'}")
    return 1 if failed or any(st for _, st in subs.values()) else 0


# The benches run after the latency table, in order: field name -> (module, its settle, what its
# rows are). Each is skipped by --skip-NAME and gets --threads, --whittle and --quick.
SUBS = {
    "prune": (prune_bench, prune_bench.settle, "channel pruning rows"),
    "lowrank": (lowrank_bench, prune_bench.settle, "low-rank rows"),
    "transformer": (transformer_bench, transformer_bench.settle, "transformer rows"),
    "merge": (merge_bench, merge_bench.settle, "depth merging rows"),
    "runner": (runner_bench, None, "runner"),
}


def run_sub(name: str, a: argparse.Namespace, log) -> tuple[dict | None, int]:
    """One sub-bench, unless skipped: (its result or None, its exit status)."""
    if getattr(a, f"skip_{name}"):
        return None, 0
    module, settle, _ = SUBS[name]
    if settle is None:  # the runner: --quick logs nothing before its lines
        if not a.quick:
            log("")
        return module.run(argparse.Namespace(quick=a.quick, json=a.json), log)
    ap = argparse.ArgumentParser()
    module.add_args(ap)
    sa = ap.parse_args(["--threads", str(a.threads), "--whittle", str(a.whittle)] + ["--quick"] * a.quick)
    settle(sa)
    log("")
    return module.run(sa, log)


if __name__ == "__main__":
    sys.exit(main())
