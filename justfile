# whittle's entry points. `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]

target_dir := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target")
whittle := target_dir / "release" / "whittle"

export CARGO_TARGET_DIR := target_dir

# Show the recipes.
default:
    @just --list

# Install ONNX Runtime's library (pinned PyPI wheel) and the shared MiniLM asset.
setup:
    bash scripts/setup.sh

# Build everything (release: the tests run real models).
build:
    cargo build --release --workspace

# Run every test (unit, integration, end-to-end through the binary).
test: setup build
    cargo test --release --workspace

# rustfmt check and clippy with warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets -- -D warnings

# Measure on a target and write reports/<target>/<time>/ (default: this machine, bundled ResNet-8). An emulated target (qemu-aarch64) first gets `setup-cross` and its cross-built runner.
deploy target="host" *args="": setup build
    #!/usr/bin/env bash
    set -euo pipefail
    f="targets/{{target}}.toml"
    triple="$( [ -f "$f" ] && sed -n 's/^triple *= *"\(.*\)"/\1/p' "$f" || true)"
    # a board (emulated, ssh, serial): build the runner for its triple first
    if [ -n "$triple" ] && [ "$triple" != host ] && [ -z "${WHITTLE_RUNNER:-}" ]; then
        case "$triple" in
            aarch64-unknown-linux-gnu) bash scripts/setup-cross.sh ;;
            *) linker="$(sed -n "/$triple/,/linker/s/^linker *= *\"\(.*\)\"/\1/p" .cargo/config.toml)"
               command -v "${linker:-none}" >/dev/null || { echo "error: no cross linker for $triple (${linker:-none in .cargo/config.toml}); install it, e.g. apt-get install gcc-arm-linux-gnueabihf" >&2; exit 1; } ;;
        esac
        if grep -Eq '^runtimes *=.*"tract"' "$f"; then
            echo "building the runner for $triple with tract (slow: tract-onnx takes most of an hour to cross-build)" >&2
            cargo build --release -p whittle-runner --target "$triple"
        else
            just build-runner "$triple"
        fi
        export WHITTLE_RUNNER="{{target_dir}}/$triple/release/whittle-runner"
    fi
    {{whittle}} deploy --target {{target}} {{args}}

# Install the aarch64 cross toolchain, qemu-user >= 10 and ONNX Runtime's aarch64 library (targets/qemu-aarch64.toml).
setup-cross:
    bash scripts/setup-cross.sh

# Install the OpenSSH server and client for ssh targets and tests/deploy_ssh.rs (which starts its own sshd on 127.0.0.1).
setup-ssh:
    bash scripts/setup-ssh.sh

# Install socat for tests/deploy_serial.rs (which makes its own pseudo-terminal pair with it).
setup-serial:
    bash scripts/setup-serial.sh

# Cross-build the ONNX Runtime-only runner for a board triple (tract left out: minutes, not most of an hour).
build-runner triple="aarch64-unknown-linux-gnu":
    cargo build --release -p whittle-runner --no-default-features --target {{triple}}

# Create the bench venv (onnxruntime==1.31.1 and numpy from PyPI) and check its onnxruntime version.
setup-bench:
    bash bench/setup_venv.sh

# whittle (ort-cpu, tract) vs ONNX Runtime's Python API, then channel pruning, low-rank and MiniLM (transformer) rows, then the aarch64 runner's stripped size and cross build time (--quick, --json, --threads N, --skip-prune, --skip-lowrank, --skip-transformer, --skip-merge, --skip-runner; --readme rewrites README.md's tables from the run, bench/readme.py).
bench *args: setup build setup-bench
    "${WHITTLE_CACHE:-$HOME/.cache/whittle}/bench-venv/bin/python" bench/bench.py --whittle "{{whittle}}" {{args}}

# Fuzz every target (libFuzzer, cargo-fuzz) for SECONDS each; a crash lands in fuzz/regressions/, which `just test` replays.
fuzz seconds="60" *targets="":
    bash scripts/fuzz.sh {{seconds}} {{targets}}

# Create the peers venv (pinned onnxsim==0.8.1, onnxruntime, numpy from PyPI) and check its versions.
setup-peers:
    bash bench/peers/setup_venv.sh

# whittle's channel pruning beside onnxsim 0.8.1's at the same MAC budgets and images (--quick, --json); writes reports/peers/<time>/.
bench-peers *args: setup build setup-peers
    "${WHITTLE_CACHE:-$HOME/.cache/whittle}/peers-venv/bin/python" bench/peers/peers_bench.py --whittle "{{whittle}}" {{args}}

# Compress time of a 640x640 text-detector fixture at macs=0.7 (--rounds N, --json); writes reports/detector/<time>/.
bench-detector *args: setup build
    python3 bench/detector_bench.py --whittle "{{whittle}}" {{args}}

# whittle's INT8 quantization beside ONNX Runtime's quantize_static and onnxsim 0.8.1's (--quick, --json, --models); writes reports/peers-quant/<time>/.
bench-peers-quant *args: setup build setup-peers
    "${WHITTLE_CACHE:-$HOME/.cache/whittle}/peers-venv/bin/python" bench/peers/quant_bench.py --whittle "{{whittle}}" {{args}}
