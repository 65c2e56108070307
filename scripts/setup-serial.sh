#!/usr/bin/env bash
# Install what tests/deploy_serial.rs needs, idempotently: socat, which the test uses to make a
# pseudo-terminal pair (`socat -d -d pty,raw,echo=0,link=A pty,raw,echo=0,link=B`) standing in for
# a serial line. This script starts nothing. One line per step; a failure says why. apt needs root
# (or sudo).
set -euo pipefail

name=setup-serial
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if command -v socat >/dev/null 2>&1; then
  echo "setup-serial: $(socat -V 2>/dev/null | grep -m1 'socat version' || echo socat) at $(command -v socat)" >&2
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || fail "socat is missing and there is no apt-get; install socat yourself"
apt_install socat
command -v socat >/dev/null 2>&1 || fail "socat still missing after install"
echo "setup-serial: installed $(socat -V 2>/dev/null | grep -m1 'socat version')" >&2
