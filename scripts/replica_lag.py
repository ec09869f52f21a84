#!/usr/bin/env python3
"""How far behind their leaders healthy replicas of queue partitions are, in time, on
this machine: the figures behind the default of `[cluster] in_sync_lag_ms`.

A 3-node cluster in network namespaces (root), `replication_factor` 3, queues of one
partition each (their leaders spread over the nodes); `roost-bench pub` produces to
each at QoS 1 (MQTT 5) at the given rates, one phase per rate (`0`: idle, `max`: as
fast as 64 in flight allow). Meanwhile the placement (`GET /api/v1/queues/{name}` on
node 1, which asks each partition's leader) is polled every 20 ms; every follower's
`lag_ms` is one sample. The nodes run with `in_sync_lag_ms` = 10000 so that every lag
under 10 s is reported exactly (`null`: more).

    sudo python3 scripts/replica_lag.py [--seconds S] [--queues N] [RATE ...]

Prints per phase: samples, median, p99, p99.9 and max lag, the share of samples over
each candidate window, and the load average.
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from cluster import Cluster  # noqa: E402

WINDOWS = (100, 200, 300, 500, 1000, 2000)
BENCH = Path(__file__).resolve().parent.parent / "target" / "release" / "roost-bench"


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def poll(node, queues, stop, samples):
    while not stop.is_set():
        for q in queues:
            try:
                _, info = node.api("GET", f"/api/v1/queues/{q}", timeout=2.0)
            except Exception:  # noqa: BLE001 - a missed poll is a missed sample
                continue
            for p in info.get("placement") or []:
                for replica, lag in (p.get("lag_ms") or {}).items():
                    if int(replica) != p["leader"]:
                        samples.append(10_000_000 if lag is None else lag)
        time.sleep(0.02)


def phase(c, queues, rate, seconds):
    samples, stop = [], threading.Event()
    poller = threading.Thread(target=poll, args=(c[1], queues, stop, samples))
    benches = []
    if rate != "0":
        for i, q in enumerate(queues):
            node = c[1 + i % 3]
            cmd = [os.environ.get("ROOST_BENCH", str(BENCH)), "--host", node.host, "--port",
                   str(node.port), "--mqtt-version", "5", "--duration", f"{seconds}s",
                   "--warmup", "0s", "pub", "--qos", "1", "--topic", f"$queue/{q}"]
            if rate != "max":
                cmd += ["--rate", rate]
            benches.append(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True))
    poller.start()
    if benches:
        outs = [b.communicate()[0] for b in benches]
    else:
        time.sleep(seconds)
        outs = []
    stop.set()
    poller.join()
    return samples, outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--queues", type=int, default=3)
    ap.add_argument("rates", nargs="*", default=["0", "200", "2000", "max"])
    a = ap.parse_args()
    c = Cluster(3, netns=True, settings={"in_sync_lag_ms": 10000})
    try:
        c.start()
        c.wait_stable()
        queues = []
        for _ in range(a.queues):
            q = f"lag{uuid.uuid4().hex[:6]}"
            code, body = c[1].api("PUT", f"/api/v1/queues/{q}",
                                  {"partitions": 1, "replication_factor": 3})
            assert code in (200, 201), body
            queues.append(q)
        time.sleep(2.0)
        for rate in a.rates:
            load0 = os.getloadavg()[0]
            samples, outs = phase(c, queues, rate, a.seconds)
            load1 = os.getloadavg()[0]
            if not samples:
                print(f"rate {rate}: no samples", flush=True)
                continue
            over = ", ".join(f">{w}: {sum(s > w for s in samples) / len(samples):.2%}"
                             for w in WINDOWS)
            print(f"rate {rate}/s per queue x {len(queues)}: {len(samples)} samples, lag ms "
                  f"median {statistics.median(samples)}, p99 {pct(samples, 0.99)}, "
                  f"p99.9 {pct(samples, 0.999)}, max {max(samples)}; {over}; "
                  f"load {load0:.1f} -> {load1:.1f}", flush=True)
            for out in outs:
                lines = [ln for ln in out.splitlines() if "msg/s" in ln or "p99" in ln]
                print("   bench: " + " | ".join(lines[-2:]), flush=True)
    finally:
        c.cleanup()


if __name__ == "__main__":
    main()
