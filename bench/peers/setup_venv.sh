#!/usr/bin/env bash
# Create (idempotently) the peers venv at ${WHITTLE_CACHE:-~/.cache/whittle}/peers-venv with the
# pinned wheels of bench/peers/requirements.txt (onnxsim, onnx, onnxruntime, numpy, Pillow) from
# PyPI, and check that every pinned package imports at its pinned version.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
. "$here/../venv.sh"
make_venv setup-peers peers-venv "$req"
"$py" - "$req" <<'PY' || { echo "setup-peers: $venv does not match $req (remove it and rerun)" >&2; exit 2; }
import importlib, importlib.metadata, sys
wrong = []
have = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        got = importlib.metadata.version(name)
        importlib.import_module({"pillow": "PIL"}.get(name, name))
    except Exception as e:
        wrong.append(f"{name}: {type(e).__name__}: {e}")
        continue
    (have if got == want else wrong).append(f"{name} {got}" + ("" if got == want else f", want {want}"))
for w in wrong:
    print(f"setup-peers: {w}", file=sys.stderr)
print(f"setup-peers: {', '.join(have)}", file=sys.stderr)
sys.exit(1 if wrong else 0)
PY
echo "setup-peers: ready: $venv" >&2
