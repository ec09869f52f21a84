"""roost-bench against the broker under test: a short QoS 1 run must deliver everything.

Uses target/release/roost-bench (ROOST_BENCH_BIN overrides; built with cargo when missing,
unless ROOST_NO_BUILD=1). test.sh builds it next to the broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from broker import WORKSPACE, free_port

_bench = None


def bench_binary() -> str:
    global _bench
    if os.environ.get("ROOST_BENCH_BIN"):
        return os.environ["ROOST_BENCH_BIN"]
    if _bench is None:
        path = WORKSPACE / "target" / "release" / "roost-bench"
        if not path.exists() and os.environ.get("ROOST_NO_BUILD") != "1":
            r = subprocess.run(["cargo", "build", "--release", "--bin", "roost-bench"],
                               cwd=WORKSPACE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cargo build --release --bin roost-bench failed:\n"
                                   f"{r.stdout[-4000:]}")
        _bench = str(path)
    return _bench


def run_bench(*args, timeout=25):
    return subprocess.run([bench_binary(), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_pubsub_qos1_delivers_everything_with_latency(broker, version):
    # A fixed rate well within any broker's means: this checks behaviour, not speed.
    r = run_bench("pubsub", "--host", broker.host, "--port", str(broker.port),
                  "--mqtt-version", version, "--mode", "p2p", "-p", "4", "-s", "4",
                  "--qos", "1", "--rate", "4000", "--size", "64",
                  "--duration", "2s", "--warmup", "300ms", "--json")
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    s = json.loads(r.stdout)
    assert s["scenario"] == "pubsub" and s["mode"] == "p2p"
    assert s["connections"]["established"] == 8
    assert s["delivered"] > 0 and s["total_delivered"] > 0
    assert s["expected"] == s["total_sent"] > 0
    assert s["loss"] == 0, s
    assert s["duplicates"] == 0 and s["misrouted"] == 0, s
    assert s["unacked"] == 0, s
    assert s["errors"] == {}, s
    # Roughly the asked rate over the measured window.
    assert 2000 < s["sent_per_s"] < 6000, s
    lat = s["latency_us"]
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        assert lat[key] > 0, lat
    assert lat["p50"] <= lat["p99"] <= lat["max"], lat
    assert s["ack_latency_us"]["count"] > 0


def test_refused_connect_is_a_clear_error():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    r = run_bench("pubsub", "--port", str(port), "--duration", "2s")
    assert r.returncode == 1, r
    assert "connection refused" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10, "gave up promptly"
