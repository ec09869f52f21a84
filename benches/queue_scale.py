#!/usr/bin/env python3
"""The queue load matrix of issue 16 section 2, one row per shape, as Markdown.

Every row starts roost fresh (its own data directory under /tmp and port) with the
queue settings of the row in a config file, runs `roost-bench queue` against it, and
prints what it measured with the 1-minute load average read before the run:

  partitions  8 / 10 / 100 / 1000 partitions on one queue (throughput vs 8)
  groups      1 / 10 / 100 consumer groups on one queue, one consumer each
  payload     100 B / 1 KiB / 10 KiB / 100 KiB, beside dd's sequential write speed
  consumers   8 / 32 consumers on 8 partitions, and 32 on 32
  memory      RSS per idle partition (one queue of 1000) and per idle queue (1000 x 8)
  startup     time from exec to /ready with 10,000 partitions on disk

    benches/queue_scale.py --roost target/release/roost \\
        --bench target/release/roost-bench [--only partitions,groups] [--duration 10s]
"""

from __future__ import annotations

import argparse
import json
import resource
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load1() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def more_files() -> None:
    """Every partition log holds open files (see the memory rows): raise the limit as
    far as this user may."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200_000, 200_000))
    except (ValueError, OSError):
        pass


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Roost:
    """One roost process on a fresh data directory, with the admin API on."""

    def __init__(self, binary: str, queue_defaults: dict, data: str | None = None,
                 top: dict | None = None):
        self.binary = binary
        self.data = data or tempfile.mkdtemp(prefix="roost-scale-", dir="/tmp")
        self.port = free_port()
        self.admin = free_port()
        # Beside the data directory, named without "..": cleanup removes that directory
        # first, after which a path through it no longer resolves.
        self.config = os.path.join(os.path.dirname(self.data),
                                   os.path.basename(self.data) + ".toml")
        with open(self.config, "w") as f:
            for k, v in (top or {}).items():
                f.write(f"{k} = {json.dumps(v)}\n")
            f.write("[queue_defaults]\n")
            for k, v in queue_defaults.items():
                f.write(f"{k} = {json.dumps(v)}\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Starts roost; returns the seconds until /ready answered 200."""
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [self.binary, "--bind", f"127.0.0.1:{self.port}", "--data-dir", self.data,
             "--admin-bind", f"127.0.0.1:{self.admin}", "--log-level", "warn",
             "--config", self.config],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=more_files)
        while time.monotonic() - t0 < 300:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("roost exited")
            time.sleep(0.02)
        raise RuntimeError("roost not ready in 300 s")

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}", data=data,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read().decode()}") from None

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        try:
            os.unlink(self.config)
        except OSError:
            pass


def bench(args, roost: Roost, *extra: str) -> dict:
    out = subprocess.run(
        [args.bench, "queue", "--port", str(roost.port), "--duration", args.duration,
         "--json", *extra],
        capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout)


