#!/usr/bin/env python3
"""Alternating A/B runs of `roost-bench queue` against two (or more) roost setups.

Each arm is NAME=BINARY or NAME=BINARY:CONFIG (a roost config file). Every round runs
each arm once, in turn, on a fresh data directory and port, so both see the same
drift of a shared machine; the load average is read just before each run.

    benches/queue_ab.py --rounds 5 --bench target/release/roost-bench \\
        old=/tmp/roost-old new=target/release/roost -- --size 100 -p 4 -c 8 --inflight 160

Prints one Markdown table row per run (arm, round, load, CPU pressure, produced/consumed
msg/s, PUBACK p50/p99, e2e p99, roost's CPU per message, loss, duplicates) and a summary
per arm.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"roost did not listen on {port}")


def load1() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_pressure() -> float:
    """The share of the last 10 s in which some runnable task waited for a CPU (PSI):
    on a shared machine, how much of it other work took."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_arm(binary: str, config: str | None, bench: str, bench_args: list[str],
            duration: str) -> dict:
    data = tempfile.mkdtemp(prefix="roost-ab-", dir="/tmp")
    port = free_port()
    cmd = [binary, "--bind", f"127.0.0.1:{port}", "--data-dir", data, "--log-level", "warn"]
    if config:
        cmd += ["--config", config]
    broker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        load, pressure = load1(), cpu_pressure()
        cpu = cpu_seconds(broker.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [bench, "queue", "--port", str(port), "--duration", duration, "--json",
             *bench_args],
            capture_output=True, text=True, check=True, timeout=600)
        cpu = cpu_seconds(broker.pid) - cpu
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        bench_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        r = json.loads(out.stdout)
        r["load1"], r["cpu_pressure"] = load, pressure
        # roost's CPU over the whole run (warm-up and drain too) per message produced.
        r["cpu_us_per_msg"] = cpu * 1e6 / max(r["total_sent"], 1)
        # The load generator's, on the same cores: what it takes, roost cannot have.
        r["bench_cpu_us_per_msg"] = bench_cpu * 1e6 / max(r["total_sent"], 1)
        return r
    finally:
        broker.kill()
        broker.wait()
        shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bench", default="target/release/roost-bench")
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--json-out", help="also write every run's summary here")
    ap.add_argument("arms", nargs="+", help="NAME=BINARY[:CONFIG]")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    bench_args = argv[cut + 1:]
    arms = []
    for a in args.arms:
        name, _, spec = a.partition("=")
        binary, _, config = spec.partition(":")
        if not os.access(binary, os.X_OK):
            ap.error(f"{binary}: not an executable")
        arms.append((name, binary, config or None))
    runs = []
    print("| arm | round | load 1m | CPU pressure % | produced msg/s | consumed msg/s "
          "| ack p50 / p99 / p99.9 ms | e2e p99 ms | roost CPU us/msg | bench CPU us/msg | loss | dup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for rnd in range(1, args.rounds + 1):
        # Alternate which arm goes first, so neither always follows the other.
        order = arms if rnd % 2 else list(reversed(arms))
        for name, binary, config in order:
            r = run_arm(binary, config, args.bench, bench_args, args.duration)
            r["arm"], r["round"] = name, rnd
            runs.append(r)
            ack, e2e = r["ack_latency_us"], r["latency_us"]
            print(f"| {name} | {rnd} | {r['load1']:.2f} | {r['cpu_pressure']:.0f} "
                  f"| {r['sent_per_s']:,.0f} "
                  f"| {r['delivered_per_s']:,.0f} | {ack['p50'] / 1000:.2f} / "
                  f"{ack['p99'] / 1000:.2f} / {ack['p99.9'] / 1000:.1f} "
                  f"| {e2e['p99'] / 1000:.2f} "
                  f"| {r['cpu_us_per_msg']:.2f} | {r['bench_cpu_us_per_msg']:.2f} "
                  f"| {r['loss']} "
                  f"| {r['duplicates']} |", flush=True)
    print()
    for name, _, _ in arms:
        mine = [r for r in runs if r["arm"] == name]
        rates = [r["sent_per_s"] for r in mine]
        p99s = [r["ack_latency_us"]["p99"] / 1000 for r in mine]
        cpus = [r["cpu_us_per_msg"] for r in mine]
        print(f"{name}: produced median {statistics.median(rates):,.0f} "
              f"(min {min(rates):,.0f}, max {max(rates):,.0f}); PUBACK p99 max "
              f"{max(p99s):.2f} ms; runs >= 200K with p99 < 10 ms: "
              f"{sum(1 for r, p in zip(rates, p99s) if r >= 200_000 and p < 10)}"
              f"/{len(mine)}; roost CPU per message median "
              f"{statistics.median(cpus):.2f} us")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
