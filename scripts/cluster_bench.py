#!/usr/bin/env python3
"""Cross-node QoS 1 throughput of a 3-node roost cluster next to one roost node, with
the CPU each node spent per message (from /proc/PID/stat), on this machine.

    python3 scripts/cluster_bench.py [--runs N] [--duration 10s] [-- ROOST-BENCH ARGS]

The same `roost-bench pubsub` run (default: p2p, 10 pairs, QoS 1, 64-byte payloads) goes
against one node (publishers and subscribers on it), then against the cluster with the
publishers on node 1 and the subscribers on nodes 2 and 3 (--sub-broker), alternating,
`--runs` times each. Uses target/release/roost and roost-bench (ROOST_BIN overrides).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "integration"))

from broker import Broker  # noqa: E402
from cluster import Cluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def bench(host, port, extra, duration, sub_brokers=None):
    cmd = [str(ROOT / "target/release/roost-bench"), "--host", host, "--port", str(port),
           "--json", "--duration", duration, "pubsub", "--mode", "p2p", "--qos", "1", *extra]
    if sub_brokers:
        cmd[1:1] = ["--sub-broker", ",".join(sub_brokers)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    if r.returncode not in (0, 1):
        raise SystemExit(f"roost-bench failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def row(name, s, cpu):
    # CPU was counted over the whole run: divide by everything delivered in it.
    msgs = s.get("total_delivered", 0)
    lat = s.get("latency_us") or {}
    ack = s.get("ack_latency_us") or {}
    cpus = " / ".join(f"{c * 1e6 / max(msgs, 1):.1f}" for c in cpu)
    return (f"| {name} | {s.get('delivered_per_s', 0):,.0f} | {lat.get('p50', 0) / 1000:.2f} | "
            f"{lat.get('p99', 0) / 1000:.2f} | {ack.get('p99', 0) / 1000:.2f} | "
            f"{s.get('loss', 0)} | {cpus} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    if not os.environ.get("ROOST_BIN"):
        os.environ["ROOST_BIN"] = str(ROOT / "target/release/roost")
    print("| setup | delivered msg/s | e2e p50 ms | e2e p99 ms | PUBACK p99 ms | lost | "
          "CPU µs per message (node 1 / 2 / 3) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for _ in range(a.runs):
        single = Broker().start()
        try:
            pid = single.proc.pid
            c0 = cpu_seconds(pid)
            s = bench(single.host, single.port, a.extra, a.duration)
            print(row("1 node", s, [cpu_seconds(pid) - c0]), flush=True)
        finally:
            single.cleanup()
        c = Cluster(3).start()
        try:
            pids = [c[i].proc.pid for i in (1, 2, 3)]
            c0 = [cpu_seconds(p) for p in pids]
            s = bench(c[1].host, c[1].port, a.extra, a.duration,
                      [f"{c[i].host}:{c[i].port}" for i in (2, 3)])
            print(row("3 nodes, pub on 1, sub on 2+3", s,
                      [cpu_seconds(p) - c for p, c in zip(pids, c0)]), flush=True)
        finally:
            c.cleanup()


if __name__ == "__main__":
    main()
