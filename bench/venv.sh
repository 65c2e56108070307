# Sourced by bench/setup_venv.sh and bench/peers/setup_venv.sh: make_venv LABEL NAME REQUIREMENTS
# creates (idempotently) the venv ${WHITTLE_CACHE:-~/.cache/whittle}/NAME and installs the pinned
# wheels of REQUIREMENTS from PyPI (wheels only), again only when the file changed since the last
# successful install; it sets $venv and $py. Progress goes to stderr, prefixed with LABEL.
make_venv() {
  local label="$1" req="$3"
  venv="${WHITTLE_CACHE:-$HOME/.cache/whittle}/$2"
  py="$venv/bin/python"
  local stamp="$venv/.whittle-requirements"
  if [ ! -x "$py" ]; then
    echo "$label: creating $venv" >&2
    python3 -m venv "$venv"
  fi
  if ! cmp -s "$req" "$stamp"; then
    echo "$label: installing $(grep -v '^#' "$req" | xargs) (wheels only)" >&2
    "$py" -m pip install --quiet --disable-pip-version-check --only-binary=:all: -r "$req" >&2
    cp "$req" "$stamp"
  fi
}
