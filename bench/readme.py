#!/usr/bin/env python3
"""Rewrite README.md's benchmark tables from a bench run's --json result: no copying by hand.

    python3 bench/readme.py RESULT.json [--readme README.md] [--only latency,prune] [--machine TEXT]

RESULT.json is what `just bench --json` (bench/bench.py --json, with or without --quick) printed,
or a `just bench-peers` report's results.json. Each table of the README stands between two marker
comments, and everything between them is replaced:

    <!-- bench:NAME -->
    ... (written by this script) ...
    <!-- /bench:NAME -->

NAME is one of: latency (whittle vs ONNX Runtime's Python API and tract), prune, lowrank,
transformer, merge, runner (bench.py's sections) and peers (the onnxsim comparison). A block holds
one line saying when, how (`just bench` or `--quick`) and on what machine it was measured, then the
section's tables exactly as the bench prints them. Paths are written as they read from the repo
(../shared/assets/..., ~/.cache/...; the bench's temporary folder as <work>), never as the
machine's absolute paths. A section the result does not measure (skipped, failed, a --quick runner
with no cross build, MiniLM not fetched) leaves its block as it is, so a later run fills it; the
script says which blocks it rewrote and which it left. `just bench --readme` runs it after the bench.

Exit status: 0, 1 when a marker is missing or unbalanced or a machine path would be written, 2
when a file cannot be read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

SECTIONS = ["latency", "prune", "lowrank", "transformer", "merge", "runner", "peers"]


def is_quick(result: dict) -> bool:
    """Whether the run was `--quick` (bench.py's settings say so; older results: a sub-bench's)."""
    s = result.get("settings") or {}
    if "quick" in s:
        return bool(s["quick"])
    return any(bool(((result.get(n) or {}).get("settings") or {}).get("quick")) for n in SECTIONS)


def measured(name: str, result: dict) -> str | None:
    """Why the result has nothing for section name, or None when it has."""
    if name == "latency":
        return None if result.get("results") else "no latency results"
    if name == "peers":
        return None if any(m.get("verdicts") for m in result.get("models") or []) else "no row measured"
    r = result.get(name)
    if r is None:
        return "not run (--skip)"
    if "error" in r:
        return f"failed: {r['error']}"
    if "skipped" in r:
        return f"not measured: {r['skipped']}"
    if name == "runner":
        build, size = r.get("build") or {}, r.get("size") or {}
        if "wall_s" not in build and "stripped_bytes" not in size:
            return "no cross build timed and no stripped size (" + "; ".join(
                x["skipped"] for x in (build, size) if "skipped" in x) + ")"
    return None


def render(name: str, result: dict) -> str:
    """The section's tables as the bench prints them."""
    import bench  # bench.py imports this module: import it here, not at the top

    if name == "latency":
        return (bench.render(result) + f"\nload average at the end: "
                f"{' '.join(f'{x:.2f}' for x in result['loadavg_end'])}; took {result['elapsed_s']:.0f} s")
    if name == "peers":
        return peers_summary(result)
    module = bench.SUBS[name][0]
    return module.render(result[name])


def peers_summary(result: dict) -> str:
    """Per model and budget: whittle's top-1 agreement, the best onnxsim row's, the margin."""
    import benchlib

    rows = [["model", "MACs removed", "whittle", "best onnxsim row (of 16)", "onnxsim", "whittle ahead by"]]
    for m in result["models"]:
        for v in m["verdicts"]:
            rows.append([m["model"], f"{v['target_removed']:.0%}", benchlib.fmt(v["whittle_agreement"], ".3f"),
                         v["best_peer"] or "none measured", benchlib.fmt(v["best_peer_agreement"], ".3f"),
                         benchlib.fmt(v.get("margin_points"), "+.1f", " points")])
    return "\n".join(benchlib.layout(rows, left=4))


def portable(text: str, roots: list[Path]) -> str:
    """text with the machine's absolute paths made relative: the shared assets as ../shared/assets,
    a checkout's files relative to it, the home folder as ~, the bench's temporary folder as <work>."""
    text = re.sub(r"(?<![\w.~])/[^\s()`'\",;]*?/shared/assets(?=/|\b)", "../shared/assets", text)
    for root in roots:
        text = re.sub(r"(?<![\w.~])" + re.escape(str(root).rstrip("/")) + r"/", "", text)
    tmp = re.escape(tempfile.gettempdir().rstrip("/"))
    text = re.sub(r"(?<![\w.~])" + tmp + r"/whittle-[\w-]*?-bench-[\w]+", "<work>", text)
    return re.sub(r"(?<![\w.~])" + re.escape(str(Path.home())) + r"(?=/)", "~", text)


MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|root|home|tmp|var|usr|opt|mnt|srv|Users)/\S+")


def machine_line(result: dict, machine: str | None) -> str:
    m = result.get("machine") or {}
    if machine is None:
        cpu = f" ({m['cpu']})" if m.get("cpu") else ""
        machine = f"a {m.get('cores', '?')}-core machine{cpu}" if m else "this machine"
    load = m.get("loadavg") or result.get("loadavg_start")
    if load:
        machine += f", load average {load[0]:.2f} at the start"
    return machine


def when(result: dict, source: Path | None) -> str:
    if result.get("date"):
        t = datetime.datetime.fromisoformat(result["date"])
        return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if source is not None:  # results from before the bench wrote its date: the file's time
        t = datetime.datetime.fromtimestamp(source.stat().st_mtime, datetime.timezone.utc)
        return t.strftime("%Y-%m-%d %H:%M UTC") + " (the result file's time)"
    return "at an unrecorded time"


def block(name: str, result: dict, source: Path | None, machine: str | None, note: str | None,
          roots: list[Path]) -> str:
    peers = name == "peers"
    how = ("`just bench-peers" if peers else "`just bench") + (" --quick`" if is_quick(result) else "`")
    head = (f"Measured {when(result, source)} by {how} on {machine_line(result, machine)}; written by "
            f"`bench/readme.py` from the run's {'results.json' if peers else '`--json`'}"
            f"{'' if peers else ' (the latency columns are noise on a shared machine)'}.")
    if note:
        head += " " + note
    return f"{head}\n\n```\n{portable(render(name, result), roots)}\n```"


def marker_spans(text: str, name: str) -> list[tuple[int, int]]:
    """(start, end) of the text between each pair of name's markers."""
    spans, pos = [], 0
    open_, close = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    while (i := text.find(open_, pos)) >= 0:
        j = text.find(close, i)
        if j < 0:
            raise ValueError(f"<!-- bench:{name} --> at offset {i} has no closing <!-- /bench:{name} -->")
        spans.append((i + len(open_), j))
        pos = j + len(close)
    return spans


def rewrite(readme: Path, result: dict, source: Path | None = None, only: list[str] | None = None,
            machine: str | None = None, note: str | None = None, log=None) -> list[str]:
    """Rewrites readme's blocks for the sections result measures; returns their names."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    text = readme.read_text()
    peers = "onnxsim" in (result.get("versions") or {})
    names = ["peers"] if peers else [n for n in SECTIONS if n != "peers"]
    roots = [REPO.resolve(), REPO.resolve().parent]
    done = []
    for name in names:
        if only and name not in only:
            continue
        why = measured(name, result)
        if why:
            log(f"readme: {name}: left as it is: {why}")
            continue
        spans = marker_spans(text, name)
        if not spans:
            log(f"readme: {name}: no <!-- bench:{name} --> marker in {readme}")
            continue
        body = "\n" + block(name, result, source, machine, note, roots) + "\n"
        leak = MACHINE_PATH.search(body)
        if leak:
            raise ValueError(f"{name}: a machine path would be written: {leak.group(0)}")
        for start, end in reversed(spans):
            text = text[:start] + body + text[end:]
        done.append(name)
    readme.write_text(text)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rewrite README.md's benchmark tables (between <!-- bench:NAME --> "
                                             "markers) from a bench --json result")
    ap.add_argument("result", type=Path, help="bench.py --json output, or a bench-peers results.json")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md", help="default: the repo's README.md")
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    ap.add_argument("--machine", help="what to call the machine (default: N-core machine (CPU model) "
                                      "from the result)")
    ap.add_argument("--date", help="when it was measured, for a result without its date (default: the "
                                   "result's date, else the file's time)")
    ap.add_argument("--note", help="one more sentence for each block's first line")
    a = ap.parse_args(argv)
    only = [x.strip() for x in a.only.split(",") if x.strip()] if a.only else None
    if only and set(only) - set(SECTIONS):
        ap.error(f"--only: a subset of {', '.join(SECTIONS)}")
    try:
        result = json.loads(a.result.read_text())
        a.readme.read_text()
        if a.date:
            result["date"] = datetime.datetime.fromisoformat(a.date).isoformat()
    except (OSError, ValueError) as e:
        print(f"readme: {e}", file=sys.stderr)
        return 2
    try:
        done = rewrite(a.readme, result, a.result, only, a.machine, a.note)
    except ValueError as e:
        print(f"readme: {e}", file=sys.stderr)
        return 1
    print(f"readme: rewrote {', '.join(done) if done else 'nothing'} in {a.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
