"""What whittle's benches share: paths, running the binary, interleaved rounds, paired ratios and
their spread, verdicts, table layout, work folders, and the command line around a bench.

Every bench (bench.py, prune_bench.py, lowrank_bench.py, transformer_bench.py, merge_bench.py,
runner_bench.py, peers/peers_bench.py) imports this module; it needs only the standard library.
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

CALIB_ITEMS = 128
# Per run, beyond the expected time: loading, and a loaded machine.
COMPRESS_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 900
RUNTIMES = ("ort-cpu", "tract")


def default_whittle(fallback: Path | None = None) -> Path:
    """$CARGO_TARGET_DIR/release/whittle, else under fallback (default: the repo's target/)."""
    target = os.environ.get("CARGO_TARGET_DIR") or str(fallback or REPO / "target")
    return Path(target) / "release" / "whittle"


def minilm_path() -> Path:
    """The MiniLM model ../shared/assets/fetch.sh fetches into $WHITTLE_ASSETS_CACHE."""
    cache = os.environ.get("WHITTLE_ASSETS_CACHE") or str(Path.home() / ".cache" / "whittle" / "assets")
    return Path(cache) / "minilm-l6-v2.opset17.onnx"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Clock:
    """A bench's start: the time and the load average then; end() the figures every result carries."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.load0 = loadavg()

    def line(self, what: str) -> str:
        """what, then the load average at the start: a bench's opening log line."""
        return f"{what}; load average {' '.join(map(str, self.load0))}"

    def end(self, status: int | None = None) -> dict:
        """loadavg_start, loadavg_end, elapsed_s, and with an exit status ok (status 0)."""
        ends = {"loadavg_start": self.load0, "loadavg_end": loadavg(),
                "elapsed_s": round(time.monotonic() - self.started, 1)}
        return ends if status is None else {**ends, "ok": status == 0}


def started(log, what: str, a: argparse.Namespace, iters: bool = True, after: str = "") -> Clock:
    """A Clock, its start logged: `WHAT, --calib-items N; T threads, R interleaved rounds x (warmup W +
    I timed runs) per row AFTER; load average L` (iters False: no I, where it differs per model)."""
    n = f"{a.iters} " if iters else ""
    clock = Clock()
    log(clock.line(f"{what}, --calib-items {a.calib_items}; {a.threads} threads, {a.rounds} interleaved rounds x "
                   f"(warmup {a.warmup} + {n}timed runs) per row{after}"))
    return clock


# ---------------------------------------------------------------- running whittle

class RunError(RuntimeError):
    pass


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def spawn(cmd: list[str], timeout: int, error: type[Exception] = RunError) -> subprocess.CompletedProcess:
    """Runs cmd to its end (output captured, no stdin); a timeout or a failed start raises error."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise error(f"timed out after {timeout} s: {' '.join(cmd)}")
    except OSError as e:
        raise error(f"could not start {cmd[0]}: {e}")


def last_json(p: subprocess.CompletedProcess, cmd: list[str], error: type[Exception] = RunError) -> dict:
    """The JSON object on the last line of p's stdout, or error saying why not."""
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise error(f"unreadable output ({e}): {' '.join(cmd)}\n{p.stdout[-2000:]}")


def run_json(cmd: list[str], timeout: int) -> dict:
    """Runs cmd, returns the JSON object on its last stdout line, or raises RunError saying why not."""
    p = spawn(cmd, timeout)
    if p.returncode != 0:
        text = (p.stderr.strip() or p.stdout.strip())
        raise RunError(text or f"exit {p.returncode} with no output")
    return last_json(p, cmd)


def compress_json(cmd: list[str]) -> tuple[dict, dict]:
    """Runs a `whittle compress ... --json` command: its report, and the figures every bench keeps of
    it (the command, seconds, wall time, MACs and params before/after and the fraction kept)."""
    t0 = time.monotonic()
    rep = run_json(cmd, COMPRESS_TIMEOUT_S)
    wall = time.monotonic() - t0
    return rep, {"command": cmd, "seconds": rep.get("seconds"), "wall_s": round(wall, 2),
                 "macs": list(rep["macs"]), "params": list(rep["params"]),
                 "macs_kept": kept(rep["macs"]), "params_kept": kept(rep["params"])}


def on_cpu_provider(report: dict) -> str | None:
    """Why an ort report did not run on ONNX Runtime's CPU provider, or None when it did."""
    prov = report.get("provider") or {}
    if prov.get("actual") != "CPUExecutionProvider" or prov.get("fallback"):
        return f"ran on {prov.get('actual')!r} (fallback {prov.get('fallback')}), not CPUExecutionProvider"
    return None


def bench_once(model: Path, runtime: str, iters: int, a, extra: tuple[str, ...] = ()) -> dict:
    """One `whittle bench --json` process; its stats."""
    cmd = [str(a.whittle), "bench", str(model), "--runtime", runtime, "--threads", str(a.threads),
           "--warmup", str(a.warmup), "--iters", str(iters), *extra, "--json"]
    rep = run_json(cmd, RUN_TIMEOUT_S)
    if runtime == "ort-cpu" and on_cpu_provider(rep):
        raise RunError(on_cpu_provider(rep))
    return rep["stats"]


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


def kept(pair: list) -> float | None:
    """after / before of a (before, after) pair, None when before is 0."""
    return pair[1] / pair[0] if pair[0] else None


# ---------------------------------------------------------------- interleaved rounds, paired ratios

def rotations(rounds: int, contestants: list[str]):
    """(round, order) for each round: every contestant once, the order rotating from round to round
    (two contestants: the one going first alternates), so a shared machine's noise falls on all alike."""
    for r in range(rounds):
        k = r % len(contestants)
        yield r, contestants[k:] + contestants[:k]


def spread(values: list[float]) -> list[float] | None:
    """[min, max] of a contestant's per-round figures, None when there are none."""
    return [min(values), max(values)] if values else None


def paired_ratio(pairs: list[tuple[float | None, float | None]]) -> float | None:
    """Median of the per-round ratios a / b (a and b measured back to back in the same round, under
    the same load); rounds missing either side are left out."""
    rs = [x / y for x, y in pairs if x is not None and y]
    return statistics.median(rs) if rs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def bench_pair(original: Path, pruned: Path, runtime: str, iters: int, a, log,
               extra: tuple[str, ...] = ()) -> dict:
    """Original and pruned, interleaved over a.rounds rounds; median of each one's p50s. `extra`:
    more `whittle bench` arguments (input shapes)."""
    p50 = {"original": [], "pruned": []}
    paths = {"original": original, "pruned": pruned}
    for _, order in rotations(a.rounds, ["original", "pruned"]):
        for which in order:
            st = bench_once(paths[which], runtime, iters, a, extra)
            p50[which].append(st["p50_ms"])
    med = {k: statistics.median(v) for k, v in p50.items()}
    speedup = med["original"] / med["pruned"] if med["pruned"] else None
    log(f"      {runtime:<7} p50 original {med['original']:9.3f} ms, pruned {med['pruned']:9.3f} ms, "
        f"speedup {speedup:.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in p50['original'])} | "
        f"{', '.join(f'{x:.2f}' for x in p50['pruned'])})")
    return {"median_p50_ms": med, "round_p50_ms": p50, "speedup": speedup, "iters": iters}


# ---------------------------------------------------------------- one compressed row

def compress_failed(row: dict, e: Exception, log) -> dict:
    row["compress_error"] = first_line(str(e))
    row["compress_error_full"] = str(e)[-4000:]
    log(f"    compress FAILED: {row['compress_error']}")
    return row


def verify_failed(row: dict, e: Exception, log) -> None:
    row["verify_error"] = str(e)[-4000:]
    row["ok"] = False
    log(f"    verify FAILED: {first_line(str(e))}")


def latency(row: dict, original: Path, candidate: Path, iters, a, log, extra: tuple[str, ...] = ()) -> None:
    """row["latency"][runtime] for ort-cpu and tract (bench_pair; iters: a count, or runtime -> count);
    a failed runtime goes to row["bench_errors"] and marks the row not ok."""
    row["latency"] = {}
    for runtime in RUNTIMES:
        try:
            n = iters(runtime) if callable(iters) else iters
            row["latency"][runtime] = bench_pair(original, candidate, runtime, n, a, log, extra)
        except (RunError, KeyError, TypeError) as e:
            row.setdefault("bench_errors", {})[runtime] = str(e)[-4000:]
            row["ok"] = False
            log(f"      {runtime} bench FAILED: {first_line(str(e))}")


# ---------------------------------------------------------------- verdicts

def outcome(x: float | None, y: float | None, within: float = 0.0) -> str:
    """x against y, higher is better: "beats", "ties" (|x - y| <= within: inside the spread of what
    was measured; 0 for deterministic figures), "loses", or "unmeasured"."""
    if x is None or y is None:
        return "unmeasured"
    if abs(x - y) <= within:
        return "ties"
    return "beats" if x > y else "loses"


def per_budget(rows: list[dict], flag: str, key: str, names: tuple[str, str]) -> list[dict]:
    """Per MAC budget of rows: the row with flag on against the one with it off, on verify's key."""
    per = []
    for keep in sorted({r["target_macs_kept"] for r in rows}, reverse=True):
        by = {r[flag]: r for r in rows if r["target_macs_kept"] == keep}
        ag = {k: (by[k].get("verify") or {}).get(key) if k in by else None for k in (True, False)}
        per.append({"removed_pct": round((1 - keep) * 100), names[0]: ag[True], names[1]: ag[False],
                    "outcome": outcome(ag[True], ag[False])})
    return per


def every_budget(per: list[dict]) -> bool:
    return bool(per) and all(p["outcome"] == "beats" for p in per)


def budget_detail(per: list[dict], names: tuple[str, str], spec: str) -> str:
    """`10%: 0.912 vs 0.842; 25%: ... (LOSES)`: each budget's figures, the outcome where not a win."""
    return "; ".join(f"{p['removed_pct']}%: {fmt(p[names[0]], spec)} vs {fmt(p[names[1]], spec)}"
                     + ("" if p["outcome"] == "beats" else f" ({p['outcome'].upper()})") for p in per)


def verdict_line(name: str, claim: str, v: dict, names: tuple[str, str], spec: str, figure: str, pair: str) -> str:
    """`NAME: CLAIM at every budget (10%, 25%) of this run: YES [FIGURE with the original, PAIR: details]`."""
    per = v["per_budget"]
    budgets = ", ".join(f"{p['removed_pct']}%" for p in per)
    return (f"{name}: {claim} at every budget ({budgets}) of this run: {'YES' if v['beats_at_every_budget'] else 'NO'} "
            f"[{figure} with the original, {pair}: {budget_detail(per, names, spec)}]")


# ---------------------------------------------------------------- tables

def fmt(x, spec: str, suffix: str = "", missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec) + suffix


def layout(rows: list[list[str]], left: int = 2, align: str | None = None) -> list[str]:
    """Aligned lines of a table whose first row is the header, a dashed line under it: the first
    `left` columns left-aligned, the others right (or per column by align, "l" / "r"). A shorter row
    (labels and a message) keeps its labels in their columns and runs on with the message."""
    n = len(rows[0])
    align = align or "l" * left + "r" * (n - left)
    widths = [max(len(r[i]) for r in rows if len(r) == n) for i in range(n)]
    lines = []
    for j, r in enumerate(rows):
        if len(r) == n:
            cells = [c.ljust(w) if al == "l" else c.rjust(w) for c, w, al in zip(r, widths, align)]
            if align[-1] == "l":
                cells[-1] = r[-1]
            lines.append("  ".join(cells))
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def latency_cells(lat: dict, ort: str = ".2f", tract: str = ".1f") -> list[str]:
    """ort orig p50, ort compressed p50, ort speedup, and the same for tract (bench_pair's figures)."""
    cells = []
    for runtime, spec in (("ort-cpu", ort), ("tract", tract)):
        t = lat.get(runtime) or {}
        m = t.get("median_p50_ms") or {}
        cells += [fmt(m.get("original"), spec, " ms"), fmt(m.get("pruned"), spec, " ms"),
                  fmt(t.get("speedup"), ".2f", "x")]
    return cells


def row_notes(tag: str, r: dict) -> list[str]:
    """Lines under a table for a row whose verify or bench failed."""
    notes = [f"{tag}: verify failed: {first_line(r['verify_error'])}"] if "verify_error" in r else []
    return notes + [f"{tag}: {rt} bench failed: {first_line(why)}" for rt, why in (r.get("bench_errors") or {}).items()]


def rows_table(head: list[str], rows: list[dict], labels, cells, tag=None, first: tuple = ()) -> str:
    """A table of compressed rows: each row's labels (labels(row): the left columns), then cells(row),
    or "compress failed: ..." for a row whose compress failed; under the table, a note for each row
    whose verify or bench failed, named by tag(row) (default: its labels). first: rows to put
    before them (the original)."""
    table, notes = [head, *first], []
    for r in rows:
        lab = labels(r)
        if "compress_error" in r:
            table.append(lab + ["compress failed: " + r["compress_error"]])
            continue
        table.append(lab + cells(r))
        notes += row_notes("  " + (tag(r) if tag else " ".join(lab)), r)
    return "\n".join(layout(table) + notes)


def took_line(result: dict) -> str:
    return (f"took {result['elapsed_s']:.0f} s; load average at the end: "
            f"{' '.join(f'{x:.2f}' for x in result['loadavg_end'])}")


# ---------------------------------------------------------------- work folders, data

@contextlib.contextmanager
def workdir(keep: Path | None, prefix: str):
    """Where a bench writes: --keep's folder (kept), or a temporary one (removed afterwards)."""
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as d:
            yield Path(d)


def own_copy(a: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """Copies a.whittle into work (so a rebuild during the run cannot change what is measured) and
    points a.whittle at the copy; returns the path it came from and the copy's `--version`."""
    binary = work / "whittle"
    shutil.copy2(a.whittle, binary)
    origin, a.whittle = a.whittle, binary
    return origin, subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.strip()


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


def select(specs: list[dict], models: str | None, sort: bool = False) -> tuple[list[dict], str | None]:
    """The specs --models names (all without it), or an error naming the unknown ones (sorted, or
    in the order given)."""
    if not models:
        return specs, None
    want = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in want if m not in {s["name"] for s in specs}]
    if sort:
        unknown = sorted(set(unknown))
    if unknown:
        return specs, f"unknown model(s): {', '.join(unknown)}"
    return [s for s in specs if s["name"] in want], None


def check(a: argparse.Namespace, specs: list[dict]) -> str | None:
    """Why the bench cannot run (no binary, no assets, a missing model or data folder), or None."""
    if not (a.whittle.is_file() and os.access(a.whittle, os.X_OK)):
        return f"no whittle binary at {a.whittle} (`just build`, or pass --whittle)"
    if not ASSETS.is_dir():
        return f"the shared assets are missing: expected them at {ASSETS.resolve()} (../shared/assets beside the repo)"
    for s in specs:
        for p in (s["path"], s["calib"], s["eval"], s["split"]):
            if p is not None and not p.exists():
                return f"{s['name']}: missing {p.resolve()}"
    return None


def counts_error(a: argparse.Namespace, *more: str) -> str | None:
    """The message for a count flag out of range (--warmup >= 0, the others >= 1), or None."""
    names = ["rounds", "iters", "threads", "calib_items", *more]
    if a.warmup < 0 or any(getattr(a, n) < 1 for n in names):
        return ", ".join(f"--{n.replace('_', '-')}" for n in names) + " must be >= 1, --warmup >= 0"
    return None


# ---------------------------------------------------------------- the command line

def settings(a: argparse.Namespace, work: Path, **first) -> dict:
    """A result's "settings": first's items, then the measuring flags, the binary and the kept folder."""
    return {**first, "calib_items": a.calib_items, "threads": a.threads, "rounds": a.rounds, "warmup": a.warmup,
            "iters": a.iters, "quick": a.quick, "whittle": str(a.whittle), "work": str(work) if a.keep else None}


def budget_list(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}")
    if not vals:
        raise argparse.ArgumentTypeError("no budgets")
    return vals


def add_measure_args(ap: argparse.ArgumentParser, rounds: str, iters: str,
                     warmup: str = "untimed runs per bench run (default 5; --quick 2)",
                     calib_items: int = CALIB_ITEMS) -> None:
    """--threads, --rounds, --warmup, --iters, --calib-items (the help of the middle three given)."""
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads everywhere (default 2)")
    ap.add_argument("--rounds", type=int, help=rounds)
    ap.add_argument("--warmup", type=int, help=warmup)
    ap.add_argument("--iters", type=int, help=iters)
    ap.add_argument("--calib-items", type=int, default=calib_items, help=f"default {calib_items}")


def add_budget_args(ap: argparse.ArgumentParser, what: str, full: list[float], quick: list[float],
                    specs: list[dict] | None = None) -> None:
    """--budgets (what they are, their defaults full and quick), and --models where specs are given."""
    ap.add_argument("--budgets", type=budget_list, help=f"comma-separated {what} (default "
                                                         f"{','.join(map(str, full))}; --quick {','.join(map(str, quick))})")
    if specs is not None:
        ap.add_argument("--models", help=f"comma-separated subset of: {', '.join(s['name'] for s in specs)}")


def add_output_args(ap: argparse.ArgumentParser, keep: str, quick: str, json_help: str) -> None:
    """--keep, --quick, --json, --whittle."""
    ap.add_argument("--keep", type=Path, help=keep)
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--json", action="store_true", help=json_help)
    ap.add_argument("--whittle", type=Path, default=default_whittle(),
                    help="the whittle binary (default $CARGO_TARGET_DIR/release/whittle)")


def settle(a: argparse.Namespace, quick: dict, full: dict) -> None:
    """Defaults of the flags left unset, quick's with --quick."""
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)


def logger(json_out: bool):
    """Progress goes to stderr with --json (stdout is the one JSON object), to stdout otherwise."""
    def log(msg: str) -> None:
        print(msg, file=sys.stderr if json_out else sys.stdout, flush=True)
    return log


def cli_main(prog: str, description: str, add_args, settle, run, render, argv: list[str] | None = None) -> int:
    """The command line of a bench: parse, run, print the rendered tables (or --json's one object),
    and return the exit status (an error the bench names goes to stderr as `prog: why`)."""
    ap = argparse.ArgumentParser(description=description)
    add_args(ap)
    a = ap.parse_args(argv)
    settle(a)
    result, status = run(a, logger(a.json))
    if "error" in result:
        print(f"{prog}: {result['error']}", file=sys.stderr)
        return status
    print(json.dumps(result) if a.json else "\n" + render(result))
    return status
