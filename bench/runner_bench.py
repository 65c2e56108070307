#!/usr/bin/env python3
"""The aarch64 board runner: its stripped size against the 40 MB limit, and the time of a cross build.

What is measured (issue 7: "The aarch64 runner binary is at most 40 MB stripped; its size and the
time of a cross build are reported by `just bench`"):

  cross build  (not with --quick) `cargo clean --release --target aarch64-unknown-linux-gnu -p
               whittle-runner -p whittle-deploy -p whittle-runtime -p whittle-core`, then the wall
               time of `cargo build
               --release -p whittle-runner --no-default-features --target aarch64-unknown-linux-gnu`
               (what `just build-runner` runs: the ONNX Runtime-only runner, tract left out). The
               timing covers whittle's own four crates rebuilt from scratch for aarch64 (and their
               build scripts' outputs); the third-party dependencies are whatever the target
               directory already holds (cached after the first build; when they are not, the time
               includes building them, and the report lists every crate compiled). A build that
               waited for another cargo's lock on the target directory is flagged.
  size         the runner at <CARGO_TARGET_DIR>/aarch64-unknown-linux-gnu/release/whittle-runner, and
               a stripped copy of it (aarch64-linux-gnu-strip, else llvm-strip; the built file is never
               stripped in place), against 40 MB (40,000,000 bytes). With --quick the existing binary
               is measured (no build); when there is none, the report says so.

When the cross toolchain is absent (the rust target or the aarch64-linux-gnu-gcc linker;
`just setup-cross` installs them) nothing is built and the report says why. Exit status: 0, or 1
when the build or the strip failed. It asserts nothing about the size: it reports it.

    python3 bench/runner_bench.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, first_line, logger
TRIPLE = "aarch64-unknown-linux-gnu"
LINKER = "aarch64-linux-gnu-gcc"  # .cargo/config.toml
STRIPS = ["aarch64-linux-gnu-strip", "llvm-strip"]
LIMIT_BYTES = 40_000_000
CRATES = ["whittle-runner", "whittle-deploy", "whittle-runtime", "whittle-core"]
BUILD_CMD = ["cargo", "build", "--release", "-p", "whittle-runner", "--no-default-features", "--target", TRIPLE]
CLEAN_CMD = ["cargo", "clean", "--release", "--target", TRIPLE] + [x for c in CRATES for x in ("-p", c)]
BUILD_TIMEOUT_S = 3600


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")


def error_line(text: str) -> str:
    """The first `error` line of cargo's output, else its last line."""
    for line in text.splitlines():
        if line.strip().startswith("error"):
            return line.strip()
    lines = [x for x in text.splitlines() if x.strip()]
    return lines[-1].strip() if lines else "no output"


def toolchain_missing() -> str | None:
    """Why the cross build cannot run here, or None."""
    if shutil.which("cargo") is None:
        return "cargo is not on PATH"
    if shutil.which(LINKER) is None:
        return f"the cross linker {LINKER} is not installed (`just setup-cross` installs it)"
    if shutil.which("rustup") is not None:
        p = subprocess.run(["rustup", "target", "list", "--installed"], capture_output=True, text=True)
        if p.returncode == 0 and TRIPLE not in p.stdout.split():
            return f"the rust target {TRIPLE} is not installed (`just setup-cross` installs it)"
    return None


