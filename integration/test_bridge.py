"""Bridges (`[[bridge]]`): roost forwarding topics to and from another broker.

The remote is a real mosquitto (Debian's, installed by test.sh) or a second roost. The
tests stop the remote mid-stream and count every message: what goes out waits in the
bridge's durable queue while the remote is away, and nothing is lost or looped back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest

import mqttraw
from broker import IS_MOSQUITTO, accepts, free_port, wait_port
from conftest import wait_for

pytestmark = [
    pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own bridges"),
    pytest.mark.skipif(shutil.which("mosquitto") is None,
                       reason="mosquitto not installed (apt-get install mosquitto)"),
]


class Mosquitto:
    """A mosquitto broker on 127.0.0.1:port with persistence in its own directory, so a
    persistent session survives a stop and start (mosquitto saves on SIGTERM)."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="roost-it-mosq-")
        self.dir = Path(self.tmp.name)
        # Started as root, mosquitto drops to its own user, which must be able to save
        # its persistence file here.
        os.chmod(self.dir, 0o777)
        self.proc = None
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1", "allow_anonymous true",
            "persistence true", f"persistence_location {self.dir}/",
            "max_queued_messages 0", "max_inflight_messages 0",
            "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
        ]) + "\n")
        self.conf = conf

    def start(self):
        self.log = open(self.dir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.log.close()

    def cleanup(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.tmp.cleanup()


@pytest.fixture
def mosquittos():
    made = []

    def make(port=None):
        m = Mosquitto(port)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()


class Sink:
    """A paho client collecting what arrives on `filter` (persistent session, QoS 1),
    reconnecting by itself when its broker comes back."""

    def __init__(self, port, filter, version=paho.MQTTv311, client_id=None):
        self.got = []
        self.lock = threading.Lock()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"sink-{uuid.uuid4().hex[:8]}",
                             clean_session=False if version != paho.MQTTv5 else None,
                             protocol=version)
        self.c.reconnect_delay_set(0.1, 0.5)
        self.subscribed = threading.Event()
        self.filter = filter
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(filter, qos=1)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        assert self.subscribed.wait(10), "sink did not subscribe"

    def _on_message(self, c, u, msg):
        with self.lock:
            self.got.append((msg.topic, msg.payload.decode(), msg.retain))

    def messages(self):
        with self.lock:
            return list(self.got)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def start_roost(tmp: Path, bridges, extra=()):
    """A roost with `bridges` ([[bridge]] tables as dicts) and an admin listener."""
    port, admin = free_port(), free_port()
    lines = [f'bind = ["127.0.0.1:{port}"]', f'data_dir = "{tmp}/data"',
             f'admin_bind = ["127.0.0.1:{admin}"]', 'log_level = "info"', *extra]
    for b in bridges:
        lines.append("[[bridge]]")
        for k, v in b.items():
            lines.append(f"{k} = {json.dumps(v) if not isinstance(v, list) else toml_list(v)}")
    (tmp / "roost.toml").write_text("\n".join(lines) + "\n")
    from broker import roost_binary
    log = open(tmp / "roost.log", "ab")
    proc = subprocess.Popen([roost_binary(), "--config", str(tmp / "roost.toml")], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port)
    except Exception:
        proc.kill()
        raise AssertionError((tmp / "roost.log").read_text())
    proc.port, proc.admin, proc.logfile = port, admin, tmp / "roost.log"
    return proc


def toml_list(v):
    def inline(d):
        return "{ " + ", ".join(f"{k} = {json.dumps(x)}" for k, x in d.items()) + " }"
    return "[" + ", ".join(inline(x) if isinstance(x, dict) else json.dumps(x) for x in v) + "]"


def stop_roost(proc):
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(15)
    assert rc == 0, proc.logfile.read_text()[-3000:]


def get(proc, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.admin}{path}", timeout=10) as r:
        return r.read().decode()


def bridge_state(proc, name):
    return next(b for b in json.loads(get(proc, "/api/v1/bridges")) if b["name"] == name)


def metric(proc, line_prefix):
    for line in get(proc, "/metrics").splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    return None


def publish_many(port, topics_payloads, version=paho.MQTTv311, inflight=100):
    """Publishes at QoS 1 with `inflight` unacknowledged at a time; returns once every
    PUBACK came (roost's PUBACK means the bridge's queue holds the message)."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                    protocol=version)
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    done = threading.Event()
    acked = set()
    lock = threading.Lock()
    total = len(topics_payloads)

    def on_publish(client, userdata, mid, rc, props):
        with lock:
            acked.add(mid)
            if len(acked) == total:
                done.set()

    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    for topic, payload in topics_payloads:
        c.publish(topic, payload, qos=1)
    assert done.wait(120), f"{len(acked)} of {total} acknowledged"
    c.loop_stop()
    c.disconnect()


def first_occurrences(payloads):
    seen, order = set(), []
    for p in payloads:
        if p not in seen:
            seen.add(p)
            order.append(p)
    return order


@pytest.mark.timeout(180)
def test_nothing_is_lost_across_a_remote_restart(tmp_path, mosquittos):
    """5,000 QoS 1 messages out to mosquitto; mosquitto is stopped and started again in
    the middle. Every message arrives, first occurrences in the order published."""
    remote = mosquittos().start()
    sink = Sink(remote.port, "site-1/#", client_id="bridge-sink")
    roost = start_roost(tmp_path, [{
        "name": "cloud", "address": f"127.0.0.1:{remote.port}", "protocol": "5",
        "reconnect_initial_ms": 100, "reconnect_max_ms": 500,
        "topics": [{"filter": "sensors/#", "direction": "out", "qos": 1,
                    "remote_prefix": "site-1/"}],
    }])
    try:
        assert wait_for(lambda: bridge_state(roost, "cloud")["up"], 10)
        n = 5000
        batches = [[(f"sensors/dev-{i % 7}/t", str(i)) for i in range(k, min(k + 1000, n))]
                   for k in range(0, n, 1000)]
        publish_many(roost.port, batches[0] + batches[1])
        remote.stop()
        # The remote is down: publishes are acknowledged by roost and wait in its queue.
        assert wait_for(lambda: not bridge_state(roost, "cloud")["up"], 10)
        publish_many(roost.port, batches[2] + batches[3])
        state = bridge_state(roost, "cloud")
        assert state["queued"] > 0, state
        assert metric(roost, 'roost_bridge_up{bridge="cloud"}') == 0
        remote.start()
        publish_many(roost.port, batches[4])
        expected = [str(i) for i in range(n)]

        def all_arrived():
            return len({p for _, p, _ in sink.messages()}) >= n

        if not wait_for(all_arrived, 60):
            have = {int(p) for _, p, _ in sink.messages()}
            missing = sorted(set(range(n)) - have)
            raise AssertionError(f"{len(have)} of {n} arrived; missing {len(missing)}: "
                                 f"{missing[:5]}..{missing[-5:]}; bridge: "
                                 f"{bridge_state(roost, 'cloud')}\n"
                                 + roost.logfile.read_text()[-2000:])
        got = [p for _, p, _ in sink.messages()]
        assert set(got) == set(expected)
        assert first_occurrences(got) == expected, "out of order"
        assert all(t.startswith("site-1/sensors/dev-") for t, _, _ in sink.messages())
        assert wait_for(lambda: bridge_state(roost, "cloud")["queued"] == 0, 10)
        state = bridge_state(roost, "cloud")
        assert state["up"] and state["connects"] >= 2 and state["forwarded_out"] >= n, state
        assert metric(roost, 'roost_bridge_up{bridge="cloud"}') == 1
        assert metric(roost, 'roost_bridge_messages_forwarded_total{bridge="cloud",direction="out"}') >= n
        log = roost.logfile.read_text()
        assert log.count("bridge connected") >= 2 and "bridge connection lost" in log
    finally:
        sink.close()
        stop_roost(roost)


def test_the_queue_is_bounded_and_drains_in_order_when_the_remote_comes(tmp_path, mosquittos):
    """Remote down from the start: 10 messages wait (the bound), 5 more are dropped and
    counted; once the remote is back, the 10 arrive in order, retained flag kept."""
    # The sink's persistent session exists at the remote before it goes down, so what
    # the bridge sends the moment the remote is back is kept for the sink.
    remote = mosquittos().start()
    sink = Sink(remote.port, "data/#", client_id="bounded-sink")
    remote.stop()
    roost = start_roost(tmp_path, [{
        "name": "late", "address": f"127.0.0.1:{remote.port}", "protocol": "3.1.1",
        "queue_max_messages": 10, "reconnect_initial_ms": 100, "reconnect_max_ms": 300,
        "topics": [{"filter": "data/#", "direction": "out", "qos": 1}],
    }])
    try:
        pub = mqttraw.RawClient("127.0.0.1", roost.port, 4)
        pub.connect("bounded-pub")
        for i in range(15):
            pub.publish("data/x", str(i).encode(), qos=1, pid=i + 1, retain=(i == 0))
            assert pub.expect(mqttraw.PUBACK).pid == i + 1
        pub.disconnect()
        state = bridge_state(roost, "late")
        assert not state["up"] and state["queued"] == 10, state
        assert state["dropped"]["queue_full"] == 5, state
        assert metric(roost, 'roost_bridge_messages_dropped_total{bridge="late",reason="queue_full"}') == 5
        assert metric(roost, 'roost_bridge_queued_messages{bridge="late"}') == 10
        remote.start()
        assert wait_for(lambda: len(sink.messages()) >= 10, 20), sink.messages()
        got = sink.messages()
        # (The sink's re-subscription after its reconnect may bring the retained 0 again.)
        assert first_occurrences([p for _, p, _ in got]) == [str(i) for i in range(10)], got
        assert wait_for(lambda: bridge_state(roost, "late")["queued"] == 0, 10)
        # The retained flag travelled: the remote holds message 0 as retained.
        fresh = mqttraw.RawClient("127.0.0.1", remote.port, 4)
        fresh.connect("retained-check")
        fresh.subscribe("data/x", qos=1)
        p = fresh.expect(mqttraw.PUBLISH)
        assert (p.payload, p.retain) == (b"0", True)
        fresh.disconnect()
    finally:
        sink.close()
        stop_roost(roost)


def test_incoming_mappings_republish_under_the_local_prefix(tmp_path, mosquittos):
    remote = mosquittos().start()
    roost = start_roost(tmp_path, [{
        "name": "cmds", "address": f"127.0.0.1:{remote.port}",
        "topics": [{"filter": "commands/#", "direction": "in", "qos": 1,
                    "local_prefix": "edge/"}],
    }])
    try:
        assert wait_for(lambda: bridge_state(roost, "cmds")["up"], 10)
        local = mqttraw.RawClient("127.0.0.1", roost.port, 5)
        local.connect("cmd-listener")
        assert local.subscribe("edge/#", qos=1).rcs == [1]
        time.sleep(0.3)  # the bridge's SUBSCRIBE at the remote
        publish_many(remote.port, [("commands/door", "open"), ("other/x", "not bridged")])
        p = local.expect(mqttraw.PUBLISH, timeout=10)
        assert (p.topic, p.payload) == ("edge/commands/door", b"open")
        local.puback(p.pid)
        assert local.recv(1.0) is None, "only the mapped topic comes in"
        assert bridge_state(roost, "cmds")["forwarded_in"] == 1
        local.disconnect()
    finally:
        stop_roost(roost)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_roost_to_roost_both_ways_without_loops(tmp_path, protocol):
    """roost A bridges `shared/#` both ways to roost B: what is published on either side
    reaches subscribers on both sides exactly once, and nothing comes back."""
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    b = start_roost(tmp_path / "b", [])
    a = start_roost(tmp_path / "a", [{
        "name": "peer", "address": f"127.0.0.1:{b.port}", "protocol": protocol,
        "topics": [{"filter": "shared/#", "direction": "both", "qos": 1}],
    }])
    try:
        assert wait_for(lambda: bridge_state(a, "peer")["up"], 10)
        sa = Sink(a.port, "shared/#")
        sb = Sink(b.port, "shared/#")
        time.sleep(0.3)
        publish_many(a.port, [(f"shared/from-a/{i}", f"a{i}") for i in range(50)])
        publish_many(b.port, [(f"shared/from-b/{i}", f"b{i}") for i in range(50)])
        want = sorted([f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)])
        for sink in (sa, sb):
            assert wait_for(lambda: len(sink.messages()) >= 100, 20), len(sink.messages())
        time.sleep(1.5)  # a loop would bring more
        for side, sink in (("A", sa), ("B", sb)):
            got = sorted(p for _, p, _ in sink.messages())
            assert got == want, f"on {side}: {len(got)} messages"
        state = bridge_state(a, "peer")
        assert state["forwarded_out"] == 50 and state["forwarded_in"] == 50, state
        sa.close()
        sb.close()
    finally:
        stop_roost(a)
        stop_roost(b)


def test_bad_bridge_settings_name_the_key(tmp_path):
    from broker import roost_binary
    conf = tmp_path / "roost.toml"
    conf.write_text('[[bridge]]\nname = "x"\naddress = "nowhere"\n'
                    'topics = [{ filter = "a/#", direction = "out" }]\n')
    r = subprocess.run([roost_binary(), "--config", str(conf), "--data-dir",
                        str(tmp_path / "d")], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "bridge" in r.stderr and "address" in r.stderr, r.stderr


def test_a_bridge_over_tls_with_a_client_certificate(tmp_path, pki):
    """roost A bridges out to roost B's TLS listener, which requires client certificates
    from the test CA; a bridge that trusts another CA does not connect."""
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "c").mkdir()
    tls_port = free_port()
    b = start_roost(tmp_path / "b", [], extra=[
        f'tls_bind = ["127.0.0.1:{tls_port}"]', f'tls_cert = "{pki.server.cert_path}"',
        f'tls_key = "{pki.server.key_path}"', f'tls_client_ca = "{pki.ca.cert_path}"'])
    wait_port(tls_port)
    bridge = {"name": "secure", "address": f"127.0.0.1:{tls_port}", "tls": True,
              "ca_file": str(pki.ca.cert_path), "cert_file": str(pki.client.cert_path),
              "key_file": str(pki.client.key_path),
              "topics": [{"filter": "tls/#", "direction": "out", "qos": 1}]}
    a = start_roost(tmp_path / "a", [bridge])
    rogue = start_roost(tmp_path / "c", [dict(bridge, ca_file=str(pki.rogue_ca.cert_path))])
    try:
        assert wait_for(lambda: bridge_state(a, "secure")["up"], 10)
        sink = Sink(b.port, "tls/#")
        publish_many(a.port, [("tls/x", "over tls")])
        assert wait_for(lambda: sink.messages(), 10)
        assert sink.messages()[0][:2] == ("tls/x", "over tls")
        sink.close()
        state = bridge_state(rogue, "secure")
        assert not state["up"] and "TLS" in (state["last_error"] or ""), state
    finally:
        stop_roost(rogue)
        stop_roost(a)
        stop_roost(b)
