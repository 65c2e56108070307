#!/usr/bin/env bash
# Fuzz every cargo-fuzz target in fuzz/ (libFuzzer, AddressSanitizer, debug assertions and
# overflow checks on) for SECONDS each (default 60), one after the other.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# - Installs cargo-fuzz (pinned) when it is missing; that takes minutes the first time. It runs
#   on the stable toolchain with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z flags).
# - Builds in $WHITTLE_CACHE/fuzz-target (default ~/.cache/whittle), apart from the workspace's
#   target folder, so the sanitizer build does not invalidate it.
# - Seeds fuzz/corpus/<target>/ (git-ignored; it keeps what the fuzzer finds between runs) from
#   fuzz/regressions/<target>/ and from the repo's models, targets, profiles and images (and the
#   shared assets' small models and images when ../shared/assets is beside the repo).
# - A crash, panic, out-of-memory or timeout is copied into fuzz/regressions/<target>/, which
#   `cargo test` replays (fuzz-entries/tests/replay.rs); the script then goes on with the other
#   targets and exits 1 naming every new file. Minimise one with
#   `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz tmin --target-dir "$CACHE/fuzz-target" TARGET FILE`.
# - Prints, per target, the executions, executions per second and corpus size.
set -euo pipefail
CARGO_FUZZ_VERSION=0.13.2
seconds="${1:-60}"
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${WHITTLE_CACHE:-$HOME/.cache/whittle}"
target_dir="$CACHE/fuzz-target"
fuzz="$here/fuzz"
all_targets=(onnx_load shape_infer target_toml profile_toml calib_npy calib_bin calib_image runner_protocol)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi
# Built with stable; cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module).
export RUSTC_BOOTSTRAP=1

case "$seconds" in
  '' | *[!0-9]*) echo "fuzz: SECONDS must be a whole number, not '$seconds'" >&2; exit 2 ;;
esac

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (takes several minutes once)" >&2
  env -u CARGO_TARGET_DIR cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked >&2
fi

# The same dependency versions as the workspace (the fuzz crate is its own workspace).
cp "$here/Cargo.lock" "$fuzz/Cargo.lock"

# max_len per target: above its largest seed, small enough to keep mutation fast.
max_len() {
  case "$1" in
    onnx_load) echo 400000 ;;
    calib_image) echo 65536 ;;
    *) echo 4096 ;;
  esac
}

# Copies a seed file into the corpus unless a file of that name is there already.
seed() { # corpus file [prefix-byte-in-octal]
  local dest="$1/seed-$(basename "$2")"
  [ -e "$dest" ] && return 0
  if [ -n "${3:-}" ]; then
    { printf "\\$3"; cat "$2"; } > "$dest"
  else
    cp "$2" "$dest"
  fi
}

seed_corpus() { # target
  local t="$1" corpus="$fuzz/corpus/$1" shared="$here/../shared/assets"
  mkdir -p "$corpus"
  local f
  for f in "$fuzz/regressions/$t"/*; do
    [ -f "$f" ] && seed "$corpus" "$f"
  done
  case "$t" in
    onnx_load)
      seed "$corpus" "$here/models/resnet8_cifar10.onnx"
      for f in "$shared/models/mnist-8.onnx" "$shared/models/dscnn_kws.onnx"; do
        [ -f "$f" ] && seed "$corpus" "$f"
      done
      ;;
    target_toml)
      for f in "$here"/targets/*.toml; do seed "$corpus" "$f"; done
      ;;
    profile_toml)
      for f in "$here"/models/*.profile.toml; do seed "$corpus" "$f"; done
      ;;
    calib_image)
      # Byte 0 picks the built-in profile (index mod 6: 0 resnet8, 2 efficientnet, 3 vww, 4 mnist).
      local i=0 prefixes=(000 002 003 004 005)
      while IFS= read -r f; do
        seed "$corpus" "$f" "${prefixes[$((i % 5))]}"
        i=$((i + 1))
      done < <(find "$here/data/cifar10" -name '*.png' | sort | head -n 5)
      if [ -d "$shared/data/imagenet" ]; then
        while IFS= read -r f; do
          seed "$corpus" "$f" "${prefixes[$((i % 5))]}"
          i=$((i + 1))
        done < <(find "$shared/data/imagenet" -name '*.jpg' -size -40k | sort | head -n 3)
      fi
      ;;
  esac
}

echo "fuzz: building ${#targets[@]} target(s) in $target_dir" >&2
(cd "$fuzz" && nice cargo fuzz build --codegen-units 16 --target-dir "$target_dir" >&2)

found=()
summary=()
for t in "${targets[@]}"; do
  [ -f "$fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz: no target '$t' (${all_targets[*]})" >&2; exit 2; }
  seed_corpus "$t"
  artifacts="$fuzz/artifacts/$t"
  mkdir -p "$artifacts"
  log="$fuzz/artifacts/$t.log"
  before="$(ls "$artifacts")"
  echo "fuzz: $t for ${seconds}s (log $log)" >&2
  rc=0
  (cd "$fuzz" && nice cargo fuzz run --codegen-units 16 --target-dir "$target_dir" "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len="$(max_len "$t")" \
    -print_final_stats=1) > "$log" 2>&1 || rc=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
  corpus_size="$(find "$fuzz/corpus/$t" -type f | wc -l)"
  new=()
  for f in "$artifacts"/*; do
    [ -f "$f" ] || continue
    grep -qxF "$(basename "$f")" <<<"$before" && continue
    mkdir -p "$fuzz/regressions/$t"
    cp "$f" "$fuzz/regressions/$t/"
    new+=("fuzz/regressions/$t/$(basename "$f")")
  done
  if [ "$rc" -ne 0 ] || [ "${#new[@]}" -gt 0 ]; then
    tail -n 60 "$log" >&2
    [ "${#new[@]}" -gt 0 ] || new=("(exit $rc, no artifact; see $log)")
    found+=("$t: ${new[*]}")
    status="FAILED"
  else
    status="ok"
  fi
  summary+=("$(printf '%-13s %-6s %12s execs %8s execs/s %6s corpus files' \
    "$t" "$status" "${execs:-?}" "${rate:-?}" "$corpus_size")")
done

printf '%s\n' "${summary[@]}"
if [ "${#found[@]}" -gt 0 ]; then
  echo "fuzz: found crashes (copied into fuzz/regressions/, replayed by cargo test):" >&2
  printf '  %s\n' "${found[@]}" >&2
  exit 1
fi
