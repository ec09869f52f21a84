"""Retained messages: store, replace, clear, delivery on subscribe, v5 retain options."""


import pytest

import mqttraw as w
from conftest import VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_delivered_on_subscribe_with_retain_flag(broker, clients, topic, version):
    pub = clients(broker, version)
    pub.publish(topic, b"21.5", qos=1, retain=True)
    sub = clients(broker, version)
    sub.subscribe(topic, qos=1)
    m = sub.get()
    assert m.payload == b"21.5" and m.retain is True and m.qos == 1
    sub.assert_nothing(0.3)


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_replaced_by_newer(broker, clients, topic, version):
    pub = clients(broker, version)
    pub.publish(topic, b"old", qos=1, retain=True)
    pub.publish(topic, b"new", qos=1, retain=True)
    sub = clients(broker, version)
    sub.subscribe(topic, qos=1)
    assert [m.payload for m in sub.drain(0.5)] == [b"new"]


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_cleared_by_empty_payload(broker, clients, topic, version):
    pub = clients(broker, version)
    pub.publish(topic, b"soon gone", qos=1, retain=True)
    live = clients(broker, version)
    live.subscribe(topic, qos=1)
    assert live.get().payload == b"soon gone"
    pub.publish(topic, b"", qos=1, retain=True)
    # the empty retained message is still forwarded to current subscribers like any message
    m = live.get()
    assert m.payload == b""
    sub = clients(broker, version)
    sub.subscribe(topic, qos=1)
    sub.assert_nothing(0.5)


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_matched_by_wildcard_and_qos_downgraded(broker, clients, topic, version):
    pub = clients(broker, version)
    # The QoS 0 publish first: nothing acknowledges it, but the acknowledged ones after
    # it on the same connection are handled after it, so all three are retained before
    # the subscriber comes (else it may get Z live, with retain 0).
    pub.publish(topic + "/q0", b"Z", qos=0, retain=True)
    pub.publish(topic + "/a", b"A", qos=2, retain=True)
    pub.publish(topic + "/b/c", b"C", qos=1, retain=True)
    sub = clients(broker, version)
    sub.subscribe(topic + "/#", qos=1)
    got = {m.topic: m for m in sub.drain(0.6)}
    assert set(got) == {topic + "/a", topic + "/b/c", topic + "/q0"}
    assert got[topic + "/a"].qos == 1 and got[topic + "/b/c"].qos == 1
    assert got[topic + "/q0"].qos == 0
    assert all(m.retain for m in got.values())


def test_v311_live_delivery_has_retain_flag_0(broker, clients, topic):
    sub = clients(broker, 4)
    sub.subscribe(topic, qos=1)
    pub = clients(broker, 4)
    pub.publish(topic, b"live", qos=1, retain=True)
    m = sub.get()
    # [MQTT-3.3.1-9]: retain is 0 when sent because of an established subscription
    assert m.payload == b"live" and m.retain is False


@pytest.mark.parametrize("rap", [False, True])
def test_v5_retain_as_published(broker, clients, topic, rap):
    sub = clients(broker, 5)
    sub.subscribe(topic, qos=1, retain_as_published=rap)
    pub = clients(broker, 5)
    pub.publish(topic, b"live", qos=1, retain=True)
    pub.publish(topic + "x", b"not retained", qos=1)
    m = sub.get()
    assert m.payload == b"live" and m.retain is rap


def _retained_count(sub, wait=0.5):
    return [m for m in sub.drain(wait) if m.retain]


def test_v5_retain_handling_0_sends_on_every_subscribe(broker, clients, topic):
    clients(broker, 5).publish(topic, b"r", qos=1, retain=True)
    sub = clients(broker, 5)
    sub.subscribe(topic, qos=1, retain_handling=0)
    assert len(_retained_count(sub)) == 1
    sub.subscribe(topic, qos=1, retain_handling=0)  # re-subscribe: sent again
    assert len(_retained_count(sub)) == 1


def test_v5_retain_handling_1_sends_only_for_new_subscription(broker, clients, topic):
    clients(broker, 5).publish(topic, b"r", qos=1, retain=True)
    sub = clients(broker, 5)
    sub.subscribe(topic, qos=1, retain_handling=1)
    assert len(_retained_count(sub)) == 1
    sub.subscribe(topic, qos=1, retain_handling=1)  # already exists: not sent
    assert _retained_count(sub) == []


def test_v5_retain_handling_2_never_sends(broker, clients, topic):
    pub = clients(broker, 5)
    pub.publish(topic, b"r", qos=1, retain=True)
    sub = clients(broker, 5)
    sub.subscribe(topic, qos=1, retain_handling=2)
    sub.assert_nothing(0.5)
    pub.publish(topic, b"live", qos=1)
    assert sub.get().payload == b"live"  # the subscription itself works


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_raw_flags_on_subscribe(broker, raw, uid, version):
    t = "it/" + uid
    p = raw(broker, version)
    p.connect(uid + "p")
    p.publish(t, b"raw-retained", qos=1, pid=1, retain=True)
    p.expect(w.PUBACK)
    s = raw(broker, version)
    s.connect(uid + "s")
    s.send(w.subscribe_packet(3, [(t, 2)], version))
    got = s.recv_all(0.7)
    assert [x.type for x in got].count(w.SUBACK) == 1
    pubs = [x for x in got if x.type == w.PUBLISH]
    assert len(pubs) == 1 and pubs[0].retain and pubs[0].qos == 1 and pubs[0].payload == \
        b"raw-retained"
