"""roost against hostile clients: each resource-exhaustion hole driven from outside the way
an attacker would (raw sockets where a client library would refuse to misbehave), with the
bound asserted (peak RSS, tasks, file descriptors, the spec's reason code) and a
well-behaved client served during or right after the attack.

Long variants (by hand): ROOST_HOSTILE_CYCLES=100000 for the connect/disconnect loop,
ROOST_HOSTILE_RETAINED=1000000 for SUBSCRIBE # over many retained messages."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO, free_port, roost_passwd, wait_port
from conftest import assert_broker_serves, wait_for
from test_admin import Admin, value

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own bounds and /metrics")


def with_admin(broker_with, **config):
    port = free_port()
    b = broker_with(admin_bind=[f"127.0.0.1:{port}"], sys_interval=0, **config)
    return b, Admin(port)


def status(b, field):
    """A field of /proc/<pid>/status in KiB (VmHWM: peak RSS, VmRSS: RSS now)."""
    with open(f"/proc/{b.proc.pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {b!r}")


def fds(b):
    return len(os.listdir(f"/proc/{b.proc.pid}/fd"))


def trips(api, limit):
    return value(api.metrics(), "roost_limit_trips_total", limit=limit)


def uid(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def connack(b, version, client_id, source=None, **kw):
    """Sends a CONNECT, returns the CONNACK code (None if the broker closed without one)."""
    c = w.RawClient(b.host, b.port, version, source=source)
    try:
        c.send(w.connect_packet(client_id, version, **kw))
        return c.expect(w.CONNACK).rc
    except (w.Closed, OSError, AssertionError):
        return None
    finally:
        c.close()


# -- the auth hook's chunked answer ------------------------------------------------------

class _HostileHook(BaseHTTPRequestHandler):
    """Answers every POST with a chunk claiming 2^64-1 bytes."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"ffffffffffffffff\r\n{}\r\n0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_hook_chunk_size_overflow_is_an_error_and_leaks_no_slot(broker_with):
    """A chunk size of 2^64-1 from the hook panicked the connection task, and each panic
    kept its max_connections slot: three such CONNECTs refused everyone after."""
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _HostileHook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        b, api = with_admin(broker_with, max_connections=3,
                            auth_hook={"url": f"http://127.0.0.1:{hook.server_port}/auth"})
        for i in range(12):
            code = connack(b, 5, uid(f"hook{i}"), username="mallory", password=b"x")
            assert code == 0x88, f"attempt {i}: CONNACK {code} (0x88: hook unavailable)"
        assert wait_for(lambda: value(api.metrics(), "roost_connections") == 0)
        assert trips(api, "max_connections") == 0, "no slot was kept"
        assert "panicked" not in b.log_tail(2000)
    finally:
        hook.shutdown()


# -- password checks -----------------------------------------------------------------------

def test_wrong_password_burst_is_bounded_and_a_right_password_gets_in(broker_with, tmp_path):
    """300 parallel CONNECTs with a wrong password took roost to 5.7 GiB (argon2, ~19 MiB a
    check, unbounded). Now: peak RSS under 512 MiB, the overflow told 0x89 (server busy),
    and a client with the right password connects within 3 s while the burst runs."""
    passwd = tmp_path / "passwd"
    roost_passwd("-b", passwd, "alice", "right")
    roost_passwd("-b", passwd, "mallory", "secret")
    b, api = with_admin(broker_with, password_file=str(passwd))
    assert connack(b, 5, uid("warm"), username="alice", password=b"right") == 0
    before = status(b, "VmHWM")
    codes = []
    start = threading.Barrier(301)

    def attacker(i):
        c = w.RawClient(b.host, b.port, 5, timeout=30)
        try:
            start.wait()
            c.send(w.connect_packet(f"m{i}", 5, username="mallory", password=b"wrong"))
            codes.append(c.expect(w.CONNACK, timeout=30).rc)
        except (w.Closed, OSError):
            codes.append(None)
        finally:
            c.close()

    with ThreadPoolExecutor(300) as pool:
        for i in range(300):
            pool.submit(attacker, i)
        start.wait()
        t0 = time.monotonic()
        good = connack(b, 5, uid("alice"), source="127.0.0.2", username="alice",
                       password=b"right")
        took = time.monotonic() - t0
    print(f"right password answered in {took:.2f}s during the burst")
    assert good == 0, f"the right password was refused with {good}"
    assert took < 3.0, f"the right password took {took:.2f}s during the burst"
    peak = status(b, "VmHWM")
    assert peak < 512 * 1024, f"peak RSS {peak // 1024} MiB (was {before // 1024} MiB before)"
    assert len(codes) == 300 and set(codes) <= {0x86, 0x89}, sorted(set(map(str, codes)))
    busy = codes.count(0x89)
    print(f"peak RSS {before // 1024} -> {peak // 1024} MiB; {busy} busy, "
          f"{codes.count(0x86)} checked and refused")
    assert busy > 0 and codes.count(0x86) > 0, f"{busy} busy, {codes.count(0x86)} checked"
    assert trips(api, "max_auth_waiting") == busy
    assert_broker_serves_auth(b)


