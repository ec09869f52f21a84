"""A soak of roost (issue 15): mixed traffic for a while, sampling the broker's RSS and
open file descriptors, then checking that nothing was lost, nothing went wrong in the
log, and memory and descriptors stayed flat after the warm-up.

Traffic, all at once, each roost-bench scenario in its own process (one thread each):
- pub/sub QoS 1, MQTT 5, 4 publisher/subscriber pairs;
- fan-out QoS 0, 3.1.1, 1 publisher to 20 subscribers;
- a shared subscription at QoS 2, MQTT 5, 2 publishers to 3 members;
- a `$queue/` with 2 producers and 2 consumers (QoS 1, acknowledged);
- a churn thread: clean clients that connect, subscribe and leave; persistent sessions
  (3.1.1, clean session 0) that are taken over by a second connection with their client
  id, and get a QoS 1 message published while they are away, which must be there when
  they come back.

Run by hand for longer:  python3 integration/soak.py --seconds 1800 --table 300
(ROOST_BIN / ROOST_BENCH_BIN as for the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mqttraw as w  # noqa: E402
from broker import Broker  # noqa: E402
from test_bench import bench_binary  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid):
    """Open files, not counting segment index files: a log opens its two when it first
    writes an entry to them and keeps them open (two per log however long the run), so
    they show up as growth early in a run without being a leak."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if not target.endswith((".index", ".timeindex")):
            n += 1
    return n


class Churn(threading.Thread):
    """Connects, takes over and disconnects clients until stopped; counts what it did
    and every persistent-session message that did not come back."""

    def __init__(self, b, persistent=16, rate=12.0):
        super().__init__(daemon=True)
        self.b = b
        self.rate = rate
        self.stop = threading.Event()
        self.cycles = 0
        self.takeovers = 0
        self.lost = []
        self.errors = []
        self.ids = [f"soak-p{i}-{uuid.uuid4().hex[:4]}" for i in range(persistent)]

    def client(self, cid, clean=True):
        c = w.RawClient(self.b.host, self.b.port, 4, timeout=10)
        c.connect(cid, clean=clean)
        return c

    def cycle(self, n):
        # A clean client comes and goes.
        c = self.client(f"soak-c{n}")
        c.subscribe(f"soak/clean/{n % 7}", qos=1)
        c.disconnect()
        # A persistent session: subscribe, leave, get a message while away, be taken
        # over on return, and find the message on the connection that won.
        cid = self.ids[n % len(self.ids)]
        topic = f"soak/p/{cid}"
        a = self.client(cid, clean=False)
        a.subscribe(topic, qos=1)
        a.disconnect()
        pub = self.client(f"soak-pub{n % 3}")
        body = b"away-%d" % n
        pub.publish(topic, body, qos=1, pid=1)
        pub.expect(w.PUBACK)
        pub.disconnect()
        first = self.client(cid, clean=False)
        second = self.client(cid, clean=False)  # takes the session over
        self.takeovers += 1
        # The message is on the connection that won (resent if the first one had it
        # unacknowledged); the first one is closed by the takeover.
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and body not in got:
            p = second.recv(0.1)
            if p is not None and p.type == w.PUBLISH:
                got.append(p.payload)
                if p.qos:
                    second.puback(p.pid)
        if body not in got:
            self.lost.append(body)
        try:
            while first.recv(1.0) is not None:
                pass
            self.errors.append(f"cycle {n}: the taken-over connection stayed open")
        except w.Closed:
            pass
        first.close()
        second.disconnect()

    def run(self):
        # A fixed pace, so the work (and what bounded caches fill with) per second is the
        # same on a fast machine as on a slow one.
        n, t0 = 0, time.monotonic()
        while not self.stop.is_set():
            try:
                self.cycle(n)
            except Exception as e:  # counted and reported: the soak asserts there are none
                self.errors.append(f"cycle {n}: {e!r}")
            n += 1
            self.cycles = n
            self.stop.wait(max(0.0, t0 + n / self.rate - time.monotonic()))


