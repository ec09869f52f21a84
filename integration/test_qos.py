"""QoS 0/1/2 in both directions: delivery, downgrade, exact wire flows, packet ids."""

import pytest

import mqttraw as w
from conftest import VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
def test_pubsub_delivers_at_min_of_publish_and_subscription_qos(broker, clients, topic, version,
                                                                pub_qos, sub_qos):
    sub = clients(broker, version)
    assert sub.subscribe(topic, qos=sub_qos) == [sub_qos]
    pub = clients(broker, version)
    for i in range(3):
        pub.publish(topic, f"m{i}".encode(), qos=pub_qos)
    got = sub.get_n(3)
    assert [m.payload for m in got] == [b"m0", b"m1", b"m2"]  # in order, each once
    assert {m.qos for m in got} == {min(pub_qos, sub_qos)}
    sub.assert_nothing(0.3)


@pytest.mark.parametrize("version", VERSIONS)
def test_qos1_inbound_flow_publish_puback(broker, raw, uid, version):
    c = raw(broker, version)
    c.connect(uid)
    c.publish("it/" + uid, b"x", qos=1, pid=0x1234)
    ack = c.expect(w.PUBACK)
    assert ack.pid == 0x1234
    if version == 5:
        assert ack.rc in (0x00, 0x10)  # success / no matching subscribers
    else:
        assert ack.raw == b"\x40\x02\x12\x34"
    c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_qos2_inbound_flow_pubrec_pubrel_pubcomp(broker, raw, clients, uid, version):
    t = "it/" + uid
    sub = clients(broker, version)
    sub.subscribe(t, qos=2)
    c = raw(broker, version)
    c.connect(uid)
    c.publish(t, b"exactly once", qos=2, pid=77)
    rec = c.expect(w.PUBREC)
    assert rec.pid == 77 and rec.rc == 0
    c.ack(w.PUBREL, 77)
    comp = c.expect(w.PUBCOMP)
    assert comp.pid == 77 and comp.rc == 0
    if version == 4:
        assert rec.raw == b"\x50\x02\x00\x4d" and comp.raw == b"\x70\x02\x00\x4d"
    m = sub.get()
    assert m.payload == b"exactly once" and m.qos == 2
    sub.assert_nothing(0.3)


@pytest.mark.parametrize("version", VERSIONS)
def test_qos2_duplicate_publish_before_pubrel_is_delivered_once(broker, raw, clients, uid,
                                                               version):
    t = "it/" + uid
    sub = clients(broker, version)
    sub.subscribe(t, qos=2)
    c = raw(broker, version)
    c.connect(uid)
    c.publish(t, b"once", qos=2, pid=9)
    assert c.expect(w.PUBREC).pid == 9
    c.publish(t, b"once", qos=2, pid=9, dup=True)  # the PUBREC "got lost": resend
    assert c.expect(w.PUBREC).pid == 9
    c.ack(w.PUBREL, 9)
    assert c.expect(w.PUBCOMP).pid == 9
    # a new message may reuse the id once the flow completed
    c.publish(t, b"next", qos=2, pid=9)
    assert c.expect(w.PUBREC).pid == 9
    c.ack(w.PUBREL, 9)
    assert c.expect(w.PUBCOMP).pid == 9
    got = [m.payload for m in sub.drain(0.7)]
    assert got == [b"once", b"next"]


@pytest.mark.parametrize("version", VERSIONS)
def test_qos1_outbound_flow_to_subscriber(broker, raw, clients, uid, version):
    t = "it/" + uid
    c = raw(broker, version)
    c.connect(uid)
    assert c.subscribe(t, qos=1).rcs == [1]
    pub = clients(broker, version)
    pub.publish(t, b"one", qos=1)
    m = c.expect(w.PUBLISH)
    assert m.qos == 1 and m.pid and not m.dup and m.payload == b"one" and m.topic == t
    c.puback(m.pid)
    pub.publish(t, b"two", qos=1)
    m2 = c.expect(w.PUBLISH)
    assert m2.payload == b"two"
    c.puback(m2.pid)
    assert c.recv(0.5) is None  # nothing resent once acknowledged


