"""Overload protection: each limit tripped with real traffic, the client told in the spec's
terms (CONNACK / SUBACK / DISCONNECT codes, or throttling that loses nothing), the broker
still serving everyone else, and `roost_limit_trips_total{limit=...}` counting the trip.

Also the counters that go with them on /metrics: bytes in and out, authentication
failures, and the fdatasync latency histograms."""

from __future__ import annotations

import time
import uuid

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO, free_port, roost_passwd
from conftest import (VERSIONS, assert_broker_serves, publish_acked, receive_publishes,
                      wait_for)
from test_admin import Admin, value

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's overload limits and /metrics")


def limited_broker(broker_with, **config):
    port = free_port()
    b = broker_with(admin_bind=[f"127.0.0.1:{port}"], sys_interval=0, **config)
    return b, Admin(port)


def trips(api, limit):
    return value(api.metrics(), "roost_limit_trips_total", limit=limit)


def refused_code(b, version, source=None):
    """Connects from `source` and returns the CONNACK code (None if closed without one)."""
    c = w.RawClient(b.host, b.port, version, source=source)
    try:
        c.send(w.connect_packet(f"ov-{uuid.uuid4().hex[:8]}", version))
        closed, got = c.wait_closed(5)
        assert closed, f"a refused connection was kept open: {got}"
        acks = [p for p in got if p.type == w.CONNACK]
        return acks[0].rc if acks else None
    except w.Closed:
        return None
    finally:
        c.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_max_connections_per_ip(broker_with, raw, version):
    b, api = limited_broker(broker_with, max_connections_per_ip=2)
    # The harness's readiness probe may still hold a slot for a moment.
    assert wait_for(lambda: value(api.metrics(), "roost_connections") == 0)
    held = []
    for i in range(2):
        c = raw(b, version)
        c.connect(f"ip-{version}-{i}")
        held.append(c)
    # 3.1.1 has no quota code: "server unavailable" (3).
    assert refused_code(b, version) == (0x97 if version == 5 else 3)
    # Another source address has its own allowance.
    other = w.RawClient(b.host, b.port, version, source="127.0.0.2")
    assert other.connect(f"ip-{version}-other").rc == 0
    other.disconnect()
    other.close()
    assert trips(api, "max_connections_per_ip") == 1
    # A freed slot is reusable.
    held[0].disconnect()
    assert wait_for(lambda: value(api.metrics(), "roost_connections") == 1)
    again = raw(b, version)
    assert again.connect(f"ip-{version}-again").rc == 0


def test_max_connections_is_counted(broker_with, raw):
    b, api = limited_broker(broker_with, max_connections=1)
    # The harness's readiness probe may still hold the one slot for a moment.
    assert wait_for(lambda: value(api.metrics(), "roost_connections") == 0)
    c = raw(b, 5)
    c.connect("only-one")
    assert refused_code(b, 5) == 0x97
    assert trips(api, "max_connections") == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_connect_rate(broker_with, raw, version):
    b, api = limited_broker(broker_with, max_connect_rate=5)
    time.sleep(1.2)  # the test harness's readiness probe took a token: let it refill
    # The bucket holds one second's worth (5); 12 connects in a burst overrun it.
    codes = []
    for i in range(12):
        c = raw(b, version)
        ack = c.connect(f"rate-{version}-{i}", expect_rc=None)
        codes.append(ack.rc)
    accepted = codes.count(0)
    refused = [rc for rc in codes if rc != 0]
    assert 5 <= accepted <= 8, codes  # 5 up front, plus what refilled during the burst
    assert set(refused) == {0x9F if version == 5 else 3}, codes
    assert trips(api, "max_connect_rate") == len(refused)
    time.sleep(1.2)
    late = raw(b, version)
    assert late.connect(f"rate-{version}-late").rc == 0


def test_publish_rate_throttles_without_loss(broker_with, raw, uid):
    b, api = limited_broker(broker_with, max_publish_rate=20)
    t = "it/" + uid
    sub = raw(b, 5)
    sub.connect(uid + "-s")
    assert sub.subscribe(t, qos=1).rcs == [1]
    # keep-alive 1 s: the broker closes after 1.5 s of silence, but a throttled client is
    # silent because roost is not reading it, which must not count against it.
    pub = raw(b, 5)
    pub.connect(uid + "-p", keepalive=1)
    n = 70
    started = time.monotonic()
    for i in range(n):
        pub.publish(t, b"m%d" % i, qos=0)
    got = [p.payload for p in receive_publishes(sub, n, timeout=20)]
    elapsed = time.monotonic() - started
    assert got == [b"m%d" % i for i in range(n)]  # nothing lost, in order
    # 20 up front, 50 more at 20/s: at least 2.5 s.
    assert elapsed >= 2.2, f"{n} publishes at max_publish_rate=20 took only {elapsed:.2f}s"
    assert trips(api, "max_publish_rate") >= 1
    pub.pingreq()
    assert pub.expect(w.PINGRESP, timeout=5)  # still connected
    assert trips(api, "max_publish_bytes_rate") == 0