def row(cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def fmt_run(r: dict) -> list[str]:
    return [f"{r['sent_per_s']:,.0f}", f"{r['delivered_per_s']:,.0f}",
            f"{r['ack_latency_us']['p99'] / 1000:.1f}", f"{r['loss']}/{r['duplicates']}"]


def one(args, queue_defaults: dict, *extra: str) -> dict:
    roost = Roost(args.roost, queue_defaults)
    try:
        roost.start()
        # Created before the run: creating 1,000 partitions (3,000 files) takes seconds,
        # which would otherwise fall inside the measured time.
        t0 = time.monotonic()
        roost.call("PUT", "/api/v1/queues/bench", queue_defaults)
        created = time.monotonic() - t0
        load = load1()
        r = bench(args, roost, *extra)
        r["load1"] = load
        r["created_s"] = created
        return r
    finally:
        roost.cleanup()


BASE = ["--size", "100", "-p", "4", "-c", "8", "--inflight", "160"]


def partitions(args) -> None:
    print("\n### Partitions per queue (`-p 4 -c 8 --inflight 160 --size 100`)\n")
    row(["partitions", "queue created in", "load 1m", "produced msg/s", "delivered msg/s",
         "ack p99 ms", "loss/dup", "vs 8"])
    row(["---"] * 8)
    base = None
    for n in (8, 10, 100, 1000):
        r = one(args, {"partitions": n}, *BASE)
        base = base or r["sent_per_s"]
        row([n, f"{r['created_s']:.2f} s", f"{r['load1']:.2f}", *fmt_run(r),
             f"{r['sent_per_s'] / base:.0%}"])


def groups(args) -> None:
    print("\n### Consumer groups on one queue (one consumer per group, "
          "`-p 4 --inflight 160 --size 100`)\n")
    row(["groups", "load 1m", "produced msg/s", "deliveries/s (all groups)", "ack p99 ms",
         "loss/dup"])
    row(["---"] * 6)
    for g in (1, 10, 100):
        r = one(args, {}, "--size", "100", "-p", "4", "--inflight", "160",
                "--groups", str(g), "-c", str(g))
        f = fmt_run(r)
        row([g, f"{r['load1']:.2f}", f[0], f[1], f[2], f[3]])


def dd_mb_s() -> float:
    """Sequential write speed of /tmp's disk: 256 MiB, fdatasync at the end."""
    path = tempfile.mktemp(prefix="roost-dd-", dir="/tmp")
    try:
        out = subprocess.run(
            ["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=256", "conv=fdatasync"],
            capture_output=True, text=True, check=True)
        # "268435456 bytes (268 MB, 256 MiB) copied, 0.52 s, 516 MB/s"
        last = out.stderr.strip().splitlines()[-1]
        secs = float(last.split(" copied, ")[1].split(" s")[0])
        return 268435456 / secs / 1e6
    finally:
        os.unlink(path)


def payload(args) -> None:
    print("\n### Payload size (`-p 4 -c 8`; in flight per producer as shown)\n")
    row(["payload", "in flight", "load 1m", "dd MB/s", "produced msg/s", "produced MB/s",
         "delivered msg/s", "ack p99 ms", "loss/dup"])
    row(["---"] * 9)
    for size, inflight in ((100, 160), (1024, 160), (10240, 64), (102400, 16)):
        disk = dd_mb_s()
        r = one(args, {}, "--size", str(size), "-p", "4", "-c", "8",
                "--inflight", str(inflight))
        f = fmt_run(r)
        row([size, inflight, f"{r['load1']:.2f}", f"{disk:.0f}", f[0],
             f"{r['sent_per_s'] * size / 1e6:.1f}", f[1], f[2], f[3]])


def consumers(args) -> None:
    print("\n### Consumers and partitions (`-p 4 --inflight 160 --size 100`)\n")
    row(["partitions", "consumers", "load 1m", "produced msg/s", "delivered msg/s",
         "ack p99 ms", "loss/dup"])
    row(["---"] * 7)
    for parts, cons in ((8, 8), (8, 32), (32, 32)):
        r = one(args, {"partitions": parts}, "--size", "100", "-p", "4", "-c", str(cons),
                "--inflight", "160")
        f = fmt_run(r)
        row([parts, cons, f"{r['load1']:.2f}", *f])


def memory(args) -> None:
    print("\n### Idle memory (RSS after creating, idle, no messages)\n")
    row(["what", "count", "RSS before KiB", "RSS after KiB", "per item",
         "open files per item"])
    row(["---"] * 6)
    roost = Roost(args.roost, {}, top={"max_queues": 0})
    try:
        roost.start()
        time.sleep(0.5)
        pid = roost.proc.pid
        before, fds = rss_kib(pid), open_fds(pid)
        roost.call("PUT", "/api/v1/queues/wide", {"partitions": 1000})
        time.sleep(1.0)
        after = rss_kib(pid)
        row(["partition (one queue of 1000)", 1000, before, after,
             f"{(after - before) * 1024 / 1000:,.0f} B", f"{(open_fds(pid) - fds) / 1000:.2f}"])
        before, fds = after, open_fds(pid)
        # An idle queue of 8 holds 11 files open (8 partitions, its progress log and its
        # dead-letter queue's two logs): 1000 of them fit under a limit of 20,000.
        for i in range(args.queues):
            roost.call("PUT", f"/api/v1/queues/idle{i}", {"partitions": 8})
        time.sleep(1.0)
        after = rss_kib(pid)
        row(["queue of 8 partitions", args.queues, before, after,
             f"{(after - before) * 1024 / args.queues:,.0f} B",
             f"{(open_fds(pid) - fds) / args.queues:.2f}"])
    finally:
        roost.cleanup()


def startup(args) -> None:
    print(f"\n### Start-up with {args.startup_partitions:,} partitions on disk "
          "(queues of 1000, empty)\n")
    roost = Roost(args.roost, {}, top={"max_queues": 0})
    try:
        roost.start()
        for i in range(args.startup_partitions // 1000):
            roost.call("PUT", f"/api/v1/queues/big{i}", {"partitions": 1000})
        files = sum(len(fs) for _, _, fs in os.walk(roost.data))
        roost.stop()
        cold = roost.start()
        roost.stop()
        warm = roost.start()
        row(["partitions", "files in data dir", "start to /ready (1st restart)",
             "start to /ready (2nd)"])
        row(["---"] * 4)
        row([args.startup_partitions, files, f"{cold:.2f} s", f"{warm:.2f} s"])
    finally:
        roost.cleanup()


SECTIONS = {"partitions": partitions, "groups": groups, "payload": payload,
            "consumers": consumers, "memory": memory, "startup": startup}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roost", default="target/release/roost")
    ap.add_argument("--bench", default="target/release/roost-bench")
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--queues", type=int, default=1000, help="idle queues to create")
    ap.add_argument("--startup-partitions", type=int, default=10_000)
    args = ap.parse_args()
    print(f"roost {args.roost}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"load {open('/proc/loadavg').read().split()[:3]}")
    for name in args.only.split(","):
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
