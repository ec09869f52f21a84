#!/usr/bin/env python3
"""Replicated `$queue/` throughput on a 3-node roost cluster next to one roost node, on
this machine (issue 14's bench): produced msg/s, PUBACK p99, messages per fdatasync and
CPU per message of each node.

    python3 scripts/cluster_queue_bench.py [--runs N] [--duration 10s] [-- ROOST-BENCH QUEUE ARGS]

Each run, alternating: the same `roost-bench queue` (default `--size 100 -p 4 -c 8
--inflight 160`) against one node; against the cluster with every client on node 1;
and against the cluster with the producers on node 1 and the consumers on nodes 2 and 3
(`--sub-broker`). The cluster's queue is created first with `replication_factor` 3 and
`ack_mode` quorum (the defaults) and `durability` fsync, and the bench starts once every
partition has a leader. Logging is at `warn` everywhere. "fsyncs" are the node's
fdatasyncs of its queue files and of its partitions' Raft logs
(`roost_storage_fsync_seconds_count{store="queues"}` plus
`roost_cluster_partition_fsync_seconds_count`) during the run; "msgs per fsync" divides
the messages produced by them. Uses target/release/roost and roost-bench (ROOST_BIN
overrides the broker).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "integration"))

from broker import Broker, free_port  # noqa: E402
from cluster import TOKEN, Cluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
QUEUE = "cbench"


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def fsyncs(host, admin_port):
    req = urllib.request.Request(f"http://{host}:{admin_port}/metrics",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    total = 0
    for pattern in (r'^roost_storage_fsync_seconds_count\{store="queues"\} (\d+)',
                    r'^roost_cluster_partition_fsync_seconds_count\{[^}]*\} (\d+)'):
        m = re.search(pattern, text, re.M)
        total += int(m.group(1)) if m else 0
    return total


def bench(host, port, extra, duration, sub_brokers=None):
    cmd = [str(ROOT / "target/release/roost-bench"), "--host", host, "--port", str(port),
           "--json", "--duration", duration]
    if sub_brokers:
        cmd += ["--sub-broker", ",".join(sub_brokers)]
    cmd += ["queue", "--name", QUEUE, *extra]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=600)
    if r.returncode not in (0, 1):
        raise SystemExit(f"roost-bench failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def measured(name, nodes, run):
    """Runs `run()` and prints a table row with what `nodes` spent on it."""
    pids = [n.proc.pid for n in nodes]
    cpu0 = [cpu_seconds(p) for p in pids]
    fs0 = [fsyncs(n.host, n.admin_port) for n in nodes]
    s = run()
    cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
    fs = [fsyncs(n.host, n.admin_port) - f for n, f in zip(nodes, fs0)]
    sent = max(s.get("total_sent", 0), 1)
    ack, lat = s.get("ack_latency_us") or {}, s.get("latency_us") or {}
    cpus = " / ".join(f"{c * 1e6 / sent:.1f}" for c in cpu)
    per_fsync = " / ".join(f"{sent / f:.0f}" if f else "-" for f in fs)
    print(f"| {name} | {s.get('sent_per_s', 0):,.0f} | {s.get('delivered_per_s', 0):,.0f} | "
          f"{ack.get('p50', 0) / 1000:.2f} / {ack.get('p99', 0) / 1000:.2f} | "
          f"{lat.get('p99', 0) / 1000:.2f} | {s.get('loss', 0)} | {s.get('duplicates', 0)} | "
          f"{' / '.join(str(f) for f in fs)} | {per_fsync} | {cpus} |", flush=True)


def wait_leaders(node):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        code, info = node.api("GET", f"/api/v1/queues/{QUEUE}")
        placement = (info or {}).get("placement") or [] if code == 200 else []
        if placement and all(p["leader"] for p in placement):
            return
        time.sleep(0.1)
    raise SystemExit(f"queue {QUEUE} has no leader for every partition")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--duration", default="10s")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    extra = argv[cut + 1:] or ["--size", "100", "-p", "4", "-c", "8", "--inflight", "160"]
    if not os.environ.get("ROOST_BIN"):
        os.environ["ROOST_BIN"] = str(ROOT / "target/release/roost")
    print(f"roost-bench queue {' '.join(extra)} --duration {a.duration}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print()
    print("| setup | produced msg/s | consumed msg/s | PUBACK p50 / p99 ms | e2e p99 ms | "
          "lost | dup | fsyncs (node 1 / 2 / 3) | msgs per fsync | CPU µs per message "
          "(node 1 / 2 / 3) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for _ in range(a.runs):
        single = Broker({"log_level": "warn", "admin_bind": [f"127.0.0.1:{free_port()}"],
                         "admin_token": TOKEN})
        single.admin_port = int(single.config["admin_bind"][0].rsplit(":", 1)[1])
        single.start()
        try:
            measured("1 node", [single],
                     lambda: bench(single.host, single.port, extra, a.duration))
        finally:
            single.cleanup()
        for spread in (False, True):
            c = Cluster(3)
            for i in (1, 2, 3):
                c[i].config["log_level"] = "warn"
            c.start()
            try:
                code, body = c[1].api("PUT", f"/api/v1/queues/{QUEUE}",
                                      {"replication_factor": 3, "ack_mode": "quorum",
                                       "durability": "fsync"})
                assert code in (200, 201), body
                wait_leaders(c[1])
                nodes = [c[i] for i in (1, 2, 3)]
                if spread:
                    subs = [f"{c[i].host}:{c[i].port}" for i in (2, 3)]
                    measured("3 nodes, rf 3: produce on 1, consume on 2+3", nodes,
                             lambda: bench(c[1].host, c[1].port, extra, a.duration, subs))
                else:
                    measured("3 nodes, rf 3: every client on node 1", nodes,
                             lambda: bench(c[1].host, c[1].port, extra, a.duration))
            finally:
                c.cleanup()


if __name__ == "__main__":
    main()
