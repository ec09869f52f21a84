#!/usr/bin/env bash
# Side by side: roost vs mosquitto (and optionally rumqttd), the same roost-bench
# scenarios against each.
#
#   benches/compare.sh                     # prints one markdown table on stdout, progress on stderr
#   COMPARE_RUMQTTD=1 benches/compare.sh   # or --with-rumqttd: adds rumqttd as a third broker
#
# Installs mosquitto from Debian when missing, builds roost and roost-bench in release,
# then for every scenario starts a fresh broker of each kind on a free loopback port
# (alternating which goes first), runs roost-bench --json against it, and reads the
# broker's CPU seconds (utime+stime from /proc/PID/stat, before/after) and peak RSS
# (VmHWM). Equivalent settings: no persistence for mosquitto (roost keeps its data
# directory in a temp dir; these scenarios use clean sessions), max_inflight 1024 and
# max_queued_messages 1000 on both (roost's defaults).
#
# rumqttd (only when asked, since `cargo install` takes minutes): uses $RUMQTTD if set, else
# rumqttd on PATH or in $RUMQTTD_ROOT/bin, else runs `cargo install rumqttd --version
# $RUMQTTD_VERSION --root $RUMQTTD_ROOT`. Its TOML config is written below; the
# keys are those of rumqttd 0.20 (they have changed between releases, hence the pinned
# version). rumqttd keeps messages in memory only (no persistence); it has no per-session
# queue limit, so the closest equivalent is the per-filter in-memory log, bounded to
# about 1,000 of these publishes (10 segments of 10 KiB, rumqttd counting 4 bytes + topic
# + payload per message); its outgoing QoS 1/2 window is fixed at 100 in the source, and
# its `max_inflight_count` (set to 1024) bounds how many incoming packets it reads per batch.
#
# Environment: DURATION (measured seconds per run, default 5), WARMUP (default 1),
# CONNS (idle connections for the conn scenario, default 5000), KEEP_LOGS=1 keeps the
# work directory with the brokers' logs and each run's JSON, COMPARE_RUMQTTD=1 (same as
# --with-rumqttd), RUMQTTD, RUMQTTD_ROOT (default ${CARGO_HOME:-~/.cargo}),
# RUMQTTD_VERSION (default 0.20.0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-5000}
WITH_RUMQTTD=${COMPARE_RUMQTTD:-0}
RUMQTTD_VERSION=${RUMQTTD_VERSION:-0.20.0}
RUMQTTD_ROOT=${RUMQTTD_ROOT:-${CARGO_HOME:-$HOME/.cargo}}

for arg in "$@"; do
    case $arg in
        --with-rumqttd) WITH_RUMQTTD=1 ;;
        *) echo "usage: benches/compare.sh [--with-rumqttd]" >&2; exit 2 ;;
    esac
done

log() { echo "compare: $*" >&2; }

if ! command -v mosquitto >/dev/null 2>&1; then
    log "installing mosquitto (Debian package)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

BROKERS=(roost mosquitto)
if [ "$WITH_RUMQTTD" = 1 ]; then
    if [ -z "${RUMQTTD:-}" ]; then
        RUMQTTD=$(command -v rumqttd || true)
        [ -n "$RUMQTTD" ] || RUMQTTD="$RUMQTTD_ROOT/bin/rumqttd"
    fi
    if [ ! -x "$RUMQTTD" ]; then
        log "installing rumqttd $RUMQTTD_VERSION into $RUMQTTD_ROOT (cargo install, takes minutes)"
        # Not --locked: 0.20.0's lockfile pins metrics 0.22.1, which rustc 1.95 rejects
        # (E0521); the newest semver-compatible dependencies build.
        cargo install rumqttd --version "$RUMQTTD_VERSION" --root "$RUMQTTD_ROOT" >&2
        RUMQTTD="$RUMQTTD_ROOT/bin/rumqttd"
    fi
    # The config below uses 0.20's keys; another release may reject or ignore them.
    RUMQTTD_HAVE=$("$RUMQTTD" --version 2>/dev/null | awk '{print $NF}')
    log "rumqttd $RUMQTTD_HAVE at $RUMQTTD"
    [ "$RUMQTTD_HAVE" = "$RUMQTTD_VERSION" ] ||
        log "warning: the rumqttd config here was written for $RUMQTTD_VERSION"
    BROKERS+=(rumqttd)
