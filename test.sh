#!/usr/bin/env bash
# Runs every roost test: formatting, lints, unit and property tests, then the
# end-to-end suite against the release binary with real MQTT clients.
# Installs what the tests need (mosquitto-clients, Python packages) when missing.
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! python3 -c "import paho.mqtt, pytest, pytest_timeout, cryptography" >/dev/null 2>&1; then
    echo "== installing Python test packages"
    python3 -m pip install -q -r integration/requirements.txt
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== release build"
cargo build --release --bin roost --bin roost-bench
echo "== integration tests (pytest)"
target="${CARGO_TARGET_DIR:-$PWD/target}"
ROOST_BIN="$target/release/roost" ROOST_BENCH_BIN="$target/release/roost-bench" \
    python3 -m pytest integration -q
