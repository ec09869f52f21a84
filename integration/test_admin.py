"""The HTTP admin listener (`admin_bind`): /health, /ready, /metrics, the queue API under
/api/v1/queues, clients and sessions, kicking a client, and the bearer token.

Everything goes through a real `roost` with real MQTT traffic (mqttraw) and the stdlib's
urllib, as an operator's curl would.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
import uuid

import pytest

import mqttraw
from broker import IS_MOSQUITTO, free_port
from conftest import publish_acked, receive_publishes, wait_for

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's admin API")


class Admin:
    """A tiny client of the admin API."""

    def __init__(self, port, token=None):
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def call(self, method, path, body=None, token=None, raw=None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)
        tok = token if token is not None else self.token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    def json(self, method, path, body=None, expect=200, **kw):
        status, text, _ = self.call(method, path, body, **kw)
        assert status == expect, f"{method} {path}: {status} {text}"
        return json.loads(text)

    def metrics(self):
        status, text, headers = self.call("GET", "/metrics")
        assert status == 200, text
        assert headers["Content-Type"].startswith("text/plain"), headers
        return parse_metrics(text)


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text format -> {(name, frozenset(labels)): value}; every line must parse."""
    out = {}
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        labels = frozenset(LABEL.findall(m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    for name, _ in out:
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or types.get(family) == "histogram", f"{name} has no # TYPE"
    return out


def value(metrics, name, **labels):
    return metrics.get((name, frozenset(labels.items())))


def admin_broker(broker_with, **config):
    port = free_port()
    b = broker_with(admin_bind=[f"127.0.0.1:{port}"], **config)
    return b, port


def group_of(info, name):
    groups = [g for g in info["groups"] if g["group"] == name]
    assert len(groups) == 1, info
    return groups[0]


def test_health_ready_and_unknown_paths(broker_with):
    b, port = admin_broker(broker_with)
    api = Admin(port)
    assert api.json("GET", "/health") == {"status": "ok"}
    assert api.json("GET", "/ready") == {"status": "ready"}
    assert api.call("GET", "/nope")[0] == 404
    status, _, headers = api.call("POST", "/health", raw=b"")
    assert status == 405 and headers["Allow"] == "GET"
    assert api.call("PUT", "/api/v1/queues/x", raw=b"{not json")[0] == 400


def listening_ports(pid):
    """TCP ports the process `pid` listens on: its socket inodes found in
    /proc/net/tcp{,6} in state LISTEN (0A)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def test_admin_is_off_by_default(broker, broker_with):
    """Without admin_bind nothing listens but MQTT (the API controls queues and clients)."""
    assert listening_ports(broker.proc.pid) == {broker.port}
    # The probe sees an admin listener when there is one.
    b, port = admin_broker(broker_with)
    assert listening_ports(b.proc.pid) == {b.port, port}


def test_metrics_counters_move(broker_with):
    # No $SYS status topics: they are retained and published, and would move the
    # counters this test predicts exactly.
    b, port = admin_broker(broker_with, sys_interval=0)
    api = Admin(port)
    before = api.metrics()
    for name in ["roost_connections", "roost_sessions", "roost_subscriptions",
                 "roost_retained_messages"]:
        assert value(before, name) is not None, name
    for qos in "012":
        assert value(before, "roost_messages_received_total", qos=qos) == 0
        assert value(before, "roost_messages_sent_total", qos=qos) == 0
    for reason in ["offline_queue_full", "session_queue_full", "slow_subscriber"]:
        assert value(before, "roost_messages_dropped_total", reason=reason) == 0

    t = f"it/admin/{uuid.uuid4().hex[:8]}"
    sub = mqttraw.RawClient(b.host, b.port, 4)
    sub.connect("metrics-sub")
    assert sub.subscribe(t, qos=1).rcs == [1]
    pub = mqttraw.RawClient(b.host, b.port, 4)
    pub.connect("metrics-pub")
    pub.publish(t, b"retained", qos=1, pid=1, retain=True)
    pub.expect(mqttraw.PUBACK)
    for i in range(5):
        pub.publish(t, b"x%d" % i, qos=0)
    got = receive_publishes(sub, 6)
    assert len(got) == 6
    assert wait_for(lambda: value(api.metrics(), "roost_connections") == 2)
    m = api.metrics()
    assert value(m, "roost_sessions") == 2
    assert value(m, "roost_subscriptions") == 1
    assert value(m, "roost_retained_messages") == 1
    assert value(m, "roost_messages_received_total", qos="0") == 5
    assert value(m, "roost_messages_received_total", qos="1") == 1
    assert value(m, "roost_messages_sent_total", qos="0") == 5
    assert value(m, "roost_messages_sent_total", qos="1") == 1
    pub.disconnect()
    sub.disconnect()
    assert wait_for(lambda: value(api.metrics(), "roost_connections") == 0)


def test_disconnect_reasons_are_counted(broker_with):
    """roost_disconnects_total{reason} moves for each way a connection ends."""
    b, port = admin_broker(broker_with, sys_interval=0)
    api = Admin(port)

    def count(reason):
        return value(api.metrics(), "roost_disconnects_total", reason=reason)

    reasons = ["client_disconnect", "client_closed", "keep_alive_timeout", "protocol_error",
               "taken_over", "admin_kick", "receive_maximum_exceeded"]
    assert all(count(r) == 0 for r in reasons), api.metrics()
    c = mqttraw.RawClient(b.host, b.port, 5)
    c.connect("dr-normal")
    c.disconnect()
    c = mqttraw.RawClient(b.host, b.port, 4)
    c.connect("dr-closed")
    c.close()
    c = mqttraw.RawClient(b.host, b.port, 4)
    c.connect("dr-keepalive", keepalive=1)
    c.wait_closed(5)
    c = mqttraw.RawClient(b.host, b.port, 4)
    c.connect("dr-bad")
    c.send(b"\xf0\x00")  # packet type 15 is reserved
    c.wait_closed(5)
    old = mqttraw.RawClient(b.host, b.port, 4)
    old.connect("dr-twice")
    new = mqttraw.RawClient(b.host, b.port, 4)
    new.connect("dr-twice")
    old.wait_closed(5)
    new.disconnect()
    k = mqttraw.RawClient(b.host, b.port, 4)
    k.connect("dr-kick")
    assert api.json("DELETE", "/api/v1/clients/dr-kick") == {"disconnected": "dr-kick"}
    k.wait_closed(5)
    expected = {"client_disconnect": 2, "client_closed": 1, "keep_alive_timeout": 1,
                "protocol_error": 1, "taken_over": 1, "admin_kick": 1,
                "receive_maximum_exceeded": 0}
    assert wait_for(lambda: {r: count(r) for r in reasons} == expected), (
        {r: count(r) for r in reasons})


def test_dropped_messages_are_counted(broker_with):
    """An offline session's queue past max_queued_messages drops, and /metrics says so."""
    b, port = admin_broker(broker_with, max_queued_messages=2)
    api = Admin(port)
    t = f"it/admin/{uuid.uuid4().hex[:8]}"
    sub = mqttraw.RawClient(b.host, b.port, 4)
    sub.connect("drop-sub", clean=False)
    assert sub.subscribe(t, qos=1).rcs == [1]
    sub.disconnect()
    sub.close()
    publish_acked(b, 4, t, [b"d%d" % i for i in range(5)])
    m = api.metrics()
    assert value(m, "roost_messages_dropped_total", reason="offline_queue_full") == 3
    sessions = {s["client_id"]: s for s in api.json("GET", "/api/v1/sessions")}
    assert sessions["drop-sub"]["queued_messages"] == 2


def test_queue_metrics(broker_with):
    b, port = admin_broker(broker_with)
    api = Admin(port)
    q = f"q{uuid.uuid4().hex[:8]}"
    publish_acked(b, 4, f"$queue/{q}", [b"m%d" % i for i in range(4)])
    c = mqttraw.RawClient(b.host, b.port, 4)
    c.connect("qm-cons")
    assert c.subscribe([(f"$share/g1/$queue/{q}", 1)]).rcs == [1]
    receive_publishes(c, 4, ack=False)

    def check():
        m = api.metrics()
        return (value(m, "roost_queue_depth", queue=q) == 4
                and value(m, "roost_queue_inflight", queue=q, group="g1", filter="") == 4
                and value(m, "roost_queue_lag", queue=q, group="g1", filter="") == 4
                and value(m, "roost_queue_dead_letters", queue=q) == 0
                and value(m, "roost_queue_bytes", queue=q) > 0)
    assert wait_for(check), api.call("GET", "/metrics")[1]
    c.disconnect()


def test_token_required_when_configured(broker_with):
    b, port = admin_broker(broker_with, admin_token="s3cret-token")
    api = Admin(port)
    # /health and /ready stay open for probes.
    assert api.call("GET", "/health")[0] == 200
    assert api.call("GET", "/ready")[0] == 200
    for method, path in [("GET", "/metrics"), ("GET", "/api/v1/queues"),
                         ("GET", "/api/v1/clients"), ("DELETE", "/api/v1/queues/x")]:
        status, _, headers = api.call(method, path)
        assert status == 401, (method, path)
        assert headers.get("WWW-Authenticate") == "Bearer"
        assert api.call(method, path, token="wrong")[0] == 401
    api.token = "s3cret-token"
    assert api.call("GET", "/metrics")[0] == 200
    assert api.json("GET", "/api/v1/queues") == []


def test_non_loopback_without_token_is_refused(tmp_path):
    """A config error names both keys; the broker does not start."""
    import subprocess
    from broker import roost_binary
    r = subprocess.run([roost_binary(), "--bind", f"127.0.0.1:{free_port()}",
                        "--data-dir", str(tmp_path), "--admin-bind", f"0.0.0.0:{free_port()}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert "admin_bind" in r.stderr and "admin_token" in r.stderr, r.stderr


def test_queue_lifecycle_and_reset(broker_with):
    b, port = admin_broker(broker_with)
    api = Admin(port)
    q = f"q{uuid.uuid4().hex[:8]}"
    assert api.call("GET", f"/api/v1/queues/{q}")[0] == 404

    created = api.json("PUT", f"/api/v1/queues/{q}",
                       {"partitions": 1, "max_deliveries": 7}, expect=201)
    assert created["name"] == q and created["depth"] == 0
    assert created["config"]["partitions"] == 1
    assert created["config"]["max_deliveries"] == 7
    assert api.call("PUT", f"/api/v1/queues/{q}", {"partitions": 0})[0] == 400
    assert api.call("PUT", f"/api/v1/queues/{q}", {"partitons": 2})[0] == 400
    assert api.call("PUT", "/api/v1/queues/bad%20name", {})[0] == 400

    publish_acked(b, 4, f"$queue/{q}", [b"m%d" % i for i in range(10)])
    c = mqttraw.RawClient(b.host, b.port, 4)
    c.connect("admin-cons")
    assert c.subscribe([(f"$share/g1/$queue/{q}", 1)]).rcs == [1]
    first = receive_publishes(c, 5, ack=True)
    assert [p.payload for p in first] == [b"m%d" % i for i in range(5)]
    c.disconnect()
    c.close()

    def settled_five():
        info = api.json("GET", f"/api/v1/queues/{q}")
        g = group_of(info, "g1")
        return info["depth"] == 5 and g["lag"] == 5 and g["in_flight"] == 0
    assert wait_for(settled_five), api.json("GET", f"/api/v1/queues/{q}")
    listed = [x for x in api.json("GET", "/api/v1/queues") if x["name"] == q]
    assert len(listed) == 1 and listed[0]["bytes"] > 0 and listed[0]["dead_letters"] == 0
    assert group_of(listed[0], "g1")["lag"] == 5

    # Update keeps what the body does not name.
    updated = api.json("PUT", f"/api/v1/queues/{q}", {"ack_timeout_ms": 12345})
    assert updated["config"]["ack_timeout_ms"] == 12345
    assert updated["config"]["max_deliveries"] == 7
    assert api.call("PUT", f"/api/v1/queues/{q}", {"partitions": 0})[0] == 400

    # Reset the group to the earliest offset: all ten come again.
    bad = api.call("POST", f"/api/v1/queues/{q}/groups/g1/reset", {"to": "middle"})
    assert bad[0] == 400 and "error" in json.loads(bad[1])
    assert api.call("POST", f"/api/v1/queues/nope{q}/groups/g1/reset", {"to": "earliest"})[0] == 404
    reset = api.json("POST", f"/api/v1/queues/{q}/groups/g1/reset", {"to": "earliest"})
    assert group_of(reset, "g1")["lag"] == 10
    c = mqttraw.RawClient(b.host, b.port, 4)
    c.connect("admin-cons")
    assert c.subscribe([(f"$share/g1/$queue/{q}", 1)]).rcs == [1]
    again = receive_publishes(c, 10, ack=True)
    assert [p.payload for p in again] == [b"m%d" % i for i in range(10)]
    assert wait_for(lambda: group_of(api.json("GET", f"/api/v1/queues/{q}"), "g1")["lag"] == 0)

    # Reset by offset: from offset 8 on.
    api.json("POST", f"/api/v1/queues/{q}/groups/g1/reset", {"offset": 8})
    tail = receive_publishes(c, 2, ack=True)
    assert [p.payload for p in tail] == [b"m8", b"m9"]
    c.disconnect()
    c.close()

    # Purge, then delete.
    publish_acked(b, 4, f"$queue/{q}", [b"late"])
    purged = api.json("POST", f"/api/v1/queues/{q}/purge", raw=b"")
    assert purged["depth"] == 0
    assert api.json("DELETE", f"/api/v1/queues/{q}") == {"deleted": q}
    assert api.call("GET", f"/api/v1/queues/{q}")[0] == 404
    assert api.call("DELETE", f"/api/v1/queues/{q}")[0] == 404
    assert api.call("POST", f"/api/v1/queues/{q}/purge", raw=b"")[0] == 404
    assert q not in [x["name"] for x in api.json("GET", "/api/v1/queues")]


def test_reset_to_a_timestamp_replays_exactly_what_came_at_or_after_it(broker_with):
    """Replay by time with the real binary: records are stamped by roost's clock when
    stored, and a group reset to a wall-clock instant between two bursts delivers the
    second burst again, and nothing of the first."""
    b, port = admin_broker(broker_with)
    api = Admin(port)
    q = f"t{uuid.uuid4().hex[:8]}"
    # Two partitions: the reset must find the instant in each of them.
    api.json("PUT", f"/api/v1/queues/{q}", {"partitions": 2}, expect=201)
    before = [b"early%d" % i for i in range(6)]
    after = [b"late%d" % i for i in range(6)]
    publish_acked(b, 4, f"$queue/{q}", before)
    time.sleep(0.05)
    instant_ms = int(time.time() * 1000)
    time.sleep(0.05)
    publish_acked(b, 4, f"$queue/{q}", after)

    c = mqttraw.RawClient(b.host, b.port, 4)
    c.connect("ts-cons")
    assert c.subscribe([(f"$share/g/$queue/{q}", 1)]).rcs == [1]
    everything = receive_publishes(c, 12, ack=True)
    assert sorted(p.payload for p in everything) == sorted(before + after)
    assert wait_for(lambda: group_of(api.json("GET", f"/api/v1/queues/{q}"), "g")["lag"] == 0)

    reset = api.json("POST", f"/api/v1/queues/{q}/groups/g/reset", {"timestamp_ms": instant_ms})
    assert group_of(reset, "g")["lag"] == len(after), reset
    again = receive_publishes(c, len(after), ack=True)
    assert sorted(p.payload for p in again) == sorted(after)
    assert c.recv(0.5) is None, "a message from before the instant came again"

    # An instant after every message replays nothing.
    later = int(time.time() * 1000) + 1000
    reset = api.json("POST", f"/api/v1/queues/{q}/groups/g/reset", {"timestamp_ms": later})
    assert group_of(reset, "g")["lag"] == 0, reset
    assert c.recv(0.5) is None
    c.disconnect()
    c.close()


def test_clients_sessions_and_kick(broker_with):
    b, port = admin_broker(broker_with)
    api = Admin(port)
    v5 = mqttraw.RawClient(b.host, b.port, 5)
    v5.connect("kick-me-5", properties=[(mqttraw.SESSION_EXPIRY, 300)])
    v4 = mqttraw.RawClient(b.host, b.port, 4)
    v4.connect("kick-me-4")
    stored = mqttraw.RawClient(b.host, b.port, 4)
    stored.connect("stored-one", clean=False)
    assert stored.subscribe("it/admin/stored", qos=1).rcs == [1]
    stored.disconnect()
    stored.close()

    def sessions():
        return {s["client_id"]: s for s in api.json("GET", "/api/v1/sessions")}
    assert wait_for(lambda: "stored-one" in sessions() and not sessions()["stored-one"]["online"])
    s = sessions()
    assert s["stored-one"]["subscriptions"] == 1
    assert s["kick-me-5"]["online"] and s["kick-me-4"]["online"]

    clients = {c["client_id"]: c for c in api.json("GET", "/api/v1/clients")}
    assert set(clients) == {"kick-me-5", "kick-me-4"}
    assert clients["kick-me-5"]["protocol"] == "5.0"
    assert clients["kick-me-4"]["protocol"] == "3.1.1"
    assert clients["kick-me-5"]["peer"].startswith("127.0.0.1:")

    assert api.json("DELETE", "/api/v1/clients/kick-me-5") == {"disconnected": "kick-me-5"}
    closed, got = v5.wait_closed(5.0)
    assert closed, got
    discs = [p for p in got if p.type == mqttraw.DISCONNECT]
    assert discs and discs[-1].rc == 0x98, got

    assert api.json("DELETE", "/api/v1/clients/kick-me-4") == {"disconnected": "kick-me-4"}
    closed, got = v4.wait_closed(5.0)
    assert closed and not [p for p in got if p.type == mqttraw.DISCONNECT], got

    # Gone from the registry once its connection's teardown is done (a moment after
    # the socket closes).
    assert wait_for(lambda: api.call("DELETE", "/api/v1/clients/kick-me-4")[0] == 404)
    assert api.call("DELETE", "/api/v1/clients/never-here")[0] == 404
    # The v5 session had an expiry: it stays, offline.
    assert wait_for(lambda: "kick-me-5" in sessions() and not sessions()["kick-me-5"]["online"])
    assert wait_for(lambda: api.json("GET", "/api/v1/clients") == [])
    v5.close()
    v4.close()


def test_http_limits(broker_with):
    """Oversized heads and bodies are refused before they are buffered; the API still serves."""
    b, port = admin_broker(broker_with)
    api = Admin(port)

    def raw_request(data):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(data)
            except OSError:
                pass
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    big_head = b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (20 * 1024) + b"\r\n\r\n"
    assert raw_request(big_head).startswith(b"HTTP/1.1 431 ")
    big_body = b"PUT /api/v1/queues/x HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n"
    assert raw_request(big_body).startswith(b"HTTP/1.1 413 ")
    chunked = b"PUT /api/v1/queues/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert raw_request(chunked).startswith(b"HTTP/1.1 411 ")
    assert raw_request(b"\x00\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert api.json("GET", "/health") == {"status": "ok"}