fi

log "building roost and roost-bench (release)"
cargo build --release --bin roost --bin roost-bench >&2
ROOST="${CARGO_TARGET_DIR:-$ROOT/target}/release/roost"
BENCH="${CARGO_TARGET_DIR:-$ROOT/target}/release/roost-bench"

# Idle-connection scenarios need file descriptors on both sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK=$(mktemp -d /tmp/roost-compare.XXXXXX)
BROKER_PID=""
cleanup() {
    if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
        kill "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
    if [ "${KEEP_LOGS:-0}" = 1 ]; then log "logs and JSON kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_broker KIND RUN: starts a fresh broker, sets BROKER_PID and PORT.
start_broker() {
    local kind=$1 run=$2
    PORT=$(free_port)
    local dir="$WORK/$run"
    mkdir -p "$dir"
    if [ "$kind" = roost ]; then
        "$ROOST" --bind "127.0.0.1:$PORT" --data-dir "$dir/data" --log-level warn \
            --max-inflight 1024 --max-queued-messages 1000 >"$dir/broker.log" 2>&1 &
    elif [ "$kind" = rumqttd ]; then
        # No [console], [prometheus] or [v5] sections: only the MQTT 3.1.1 listener runs.
        # next_connection_delay_ms = 0: rumqttd otherwise sleeps between accepts, which
        # would cap the conn scenario's 2,500 connections/s. -q drops the banner; the
        # log level stays at its default, warn.
        cat >"$dir/rumqttd.toml" <<EOF
id = 0

[router]
max_connections = $((CONNS + 1000))
max_outgoing_packet_count = 200
max_segment_size = 10240
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:$PORT"
next_connection_delay_ms = 0

[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 1024
dynamic_filters = true
EOF
        "$RUMQTTD" -q -c "$dir/rumqttd.toml" >"$dir/broker.log" 2>&1 &
    else
        cat >"$dir/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 1024
max_queued_messages 1000
max_connections -1
log_dest stderr
log_type error
log_type warning
EOF
        "$MOSQUITTO" -c "$dir/mosquitto.conf" >"$dir/broker.log" 2>&1 &
    fi
    BROKER_PID=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
        kill -0 "$BROKER_PID" 2>/dev/null || break
        sleep 0.05
    done
    log "$kind did not start; log:"; cat "$dir/broker.log" >&2
    exit 1
}

stop_broker() {
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=""
}

# CPU seconds (utime + stime) of a process.
cpu_seconds() {
    python3 - "$1" <<'EOF'
import os, sys
stat = open(f"/proc/{sys.argv[1]}/stat").read()
fields = stat.rsplit(")", 1)[1].split()
print((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
EOF
}

hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

ROWS="$WORK/rows.txt"
: >"$ROWS"

# run_one NAME KIND ARGS...: one roost-bench run against a fresh broker of KIND.
run_one() {
    local name=$1 kind=$2; shift 2
    local run
    run=$(printf '%s-%s' "$name" "$kind" | tr -c 'A-Za-z0-9.-' '_')
    start_broker "$kind" "$run"
    local args=("$@")
    if [ "${args[0]}" = conn ]; then args+=(--broker-pid "$BROKER_PID"); fi
    local cpu0 cpu1 hwm rc=0
    cpu0=$(cpu_seconds "$BROKER_PID")
    log "$name on $kind: roost-bench ${args[*]}"
    timeout 180 "$BENCH" "${args[@]}" --port "$PORT" --json \
        >"$WORK/$run/summary.json" 2>"$WORK/$run/bench.err" || rc=$?
    cpu1=$(cpu_seconds "$BROKER_PID")
    hwm=$(hwm_kib "$BROKER_PID")
    stop_broker
    python3 - "$name" "$kind" "$rc" "$cpu0" "$cpu1" "$hwm" "$WORK/$run/summary.json" \
        "$WORK/$run/bench.err" >>"$ROWS" <<'EOF'
import json, sys
name, kind, rc, cpu0, cpu1, hwm, path, err = sys.argv[1:]
cpu = float(cpu1) - float(cpu0)
rss = f"{int(hwm) / 1024:.1f} MiB"
try:
    s = json.load(open(path))
except Exception:
    tail = open(err).read().strip().splitlines()[-1:] or ["no output"]
    print(f"| {name} | {kind} | failed (exit {rc}: {tail[0]}) | | | | {cpu:.1f} | {rss} | |")
    sys.exit()
def ms(lat, key):
    return "-" if not lat else f"{lat[key] / 1000:.2f}"
notes = []
for k, n in s.get("errors", {}).items():
    notes.append(f"{n} x {k}")
if s.get("unacked"):
    notes.append(f"{s['unacked']} unacked")
if s.get("duplicates"):
    notes.append(f"{s['duplicates']} duplicates")
if s["scenario"] == "conn":
    m = s.get("broker_memory") or {}
    per = m.get("bytes_per_connection")
    c = s["connections"]
    notes.insert(0, f"{c['established']}/{c['attempted']} held")
    if per is not None:
        rss += f" ({per:.0f} B/conn)"
    if m.get("rss_after_close_kib") is not None:
        notes.append(f"RSS after close {m['rss_after_close_kib'] / 1024:.1f} MiB")
    print(f"| {name} | {kind} | - | - | - | - | {cpu:.1f} | {rss} | {'; '.join(notes)} |")
    sys.exit()
loss = s.get("loss")
exp = s.get("expected") or 0
loss_s = "-" if loss is None else (f"{loss} ({100 * loss / exp:.2f}%)" if loss and exp else str(loss))
lat = s.get("latency_us")
print(f"| {name} | {kind} | {s['delivered_per_s']:,.0f} | {ms(lat, 'p50')} | {ms(lat, 'p99')} "
      f"| {loss_s} | {cpu:.1f} | {rss} | {'; '.join(notes)} |")
EOF
    tail -n 1 "$ROWS" >&2
}

T="--duration ${DURATION}s --warmup ${WARMUP}s --drain 3s"
# name|roost-bench arguments
SCENARIOS=(
    "fan-in 10->1 QoS 0|pubsub --mode fan-in -p 10 -s 1 --qos 0 $T"
    "fan-in 10->1 QoS 1|pubsub --mode fan-in -p 10 -s 1 --qos 1 $T"
    "fan-out 1->100 QoS 0|pubsub --mode fan-out -p 1 -s 100 --qos 0 $T"
    "fan-out 1->100 QoS 1|pubsub --mode fan-out -p 1 -s 100 --qos 1 $T"
    "p2p 10->10 QoS 1|pubsub --mode p2p -p 10 -s 10 --qos 1 $T"
    "shared 10->4 QoS 1|pubsub --mode shared -p 10 -s 4 --qos 1 $T"
    "p2p 10->10 QoS 0 at 20K msg/s|pubsub --mode p2p -p 10 -s 10 --qos 0 --rate 20000 $T"
    "fan-out 1->100 QoS 0 at 50K deliveries/s|pubsub --mode fan-out -p 1 -s 100 --qos 0 --rate 500 $T"
    "conn $CONNS idle|conn -n $CONNS --rate 2500 --duration 3s"
)

START=$(date +%s)
i=0
for entry in "${SCENARIOS[@]}"; do
    name=${entry%%|*}
    read -r -a args <<<"${entry#*|}"
    # Rotate which broker goes first, so none always runs on a warmer machine (with two
    # brokers this alternates).
    n=${#BROKERS[@]}
    for ((k = 0; k < n; k++)); do run_one "$name" "${BROKERS[$(((i + k) % n))]}" "${args[@]}"; done
    i=$((i + 1))
done
log "done in $(( $(date +%s) - START )) s"

echo "| scenario | broker | msg/s delivered | p50 ms | p99 ms | loss | broker CPU s | peak RSS | notes |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---|"
cat "$ROWS"
