#!/usr/bin/env bash
# Install what tests/deploy_ssh.rs needs, idempotently: the OpenSSH server (/usr/sbin/sshd, started
# by the test itself on 127.0.0.1 with its own config and keys; this script starts no server)
# and the client tools (ssh, scp, ssh-keygen, ssh-keyscan). One line per step; a failure says which
# step failed and why. apt needs root (or sudo).
set -euo pipefail

name=setup-ssh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

step="openssh"
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
for tool in ssh scp ssh-keygen ssh-keyscan; do
  command -v "$tool" >/dev/null 2>&1 || { missing+=(openssh-client); break; }
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-ssh: $(ssh -V 2>&1), sshd at /usr/sbin/sshd" >&2
else
  command -v apt-get >/dev/null 2>&1 || fail "missing ${missing[*]} and there is no apt-get; install OpenSSH yourself"
  apt_install openssh-server openssh-client
  [ -x /usr/sbin/sshd ] || fail "/usr/sbin/sshd still missing after install"
  command -v ssh >/dev/null 2>&1 || fail "ssh still missing after install"
  echo "setup-ssh: installed ${missing[*]} ($(ssh -V 2>&1))" >&2
fi

# sshd refuses to start without its privilege separation directory.
step="/run/sshd"
if [ -d /run/sshd ]; then
  echo "setup-ssh: /run/sshd exists" >&2
else
  $SUDO mkdir -p /run/sshd || fail "cannot create /run/sshd"
  echo "setup-ssh: created /run/sshd" >&2
fi
