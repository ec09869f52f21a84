#!/usr/bin/env bash
# Runs every roost test: formatting, the import-circle check, lints, unit and property
# tests, a bounded run of the decoder fuzz target, then the end-to-end suite against the
# release binary with real MQTT clients (paho, mosquitto_pub/sub, MQTT.js under Node.js).
# Installs what the tests need (mosquitto, mosquitto-clients, Chromium, Node.js and MQTT.js,
# Python packages, cargo-fuzz) when missing.
#
#   ./test.sh              everything, as CI runs it
#   ./test.sh --no-fuzz    skip the fuzz step (also ROOST_FUZZ_SECONDS=0); the fuzz step
#                          costs about 60 s plus its first build
set -euo pipefail
cd "$(dirname "$0")"

fuzz_seconds="${ROOST_FUZZ_SECONDS:-60}"
for arg in "$@"; do
    case "$arg" in
        --no-fuzz) fuzz_seconds=0 ;;
        *) echo "usage: $0 [--no-fuzz]" >&2; exit 2 ;;
    esac
done

need_apt=()
# The roost binary links jemalloc, built from source by its crate with cc and make.
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
# Network namespaces for the cluster tests' real network cuts (integration/cluster.py).
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# MQTT.js runs under Node.js (integration/test_mqttjs.py).
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# The dashboard test drives a real browser (integration/test_dashboard.py).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! python3 -c "import paho.mqtt, pytest, pytest_timeout, cryptography, yaml" >/dev/null 2>&1; then
    echo "== installing Python test packages"
    python3 -m pip install -q -r integration/requirements.txt
fi
# npm ci again whenever package-lock.json changed since the last install.
if [ ! -d integration/js/node_modules/mqtt ] \
        || [ integration/js/package-lock.json -nt integration/js/node_modules/.package-lock.json ]; then
    echo "== installing MQTT.js (npm ci in integration/js)"
    (cd integration/js && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== no import circle between the files of any crate"
python3 scripts/import_cycles.py
python3 -m pytest -q scripts/test_import_cycles.py
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== release build"
cargo build --release --bin roost --bin roost-bench
if [ "$fuzz_seconds" != 0 ]; then
    core/fuzz/fuzz.sh "$fuzz_seconds"
fi
echo "== integration tests (pytest)"
target="${CARGO_TARGET_DIR:-$PWD/target}"
ROOST_BIN="$target/release/roost" ROOST_BENCH_BIN="$target/release/roost-bench" \
    python3 -m pytest integration -q
