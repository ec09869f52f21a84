"""Durability: what roost acknowledged survives `kill -9` and a restart on the same data dir.

Each test kills the real binary with SIGKILL (no chance to flush anything) and starts it
again on the same port and data directory, then checks with raw clients that persistent
sessions (3.1.1 clean session 0, 5.0 session expiry > 0), their queued and in-flight
messages, incoming QoS 2 ids and retained messages are all still there, with the packet
ids and DUP flags the spec asks for, and that expired sessions and messages are gone.
"""

from __future__ import annotations

import time
import uuid

import pytest

import mqttraw
from broker import IS_MOSQUITTO, Broker
from conftest import VERSIONS, publish_acked, receive_publishes

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="runs roost's own persistence (mosquitto runs with persistence false here)")


def persistent(version):
    """CONNECT arguments for a session that outlives its connection."""
    if version == 5:
        return {"clean": False, "properties": [(mqttraw.SESSION_EXPIRY, 600)]}
    return {"clean": False}


@pytest.fixture
def durable_broker():
    b = Broker().start()
    yield b
    b.cleanup()


def crash_and_restart(b: Broker):
    b.kill()  # SIGKILL: nothing is flushed or closed cleanly
    b.log.close()
    b.start()
    assert b.alive()


def client(b, version):
    return mqttraw.RawClient(b.host, b.port, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_offline_messages_survive_kill9(durable_broker, version):
    b = durable_broker
    cid = f"durable-{uuid.uuid4().hex[:8]}"
    base = f"dur/{uuid.uuid4().hex[:6]}"
    sub = client(b, version)
    sub.connect(cid, **persistent(version))
    assert sub.subscribe([(f"{base}/q1/#", 1), (f"{base}/q2/#", 2)]).rcs == [1, 2]
    sub.disconnect()

    q1 = [f"one-{i}".encode() for i in range(20)]
    q2 = [f"two-{i}".encode() for i in range(20)]
    publish_acked(b, version, f"{base}/q1/x", q1, qos=1)
    publish_acked(b, version, f"{base}/q2/x", q2, qos=2)
    crash_and_restart(b)

    sub = client(b, version)
    ack = sub.connect(cid, **persistent(version))
    assert ack.session_present, "the persistent session survived the crash"
    got = receive_publishes(sub, 40)
    by_topic = {}
    for p in got:
        by_topic.setdefault(p.topic, []).append(p)
    assert [p.payload for p in by_topic[f"{base}/q1/x"]] == q1, "every PUBACKed message, in order"
    assert [p.payload for p in by_topic[f"{base}/q2/x"]] == q2, "every PUBCOMPed message, in order"
    assert {p.qos for p in by_topic[f"{base}/q1/x"]} == {1}
    assert {p.qos for p in by_topic[f"{base}/q2/x"]} == {2}
    assert len({p.pid for p in got}) == 40, "packet ids are distinct while in flight"
    sub.assert_nothing(0.5)
    # Subscriptions survived too: a new message still arrives.
    publish_acked(b, version, f"{base}/q1/y", [b"after"], qos=1)
    assert receive_publishes(sub, 1)[0].payload == b"after"
    sub.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_inflight_state_survives_kill9(durable_broker, version):
    """An unacknowledged QoS 1 message comes back with DUP and the same packet id; a QoS 2
    message whose PUBREC was received continues with PUBREL, not a second PUBLISH."""
    b = durable_broker
    cid = f"inflight-{uuid.uuid4().hex[:8]}"
    t = f"dur/{uuid.uuid4().hex[:6]}"
    sub = client(b, version)
    sub.connect(cid, **persistent(version))
    sub.subscribe([(f"{t}/#", 2)])
    publish_acked(b, version, f"{t}/a", [b"q1"], qos=1)
    p1 = sub.expect(mqttraw.PUBLISH)
    assert p1.qos == 1 and not p1.dup
    publish_acked(b, version, f"{t}/b", [b"q2"], qos=2)
    p2 = sub.expect(mqttraw.PUBLISH)
    assert p2.qos == 2
    sub.ack(mqttraw.PUBREC, p2.pid)
    assert sub.expect(mqttraw.PUBREL).pid == p2.pid
    # No PUBACK for p1, no PUBCOMP for p2: crash now.
    crash_and_restart(b)
    sub.close()

    sub = client(b, version)
    assert sub.connect(cid, **persistent(version)).session_present
    again = sub.expect(mqttraw.PUBLISH)
    assert (again.pid, again.dup, again.payload, again.qos) == (p1.pid, True, b"q1", 1)
    rel = sub.expect(mqttraw.PUBREL)
    assert rel.pid == p2.pid, "QoS 2 flow resumes at PUBREL"
    sub.puback(again.pid)
    sub.ack(mqttraw.PUBCOMP, p2.pid)
    sub.assert_nothing(0.5)
    sub.disconnect()

    # Completed flows stay completed across another crash.
    crash_and_restart(b)
    sub = client(b, version)
    assert sub.connect(cid, **persistent(version)).session_present
    sub.assert_nothing(0.7)
    sub.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_incoming_qos2_id_survives_kill9(durable_broker, version):
    """A QoS 2 PUBLISH resent after a crash (before PUBREL) is not delivered twice."""
    b = durable_broker
    t = f"dur/{uuid.uuid4().hex[:6]}"
    sub_id = f"s-{uuid.uuid4().hex[:8]}"
    sub = client(b, version)
    sub.connect(sub_id, **persistent(version))
    sub.subscribe([(t, 2)])
    sub.disconnect()

    pub_id = f"p-{uuid.uuid4().hex[:8]}"
    pub = client(b, version)
    pub.connect(pub_id, **persistent(version))
    pub.publish(t, b"exactly once", qos=2, pid=7)
    assert pub.expect(mqttraw.PUBREC).pid == 7
    crash_and_restart(b)
    pub.close()

    pub = client(b, version)
    assert pub.connect(pub_id, **persistent(version)).session_present
    pub.publish(t, b"exactly once", qos=2, pid=7, dup=True)
    assert pub.expect(mqttraw.PUBREC).pid == 7
    pub.ack(mqttraw.PUBREL, 7)
    assert pub.expect(mqttraw.PUBCOMP).pid == 7
    pub.disconnect()

    sub = client(b, version)
    sub.connect(sub_id, **persistent(version))
    got = receive_publishes(sub, 1)
    assert got[0].payload == b"exactly once"
    sub.assert_nothing(0.7)
    sub.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_and_their_deletion_survive_kill9(durable_broker, version):
    b = durable_broker
    base = f"dur/{uuid.uuid4().hex[:6]}"
    publish_acked(b, version, f"{base}/kept", [b"kept"], qos=1, retain=True)
    publish_acked(b, version, f"{base}/cleared", [b"soon gone"], qos=1, retain=True)
    publish_acked(b, version, f"{base}/cleared", [b""], qos=1, retain=True)
    publish_acked(b, version, f"{base}/replaced", [b"old"], qos=1, retain=True)
    publish_acked(b, version, f"{base}/replaced", [b"new"], qos=1, retain=True)
    crash_and_restart(b)

    sub = client(b, version)
    sub.connect(f"r-{uuid.uuid4().hex[:8]}")
    sub.subscribe([(f"{base}/#", 1)])
    got = {p.topic: p for p in receive_publishes(sub, 2)}
    assert set(got) == {f"{base}/kept", f"{base}/replaced"}
    assert got[f"{base}/kept"].payload == b"kept" and got[f"{base}/kept"].retain
    assert got[f"{base}/replaced"].payload == b"new"
    sub.assert_nothing(0.5)
    sub.disconnect()


def test_expired_session_and_message_are_gone_after_restart(durable_broker):
    b = durable_broker
    t = f"dur/{uuid.uuid4().hex[:6]}"
    short = f"short-{uuid.uuid4().hex[:8]}"
    long = f"long-{uuid.uuid4().hex[:8]}"
    for cid, expiry in ((short, 1), (long, 600)):
        c = client(b, 5)
        c.connect(cid, clean=False, properties=[(mqttraw.SESSION_EXPIRY, expiry)])
        c.subscribe([(t, 1)])
        c.disconnect()
    pub = client(b, 5)
    pub.connect(f"p-{uuid.uuid4().hex[:8]}")
    pub.publish(t, b"short-lived", qos=1, pid=1, properties=[(mqttraw.MESSAGE_EXPIRY, 1)])
    assert pub.expect(mqttraw.PUBACK).pid == 1
    pub.publish(t, b"long-lived", qos=1, pid=2, properties=[(mqttraw.MESSAGE_EXPIRY, 600)])
    assert pub.expect(mqttraw.PUBACK).pid == 2
    pub.disconnect()
    b.kill()
    time.sleep(2.2)  # the short session and the short message expire while roost is down
    b.log.close()
    b.start()

    c = client(b, 5)
    ack = c.connect(short, clean=False, properties=[(mqttraw.SESSION_EXPIRY, 600)])
    assert not ack.session_present, "a session whose expiry passed while down is gone"
    c.assert_nothing(0.5)
    c.disconnect()

    c = client(b, 5)
    assert c.connect(long, clean=False, properties=[(mqttraw.SESSION_EXPIRY, 600)]).session_present
    got = receive_publishes(c, 1)
    assert got[0].payload == b"long-lived"
    left = got[0].props.get(mqttraw.MESSAGE_EXPIRY)
    assert left is not None and 590 <= left <= 600, "expiry counts the time spent down"
    c.assert_nothing(0.5)
    c.disconnect()


def test_will_of_client_connected_at_crash_is_published_after_restart(durable_broker):
    """A crash ends every connection without DISCONNECT: a persistent session's will
    is published when roost comes back."""
    b = durable_broker
    t = f"dur/will/{uuid.uuid4().hex[:6]}"
    watcher_id = f"w-{uuid.uuid4().hex[:8]}"
    watcher = client(b, 4)
    watcher.connect(watcher_id, clean=False)
    watcher.subscribe([(t, 1)])
    watcher.disconnect()
    dev = client(b, 4)
    dev.connect(f"dev-{uuid.uuid4().hex[:8]}", clean=False,
                will={"topic": t, "payload": b"device lost", "qos": 1})
    crash_and_restart(b)
    dev.close()
    watcher = client(b, 4)
    watcher.connect(watcher_id, clean=False)
    assert receive_publishes(watcher, 1)[0].payload == b"device lost"
    watcher.disconnect()