def test_publish_bytes_rate_throttles(broker_with, raw, uid):
    b, api = limited_broker(broker_with, max_publish_bytes_rate=20_000)
    t = "it/" + uid
    sub = raw(b, 4)
    sub.connect(uid + "-s")
    sub.subscribe(t, qos=1)
    pub = raw(b, 4)
    pub.connect(uid + "-p")
    started = time.monotonic()
    for i in range(1, 51):  # 50 KB at 20 KB/s, 20 KB burst: at least 1.5 s
        pub.publish(t, bytes(1000), qos=1, pid=i)
    for i in range(1, 51):
        assert pub.expect(w.PUBACK, timeout=10).pid == i
    elapsed = time.monotonic() - started
    assert elapsed >= 1.2, f"50 KB at 20 KB/s took only {elapsed:.2f}s"
    receive_publishes(sub, 50)
    assert trips(api, "max_publish_bytes_rate") >= 1


@pytest.mark.parametrize("version", VERSIONS)
def test_max_subscriptions_per_client(broker_with, raw, uid, version):
    b, api = limited_broker(broker_with, max_subscriptions_per_client=3)
    c = raw(b, version)
    c.connect(uid)
    ack = c.subscribe([(f"{uid}/{i}", 1) for i in range(4)])
    assert ack.rcs == [1, 1, 1, 0x97 if version == 5 else 0x80], ack
    # Changing the options of a held subscription is not a new one.
    assert c.subscribe(f"{uid}/0", qos=0, pid=2).rcs == [0]
    c.unsubscribe([f"{uid}/1"], pid=3)
    assert c.subscribe(f"{uid}/3", qos=1, pid=4).rcs == [1]
    assert trips(api, "max_subscriptions_per_client") == 1


def test_max_queued_bytes_bounds_an_offline_queue(broker_with, raw, uid):
    # Each message weighs its 400-byte payload, its topic and the ~440 bytes of the
    # message itself.
    b, api = limited_broker(broker_with, max_queued_bytes=2000)
    t = "it/" + uid
    sub = raw(b, 4)
    sub.connect(uid + "-s", clean=False)
    sub.subscribe(t, qos=1)
    sub.disconnect()
    sub.close()
    publish_acked(b, 4, t, [bytes([i]) * 400 for i in range(1, 6)])
    m = api.metrics()
    # Two fit in 2000 bytes; the next three would not.
    assert value(m, "roost_limit_trips_total", limit="max_queued_bytes") == 3
    assert value(m, "roost_messages_dropped_total", reason="offline_queue_full") == 3
    back = raw(b, 4)
    assert back.connect(uid + "-s", clean=False).session_present
    got = [p.payload for p in receive_publishes(back, 2)]
    assert got == [bytes([1]) * 400, bytes([2]) * 400]
    assert back.recv(0.5) is None


def test_slow_consumer_that_does_not_acknowledge_is_disconnected(broker_with, raw, uid):
    b, api = limited_broker(broker_with, slow_consumer_timeout_ms=1000, max_inflight=4,
                            max_queued_messages=4, max_delivery_wait_ms=100)
    t = "it/" + uid
    slow = raw(b, 5)
    slow.connect(uid + "-slow")
    slow.subscribe(t, qos=1)
    pub = raw(b, 5)
    pub.connect(uid + "-p")
    # 4 in flight + 4 queued fill its buffer; the rest wait in (or are dropped from)
    # its delivery channel.
    for i in range(1, 61):
        pub.publish(t, b"x", qos=1, pid=i)
    for i in range(1, 61):
        pub.expect(w.PUBACK, timeout=15)
    started = time.monotonic()
    closed, got = slow.wait_closed(10)
    assert closed, "a consumer that never acknowledges was never disconnected"
    discs = [p for p in got if p.type == w.DISCONNECT]
    assert discs and discs[-1].rc == 0x97, got
    assert time.monotonic() - started < 8
    assert trips(api, "slow_consumer_timeout_ms") == 1
    assert_broker_serves(b, 5)


def test_slow_consumer_that_stops_reading_is_disconnected(broker_with, uid):
    b, api = limited_broker(broker_with, slow_consumer_timeout_ms=1000)
    t = "it/" + uid
    # A tiny receive buffer: the broker's writes stall as soon as it stops reading.
    slow = w.RawClient(b.host, b.port, 4, rcvbuf=4096)
    slow.connect(uid + "-slow")
    slow.subscribe(t, qos=0)
    pub = w.RawClient(b.host, b.port, 4)
    pub.connect(uid + "-p")
    big = bytes(64 * 1024)
    for _ in range(100):  # 6.4 MB of QoS 0 that the subscriber never reads
        pub.publish(t, big, qos=0)
    assert wait_for(lambda: trips(api, "slow_consumer_timeout_ms") == 1, timeout=15), \
        "a consumer that stopped reading was never disconnected"
    slow.close()
    pub.pingreq()
    assert pub.expect(w.PINGRESP, timeout=5)
    pub.close()
    assert_broker_serves(b, 4)