def bench(b, seconds, *args):
    cmd = [bench_binary(), *args, "--host", b.host, "--port", str(b.port), "--threads", "1",
           "--duration", f"{seconds}s", "--warmup", "1s", "--json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def soak(seconds, sample_every=1.0, table_every=None, only=None):
    """Runs the soak; returns a report dict (samples, bench summaries, churn counts,
    log problems). `only`: the names of the parts to run (bench names, "churn"), to
    find which one a trend comes from."""
    b = Broker({"log_level": "info", "queues": {"soakq": {"partitions": 4}}})
    b.start()
    try:
        pid = b.proc.pid
        time.sleep(0.5)
        start_fds, start_rss = fd_count(pid), rss_kib(pid)
        benches = {
            "p2p_qos1_v5": bench(b, seconds, "pubsub", "--mode", "p2p", "-p", "4", "-s", "4",
                                 "--qos", "1", "--rate", "1000", "--size", "128",
                                 "--mqtt-version", "5", "--client-prefix", "soak-a"),
            "fanout_qos0": bench(b, seconds, "pubsub", "--mode", "fan-out", "-p", "1", "-s", "20",
                                 "--qos", "0", "--rate", "200", "--size", "64",
                                 "--client-prefix", "soak-b"),
            "shared_qos2_v5": bench(b, seconds, "pubsub", "--mode", "shared", "-p", "2", "-s", "3",
                                    "--qos", "2", "--rate", "300", "--size", "256",
                                    "--mqtt-version", "5", "--client-prefix", "soak-c"),
            "queue_qos1": bench(b, seconds, "queue", "--name", "soakq", "-p", "2", "-c", "2",
                                "--qos", "1", "--rate", "300", "--size", "256",
                                "--client-prefix", "soak-d"),
        }
        for name in [n for n in benches if only is not None and n not in only]:
            benches.pop(name).kill()
        churn = Churn(b, rate=12.0 if only is None or "churn" in only else 0.0)
        if churn.rate:
            churn.start()
        samples = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds + 1:
            t = time.monotonic() - t0
            samples.append((round(t, 1), rss_kib(pid), fd_count(pid)))
            if table_every and len(samples) > 1 \
                    and samples[-2][0] // table_every < t // table_every:
                print(f"{int(t):>6} s  RSS {samples[-1][1] / 1024:7.1f} MiB  fds {samples[-1][2]}",
                      flush=True)
            time.sleep(sample_every)
        churn.stop.set()
        if churn.rate:
            churn.join(30)
        summaries = {}
        for name, p in benches.items():
            out, err = p.communicate(timeout=seconds + 120)
            assert p.returncode == 0, f"{name}: exit {p.returncode}\n{err[-3000:]}"
            summaries[name] = json.loads(out)
        time.sleep(1.0)  # every client gone: their sockets closed
        end_fds, end_rss = fd_count(pid), rss_kib(pid)
        log = b.log_path.read_text(errors="replace")
        problems = [line for line in log.splitlines()
                    if re.search(r"\b(ERROR|panicked)\b", line)]
        warnings = [line for line in log.splitlines() if " WARN " in line]
        return {
            "seconds": seconds, "start_fds": start_fds, "start_rss_kib": start_rss,
            "end_fds": end_fds, "end_rss_kib": end_rss, "samples": samples,
            "benches": summaries, "churn_cycles": churn.cycles, "takeovers": churn.takeovers,
            "churn_lost": churn.lost, "churn_errors": churn.errors,
            "log_problems": problems, "log_warnings": warnings,
        }
    finally:
        b.cleanup()


def flat(report, warmup_fraction=0.25):
    """RSS and fds after the warm-up: (rss at the end of the warm-up, highest RSS of the
    second half, median RSS of the last quarter, fds range after the warm-up)."""
    s = report["samples"]
    n = len(s)
    warm = s[int(n * warmup_fraction)][1]
    second_half = [r for _, r, _ in s[n // 2:]]
    last_quarter = [r for _, r, _ in s[3 * n // 4:]]
    fds = [f for _, _, f in s[int(n * warmup_fraction):]]
    return warm, max(second_half), statistics.median(last_quarter), (min(fds), max(fds))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--table", type=int, default=0, metavar="SECONDS",
                    help="print RSS and fds every SECONDS while running")
    ap.add_argument("--samples-out", help="write every (seconds, RSS KiB, fds) sample here")
    ap.add_argument("--only", help="comma-separated parts to run: " 
                    "p2p_qos1_v5, fanout_qos0, shared_qos2_v5, queue_qos1, churn")
    a = ap.parse_args()
    r = soak(a.seconds, table_every=a.table or None,
             only=set(a.only.split(",")) if a.only else None)
    if a.samples_out:
        with open(a.samples_out, "w") as f:
            json.dump(r["samples"], f)
    warm, peak, tail, fds = flat(r)
    print(json.dumps({k: v for k, v in r.items() if k != "samples"}, indent=1)[:6000])
    print(f"RSS after warm-up {warm / 1024:.1f} MiB, peak of the second half {peak / 1024:.1f} MiB, "
          f"median of the last quarter {tail / 1024:.1f} MiB; fds after warm-up {fds}; "
          f"fds before/after {r['start_fds']}/{r['end_fds']}")


if __name__ == "__main__":
    main()
