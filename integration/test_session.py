"""Sessions: clean session / clean start, v5 session expiry, offline queueing, DUP resend."""

import time

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO
from conftest import VERSIONS, assert_broker_serves


def _persist(version, expiry=60):
    return {w.SESSION_EXPIRY: expiry} if version == 5 else None


@pytest.mark.parametrize("version", VERSIONS)
def test_clean_session_discards_subscriptions(broker, clients, uid, topic, version):
    c = clients(broker, version, client_id=uid, clean=True)
    c.subscribe(topic, qos=1)
    c.disconnect()
    c = clients(broker, version, client_id=uid, clean=True)
    assert not c.session_present
    clients(broker, version).publish(topic, b"x", qos=1)
    c.assert_nothing(0.5)


@pytest.mark.parametrize("version", VERSIONS)
def test_persistent_session_keeps_subscriptions_and_queues_qos1_qos2(broker, clients, uid, topic,
                                                                     version):
    props = None
    if version == 5:
        from pahoclient import connect_props
        props = connect_props(SessionExpiryInterval=60)
    c = clients(broker, version, client_id=uid, clean=False, properties=props)
    c.subscribe(topic + "/#", qos=2)
    c.disconnect()
    pub = clients(broker, version)
    pub.publish(topic + "/1", b"q1", qos=1)
    pub.publish(topic + "/2", b"q2", qos=2)
    pub.publish(topic + "/0", b"q0", qos=0)
    c = clients(broker, version, client_id=uid, clean=False, properties=props)
    assert c.session_present
    got = {m.payload: m.qos for m in c.drain(0.8)}
    assert got.get(b"q1") == 1 and got.get(b"q2") == 2, got
    # QoS 0 messages may or may not be queued for an offline client [MQTT-3.1.2-5 note]
    assert set(got) <= {b"q1", b"q2", b"q0"}
    # and the subscription survived: live messages still arrive
    pub.publish(topic + "/3", b"live", qos=1)
    assert c.get().payload == b"live"


def test_v5_session_expires_after_interval(broker, raw, clients, uid, topic):
    c = raw(broker, 5)
    c.connect(uid, clean=True, properties={w.SESSION_EXPIRY: 1})
    c.subscribe(topic, qos=1)
    c.disconnect()
    clients(broker, 5).publish(topic, b"into the void", qos=1)
    time.sleep(2.5)
    c = raw(broker, 5)
    ack = c.connect(uid, clean=False, properties={w.SESSION_EXPIRY: 1})
    assert ack.session_present is False
    assert c.recv(0.7) is None  # no queued message, no subscription


def test_v5_session_kept_within_expiry(broker, raw, clients, uid, topic):
    c = raw(broker, 5)
    c.connect(uid, clean=True, properties={w.SESSION_EXPIRY: 10})
    c.subscribe(topic, qos=1)
    c.close()  # network loss, no DISCONNECT
    clients(broker, 5).publish(topic, b"kept", qos=1)
    time.sleep(1.0)
    c = raw(broker, 5)
    ack = c.connect(uid, clean=False, properties={w.SESSION_EXPIRY: 10})
    assert ack.session_present is True
    m = c.expect(w.PUBLISH)
    assert m.payload == b"kept"
    c.puback(m.pid)


def test_v5_session_expiry_zero_ends_session_at_disconnect(broker, raw, uid, topic):
    c = raw(broker, 5)
    c.connect(uid, clean=True)  # no Session Expiry Interval property: 0
    c.subscribe(topic, qos=1)
    c.disconnect()
    c = raw(broker, 5)
    assert c.connect(uid, clean=False).session_present is False


def test_v5_disconnect_can_shorten_session_expiry(broker, raw, uid, topic):
    c = raw(broker, 5)
    c.connect(uid, clean=True, properties={w.SESSION_EXPIRY: 60})
    c.subscribe(topic, qos=1)
    c.disconnect(rc=0, properties={w.SESSION_EXPIRY: 0})
    time.sleep(0.3)
    c = raw(broker, 5)
    assert c.connect(uid, clean=False, properties={w.SESSION_EXPIRY: 60}).session_present is False


