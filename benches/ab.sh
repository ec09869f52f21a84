#!/usr/bin/env bash
# A/B of two roost binaries on the rows a refactor must keep: p2p 10->10 QoS 1 and
# fan-out 1->100 QoS 1 (as benches/compare.sh runs them) and the memory of 10,000 idle
# connections, alternating A and B in each round so that a noisy machine hurts both
# alike. Prints one line per run and a summary of each row's runs.
#
#   benches/ab.sh OLD_ROOST NEW_ROOST [ROUNDS]     (ROUNDS defaults to 2)
#   AB_ROWS=idle benches/ab.sh ...                  only the rows whose name matches
#
# roost-bench is target/release/roost-bench (built if missing) or $ROOST_BENCH_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 OLD_ROOST NEW_ROOST [ROUNDS]" >&2; exit 2; }
A=$1 B=$2 ROUNDS=${3:-2}
BENCH=${ROOST_BENCH_BIN:-target/release/roost-bench}
[ -x "$BENCH" ] || cargo build --release --bin roost-bench >&2
WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
PORT=$((20000 + RANDOM % 20000))
PID=

start() {
    rm -rf "$WORK/data"
    "$1" --bind "127.0.0.1:$PORT" --data-dir "$WORK/data" --log-level warn --sys-interval 0 \
        >"$WORK/broker.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do
        (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return
        sleep 0.05
    done
    echo "broker $1 did not start" >&2; exit 1
}

stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }

# run LABEL BINARY ROW ARGS...: prints "ROW LABEL VALUE"
run() {
    local label=$1 bin=$2 row=$3; shift 3
    start "$bin"
    local args=("$@")
    if [ "${args[0]}" = conn ]; then args+=(--broker-pid "$PID"); fi
    "$BENCH" "${args[@]}" --port "$PORT" --json >"$WORK/out.json" 2>/dev/null || true
    stop
    python3 - "$row" "$label" "$WORK/out.json" <<'EOF'
import json, sys
row, label, path = sys.argv[1:]
try:
    s = json.load(open(path))
except Exception:
    print(f"{row}\t{label}\tfailed")
    sys.exit()
if s["scenario"] == "conn":
    per = (s.get("broker_memory") or {}).get("bytes_per_connection")
    print(f"{row}\t{label}\t{per:.0f} B/conn")
else:
    print(f"{row}\t{label}\t{s['delivered_per_s']:.0f} msg/s")
EOF
}

T="--duration 10s --warmup 2s --drain 3s"
ROWS=(
    "p2p 10->10 QoS 1|pubsub --mode p2p -p 10 -s 10 --qos 1 $T"
    "fan-out 1->100 QoS 1|pubsub --mode fan-out -p 1 -s 100 --qos 1 $T"
    "idle 10,000 conns|conn -n 10000 --rate 3000 --duration 3s"
)
for round in $(seq "$ROUNDS"); do
    for r in "${ROWS[@]}"; do
        name=${r%%|*}; read -r -a args <<<"${r#*|}"
        [[ "$name" =~ ${AB_ROWS:-.} ]] || continue
        if [ $((round % 2)) = 1 ]; then order="A B"; else order="B A"; fi
        for who in $order; do
            if [ "$who" = A ]; then bin=$A; else bin=$B; fi
            run "$who" "$bin" "$name" "${args[@]}" | tee -a "$WORK/results.tsv"
        done
    done
done
echo
python3 - "$WORK/results.tsv" <<'EOF'
import collections, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    row, who, value = line.rstrip("\n").split("\t")
    if value != "failed":
        runs[(row, who)].append(float(value.split()[0]))
for row in dict.fromkeys(r for r, _ in runs):
    a, b = runs.get((row, "A"), []), runs.get((row, "B"), [])
    fmt = lambda v: ", ".join(f"{x:,.0f}" for x in v)
    ratio = (sum(b) / len(b)) / (sum(a) / len(a)) if a and b else float("nan")
    print(f"{row}: A {fmt(a)} | B {fmt(b)} | B/A {ratio:.3f}")
EOF
