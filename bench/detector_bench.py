#!/usr/bin/env python3
"""Compress time of a 640x640 text detector (issue 17, point 5).

The detector is the fixture of `whittle_test_support::fixtures::text_detector`: EfficientNet-Lite0
with its height and width declared as -1, a Resize + Concat neck and a probability-map head
(3.18 G MACs at 640x640). The script writes it with the `fixture` binary, then runs
`whittle compress DET --target macs=0.7` on the shared ImageNet photos resized to 640x640 (the
binding of H and W comes from that data), with the defaults otherwise (sensitivity, refit, the
speed check), `--rounds` times. It prints the wall time of each run (measured here, around the
process), the MACs counted, the IoU of the pruned map on the held-apart photos and the speed the
summary measured, and writes reports/detector/<time>/results.json. It asserts nothing.

Standard library only: `python3 bench/detector_bench.py --whittle target/release/whittle`
(`just bench-detector`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO.parent / "shared" / "assets"

PROFILE = """[preprocess]
resize = [640, 640]
mean = [127.5]
std = [127.5]
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--whittle", default=str(REPO / "target/release/whittle"))
    ap.add_argument("--fixture", default=None, help="the fixture binary (default: beside whittle)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--target", default="macs=0.7")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    a = ap.parse_args()
    whittle = Path(a.whittle)
    fixture = Path(a.fixture) if a.fixture else whittle.parent / "fixture"
    src = ASSETS / "models" / "efficientnet_lite0_224.onnx"
    photos = ASSETS / "data" / "imagenet"
    for p in (whittle, fixture, src, photos):
        if not p.exists():
            print(f"error: {p} not found", file=sys.stderr)
            return 1
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = REPO / "reports" / "detector" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        det = Path(tmp) / "text_detector_640.onnx"
        subprocess.run([str(fixture), "text-detector", str(src), str(det)], check=True)
        profile = Path(tmp) / "det640.toml"
        profile.write_text(PROFILE)
        for r in range(a.rounds):
            cmd = [str(whittle), "compress", str(det), "-o", str(Path(tmp) / "pruned.onnx"),
                   "--calib", str(photos), "--profile", str(profile), "--target", a.target, "--json"]
            t0 = time.monotonic()
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.monotonic() - t0
            if p.returncode != 0:
                print(p.stderr, file=sys.stderr)
                return 1
            s = json.loads(p.stdout)
            o = s["fidelity"]["outputs"][0]
            row = {
                "round": r + 1,
                "wall_s": round(wall, 1),
                "costed_at": s["costed_at"],
                "macs": s["macs"],
                "macs_kept": s["macs_kept"],
                "task": o["task"],
                "iou": o["metric"],
                "held_apart_items": s["fidelity"]["items"],
                "speedup": (s.get("speed") or {}).get("speedup"),
                "large_input": s.get("large_input"),
                "command": " ".join(cmd[1:]),
            }
            rows.append(row)
            if not a.json:
                print(f"round {r + 1}: {wall:.1f} s, {s['costed_at']}, MACs {s['macs'][0] / 1e9:.2f} G -> "
                      f"{s['macs'][1] / 1e9:.2f} G ({s['macs_kept']:.1%} kept), IoU {o['metric']:.2%} on "
                      f"{s['fidelity']['items']} held-apart photos, speed {row['speedup']:.2f}x (ort-cpu)")
    result = {"machine": {"cpus": os.cpu_count()}, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    if a.json:
        print(json.dumps(result))
    else:
        print(f"wrote {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