@pytest.mark.parametrize("version", VERSIONS)
def test_offline_queue_is_bounded(broker_with, raw, clients, uid, version):
    b = broker_with(max_queued_messages=5)
    t = "it/" + uid
    c = raw(b, version)
    c.connect(uid, clean=False, properties=_persist(version))
    c.subscribe(t, qos=1)
    c.disconnect()
    pub = clients(b, version)
    for i in range(40):
        pub.publish(t, b"%d" % i, qos=1)
    c = raw(b, version)
    assert c.connect(uid, clean=False, properties=_persist(version)).session_present
    got = []
    while True:
        p = c.recv(0.7)
        if p is None:
            break
        assert p.type == w.PUBLISH
        got.append(int(p.payload))
        c.puback(p.pid)
    # mosquitto keeps max_inflight_messages (20) "in flight" on top of the queue limit
    limit = 5 + (20 if IS_MOSQUITTO else 0)
    assert 1 <= len(got) <= limit, f"{len(got)} queued messages kept, limit 5: {got}"
    assert got == sorted(got)  # what is kept is delivered in order
    # the broker is fine and the session is live again
    pub.publish(t, b"999", qos=1)
    m = c.expect(w.PUBLISH)
    assert m.payload == b"999"
    assert_broker_serves(b, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_unacked_qos1_resent_with_dup_on_session_resume(broker, raw, clients, uid, version):
    t = "it/" + uid
    c = raw(broker, version)
    c.connect(uid, clean=False, properties=_persist(version))
    c.subscribe(t, qos=1)
    clients(broker, version).publish(t, b"ack me", qos=1)
    first = c.expect(w.PUBLISH)
    assert first.qos == 1 and not first.dup
    c.close()  # no PUBACK
    time.sleep(0.2)
    c = raw(broker, version)
    ack = c.connect(uid, clean=False, properties=_persist(version))
    assert ack.session_present
    again = c.expect(w.PUBLISH)
    # [MQTT-4.4.0-1]: resent with its original packet id, DUP=1 [MQTT-3.3.1-1]
    assert again.pid == first.pid and again.dup and again.payload == b"ack me"
    c.puback(again.pid)
    assert c.recv(0.5) is None
    c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_unacked_qos2_publish_and_pubrel_resent_on_session_resume(broker, raw, clients, uid,
                                                                 version):
    t = "it/" + uid
    c = raw(broker, version)
    c.connect(uid, clean=False, properties=_persist(version))
    c.subscribe(t, qos=2)
    pub = clients(broker, version)
    pub.publish(t, b"first", qos=2)
    m1 = c.expect(w.PUBLISH)
    c.ack(w.PUBREC, m1.pid)
    assert c.expect(w.PUBREL).pid == m1.pid
    pub.publish(t, b"second", qos=2)
    m2 = c.expect(w.PUBLISH)
    c.close()  # m1 awaits PUBCOMP, m2 awaits PUBREC
    time.sleep(0.2)
    c = raw(broker, version)
    assert c.connect(uid, clean=False, properties=_persist(version)).session_present
    got = c.recv_all(0.8)
    rel = [p for p in got if p.type == w.PUBREL]
    pubs = [p for p in got if p.type == w.PUBLISH]
    assert [p.pid for p in rel] == [m1.pid], got  # PUBREL resent, not the PUBLISH
    assert [(p.pid, p.dup, p.payload) for p in pubs] == [(m2.pid, True, b"second")], got
    c.ack(w.PUBCOMP, m1.pid)
    c.ack(w.PUBREC, m2.pid)
    assert c.expect(w.PUBREL).pid == m2.pid
    c.ack(w.PUBCOMP, m2.pid)
    assert c.recv(0.4) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_clean_session_reconnect_does_not_resend(broker, raw, clients, uid, version):
    t = "it/" + uid
    c = raw(broker, version)
    c.connect(uid, clean=False, properties=_persist(version))
    c.subscribe(t, qos=1)
    clients(broker, version).publish(t, b"x", qos=1)
    c.expect(w.PUBLISH)
    c.close()
    c = raw(broker, version)
    assert c.connect(uid, clean=True).session_present is False
    assert c.recv(0.6) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_resend_in_original_order_before_new_messages(broker, raw, clients, uid, version):
    t = "it/" + uid
    c = raw(broker, version)
    c.connect(uid, clean=False, properties=_persist(version))
    c.subscribe(t, qos=1)
    pub = clients(broker, version)
    for i in range(3):
        pub.publish(t, b"old%d" % i, qos=1)
    first = [c.expect(w.PUBLISH) for _ in range(3)]
    c.close()  # none acknowledged
    for i in range(2):
        pub.publish(t, b"new%d" % i, qos=1)
    time.sleep(0.2)
    c = raw(broker, version)
    assert c.connect(uid, clean=False, properties=_persist(version)).session_present
    got = [c.expect(w.PUBLISH) for _ in range(5)]
    # [MQTT-4.6.0-1] resent in the original order, with their ids and DUP, then the rest
    assert [(p.payload, p.dup) for p in got] == [(b"old0", True), (b"old1", True),
                                                 (b"old2", True), (b"new0", False),
                                                 (b"new1", False)]
    assert [p.pid for p in got[:3]] == [p.pid for p in first]
    for p in got:
        c.puback(p.pid)
