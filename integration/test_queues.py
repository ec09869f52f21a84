"""`$queue/` work queues through real MQTT clients: produce, consume in groups, settle.

These follow the `$queue/` contract in DESIGN.md and README: a PUBLISH to
`$queue/<name>[/<rest>]` is stored (acknowledged once durable); a SUBSCRIBE to
`$share/<group>/$queue/<name>` (or `$queue/<name>`, group `default`, or the v5
`consumer-group` property) consumes; PUBACK acks, a v5 PUBACK >= 0x80 nacks; deliveries
carry `queue`, `partition`, `offset`, `message-id`, `delivery-count` and `topic`.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

import mqttraw
from broker import IS_MOSQUITTO, Broker
from conftest import VERSIONS, publish_acked, raw_subscriber, receive_publishes

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's $queue/ queues")


def qname():
    return f"q{uuid.uuid4().hex[:10]}"


def props(p):
    return dict(p.user_props())


@pytest.mark.parametrize("version", VERSIONS)
def test_produce_consume_ack_with_properties(broker, version):
    q = qname()
    c = raw_subscriber(broker, version, f"$share/workers/$queue/{q}")
    publish_acked(broker, version, f"$queue/{q}/device/7", [b"job-1", b"job-2"])
    got = receive_publishes(c, 2)
    assert [p.payload for p in got] == [b"job-1", b"job-2"], "one device's messages in order"
    assert all(p.qos == 1 for p in got), "queue deliveries are at least QoS 1"
    if version == 5:
        up = props(got[0])
        assert up["queue"] == q and up["topic"] == f"$queue/{q}/device/7"
        assert up["delivery-count"] == "1"
        assert up["message-id"] == f"{q}:{up['partition']}:{up['offset']}"
    assert c.recv(0.5) is None, "acked messages are not delivered again"
    c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_two_groups_each_get_everything_and_members_share(broker, version):
    q = qname()
    a1 = raw_subscriber(broker, version, f"$share/a/$queue/{q}")
    a2 = raw_subscriber(broker, version, f"$share/a/$queue/{q}")
    b1 = raw_subscriber(broker, version, f"$share/b/$queue/{q}")
    payloads = [f"m{i}".encode() for i in range(40)]
    # One source topic per message: they hash to different partitions (one topic's
    # messages would all land in one partition, owned by one member).
    for i, payload in enumerate(payloads):
        publish_acked(broker, version, f"$queue/{q}/dev{i}", [payload])
    got_b = receive_publishes(b1, 40)
    assert sorted(p.payload for p in got_b) == sorted(payloads), "group b gets every message"
    got_a = {a1: [], a2: []}
    deadline = time.monotonic() + 10
    while sum(map(len, got_a.values())) < 40 and time.monotonic() < deadline:
        for c in (a1, a2):
            p = c.recv(0.05)
            if p is not None and p.type == mqttraw.PUBLISH:
                got_a[c].append(p)
                c.puback(p.pid)
    assert sorted(p.payload for ps in got_a.values() for p in ps) == sorted(payloads), \
        "group a's members together get every message once"
    assert got_a[a1] and got_a[a2], \
        f"the members share the work: {len(got_a[a1])} and {len(got_a[a2])} messages"
    if version == 5:
        # A partition is owned by one member at a time.
        parts = [{props(p)["partition"] for p in got_a[c]} for c in (a1, a2)]
        assert parts[0].isdisjoint(parts[1]), parts
    for c in (a1, a2, b1):
        c.disconnect()


def test_v5_nack_redelivers_with_rising_delivery_count(broker):
    q = qname()
    c = raw_subscriber(broker, 5, f"$share/w/$queue/{q}")
    publish_acked(broker, 5, f"$queue/{q}", [b"retry me"])
    first = receive_publishes(c, 1, ack=False)[0]
    assert props(first)["delivery-count"] == "1"
    c.ack(mqttraw.PUBACK, first.pid, rc=0x80)  # nack
    again = receive_publishes(c, 1, timeout=15)[0]
    assert again.payload == b"retry me"
    assert props(again)["delivery-count"] == "2"
    assert c.recv(0.5) is None
    c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_settle_by_publishing_to_ack_topic(broker, version):
    q = qname()
    c = raw_subscriber(broker, 5, f"$share/w/$queue/{q}")
    publish_acked(broker, version, f"$queue/{q}", [b"settle by topic"])
    p = receive_publishes(c, 1, ack=False)[0]
    mid = props(p)["message-id"]
    # Settle from a second connection of the same client is not possible (takeover), so
    # settle on this one by publishing to $ack with the message-id.
    c.publish(f"$queue/{q}/$ack", b"", qos=1, pid=500,
              properties=[(mqttraw.USER_PROPERTY, ("message-id", mid))])
    ack = c.expect(mqttraw.PUBACK)
    assert ack.pid == 500 and ack.rc in (None, 0)
    c.disconnect()  # the unacked PUBLISH does not matter any more
    c2 = raw_subscriber(broker, 5, f"$share/w/$queue/{q}")
    assert c2.recv(1.0) is None, "settled through $ack: not delivered again"
    c2.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_consumer_leaving_mid_stream_loses_nothing(broker, version):
    q = qname()
    leaving = raw_subscriber(broker, version, f"$share/g/$queue/{q}")
    staying = raw_subscriber(broker, version, f"$share/g/$queue/{q}")
    payloads = [f"n{i}".encode() for i in range(30)]
    publish_acked(broker, version, f"$queue/{q}", payloads)
    got = []
    # The leaving consumer takes what it is given without acking, then drops off.
    while True:
        p = leaving.recv(0.3)
        if p is None:
            break
    leaving.close()
    deadline = time.monotonic() + 15
    while len(set(got)) < 30 and time.monotonic() < deadline:
        p = staying.recv(0.5)
        if p is not None and p.type == mqttraw.PUBLISH:
            got.append(p.payload)
            staying.puback(p.pid)
    assert sorted(set(got)) == sorted(payloads), "everything the leaver held came to the other member"
    staying.disconnect()


def test_ack_timeout_redelivery_then_dead_letter(broker_with):
    b = broker_with(queue_defaults={"ack_timeout_ms": 300, "max_deliveries": 2,
                                    "backoff_initial_ms": 100, "backoff_max_ms": 200})
    q = qname()
    c = raw_subscriber(b, 5, f"$share/w/$queue/{q}")
    dlq = raw_subscriber(b, 5, f"$share/d/$queue/{q}/$dlq")
    publish_acked(b, 5, f"$queue/{q}/x", [b"poison"])
    first = receive_publishes(c, 1, ack=False)[0]
    second = receive_publishes(c, 1, ack=False, timeout=10)[0]
    assert props(first)["delivery-count"] == "1" and props(second)["delivery-count"] == "2"
    dead = receive_publishes(dlq, 1, timeout=10)[0]
    assert dead.payload == b"poison"
    assert props(dead)["topic"] == f"$queue/{q}/x"
    assert c.recv(1.0) is None, "after max deliveries it only lives in the dead-letter queue"
    c.disconnect()
    dlq.disconnect()


def test_quota_exceeded_is_0x97_for_v5(broker_with):
    b = broker_with(queue_defaults={"max_depth": 3})
    q = qname()
    pub = mqttraw.RawClient(b.host, b.port, 5)
    pub.connect(f"p-{uuid.uuid4().hex[:8]}")
    codes = []
    for i in range(1, 6):
        pub.publish(f"$queue/{q}", b"x", qos=1, pid=i)
        codes.append(pub.expect(mqttraw.PUBACK).rc or 0)
    assert codes[:3] == [0, 0, 0]
    assert codes[3:] == [0x97, 0x97], "a full queue refuses v5 producers with quota exceeded"
    pub.disconnect()


def test_partition_key_keeps_order_per_key(broker):
    q = qname()
    c = raw_subscriber(broker, 5, f"$share/w/$queue/{q}")
    pub = mqttraw.RawClient(broker.host, broker.port, 5)
    pub.connect(f"p-{uuid.uuid4().hex[:8]}")
    for i in range(1, 61):
        key = f"k{i % 3}"
        pub.publish(f"$queue/{q}", f"{key}:{i}".encode(), qos=1, pid=i,
                    properties=[(mqttraw.USER_PROPERTY, ("partition-key", key))])
        assert pub.expect(mqttraw.PUBACK).pid == i
    got = receive_publishes(c, 60)
    by_key = {}
    for p in got:
        key, n = p.payload.decode().split(":")
        by_key.setdefault(key, []).append(int(n))
    for key, ns in by_key.items():
        assert ns == sorted(ns), f"messages with partition-key {key} arrive in order"
    parts = {}
    for p in got:
        parts.setdefault(p.payload.decode().split(":")[0], set()).add(props(p)["partition"])
    assert all(len(v) == 1 for v in parts.values()), "one key, one partition"
    c.disconnect()


def test_queue_messages_survive_kill9_and_acked_ones_stay_acked():
    b = Broker().start()
    try:
        q = qname()
        c = raw_subscriber(b, 4, f"$share/w/$queue/{q}")
        publish_acked(b, 4, f"$queue/{q}", [f"d{i}".encode() for i in range(10)])
        acked = receive_publishes(c, 4)
        time.sleep(0.3)  # acks are group-committed; give them a round to be durable
        b.kill()
        b.log.close()
        b.start()
        c2 = raw_subscriber(b, 4, f"$share/w/$queue/{q}")
        rest = receive_publishes(c2, 6)
        assert sorted(p.payload for p in rest) == [f"d{i}".encode() for i in range(4, 10)]
        assert c2.recv(1.0) is None, "acked messages are not delivered again after the crash"
        assert {p.payload for p in acked}.isdisjoint({p.payload for p in rest})
        c2.disconnect()
    finally:
        b.cleanup()


def _lose_unsynced_segment_tails(logs_dir):
    """What a power cut may take from queue logs written through the journal: each log's
    active segment (never synced since it was created) and its index files."""
    cut = 0
    for log_dir in logs_dir.iterdir():
        if not log_dir.is_dir():
            continue
        segments = sorted(log_dir.glob("*.log"))
        if segments and segments[-1].stat().st_size > 0:
            segments[-1].write_bytes(b"")
            cut += 1
        for ext in ("index", "timeindex"):
            for f in log_dir.glob(f"*.{ext}"):
                if f.stem == segments[-1].stem:
                    f.unlink()
    return cut


def test_power_cut_loses_no_acknowledged_message_the_journal_restores_them():
    b = Broker().start()
    try:
        q = qname()
        payloads = [f"p{i}".encode() for i in range(60)]
        publish_acked(b, 4, f"$queue/{q}", payloads[:30])
        publish_acked(b, 5, f"$queue/{q}/dev", payloads[30:])
        c = raw_subscriber(b, 4, f"$share/w/$queue/{q}")
        acked = receive_publishes(c, 20)
        time.sleep(0.3)  # the acks' progress records: one journal round
        b.kill()
        b.log.close()
        assert _lose_unsynced_segment_tails(b.dir / "data" / "queues" / "logs") > 0
        b.start()
        c2 = raw_subscriber(b, 4, f"$share/w/$queue/{q}")
        rest = receive_publishes(c2, 40)
        assert c2.recv(1.0) is None, "acked messages stay acked after the power cut"
        assert sorted(p.payload for p in acked + rest) == sorted(payloads), \
            "every PUBACKed message is back, each once"
        assert "replayed" in b.log_tail(400), "roost logs what it restored"
        c2.disconnect()
    finally:
        b.cleanup()


def test_mosquitto_clients_produce_and_consume(broker):
    q = qname()
    sub = subprocess.Popen(["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
                            "-t", f"$share/cli/$queue/{q}", "-C", "3", "-W", "10"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    for i in range(3):
        subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
                        "-t", f"$queue/{q}/sensor", "-m", f"reading {i}"], check=True, timeout=10)
    out, _ = sub.communicate(timeout=15)
    assert sorted(out.split("\n")[:3]) == ["reading 0", "reading 1", "reading 2"]


@pytest.mark.parametrize("version", VERSIONS)
def test_capture_filter_copies_ordinary_publishes_into_a_declared_queue(broker_with, version):
    b = broker_with(queues={"readings": {"capture_filters": ["sensors/#"], "partitions": 2}})
    live = mqttraw.RawClient(b.host, b.port, version)
    live.connect(f"live-{uuid.uuid4().hex[:8]}")
    live.subscribe([("sensors/#", 1)])
    pub = mqttraw.RawClient(b.host, b.port, version)
    pub.connect(f"dev-{uuid.uuid4().hex[:8]}")
    for i in range(1, 4):
        pub.publish(f"sensors/kitchen/{i}", f"t{i}".encode(), qos=1, pid=i)
        assert pub.expect(mqttraw.PUBACK).pid == i
    pub.publish("other/topic", b"not captured", qos=1, pid=9)
    pub.expect(mqttraw.PUBACK)
    pub.disconnect()
    # Ordinary subscribers still get them live...
    assert sorted(p.payload for p in receive_publishes(live, 3)) == [b"t1", b"t2", b"t3"]
    # ...and the queue kept a durable copy for a worker group that connects later.
    c = raw_subscriber(b, 5, "$share/workers/$queue/readings")
    got = receive_publishes(c, 3)
    assert sorted(p.payload for p in got) == [b"t1", b"t2", b"t3"]
    assert sorted(props(p)["topic"] for p in got) == [f"sensors/kitchen/{i}" for i in range(1, 4)]
    assert c.recv(0.5) is None, "only matching publishes are captured"
    c.disconnect()
    live.disconnect()


def test_nack_and_reject_by_topic(broker_with):
    b = broker_with(queue_defaults={"backoff_initial_ms": 100, "backoff_max_ms": 100})
    q = qname()
    c = raw_subscriber(b, 5, f"$share/w/$queue/{q}")
    dlq = raw_subscriber(b, 5, f"$share/d/$queue/{q}/$dlq")
    publish_acked(b, 5, f"$queue/{q}", [b"again", b"never"])
    first = {p.payload: p for p in receive_publishes(c, 2, ack=False)}

    def settle(verb, p, pid):
        c.publish(f"$queue/{q}/${verb}", b"", qos=1, pid=pid,
                  properties=[(mqttraw.USER_PROPERTY, ("message-id", props(p)["message-id"]))])

    settle("nack", first[b"again"], 900)
    settle("reject", first[b"never"], 901)
    seen_acks, redelivered = set(), None
    deadline = time.monotonic() + 10
    while (len(seen_acks) < 2 or redelivered is None) and time.monotonic() < deadline:
        p = c.recv(0.5)
        if p is None:
            continue
        if p.type == mqttraw.PUBACK:
            assert p.rc in (None, 0), f"settle refused: {p!r}"
            seen_acks.add(p.pid)
        elif p.type == mqttraw.PUBLISH:
            redelivered = p
            c.puback(p.pid)
    assert seen_acks == {900, 901}
    assert redelivered is not None and redelivered.payload == b"again"
    assert props(redelivered)["delivery-count"] == "2"
    dead = receive_publishes(dlq, 1)[0]
    assert dead.payload == b"never", "$reject goes straight to the dead-letter queue"
    for x in (c, dlq):
        x.disconnect()


def test_v311_producer_waits_at_max_depth_instead_of_losing(broker_with):
    b = broker_with(queue_defaults={"max_depth": 3})
    q = qname()
    pub = mqttraw.RawClient(b.host, b.port, 4)
    pub.connect(f"p-{uuid.uuid4().hex[:8]}")
    for i in range(1, 6):
        pub.publish(f"$queue/{q}", f"w{i}".encode(), qos=1, pid=i)
    acks = [p.pid for p in pub.recv_all(timeout=1.0) if p.type == mqttraw.PUBACK]
    assert acks == [1, 2, 3], "past max_depth a 3.1.1 producer's PUBACK waits"
    c = raw_subscriber(b, 4, f"$share/w/$queue/{q}")
    got = receive_publishes(c, 5)
    assert sorted(p.payload for p in got) == [f"w{i}".encode() for i in range(1, 6)]
    acks += [p.pid for p in pub.recv_all(timeout=2.0) if p.type == mqttraw.PUBACK]
    assert acks == [1, 2, 3, 4, 5], "room made by consumers releases the waiting PUBACKs, in order"
    pub.disconnect()
    c.disconnect()


def test_order_per_device_with_three_concurrent_consumers(broker):
    q = qname()
    members = [raw_subscriber(broker, 5, f"$share/g/$queue/{q}") for _ in range(3)]
    pub = mqttraw.RawClient(broker.host, broker.port, 5)
    pub.connect(f"p-{uuid.uuid4().hex[:8]}")
    n = 0
    for i in range(20):
        for dev in range(6):
            n += 1
            pub.publish(f"$queue/{q}/dev{dev}", f"dev{dev}:{i}".encode(), qos=1, pid=n)
            assert pub.expect(mqttraw.PUBACK).pid == n
    pub.disconnect()
    seq = {}
    owners = {}
    deadline = time.monotonic() + 15
    total = 0
    while total < n and time.monotonic() < deadline:
        for idx, c in enumerate(members):
            p = c.recv(0.02)
            if p is None or p.type != mqttraw.PUBLISH:
                continue
            dev, i = p.payload.decode().split(":")
            seq.setdefault(dev, []).append(int(i))
            owners.setdefault(dev, set()).add(idx)
            c.puback(p.pid)
            total += 1
    assert total == n
    for dev, got in seq.items():
        assert got == list(range(20)), f"{dev}'s messages in order"
        assert len(owners[dev]) == 1, "a partition has one owner at a time"
    assert len({next(iter(o)) for o in owners.values()}) > 1, "the work is shared"
    for c in members:
        c.disconnect()
