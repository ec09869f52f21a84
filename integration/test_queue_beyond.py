"""What roost's `$queue/` queues do beyond plain MQTT, through real clients, each across
`kill -9`: `dedup-id`, `delay-ms` / `deliver-at`, last-value queues, atomic
ack-and-produce (`ack-message-id`) and dead-letter redrive
(`POST /api/v1/queues/{name}/dlq/redrive`).

User properties need MQTT 5.0, so dedup, delay, last-value and ack-and-produce are
driven by 5.0 clients; redrive is an admin call and works for 3.1.1 consumers too.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

import pytest

import mqttraw
from broker import IS_MOSQUITTO, Broker, free_port

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's $queue/ queues")


def qname():
    return f"q{uuid.uuid4().hex[:10]}"


def up(*pairs):
    return [(mqttraw.USER_PROPERTY, (k, v)) for k, v in pairs]


def props(p):
    return dict(p.user_props())


@pytest.fixture
def crashable():
    """Factory: a broker that the test may kill -9 and start again on the same data."""
    made = []

    def make(**config):
        b = Broker(config).start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.cleanup()


def restart(b):
    b.kill()  # SIGKILL: nothing flushed or closed cleanly
    b.start()


def client(b, version=5, cid=None):
    c = mqttraw.RawClient(b.host, b.port, version)
    c.connect(cid or f"c-{uuid.uuid4().hex[:8]}")
    return c


def publish(c, topic, payload, pid, properties=None):
    """QoS 1 publish; returns the PUBACK reason code (0 for success)."""
    c.publish(topic, payload, qos=1, pid=pid, properties=properties)
    ack = c.expect(mqttraw.PUBACK)
    assert ack.pid == pid
    return ack.rc or 0


def consumer(b, q, group="g", version=5, cid=None):
    c = client(b, version, cid)
    ack = c.subscribe([(f"$share/{group}/$queue/{q}", 1)])
    assert ack.rcs == [1], ack
    return c


def drain(c, quiet=1.5, ack=True):
    """Every PUBLISH until none comes for `quiet` seconds, acked if `ack`."""
    got = []
    while True:
        p = c.recv(quiet)
        if p is None:
            return got
        if p.type == mqttraw.PUBLISH:
            got.append(p)
            if ack:
                c.puback(p.pid)


class Admin:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


def test_dedup_id_stores_once_across_kill9(crashable):
    b = crashable()
    q = qname()
    p = client(b)
    for pid, (payload, dedup) in enumerate([(b"a1", "a"), (b"b1", "b"), (b"a2", "a")], 1):
        assert publish(p, f"$queue/{q}", payload, pid, up(("dedup-id", dedup))) == 0
    restart(b)
    p = client(b)
    # A producer retrying after the crash: acknowledged, not stored again.
    assert publish(p, f"$queue/{q}", b"b2", 1, up(("dedup-id", "b"))) == 0
    assert publish(p, f"$queue/{q}", b"c1", 2, up(("dedup-id", "c"))) == 0
    assert publish(p, f"$queue/{q}", b"plain", 3) == 0
    c = consumer(b, q)
    got = sorted(m.payload for m in drain(c))
    assert got == [b"a1", b"b1", b"c1", b"plain"]


def test_delay_holds_a_message_back_across_kill9_without_blocking_others(crashable):
    b = crashable()
    q = qname()
    c = consumer(b, q, cid="worker")
    p = client(b)
    due = time.time() + 3.0
    # Same partition key: the later message still goes first.
    assert publish(p, f"$queue/{q}", b"later", 1,
                   up(("partition-key", "k"), ("delay-ms", "3000"))) == 0
    assert publish(p, f"$queue/{q}", b"at", 2,
                   up(("deliver-at", str(int((due + 0.5) * 1000))))) == 0
    assert publish(p, f"$queue/{q}", b"now", 3, up(("partition-key", "k"))) == 0
    assert publish(p, f"$queue/{q}", b"bad", 4, up(("delay-ms", "soon"))) == 0x83
    assert [m.payload for m in drain(c, quiet=1.0)] == [b"now"]
    restart(b)
    c = consumer(b, q, cid="worker")
    early = c.recv(max(0.1, due - time.time() - 0.3))
    assert early is None, f"delivered before its time: {early!r}"
    got = []
    deadline = time.time() + 10
    while len(got) < 2 and time.time() < deadline:
        m = c.recv(1.0)
        if m is not None and m.type == mqttraw.PUBLISH:
            assert time.time() >= due - 0.05, "delivered before delay-ms passed"
            got.append(m.payload)
            c.puback(m.pid)
    assert sorted(got) == [b"at", b"later"]
    assert c.recv(1.0) is None


def test_last_value_queue_keeps_the_newest_per_key_across_kill9(crashable):
    q = qname()
    b = crashable(queues={q: {"last_value": True}})
    p = client(b)
    pid = 0
    for key, value in [("dev1", b"v1"), ("dev2", b"w1"), ("dev1", b"v2"), ("dev1", b"v3")]:
        pid += 1
        assert publish(p, f"$queue/{q}", value, pid, up(("partition-key", key))) == 0
    restart(b)
    p = client(b)
    assert publish(p, f"$queue/{q}", b"w2", 1, up(("partition-key", "dev2"))) == 0
    c = consumer(b, q)
    assert sorted(m.payload for m in drain(c)) == [b"v3", b"w2"]
    # A group that has consumed gets every new value.
    assert publish(p, f"$queue/{q}", b"v4", 2, up(("partition-key", "dev1"))) == 0
    assert [m.payload for m in drain(c)] == [b"v4"]


def test_ack_and_produce_is_atomic_across_kill9(crashable):
    """A worker turns every input message into one output message with ack-message-id
    and never PUBACKs its deliveries; the broker is killed while it works. After the
    restart every input is settled exactly when its output is stored: each output
    exists exactly once and nothing input is left over."""
    b = crashable()
    src, dst = qname(), qname()
    n = 300
    p = client(b)
    for i in range(n):
        p.publish(f"$queue/{src}", f"in-{i}".encode(), qos=1, pid=i + 1)
    for _ in range(n):
        assert (p.expect(mqttraw.PUBACK).rc or 0) == 0
    p.disconnect()
    # Unknown or not-held message ids store nothing.
    w = client(b, cid="worker")
    assert publish(w, f"$queue/{dst}", b"x", 1, up(("ack-message-id", f"{src}:0:999999"))) == 0x80
    assert publish(w, f"$queue/{dst}", b"x", 2, up(("ack-message-id", "garbage"))) == 0x80

    def work(seconds, kill_after=None):
        """Transforms what arrives; returns the number of outputs acknowledged."""
        w = consumer(b, src, group="t", cid="worker")
        done, pid = 0, 0
        end = time.time() + seconds
        killed = False
        while time.time() < end:
            try:
                m = w.recv(0.5)
            except (mqttraw.Closed, OSError):
                return done
            if m is None:
                if kill_after is None:
                    return done
                continue
            if m.type == mqttraw.PUBACK:
                done += 1
                continue
            if m.type != mqttraw.PUBLISH:
                continue
            pid = pid % 60000 + 1
            out = m.payload.replace(b"in-", b"out-")
            try:
                w.publish(f"$queue/{dst}", out, qos=1, pid=pid,
                          properties=up(("ack-message-id", props(m)["message-id"])))
            except (mqttraw.Closed, OSError):
                # Killed with deliveries still buffered here: the rest is redelivered.
                return done
            if kill_after is not None and not killed and done >= kill_after:
                b.kill()
                killed = True
        return done

    before = work(20, kill_after=100)
    assert before >= 100
    b.start()
    work(30)
    out = consumer(b, dst, group="check")
    got = Counter(m.payload for m in drain(out, quiet=2.0))
    assert {k for k, v in got.items() if v > 1} == set(), "an output stored twice"
    assert set(got) == {f"out-{i}".encode() for i in range(n)}, "an input lost its output"
    left = consumer(b, src, group="t")
    assert drain(left, quiet=1.0) == [], "an input whose output is stored is delivered again"


@pytest.mark.parametrize("version", [4, 5])
def test_redrive_moves_dead_letters_back_and_a_kill9_mid_redrive_loses_or_doubles_none(
        crashable, version):
    port = free_port()
    n = 200
    b = crashable(admin_bind=[f"127.0.0.1:{port}"],
                  queue_defaults={"ack_timeout_ms": 200, "max_deliveries": 1,
                                  "consumer_window": 1000})
    admin = Admin(port)
    q = qname()
    c = consumer(b, q, version=version, cid="w")
    p = client(b, version)
    for i in range(n):
        p.publish(f"$queue/{q}", f"m{i}".encode(), qos=1, pid=i + 1)
    for _ in range(n):
        assert (p.expect(mqttraw.PUBACK).rc or 0) == 0
    # The consumer never acks: every message times out into the dead-letter queue.
    assert len(drain(c, quiet=1.0, ack=False)) == n
    c.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        status, info = admin.call("GET", f"/api/v1/queues/{q}")
        if status == 200 and info["dead_letters"] == n:
            break
        time.sleep(0.2)
    assert info["dead_letters"] == n, info
    status, r = admin.call("POST", f"/api/v1/queues/{q}/dlq/redrive", {"count": 3})
    assert status == 200 and r["redriven"] == 3, r
    status, r = admin.call("POST", f"/api/v1/queues/{q}/dlq/redrive",
                           {"message_ids": [f"{q}$dlq:0:5", f"{q}$dlq:0:0", "bad id"]})
    assert status == 400, r
    status, r = admin.call("POST", f"/api/v1/queues/{q}/dlq/redrive",
                           {"message_ids": [f"{q}$dlq:0:5", f"{q}$dlq:0:0"]})
    assert status == 200 and r["redriven"] == 1 and r["missing"] == [f"{q}$dlq:0:0"], r
    # Redrive the rest, killing the broker while it runs.
    threading.Thread(target=admin.call,
                     args=("POST", f"/api/v1/queues/{q}/dlq/redrive", {}), daemon=True).start()
    time.sleep(0.05)
    restart(b)
    # After the restart each dead letter is in exactly one place; redrive what is left.
    status, r = admin.call("POST", f"/api/v1/queues/{q}/dlq/redrive", {})
    assert status == 200, r
    status, info = admin.call("GET", f"/api/v1/queues/{q}")
    assert info["dead_letters"] == 0, info
    c = consumer(b, q, version=version, cid="w")
    got = Counter(m.payload for m in drain(c, quiet=2.0))
    assert {k for k, v in got.items() if v > 1} == set(), "a dead letter redriven twice"
    assert set(got) == {f"m{i}".encode() for i in range(n)}, "a dead letter lost"
    dlq = consumer(b, f"{q}/$dlq", group="late", version=version)
    assert drain(dlq, quiet=1.0) == [], "redriven messages stay in the dead-letter queue"
    status, r = admin.call("POST", "/api/v1/queues/nosuch/dlq/redrive", {})
    assert status == 404


def test_a_slow_311_consumer_ends_up_holding_few_and_the_rest_waits_for_the_group(crashable):
    """The adaptive window (README, "The consumer window"): a 3.1.1 consumer that works
    through a message every 0.2 s starts with 32 in flight and is cut to 4; when it
    goes, a new member gets the few it held again and the rest as first deliveries."""
    port = free_port()
    b = crashable(admin_bind=[f"127.0.0.1:{port}"], queue_defaults={"partitions": 1})
    admin = Admin(port)
    q = qname()
    slow = consumer(b, q, version=4, cid="slow")
    p = client(b, 4)
    for i in range(200):
        p.publish(f"$queue/{q}", f"m{i}".encode(), qos=1, pid=i + 1)
    for _ in range(200):
        assert (p.expect(mqttraw.PUBACK).rc or 0) == 0
    held, seen = [], set()
    deadline = time.time() + 30
    while time.time() < deadline:
        m = slow.recv(0.2)
        if m is not None and m.type == mqttraw.PUBLISH:
            held.append(m)
            seen.add(m.payload)
            continue
        if held:  # one message done every 0.2 s, oldest first
            slow.puback(held.pop(0).pid)
        status, info = admin.call("GET", f"/api/v1/queues/{q}")
        if info["groups"][0]["windows"].get("slow") == 4 and info["groups"][0]["in_flight"] <= 4:
            break
    group = info["groups"][0]
    assert group["windows"] == {"slow": 4}, group
    assert group["in_flight"] <= 4, group
    done = 200 - group["lag"]
    assert done < 40, f"only what it settled left the queue: {group}"
    slow.close()  # the TCP connection drops; what it held goes to the next member
    fresh = consumer(b, q, version=4, cid="fresh")
    got = drain(fresh, quiet=1.5)
    counts = Counter(m.payload for m in got)
    assert len(got) == group["lag"] and max(counts.values()) == 1, "each once"
    again = seen & set(counts)
    assert again == {m.payload for m in held} and len(again) <= 4, \
        "only what the slow one held comes again"


def test_roost_queues_command_lists_shows_resets_purges_and_redrives(crashable):
    """`roost queues` over the admin API: tables for a person, --json for scripts."""
    import subprocess

    from broker import roost_binary

    port = free_port()
    b = crashable(admin_bind=[f"127.0.0.1:{port}"],
                  queue_defaults={"partitions": 2, "ack_timeout_ms": 200, "max_deliveries": 1})

    def roost_queues(*args, ok=True):
        r = subprocess.run([roost_binary(), "queues", "--admin", f"127.0.0.1:{port}", *args],
                           capture_output=True, text=True, timeout=30)
        assert (r.returncode == 0) == ok, (args, r.stdout, r.stderr)
        return r.stdout if ok else r.stderr

    q = qname()
    p = client(b, 4)
    for i in range(6):
        assert publish(p, f"$queue/{q}/k{i}", f"m{i}".encode(), i + 1) == 0
    c = consumer(b, q, group="billing", version=4, cid="w1")
    assert len(drain(c, quiet=1.0)) == 6
    listed = roost_queues("list")
    header, *rows = listed.splitlines()
    assert header.split() == ["QUEUE", "PARTITIONS", "DEPTH", "BYTES", "DEAD-LETTERS",
                              "GROUPS", "LAG"]
    mine = [r.split() for r in rows if r.split()[0] == q]
    assert mine and mine[0][1] == "2" and mine[0][5:] == ["1", "0"], listed
    shown = roost_queues("show", q)
    row = next(line.split() for line in shown.splitlines() if line.startswith("billing"))
    assert row == ["billing", "-", "0", "0", "0", "0", "w1"], shown
    as_json = json.loads(roost_queues("--json", "show", q))
    assert as_json["groups"][0]["windows"] == {"w1": 32}, as_json
    # Replay: everything comes again.
    roost_queues("reset", q, "billing", "--to", "earliest")
    assert sorted(m.payload for m in drain(c, quiet=1.0)) == [f"m{i}".encode() for i in range(6)]
    # Dead letters: a message nobody acks times out into the dead-letter queue.
    assert publish(p, f"$queue/{q}/k0", b"late", 7) == 0
    assert [m.payload for m in drain(c, quiet=1.0, ack=False)] == [b"late"]
    c.close()
    deadline = time.time() + 10
    while json.loads(roost_queues("--json", "show", q))["dead_letters"] != 1:
        assert time.time() < deadline, "no dead letter"
        time.sleep(0.2)
    assert roost_queues("redrive", q) == "redriven 1\n"
    assert json.loads(roost_queues("--json", "show", q))["dead_letters"] == 0
    roost_queues("purge", q)
    assert json.loads(roost_queues("--json", "show", q))["depth"] == 0
    err = roost_queues("show", "nosuch", ok=False)
    assert "404" in err and "nosuch" in err, err
    err = roost_queues("reset", q, "billing", "--to", "soon", ok=False)
    assert "earliest, latest or an offset" in err, err
