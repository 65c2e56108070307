#!/usr/bin/env bash
# Install what tests/deploy_serial.rs needs, idempotently: socat, which the test uses to make a
# pseudo-terminal pair (`socat -d -d pty,raw,echo=0,link=A pty,raw,echo=0,link=B`) standing in for
# a serial line. This script starts nothing. One line per step; a failure says why. apt needs root
# (or sudo).
set -euo pipefail

fail() {
  echo "setup-serial: FAILED: $*" >&2
  exit 2
}

if command -v socat >/dev/null 2>&1; then
  echo "setup-serial: $(socat -V 2>/dev/null | grep -m1 'socat version' || echo socat) at $(command -v socat)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
command -v apt-get >/dev/null 2>&1 || fail "socat is missing and there is no apt-get; install socat yourself"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
quiet() {
  "$@" >"$log" 2>&1 && return 0
  tail -n 15 "$log" >&2
  return 1
}
quiet $SUDO apt-get update || fail "apt-get update failed"
quiet $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y socat || fail "apt-get install socat failed"
command -v socat >/dev/null 2>&1 || fail "socat still missing after install"
echo "setup-serial: installed $(socat -V 2>/dev/null | grep -m1 'socat version')" >&2
