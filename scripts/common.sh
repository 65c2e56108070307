# Shared by the setup scripts, sourced after `name=...` is set: `fail` (one line naming the step,
# exit 2), `SUDO` (sudo when not root and it exists), `quiet CMD...` (the command's chatter to a
# log, its tail quoted when it fails), `apt_update` (once; clear `apt_updated` to run it again) and
# `apt_install PKG...`.
step=""
fail() {
  echo "$name: FAILED${step:+ at step '$step'}: $*" >&2
  exit 2
}

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
quiet() {
  "$@" >"$log" 2>&1 && return 0
  tail -n 15 "$log" >&2
  return 1
}
apt_updated=""
apt_update() {
  if [ -z "$apt_updated" ]; then
    quiet $SUDO apt-get update || fail "apt-get update failed"
    apt_updated=1
  fi
}
apt_install() {
  apt_update
  quiet $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" || fail "apt-get install $* failed"
}