@pytest.mark.parametrize("version", VERSIONS)
def test_qos2_outbound_flow_to_subscriber(broker, raw, clients, uid, version):
    t = "it/" + uid
    c = raw(broker, version)
    c.connect(uid)
    assert c.subscribe(t, qos=2).rcs == [2]
    pub = clients(broker, version)
    pub.publish(t, b"q2", qos=2)
    m = c.expect(w.PUBLISH)
    assert m.qos == 2 and m.pid and m.payload == b"q2"
    c.ack(w.PUBREC, m.pid)
    rel = c.expect(w.PUBREL)
    assert rel.pid == m.pid and rel.flags == 0x02  # PUBREL fixed header flags are 0010
    c.ack(w.PUBCOMP, m.pid)
    assert c.recv(0.5) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_packet_ids_unique_while_in_flight(broker, raw, clients, uid, version):
    t = "it/" + uid
    c = raw(broker, version)
    c.connect(uid)
    c.subscribe([(t + "/1", 1), (t + "/2", 2)])
    pub = clients(broker, version)
    for i in range(10):
        pub.publish(t + "/1", b"a%d" % i, qos=1)
        pub.publish(t + "/2", b"b%d" % i, qos=2)
    msgs = []
    while len(msgs) < 20:
        p = c.recv(5)
        assert p is not None, f"only {len(msgs)} of 20 messages arrived"
        assert p.type == w.PUBLISH
        msgs.append(p)
    pids = [m.pid for m in msgs]
    assert all(pids) and len(set(pids)) == 20, f"packet ids reused while in flight: {pids}"
    # acknowledge QoS 1 ones and PUBREC QoS 2 ones: the QoS 2 ids stay in use until PUBCOMP
    for m in msgs:
        c.ack(w.PUBACK if m.qos == 1 else w.PUBREC, m.pid)
    rels = [c.expect(w.PUBREL) for _ in range(10)]
    held = {r.pid for r in rels}
    assert held == {m.pid for m in msgs if m.qos == 2}
    for i in range(5):
        pub.publish(t + "/1", b"c%d" % i, qos=1)
    more = [c.expect(w.PUBLISH) for _ in range(5)]
    for m in more:
        assert m.pid not in held, f"id {m.pid} reused before PUBCOMP"
        c.puback(m.pid)
    for pid in held:
        c.ack(w.PUBCOMP, pid)


@pytest.mark.parametrize("version", VERSIONS)
def test_unsubscribe_stops_delivery(broker, clients, topic, version):
    sub = clients(broker, version)
    sub.subscribe(topic, qos=1)
    pub = clients(broker, version)
    pub.publish(topic, b"before", qos=1)
    assert sub.get().payload == b"before"
    rcs = sub.unsubscribe(topic)
    if version == 5:
        assert rcs == [0]
    pub.publish(topic, b"after", qos=1)
    sub.assert_nothing(0.5)


def test_v5_unsuback_reports_no_subscription_existed(broker, raw, uid):
    c = raw(broker, 5)
    c.connect(uid)
    c.subscribe("it/" + uid + "/a", qos=0)
    ack = c.unsubscribe(["it/" + uid + "/a", "it/" + uid + "/never"], pid=5)
    assert ack.rcs == [0x00, 0x11]


@pytest.mark.parametrize("version", VERSIONS)
def test_resubscribe_replaces_subscription_qos(broker, clients, topic, version):
    sub = clients(broker, version)
    sub.subscribe(topic, qos=2)
    assert sub.subscribe(topic, qos=0) == [0]
    pub = clients(broker, version)
    pub.publish(topic, b"x", qos=2)
    m = sub.get()
    assert m.qos == 0  # one subscription, replaced, not two copies
    sub.assert_nothing(0.4)


@pytest.mark.parametrize("version", VERSIONS)
def test_fan_out_to_many_subscribers_in_order(broker, raw, clients, uid, version):
    t = "it/" + uid
    subs = []
    for i in range(20):
        s = raw(broker, version)
        s.connect(f"{uid}-{i}")
        s.subscribe(t, qos=1)
        subs.append(s)
    pub = clients(broker, version)
    n = 50
    for i in range(n):
        pub.publish(t, b"%d" % i, qos=1, wait=False)
    for s in subs:
        got = []
        while len(got) < n:
            p = s.expect(w.PUBLISH)
            s.puback(p.pid)
            got.append(int(p.payload))
        assert got == list(range(n))  # every subscriber, every message, in order


@pytest.mark.parametrize("version", VERSIONS)
def test_large_payload_intact(broker, clients, topic, version):
    sub = clients(broker, version)
    sub.subscribe(topic, qos=1)
    payload = bytes(range(256)) * 1024  # 256 KiB, every byte value
    clients(broker, version).publish(topic, payload, qos=1)
    assert sub.get(timeout=10).payload == payload


@pytest.mark.parametrize("version", VERSIONS)
def test_acks_sent_in_order_of_publishes(broker, raw, uid, version):
    c = raw(broker, version)
    c.connect(uid)
    pids = [9, 3, 70, 1, 500, 2, 64000, 17]
    for pid in pids:
        c.publish("it/" + uid, b"x", qos=1, pid=pid)
    assert [c.expect(w.PUBACK).pid for _ in pids] == pids  # [MQTT-4.6.0-2]
    for pid in pids:
        c.publish("it/" + uid, b"x", qos=2, pid=pid)
    assert [c.expect(w.PUBREC).pid for _ in pids] == pids  # [MQTT-4.6.0-3]
    for pid in pids:
        c.ack(w.PUBREL, pid)
    assert [c.expect(w.PUBCOMP).pid for _ in pids] == pids