def assert_broker_serves_auth(b):
    c = w.RawClient(b.host, b.port, 4)
    try:
        assert c.connect(uid("after"), username="alice", password=b"right").rc == 0
        c.disconnect()
    finally:
        c.close()


# -- queues and groups ----------------------------------------------------------------------

def test_clients_cannot_create_queues_or_groups_past_the_caps(broker_with):
    """Any client could create queues (8 partition logs and descriptors each) and groups
    without end. Past max_queues / max_consumer_groups: PUBACK 0x97, SUBACK 0x97 (3.x 0x80)."""
    b, api = with_admin(broker_with, max_queues=3,
                        queue_defaults={"partitions": 2, "max_consumer_groups": 2})
    p = w.RawClient(b.host, b.port, 5)
    p.connect(uid("qp"))
    codes = []
    for i in range(10):
        p.publish(f"$queue/q{i}/x", b"m", qos=1, pid=i + 1)
        codes.append(p.expect(w.PUBACK).rc)
    assert codes == [0] * 3 + [0x97] * 7, codes
    fd_after_cap = fds(b)
    for i in range(10, 200):
        p.publish(f"$queue/q{i}", b"m", qos=1, pid=i + 1)
        assert p.expect(w.PUBACK).rc == 0x97
    assert fds(b) <= fd_after_cap + 2, "refused queues opened no files"
    assert trips(api, "max_queues") == 197
    def suback(c, f, pid):
        # Queue deliveries may come before the SUBACK of a later subscription.
        c.send(w.subscribe_packet(pid, [(f, 1)], c.version))
        return c.expect(w.SUBACK, skip=(w.PUBLISH,)).rcs

    v5 = w.RawClient(b.host, b.port, 5)
    v5.connect(uid("qs5"))
    assert suback(v5, "$share/g1/$queue/q0", 1) == [1]
    assert suback(v5, "$share/g2/$queue/q0", 2) == [1]
    assert suback(v5, "$share/g3/$queue/q0", 3) == [0x97]
    assert suback(v5, "$share/g1/$queue/new-queue", 4) == [0x97]
    v3 = w.RawClient(b.host, b.port, 4)
    v3.connect(uid("qs3"))
    assert suback(v3, "$share/g4/$queue/q0", 1) == [0x80]
    assert suback(v3, "$share/g1/$queue/q0", 2) == [1], "an existing group's"
    assert trips(api, "max_consumer_groups") == 2
    # The groups that exist still get their messages: both g1 and g2 see "work".
    p.publish("$queue/q0/y", b"work", qos=1, pid=500)
    assert p.expect(w.PUBACK).rc == 0
    payloads = [x.payload for c in (v5, v3) for x in c.recv_all(1.0) if x.type == w.PUBLISH]
    assert payloads.count(b"work") == 2, payloads
    for c in (p, v5, v3):
        c.disconnect()
    assert_broker_serves(b)


