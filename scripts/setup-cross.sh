#!/usr/bin/env bash
# Install what the emulated aarch64 target (targets/qemu-aarch64.toml) needs, idempotently; each
# step prints one line, and a failure says which step failed and why:
#  1. the Rust target aarch64-unknown-linux-gnu (rustup);
#  2. the cross C toolchain gcc-aarch64-linux-gnu (the linker, .cargo/config.toml) with the aarch64
#     C/C++ runtime in /usr/aarch64-linux-gnu (the sysroot qemu runs the runner in);
#  3. qemu-user >= 10 from bookworm-backports (bookworm's 7.2 crashes in ONNX Runtime: it shows the
#     guest the host's x86 /proc/cpuinfo);
#  4. ONNX Runtime's aarch64 library (the same pinned version as scripts/setup.sh, from the PyPI
#     manylinux_2_28_aarch64 wheel) into $WHITTLE_CACHE/ort-aarch64/<version>/.
# Cache: $WHITTLE_CACHE (default ~/.cache/whittle). apt needs root (or sudo).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${WHITTLE_CACHE:-$HOME/.cache/whittle}"
TRIPLE=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
QEMU_MIN_MAJOR=10
# The x86 library's version (scripts/setup.sh pins it): the runner speaks the same ORT API.
ORT_VERSION="$(sed -n 's/^ORT_VERSION=\([0-9.]*\)$/\1/p' "$here/scripts/setup.sh")"

name=setup-cross
source "$here/scripts/common.sh"

[ -n "$ORT_VERSION" ] || { step="read ORT version"; fail "no ORT_VERSION=... line in scripts/setup.sh"; }

trap 'echo "setup-cross: FAILED at step '"'"'$step'"'"' (exit $?, see above)" >&2' ERR

# 1. Rust target
step="rust target $TRIPLE"
if rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE"; then
  echo "setup-cross: rust target $TRIPLE already installed" >&2
else
  quiet rustup target add "$TRIPLE" || fail "rustup target add $TRIPLE failed"
  echo "setup-cross: rust target $TRIPLE installed" >&2
fi

# 2. cross gcc and the aarch64 C/C++ runtime (ONNX Runtime needs libstdc++)
step="cross gcc"
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
[ -e "$SYSROOT/lib/libstdc++.so.6" ] || missing+=(libstdc++6-arm64-cross)
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-cross: $(aarch64-linux-gnu-gcc --version | head -n1), sysroot $SYSROOT" >&2
else
  apt_install "${missing[@]}"
  command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || fail "aarch64-linux-gnu-gcc still missing after install"
  [ -e "$SYSROOT/lib/ld-linux-aarch64.so.1" ] || fail "$SYSROOT/lib/ld-linux-aarch64.so.1 missing after install"
  echo "setup-cross: installed ${missing[*]} ($(aarch64-linux-gnu-gcc --version | head -n1))" >&2
fi

# 3. qemu-user >= 10
step="qemu-user"
qemu_major() {
  command -v qemu-aarch64 >/dev/null 2>&1 || { echo 0; return; }
  qemu-aarch64 --version | sed -n '1s/.*version \([0-9]*\).*/\1/p'
}
if [ "$(qemu_major)" -ge "$QEMU_MIN_MAJOR" ]; then
  echo "setup-cross: $(qemu-aarch64 --version | head -n1)" >&2
else
  have="$(command -v qemu-aarch64 >/dev/null 2>&1 && qemu-aarch64 --version | head -n1 || echo none)"
  src=/etc/apt/sources.list.d/bookworm-backports.sources
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    [ -f /etc/debian_version ] && grep -qs bookworm /etc/os-release ||
      fail "qemu-user >= $QEMU_MIN_MAJOR is needed (found: $have) and this is not Debian bookworm; install it yourself"
    printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" \
      "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" |
      $SUDO tee "$src" >/dev/null || fail "cannot write $src"
    echo "setup-cross: added apt source $src" >&2
    apt_updated=""
  fi
  apt_update
  quiet $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -t bookworm-backports qemu-user >&2 ||
    fail "apt-get install -t bookworm-backports qemu-user failed (found: $have)"
  hash -r
  [ "$(qemu_major)" -ge "$QEMU_MIN_MAJOR" ] ||
    fail "qemu-aarch64 is still older than $QEMU_MIN_MAJOR after install: $(qemu-aarch64 --version 2>&1 | head -n1)"
  echo "setup-cross: installed $(qemu-aarch64 --version | head -n1) (was: $have)" >&2
fi

# 4. ONNX Runtime for aarch64
step="onnxruntime aarch64"
lib="$CACHE/ort-aarch64/$ORT_VERSION/libonnxruntime.so.$ORT_VERSION"
if [ -f "$lib" ]; then
  echo "setup-cross: ONNX Runtime $ORT_VERSION (aarch64) at $lib" >&2
else
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version 3.11 "onnxruntime==$ORT_VERSION" -d "$tmp" >"$log" 2>&1 ||
    { tail -n 15 "$log" >&2; fail "pip download onnxruntime==$ORT_VERSION (manylinux_2_28_aarch64) failed"; }
  mkdir -p "$(dirname "$lib")"
  python3 "$here/scripts/unpack_ort.py" "$tmp" "$lib" || fail "cannot unpack libonnxruntime.so from the wheel"
  rm -rf "$tmp"
  echo "setup-cross: ONNX Runtime $ORT_VERSION (aarch64) installed at $lib" >&2
fi
step="done"
