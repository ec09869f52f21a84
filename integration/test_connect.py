"""CONNECT / CONNACK: session present, client identifiers, protocol levels, AUTH methods."""

import pytest

import mqttraw as w
from conftest import VERSIONS, assert_broker_serves


@pytest.mark.parametrize("version", VERSIONS)
def test_connack_accepts_clean_connect_without_session(broker, raw, uid, version):
    c = raw(broker, version)
    ack = c.connect(uid, clean=True)
    assert ack.rc == 0 and ack.session_present is False
    assert ack.raw[0] == 0x20
    if version == 4:
        assert ack.raw == b"\x20\x02\x00\x00"  # 3.1.1 CONNACK is exactly four bytes
    c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_session_present_flag_follows_stored_session(broker, raw, uid, version):
    persist = {w.SESSION_EXPIRY: 60} if version == 5 else None
    c = raw(broker, version)
    # no stored session yet: session present = 0 even when asking to resume one
    assert c.connect(uid, clean=False, properties=persist).session_present is False
    c.subscribe("it/" + uid, qos=1)
    c.disconnect()

    c = raw(broker, version)
    # clean session 0 / clean start 0 with a stored session: session present = 1
    ack = c.connect(uid, clean=False, properties=persist)
    assert ack.session_present is True
    c.disconnect()

    c = raw(broker, version)
    # clean session 1 / clean start 1 discards it: session present = 0 [MQTT-3.2.2-1, -2]
    assert c.connect(uid, clean=True).session_present is False
    c.disconnect()

    c = raw(broker, version)
    # 3.1.1: a clean session ends with its connection; 5.0: clean start 1 with session
    # expiry 0 (the default) ends it too. Nothing to resume.
    assert c.connect(uid, clean=False, properties=persist).session_present is False
    c.disconnect()


def test_v5_empty_client_id_gets_assigned_identifier(broker, raw):
    a, b = raw(broker, 5), raw(broker, 5)
    ack_a = a.connect("", clean=True)
    ack_b = b.connect("", clean=True)
    id_a = ack_a.props.get(w.ASSIGNED_CLIENT_ID)
    id_b = ack_b.props.get(w.ASSIGNED_CLIENT_ID)
    assert id_a and id_b, (ack_a, ack_b)
    assert id_a != id_b
    # both connections stay usable (neither took over the other)
    a.pingreq()
    b.pingreq()
    assert a.expect(w.PINGRESP).type == w.PINGRESP
    assert b.expect(w.PINGRESP).type == w.PINGRESP


def test_v311_empty_client_id_with_clean_session(broker, raw, uid):
    c = raw(broker, 4)
    ack = c.connect("", clean=True)
    assert ack.rc == 0
    assert c.subscribe("it/" + uid, qos=0).rcs == [0]
    c.disconnect()


def test_v311_empty_client_id_without_clean_session_is_rejected(broker, raw):
    c = raw(broker, 4)
    c.send(w.connect_packet("", 4, clean=False))
    ack = c.expect(w.CONNACK)
    assert ack.rc == 0x02  # identifier rejected [MQTT-3.1.3-8]
    closed, _ = c.wait_closed(5)
    assert closed


def test_mqtt31_mqisdp_connect_and_pubsub(broker, raw, clients, uid):
    c = raw(broker, 3)
    ack = c.connect(uid[:23], clean=True)
    assert ack.rc == 0
    assert c.subscribe("it/" + uid, qos=1).rcs == [1]
    pub = clients(broker, 3, client_id=("p" + uid)[:23])
    pub.publish("it/" + uid, b"from 3.1", qos=1)
    msg = c.expect(w.PUBLISH)
    assert msg.payload == b"from 3.1" and msg.qos == 1
    c.puback(msg.pid)
    c.disconnect()


def test_paho_mqtt31_roundtrip(broker, clients, uid):
    sub = clients(broker, 3, client_id=("s" + uid)[:23])
    sub.subscribe("it/" + uid, qos=2)
    pub = clients(broker, 3, client_id=("p" + uid)[:23])
    pub.publish("it/" + uid, b"v3.1 says hi", qos=2)
    m = sub.get()
    assert m.payload == b"v3.1 says hi" and m.qos == 2


@pytest.mark.parametrize("level", [2, 6, 7])
def test_unsupported_protocol_level_refused(broker, raw, uid, level):
    c = raw(broker, 4)
    c.send(w.connect_packet(uid, version=level))
    closed, got = c.wait_closed(5)
    assert closed, "connection with unsupported protocol level was left open"
    # 3.1.1: CONNACK 0x01 (unacceptable protocol level) then close [MQTT-3.1.2-2];
    # 5.0: CONNACK 0x84 (unsupported protocol version) or just close.
    connacks = [p for p in got if p.type == w.CONNACK]
    assert all(p.type == w.CONNACK for p in got), got
    if connacks:
        assert connacks[0].raw[3] in (0x01, 0x84), connacks
    assert_broker_serves(broker)


def test_wrong_protocol_name_refused(broker, raw, uid):
    c = raw(broker, 4)
    c.send(w.connect_packet(uid, version=4, protocol_name="MQTX"))
    closed, got = c.wait_closed(5)
    assert closed
    assert all(p.type == w.CONNACK and p.raw[3] != 0 for p in got), got
    assert_broker_serves(broker)


def test_v5_unsupported_auth_method_gets_connack_0x8c(broker, raw, uid):
    c = raw(broker, 5)
    c.send(w.connect_packet(uid, 5, properties=[(w.AUTH_METHOD, "NO-SUCH-MECHANISM-42"),
                                                (w.AUTH_DATA, b"\x00\x01")]))
    ack = c.expect(w.CONNACK)
    assert ack.rc == 0x8C, ack
    closed, _ = c.wait_closed(5)
    assert closed
    assert_broker_serves(broker, 5)


def test_v5_connack_advertises_capabilities_consistently(broker, raw, uid):
    c = raw(broker, 5)
    ack = c.connect(uid)
    # every capability property the broker sends must carry a legal value
    for pid in (w.RETAIN_AVAILABLE, w.WILDCARD_SUB_AVAILABLE, w.SUB_ID_AVAILABLE,
                w.SHARED_SUB_AVAILABLE):
        assert ack.props.get(pid, 1) in (0, 1)
    if w.MAXIMUM_QOS in ack.props:  # absent means QoS 2; present may only be 0 or 1
        assert ack.props[w.MAXIMUM_QOS] in (0, 1)
    assert ack.props.get(w.RECEIVE_MAXIMUM, 65535) > 0
    c.disconnect()