# -- sessions ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_sessions_are_capped(broker_with, version):
    b, api = with_admin(broker_with, max_sessions=5)
    props = {w.SESSION_EXPIRY: 0xFFFFFFFE} if version == 5 else None
    ids = [uid(f"s{version}") for _ in range(5)]
    for cid in ids:
        assert connack(b, version, cid, clean=False, properties=props) == 0
    assert wait_for(lambda: value(api.metrics(), "roost_sessions") == 5)
    refused = 0x97 if version == 5 else 3
    for i in range(20):
        assert connack(b, version, uid("more"), clean=False, properties=props) == refused
    assert value(api.metrics(), "roost_sessions") == 5
    assert trips(api, "max_sessions") == 20
    # The clients that have a session are still served.
    c = w.RawClient(b.host, b.port, version)
    ack = c.connect(ids[0], clean=False, properties=props)
    assert ack.session_present
    c.disconnect()


@pytest.mark.timeout(900)
def test_connect_disconnect_loop_leaves_tasks_and_memory_flat(broker_with):
    """Each disconnect of a persistent session spawned a sleeping task for its whole
    expiry, never cancelled: a client looping connect/disconnect with expiry 0xFFFFFFFE
    leaked a task per cycle. Now one entry per offline session in one timer structure."""
    cycles = int(os.environ.get("ROOST_HOSTILE_CYCLES", "20000"))
    b, api = with_admin(broker_with, storage={"durability": "buffered"})
    will = {"topic": "w/t", "payload": b"gone", "properties": {w.WILL_DELAY: 3600}}
    props = {w.SESSION_EXPIRY: 0xFFFFFFFE}
    workers = 16

    def loop(k, n):
        cid = f"loop-{k}"
        for _ in range(n):
            c = w.RawClient(b.host, b.port, 5)
            try:
                c.send(w.connect_packet(cid, 5, clean=False, will=will, properties=props))
                c.expect(w.CONNACK)
                c.send(w.disconnect_packet(5, rc=0x04))  # keep the will: it is delayed
            finally:
                c.close()

    loop(0, 200)  # warm up: first allocations, thread pools
    assert wait_for(lambda: value(api.metrics(), "roost_connections") == 0)
    tasks0 = value(api.metrics(), "roost_tasks")
    rss0 = status(b, "VmRSS")
    t0 = time.monotonic()
    rss_half = None
    for half in range(2):
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(loop, k, cycles // workers // 2) for k in range(workers)]:
                f.result()
        rss_half = rss_half or status(b, "VmRSS")
    took = time.monotonic() - t0
    assert wait_for(lambda: value(api.metrics(), "roost_connections") == 0, timeout=10)
    m = api.metrics()
    assert value(m, "roost_offline_timers") == workers, "one entry per offline session"
    tasks = value(m, "roost_tasks")
    assert tasks <= tasks0 + 8, f"{tasks} tasks after {cycles} cycles (was {tasks0})"
    rss = status(b, "VmRSS")
    assert rss < rss0 + 32 * 1024, f"RSS {rss0 // 1024} -> {rss // 1024} MiB over {cycles} cycles"
    print(f"{cycles} cycles in {took:.1f}s: tasks {tasks0}->{tasks}, "
          f"RSS {rss0}->{rss_half}->{rss} KiB")
    assert_broker_serves(b)


# -- retained messages ---------------------------------------------------------------------

def test_retained_messages_are_capped(broker_with):
    b, api = with_admin(broker_with, max_retained_messages=5, max_retained_bytes=4000)
    sub = w.RawClient(b.host, b.port, 5)
    sub.connect(uid("rs"))
    sub.subscribe("r/#", qos=1)
    p = w.RawClient(b.host, b.port, 5)
    p.connect(uid("rp"))
    codes = []
    for i in range(8):
        p.publish(f"r/{i}", b"v", qos=1, pid=i + 1, retain=True)
        codes.append(p.expect(w.PUBACK).rc)
    assert codes == [0] * 5 + [0x97] * 3, codes
    live = [sub.expect(w.PUBLISH).topic for _ in range(5)]
    assert live == [f"r/{i}" for i in range(5)]
    sub.assert_nothing(0.5)  # a refused v5 QoS 1 retained publish is not routed either
    # Replacing or clearing a topic is always allowed; a new one once there is room.
    p.publish("r/0", b"newer", qos=1, pid=20, retain=True)
    assert p.expect(w.PUBACK).rc == 0
    p.publish("r/1", b"", qos=1, pid=21, retain=True)
    assert p.expect(w.PUBACK).rc == 0
    p.publish("r/9", b"v", qos=1, pid=22, retain=True)
    assert p.expect(w.PUBACK).rc == 0
    # The byte bound: one message that would pass it.
    p.publish("r/2", b"x" * 5000, qos=1, pid=23, retain=True)
    assert p.expect(w.PUBACK).rc == 0x97
    # QoS 0 and 3.x publishers cannot be told: routed live, not retained.
    v3 = w.RawClient(b.host, b.port, 4)
    v3.connect(uid("rp3"))
    v3.publish("r/new", b"live", qos=1, pid=1, retain=True)
    v3.expect(w.PUBACK)
    m = api.metrics()
    assert value(m, "roost_retained_messages") == 5
    assert trips(api, "max_retained_messages") == 4
    assert trips(api, "max_retained_bytes") == 1
    late = w.RawClient(b.host, b.port, 5)
    late.connect(uid("late"))
    late.send(w.subscribe_packet(1, [("r/#", 1)], 5))
    got = late.recv_all(1.0)
    topics = sorted(x.topic for x in got if x.type == w.PUBLISH)
    assert topics == ["r/0", "r/2", "r/3", "r/4", "r/9"], topics
    for c in (sub, p, v3, late):
        c.disconnect()


@pytest.mark.timeout(900)
def test_subscribe_hash_over_many_retained_is_paced_by_the_subscriber(broker_with):
    """SUBSCRIBE # over many retained messages collected every match at once, under the
    retained lock, into a session queue of max_queued_messages (the rest dropped). Now the
    matches are read a chunk at a time, as the subscriber makes room: none is dropped, and
    a publisher is served meanwhile."""
    n = int(os.environ.get("ROOST_HOSTILE_RETAINED", "20000"))
    b, api = with_admin(broker_with, max_queued_messages=100, max_inflight=20,
                        storage={"durability": "buffered"})
    p = w.RawClient(b.host, b.port, 4, timeout=60)
    p.connect(uid("rp"))
    # QoS 1 retained messages keep their QoS: a QoS 1 subscriber gets them within its
    # window, the rest held back until it acknowledges.
    for start in range(0, n, 20):
        p.send(b"".join(w.publish_packet(f"many/{i // 1000}/{i}", b"r" * 32, qos=1,
                                         pid=i % 65535 + 1, retain=True)
                        for i in range(start, min(n, start + 20))))
        for _ in range(start, min(n, start + 20)):
            p.expect(w.PUBACK)
    assert wait_for(lambda: value(api.metrics(), "roost_retained_messages") == n, timeout=60)
    rss0 = status(b, "VmRSS")
    s = w.RawClient(b.host, b.port, 5, timeout=30)
    s.connect(uid("hash"), properties={w.RECEIVE_MAXIMUM: 20})
    s.send(w.subscribe_packet(1, [("#", 1)], 5))
    # Not acknowledging: the broker sends its window and holds the rest back unread.
    first = [x for x in s.recv_all(1.0) if x.type == w.PUBLISH]
    assert len(first) == 20, f"{len(first)} sent with none acknowledged (receive maximum 20)"
    # A publisher is served meanwhile.
    t0 = time.monotonic()
    p.publish("other/topic", b"x", qos=1, pid=2)
    p.expect(w.PUBACK)
    assert time.monotonic() - t0 < 1.0
    # Acknowledging, the subscriber gets every retained message, none dropped.
    seen = {x.topic for x in first}
    for x in first:
        s.puback(x.pid)
    deadline = time.monotonic() + 120
    while len(seen) < n and time.monotonic() < deadline:
        x = s.recv(5)
        assert x is not None, f"stalled after {len(seen)} of {n}"
        if x.type == w.PUBLISH:
            seen.add(x.topic)
            s.puback(x.pid)
    assert len(seen) == n
    m = api.metrics()
    assert value(m, "roost_messages_dropped_total", reason="session_queue_full") == 0
    rss = status(b, "VmRSS")
    print(f"{n} retained messages read by SUBSCRIBE # at the subscriber's pace: "
          f"RSS {rss0 // 1024} -> {rss // 1024} MiB, peak {status(b, 'VmHWM') // 1024} MiB")
    assert rss < rss0 + 64 * 1024
    s.disconnect()
    p.disconnect()


# -- queue produces and Receive Maximum ----------------------------------------------------

def test_queue_produces_are_held_to_receive_maximum(broker_with):
    """$queue/ QoS 1 produces waited for their PUBACK outside the Receive Maximum: the
    pending-ack list grew until the queue's max_bytes."""
    b, api = with_admin(broker_with, max_inflight=10)
    v5 = w.RawClient(b.host, b.port, 5)
    assert v5.connect(uid("rm5")).props.get(w.RECEIVE_MAXIMUM) == 10
    v5.send(b"".join(w.publish_packet("$queue/rm/x", b"m", qos=1, pid=i + 1, version=5)
                     for i in range(11)))
    got = v5.recv_all(5, until_closed=True)
    discs = [x for x in got if x.type == w.DISCONNECT]
    assert discs and discs[-1].rc == 0x93, got
    assert trips(api, "max_inflight") == 1
    # 3.x has no Receive Maximum: a flood is read at the pace of its acknowledgements and
    # every produce is acknowledged, in order.
    v3 = w.RawClient(b.host, b.port, 4, timeout=30)
    v3.connect(uid("rm3"))
    v3.send(b"".join(w.publish_packet("$queue/rm/y", b"m", qos=1, pid=i + 1)
                     for i in range(3000)))
    acks = []
    while len(acks) < 3000:
        x = v3.expect(w.PUBACK, timeout=30)
        acks.append(x.pid)
    assert acks == list(range(1, 3001))
    v3.disconnect()
    assert_broker_serves(b, 5)


# -- refused connections -------------------------------------------------------------------

def test_refused_connections_are_closed_at_once(broker_with):
    """Connections refused by max_connections kept their task and buffer for
    connect_timeout (10 s) waiting for a CONNECT."""
    b, api = with_admin(broker_with, max_connections=2, connect_timeout=10)
    assert wait_for(lambda: value(api.metrics(), "roost_connections") == 0)
    held = [w.RawClient(b.host, b.port, 4) for _ in range(2)]
    for c in held:
        c.connect(uid("held"))
    silent = [socket.create_connection((b.host, b.port)) for _ in range(200)]
    t0 = time.monotonic()
    for s in silent:
        s.settimeout(5)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
        s.close()
    took = time.monotonic() - t0
    assert took < 3.0, f"silent refused connections held for {took:.1f}s"
    t0 = time.monotonic()
    c = w.RawClient(b.host, b.port, 5)
    c.send(w.connect_packet(uid("late"), 5))
    closed, got = c.wait_closed(5)
    assert closed and [x.rc for x in got if x.type == w.CONNACK] == [0x97]
    assert time.monotonic() - t0 < 1.0, "closed right after the CONNACK"
    for c in held:
        c.disconnect()
    assert wait_for(lambda: value(api.metrics(), "roost_connections") == 0)
    assert_broker_serves(b)


# -- found while reading as an attacker ----------------------------------------------------

def test_one_subscribe_repeating_a_filter_is_one_subscription(broker_with):
    """A SUBSCRIBE of one filter repeated 200,000 times with a 60 KB consumer-group property
    made 200,000 events each with a copy of the property (12 GB); a retained message on the
    filter was sent once per copy. Now: subscribed once, one reason code per place."""
    b, api = with_admin(broker_with)
    p = w.RawClient(b.host, b.port, 4)
    p.connect(uid("rp"))
    p.publish("a", b"r" * 1000, qos=1, pid=1, retain=True)
    p.expect(w.PUBACK)
    s = w.RawClient(b.host, b.port, 5, timeout=30)
    s.connect(uid("rep"))
    copies = 200_000
    s.send(w.subscribe_packet(1, [("a", 0)] * copies, 5,
                              properties=[(w.USER_PROPERTY, ("consumer-group", "g" * 60_000))]))
    ack = s.expect(w.SUBACK, timeout=30)
    assert ack.rcs == [0] * copies
    got = [x for x in s.recv_all(1.0) if x.type == w.PUBLISH]
    assert len(got) == 1, f"the retained message came {len(got)} times"
    assert status(b, "VmHWM") < 256 * 1024
    assert value(api.metrics(), "roost_subscriptions") >= 1
    s.disconnect()
    assert_broker_serves(b)


def test_user_properties_count_against_the_session_byte_bound(broker_with):
    """A message of empty payload and 60 KB of user properties was counted as 0 bytes by
    max_queued_bytes: an offline session held 1,000 of them (60 MB) under a 64 KiB bound."""
    b, api = with_admin(broker_with, max_queued_bytes=65536)
    s = w.RawClient(b.host, b.port, 5)
    s.connect("props-sub", clean=False, properties={w.SESSION_EXPIRY: 3600})
    s.subscribe("props/t", qos=1)
    s.disconnect()
    p = w.RawClient(b.host, b.port, 5)
    p.connect(uid("props-pub"))
    heavy = [(w.USER_PROPERTY, ("k", "v" * 30_000)), (w.USER_PROPERTY, ("k2", "v" * 30_000))]
    for i in range(10):
        p.publish("props/t", b"", qos=1, pid=i + 1, properties=heavy)
        p.expect(w.PUBACK)
    m = api.metrics()
    assert value(m, "roost_messages_dropped_total", reason="offline_queue_full") == 9, (
        "the first 60 KB message fits in 64 KiB, each of the next would pass it")
    p.disconnect()


@pytest.mark.parametrize("version", [4, 5])
def test_client_id_too_long_for_the_store_is_refused(broker_with, version):
    """A 65,535-byte client id with a persistent session made the session store's key
    assertion panic its writer thread: every later write failed for everyone."""
    b, api = with_admin(broker_with)
    long_id = "x" * 65_535
    props = {w.SESSION_EXPIRY: 3600} if version == 5 else None
    assert connack(b, version, long_id, clean=False, properties=props) == (
        0x85 if version == 5 else 2)
    ok = "y" * 65_000
    c = w.RawClient(b.host, b.port, version)
    assert c.connect(ok, clean=False, properties=props).rc == 0
    c.publish("t", b"m", qos=2, pid=7)
    c.expect(w.PUBREC)
    c.disconnect()
    status_code, text, _ = api.call("GET", "/ready")
    assert status_code == 200, text
    assert_broker_serves(b)


def test_tls_handshake_flood_is_bounded(broker_with, pki):
    """TLS handshakes came before any connection limit: a flood of clients that open a
    socket and never handshake held tasks and descriptors without bound. Past 1024 at
    once, further ones are closed at once."""
    import selectors
    from conftest import tls_broker
    b = tls_broker(broker_with, pki, max_connections=10)
    flood = [socket.create_connection((b.host, b.tls_port)) for _ in range(1100)]
    sel = selectors.DefaultSelector()
    for s in flood:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed = set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and len(closed) < 1100 - 1024:
        for key, _ in sel.select(0.2):
            try:
                data = key.fileobj.recv(1)
            except ConnectionResetError:
                data = b""
            if data == b"":
                closed.add(key.fileobj)
                sel.unregister(key.fileobj)
    assert len(closed) >= 1100 - 1024, f"{len(closed)} of the handshakes past 1024 closed"
    assert fds(b) < 1100 + 64, "the broker holds a socket for at most 1024 handshakes"
    for s in flood:
        s.close()
    assert_broker_serves(b)