def timed_build(log) -> dict:
    """Cleans whittle's crates for the triple, then times the runner's build."""
    env = dict(os.environ, CARGO_TERM_COLOR="never")
    p = subprocess.run(CLEAN_CMD, cwd=REPO, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        return {"ok": False, "error": f"{' '.join(CLEAN_CMD)}: {error_line(p.stderr or p.stdout)}"}
    cleaned = first_line(p.stderr.strip().splitlines()[-1]) if p.stderr.strip() else ""
    log(f"  {' '.join(CLEAN_CMD)}: {cleaned or 'done'}")
    log(f"  timing {' '.join(BUILD_CMD)} ...")
    t0 = time.monotonic()
    try:
        p = subprocess.run(BUILD_CMD, cwd=REPO, capture_output=True, text=True, env=env,
                           stdin=subprocess.DEVNULL, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {BUILD_TIMEOUT_S} s: {' '.join(BUILD_CMD)}"}
    wall = time.monotonic() - t0
    load = [round(x, 2) for x in os.getloadavg()]
    out = p.stderr + p.stdout
    compiled = re.findall(r"^\s*Compiling (\S+) v", out, flags=re.M)
    res = {"ok": p.returncode == 0, "command": " ".join(BUILD_CMD), "clean_command": " ".join(CLEAN_CMD),
           "cleaned": cleaned, "wall_s": round(wall, 1), "compiled": compiled, "loadavg_after": load,
           "cores": os.cpu_count(),
           "waited_for_lock": "Blocking waiting for file lock" in out,
           "covers": ("whittle's own crates (" + ", ".join(CRATES) + ") rebuilt for " + TRIPLE +
                      "; dependencies taken from the target directory's cache" +
                      ("" if set(compiled) <= set(CRATES) else
                       f" where present ({len(set(compiled) - set(CRATES))} other crates were compiled too)"))}
    if p.returncode != 0:
        res["error"] = f"exit {p.returncode}: {error_line(out)}"
    return res


def strip_size(binary: Path) -> dict:
    tool = next((t for t in STRIPS if shutil.which(t)), None)
    size = binary.stat().st_size
    res = {"path": str(binary), "bytes": size, "modified": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                         time.gmtime(binary.stat().st_mtime))}
    if tool is None:
        res["strip_error"] = f"no strip tool ({' or '.join(STRIPS)}; `just setup-cross` installs the first)"
        return res
    with tempfile.TemporaryDirectory(prefix="whittle-runner-strip-") as d:
        out = Path(d) / "whittle-runner.stripped"
        p = subprocess.run([tool, "-o", str(out), str(binary)], capture_output=True, text=True)
        if p.returncode != 0:
            res["strip_error"] = f"{tool} failed: {first_line(p.stderr or p.stdout)}"
            return res
        res["strip_tool"] = tool
        res["stripped_bytes"] = out.stat().st_size
    res["limit_bytes"] = LIMIT_BYTES
    res["within_limit"] = res["stripped_bytes"] <= LIMIT_BYTES
    return res


def run(a: argparse.Namespace, log) -> tuple[dict, int]:
    binary = target_dir() / TRIPLE / "release" / "whittle-runner"
    result: dict = {"triple": TRIPLE, "binary": str(binary), "quick": a.quick, "features": "--no-default-features "
                    "(ONNX Runtime only, as `just build-runner`)"}
    why = toolchain_missing()
    if why:
        result["build"] = {"skipped": why}
    elif a.quick:
        result["build"] = {"skipped": "--quick: no timed cross build"}
    else:
        log(f"runner bench: cross build of the {TRIPLE} runner")
        result["build"] = timed_build(log)
        if not result["build"]["ok"]:
            log(f"  build FAILED: {result['build']['error']}")
            return result, 1
        b = result["build"]
        log(f"  built in {b['wall_s']:.1f} s ({len(b['compiled'])} crates compiled"
            f"{'; waited for another cargo lock' if b['waited_for_lock'] else ''})")
    if not binary.is_file():
        result["size"] = {"skipped": f"no runner at {binary} (`just build-runner {TRIPLE}` builds it)"}
        return result, 0
    result["size"] = s = strip_size(binary)
    if "strip_error" in s:
        return result, 1
    return result, 0


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def render(result: dict) -> str:
    out = [f"board runner ({result['triple']}, {result['features']}):"]
    b = result.get("build") or {}
    if "skipped" in b:
        out.append(f"  cross build: not timed: {b['skipped']}")
    elif not b.get("ok"):
        out.append(f"  cross build: FAILED: {b.get('error')}")
    else:
        out.append(f"  cross build: {b['wall_s']:.1f} s wall for `{b['command']}` after `{b['clean_command']}`; "
                   f"covers {b['covers']}; compiled: {', '.join(b['compiled']) or 'nothing'}; {b['cores']} cores, "
                   f"load average after {' '.join(f'{x:.2f}' for x in b['loadavg_after'])} (1/5/15 min)"
                   + ("; NOTE: it waited for another cargo's lock on the target directory, so the time "
                      "includes that wait" if b["waited_for_lock"] else ""))
    s = result.get("size") or {}
    if "skipped" in s:
        out.append(f"  size: not measured: {s['skipped']}")
    elif "strip_error" in s:
        out.append(f"  size: {mb(s['bytes'])} unstripped ({s['path']}); stripped size not measured: {s['strip_error']}")
    elif s:
        out.append(f"  size: {mb(s['stripped_bytes'])} stripped ({s['stripped_bytes']:,} bytes, {s['strip_tool']} on a "
                   f"copy; {mb(s['bytes'])} as built, {s['modified']}); limit 40 MB: "
                   f"{'within' if s['within_limit'] else 'OVER'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The aarch64 runner's stripped size (limit 40 MB) and the time of "
                                             "its cross build (reports; asserts nothing)")
    ap.add_argument("--quick", action="store_true", help="no timed cross build: the size of the existing binary")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the lines")
    a = ap.parse_args(argv)
    result, status = run(a, logger(a.json))
    print(json.dumps(result) if a.json else render(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