def test_limits_default_to_documented_values(broker_with, raw, uid):
    """The defaults let ordinary traffic through: no trips after a normal exchange."""
    b, api = limited_broker(broker_with)
    c = raw(b, 5)
    c.connect(uid)
    c.subscribe([(f"{uid}/{i}", 1) for i in range(20)])
    for i in range(1, 101):
        c.publish(f"{uid}/{i % 20}", b"ok", qos=1, pid=i)
        c.expect(w.PUBACK, skip=(w.PUBLISH,))
    m = api.metrics()
    for limit in ["max_connections", "max_connections_per_ip", "max_connect_rate",
                  "max_publish_rate", "max_publish_bytes_rate",
                  "max_subscriptions_per_client", "max_queued_bytes",
                  "slow_consumer_timeout_ms"]:
        assert value(m, "roost_limit_trips_total", limit=limit) == 0, limit


# -- the counters beside the limits ------------------------------------------------------------

def test_bytes_and_payload_bytes_are_counted(broker_with, raw, uid):
    b, api = limited_broker(broker_with)
    before = api.metrics()
    t = "it/" + uid
    sub = raw(b, 4)
    sub.connect(uid + "-s")
    sub.subscribe(t, qos=1)
    pub = raw(b, 4)
    pub.connect(uid + "-p")
    pub.publish(t, b"a" * 100, qos=1, pid=1)
    pub.expect(w.PUBACK)
    pub.publish(t, b"b" * 50, qos=0)
    assert sub.expect(w.PUBLISH).payload == b"a" * 100
    assert sub.expect(w.PUBLISH).payload == b"b" * 50

    def moved():
        m = api.metrics()
        return (value(m, "roost_publish_bytes_received_total", qos="1") == 100
                and value(m, "roost_publish_bytes_received_total", qos="0") == 50
                and value(m, "roost_publish_bytes_sent_total", qos="1") == 100
                and value(m, "roost_publish_bytes_sent_total", qos="0") == 50)
    assert wait_for(moved), api.call("GET", "/metrics")[1]
    m = api.metrics()
    # At least the payloads plus headers went through the sockets each way.
    assert value(m, "roost_bytes_received_total") - value(before, "roost_bytes_received_total") > 150
    assert value(m, "roost_bytes_sent_total") - value(before, "roost_bytes_sent_total") > 150


def test_auth_failures_are_counted(broker_with, tmp_path):
    path = tmp_path / "passwd"
    roost_passwd("-b", path, "alice", "wonderland")
    b, api = limited_broker(broker_with, password_file=str(path))
    for version in (4, 5):
        c = w.RawClient(b.host, b.port, version)
        ack = c.connect(f"af-{version}", username="alice", password=b"wrong", expect_rc=None)
        assert ack.rc != 0
        c.close()
    c = w.RawClient(b.host, b.port, 5)
    assert c.connect("af-anon", expect_rc=None).rc == 0x87  # anonymous: not authorized
    c.close()
    c = w.RawClient(b.host, b.port, 5)
    ack = c.connect("af-method", properties=[(w.AUTH_METHOD, "KERBEROS")], expect_rc=None)
    assert ack.rc == 0x8C
    c.close()
    ok = w.RawClient(b.host, b.port, 5)
    assert ok.connect("af-ok", username="alice", password=b"wonderland").rc == 0
    m = api.metrics()
    assert value(m, "roost_auth_failures_total", reason="bad_credentials") == 2
    assert value(m, "roost_auth_failures_total", reason="not_authorized") == 1
    assert value(m, "roost_auth_failures_total", reason="bad_method") == 1


def test_fsync_latency_histograms(broker_with, raw, uid):
    b, api = limited_broker(broker_with)
    # A persistent session's subscription is stored (state) and a $queue publish is
    # appended to a partition log (queues), both with fdatasync by default.
    c = raw(b, 4)
    c.connect(uid, clean=False)
    c.subscribe("it/" + uid, qos=1)
    c.publish(f"$queue/{uid}", b"job", qos=1, pid=1)
    c.expect(w.PUBACK)
    m = api.metrics()
    name = "roost_storage_fsync_seconds"
    for store in ("state", "queues"):
        count = value(m, name + "_count", store=store)
        assert count and count >= 1, (store, count)
        assert value(m, name + "_bucket", store=store, le="+Inf") == count
        assert value(m, name + "_sum", store=store) > 0
        # Buckets are cumulative.
        bounds = sorted((float(dict(k[1])["le"]), v) for k, v in m.items()
                        if k[0] == name + "_bucket" and dict(k[1]).get("store") == store)
        counts = [v for _, v in bounds]
        assert counts == sorted(counts), bounds
