#!/usr/bin/env bash
# Create (idempotently) the bench venv at ${WHITTLE_CACHE:-~/.cache/whittle}/bench-venv with the
# pinned onnxruntime and numpy wheels from PyPI, and check that its onnxruntime is 1.31.1, the
# version of the library whittle loads.
set -euo pipefail
ORT_VERSION=1.31.1
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/venv.sh"
make_venv setup-bench bench-venv "$here/requirements.txt"
have="$("$py" -c 'import onnxruntime; print(onnxruntime.__version__)')" || {
  echo "setup-bench: onnxruntime does not import in $venv (remove it and rerun)" >&2
  exit 2
}
if [ "$have" != "$ORT_VERSION" ]; then
  echo "setup-bench: $venv has onnxruntime $have, want $ORT_VERSION (remove it and rerun)" >&2
  exit 2
fi
echo "setup-bench: onnxruntime $have in $venv" >&2
