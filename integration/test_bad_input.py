"""Bad input: every malformed packet or protocol violation ends in the spec's reason code
(v5 DISCONNECT) or a close (3.1.1), and the broker keeps serving everyone else."""

import pytest

import mqttraw as w
from conftest import VERSIONS, assert_broker_serves, expect_error_close, mosquitto_skip

MALFORMED, PROTOCOL_ERROR, TOPIC_NAME_INVALID = 0x81, 0x82, 0x90


def _connected(broker, raw, uid, version):
    c = raw(broker, version)
    c.connect(uid)
    return c


def _publish_with_raw_topic(topic_bytes, version):
    body = w.u16(len(topic_bytes)) + topic_bytes + (w.props(None) if version == 5 else b"")
    return w.packet(w.PUBLISH, 0, body + b"payload")


@pytest.mark.parametrize("version", VERSIONS)
def test_malformed_remaining_length(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(b"\x30\xff\xff\xff\xff\x7f")  # five length bytes: more than the allowed four
    expect_error_close(c, [MALFORMED])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_invalid_utf8_topic(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(_publish_with_raw_topic(b"it/\xff\xfe/bad", version))  # [MQTT-1.5.4-1]
    expect_error_close(c, [MALFORMED])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_utf8_surrogate_in_topic(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(_publish_with_raw_topic(b"it/\xed\xa0\x80", version))  # encoded U+D800
    expect_error_close(c, [MALFORMED])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_nul_character_in_topic(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(_publish_with_raw_topic(b"it/a\x00b", version))  # [MQTT-1.5.4-2]
    expect_error_close(c, [MALFORMED])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bad", ["it/+/x", "it/#"])
def test_wildcard_in_publish_topic(broker, raw, uid, version, bad):
    c = _connected(broker, raw, uid, version)
    c.publish(bad, b"x", qos=1, pid=1)  # [MQTT-3.3.2-2]
    expect_error_close(c, [MALFORMED, PROTOCOL_ERROR, TOPIC_NAME_INVALID])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_empty_topic_without_alias(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.publish("", b"x", qos=0)
    expect_error_close(c, [PROTOCOL_ERROR, MALFORMED, TOPIC_NAME_INVALID])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_qos_3_publish(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(w.packet(w.PUBLISH, 0x06, w.string("it/q3") + w.u16(1) +
                    (w.props(None) if version == 5 else b"") + b"x"))  # [MQTT-3.3.1-4]
    expect_error_close(c, [MALFORMED])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_qos0_publish_with_dup_flag(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(w.packet(w.PUBLISH, 0x08, w.string("it/dup0") +
                    (w.props(None) if version == 5 else b"") + b"x"))  # [MQTT-3.3.1-2]
    # the spec forbids sending it but names no receiver action: close with 0x81/0x82, or
    # carry on; either way the broker survives and the connection is sane afterwards
    closed, got = c.wait_closed(1.0)
    if closed:
        assert [p.rc for p in got if p.type == w.DISCONNECT] in ([], [MALFORMED],
                                                                 [PROTOCOL_ERROR]), got
    else:
        c.pingreq()
        assert c.expect(w.PINGRESP)
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("ptype,flags", [(w.SUBSCRIBE, 0x00), (w.UNSUBSCRIBE, 0x03),
                                         (w.PUBREL, 0x00),
                                         pytest.param(w.PINGREQ, 0x01, marks=mosquitto_skip(
                                             "answers a PINGREQ with reserved flags set"))],
                         ids=["subscribe", "unsubscribe", "pubrel", "pingreq"])
def test_reserved_fixed_header_flags(broker, raw, uid, version, ptype, flags):
    c = _connected(broker, raw, uid, version)
    if ptype == w.SUBSCRIBE:
        pkt = w.subscribe_packet(1, [("it/x", 0)], version, flags=flags)
    elif ptype == w.UNSUBSCRIBE:
        pkt = w.unsubscribe_packet(1, ["it/x"], version)
        pkt = bytes([(ptype << 4) | flags]) + pkt[1:]
    elif ptype == w.PUBREL:
        pkt = w.packet(w.PUBREL, flags, w.u16(1))
    else:
        pkt = w.packet(w.PINGREQ, flags, b"")
    c.send(pkt)  # [MQTT-2.2.2-2]: treat as malformed
    expect_error_close(c, [MALFORMED])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_reserved_packet_type_zero(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(b"\x00\x00")
    expect_error_close(c, [MALFORMED, PROTOCOL_ERROR])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_subscribe_without_topic_filters(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(w.subscribe_packet(1, [], version))  # [MQTT-3.8.3-3]
    expect_error_close(c, [PROTOCOL_ERROR, MALFORMED])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_invalid_topic_filter(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(w.subscribe_packet(1, [("it/#/x", 1), ("it/a+", 1), ("it/ok", 1)], version))
    closed, got = c.wait_closed(2)
    if not closed:
        # answered with a SUBACK instead: the bad filters refused, the good one granted
        # (3.1.1: 0x80; 5.0: 0x8F topic filter invalid, or another failure code)
        acks = [p for p in got if p.type == w.SUBACK]
        assert acks and acks[0].rcs[0] >= 0x80 and acks[0].rcs[1] >= 0x80, got
        assert acks[0].rcs[2] == 1, got
        if version == 5:
            assert acks[0].rcs[0] in (0x8F, 0x80, 0x83), got
    else:
        # or treated as a malformed packet (4.7.1 violation) and closed
        discs = [p for p in got if p.type == w.DISCONNECT]
        if version == 5 and discs:
            assert discs[0].rc in (MALFORMED, PROTOCOL_ERROR, 0x8F), got
    assert_broker_serves(broker, version)


def test_v5_subscription_options_reserved_bits(broker, raw, uid):
    c = _connected(broker, raw, uid, 5)
    c.send(w.subscribe_packet(1, [("it/x", 0xC1)], 5))  # [MQTT-3.8.3-5]
    expect_error_close(c, [MALFORMED, PROTOCOL_ERROR])
    assert_broker_serves(broker, 5)


def test_v5_retain_handling_3_is_protocol_error(broker, raw, uid):
    c = _connected(broker, raw, uid, 5)
    c.send(w.subscribe_packet(1, [("it/x", 0x31)], 5))
    expect_error_close(c, [PROTOCOL_ERROR, MALFORMED])
    assert_broker_serves(broker, 5)


@mosquitto_skip("closes without DISCONNECT on a duplicate property")
def test_v5_duplicate_property(broker, raw, uid):
    c = _connected(broker, raw, uid, 5)
    c.publish("it/" + uid, b"x", qos=0,
              properties=[(w.MESSAGE_EXPIRY, 10), (w.MESSAGE_EXPIRY, 20)])
    # "It is a Protocol Error to include the Message Expiry Interval more than once"
    expect_error_close(c, [PROTOCOL_ERROR, MALFORMED])
    assert_broker_serves(broker, 5)


def test_v5_subscription_identifier_zero(broker, raw, uid):
    c = _connected(broker, raw, uid, 5)
    c.send(w.subscribe_packet(1, [("it/x", 0)], 5, properties={w.SUBSCRIPTION_ID: 0}))
    expect_error_close(c, [PROTOCOL_ERROR, MALFORMED])  # [MQTT-3.8.2.1.2]
    assert_broker_serves(broker, 5)


def test_v5_property_not_allowed_in_packet(broker, raw, uid):
    c = _connected(broker, raw, uid, 5)
    # Session Expiry Interval belongs to CONNECT/CONNACK/DISCONNECT, not PUBLISH
    c.publish("it/" + uid, b"x", qos=0, properties=[(w.SESSION_EXPIRY, 5)])
    expect_error_close(c, [MALFORMED, PROTOCOL_ERROR])
    assert_broker_serves(broker, 5)


def test_v5_property_length_overruns_packet(broker, raw, uid):
    c = _connected(broker, raw, uid, 5)
    body = w.string("it/x") + w.vbi(50) + bytes([w.PAYLOAD_FORMAT, 1])
    c.send(w.packet(w.PUBLISH, 0, body))
    expect_error_close(c, [MALFORMED])
    assert_broker_serves(broker, 5)


@pytest.mark.parametrize("version", VERSIONS)
def test_second_connect_is_protocol_error(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.send(w.connect_packet(uid, version))  # [MQTT-3.1.0-2]
    expect_error_close(c, [PROTOCOL_ERROR])
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("first", ["publish", "subscribe", "pingreq", "garbage"])
def test_packet_before_connect_closes(broker, raw, first):
    c = raw(broker, 4)
    data = {"publish": w.publish_packet("it/early", b"x"),
            "subscribe": w.subscribe_packet(1, [("it/#", 0)]),
            "pingreq": w.PINGREQ_PACKET,
            "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"}[first]
    c.send(data)  # [MQTT-3.1.0-1]
    closed, got = c.wait_closed(5)
    assert closed
    assert all(p.type == w.CONNACK and p.rc != 0 for p in got), got
    assert_broker_serves(broker)


@pytest.mark.parametrize("version", VERSIONS)
def test_connect_reserved_flag_set(broker, raw, uid, version):
    c = raw(broker, version)
    c.send(w.connect_packet(uid, version, reserved_flag=True))  # [MQTT-3.1.2-3]
    closed, got = c.wait_closed(5)
    assert closed
    # 5.0 may send CONNACK 0x81 first; no successful CONNACK either way
    assert all(p.type == w.CONNACK and p.rc != 0 for p in got), got
    if version == 5 and got:
        assert got[0].rc in (MALFORMED, PROTOCOL_ERROR)
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_truncated_connect(broker, raw, uid, version):
    c = raw(broker, version)
    full = w.connect_packet(uid, version)
    body = full[2:12]  # cut inside the variable header, but a consistent length
    c.send(bytes([0x10, len(body)]) + body)
    closed, got = c.wait_closed(5)
    assert closed
    assert all(p.type == w.CONNACK and p.rc != 0 for p in got), got
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_will_with_wildcard_topic_refused(broker, raw, uid, version):
    c = raw(broker, version)
    c.send(w.connect_packet(uid, version, will={"topic": "it/+/will", "payload": b"x"}))
    closed, got = c.wait_closed(5)
    assert closed
    assert all(p.type == w.CONNACK and p.rc != 0 for p in got), got
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_slow_garbage_does_not_stall_other_clients(broker, raw, clients, uid, topic, version):
    # one client sends half a packet and then nothing; others carry on unaffected
    stuck = _connected(broker, raw, uid + "-stuck", version)
    stuck.send(b"\x30\x40" + w.string("it/half"))
    sub = clients(broker, version)
    sub.subscribe(topic, qos=1)
    clients(broker, version).publish(topic, b"unaffected", qos=1)
    assert sub.get().payload == b"unaffected"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", ["will_qos_without_will", "will_qos_3", "password_no_username",
                                  "bad_utf8_client_id"])
def test_invalid_connect_fields(broker, raw, uid, version, case):
    c = raw(broker, version)
    pkt = bytearray(w.connect_packet(uid, version, will=(
        {"topic": "it/w", "payload": b"x", "qos": 3} if case == "will_qos_3" else None),
        password=("pw" if case == "password_no_username" else None)))
    flags_at = 2 + 2 + 4 + 1  # fixed header(2) + name length(2) + "MQTT"(4) + level(1)
    if case == "will_qos_without_will":
        pkt[flags_at] |= 0x08  # will QoS 1 but will flag 0 [MQTT-3.1.2-11]
    if case == "bad_utf8_client_id":
        pkt = bytearray(w.connect_packet("", version))
        body = bytes(pkt[2:-2]) + w.string(b"id\xff\xfe")
        pkt = bytearray(bytes([0x10]) + w.vbi(len(body)) + body)
    if case == "password_no_username" and version == 5:
        pytest.skip("5.0 allows a password without a user name")
    c.send(bytes(pkt))
    closed, got = c.wait_closed(5)
    assert closed, f"{case}: connection accepted"
    assert all(p.type == w.CONNACK and p.rc != 0 for p in got), got
    assert_broker_serves(broker, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_puback_for_unknown_packet_id_is_harmless(broker, raw, uid, version):
    c = _connected(broker, raw, uid, version)
    c.puback(999)
    c.ack(w.PUBCOMP, 998)
    c.pingreq()
    # Ignored: the connection goes on, and the PINGRESP is the only answer.
    closed, got = c.wait_closed(0.8)
    assert not closed, f"connection closed: {got}"
    assert [p.type for p in got] == [w.PINGRESP], got
    assert_broker_serves(broker, version)


def test_v5_auth_without_authentication_method_is_protocol_error(broker, raw, uid):
    c = _connected(broker, raw, uid, 5)
    c.send(w.packet(w.AUTH, 0, bytes([0x19]) + w.props(None)))  # re-authenticate, no method
    expect_error_close(c, [PROTOCOL_ERROR])
    assert_broker_serves(broker, 5)


def test_v311_packet_type_15_is_reserved(broker, raw, uid):
    c = _connected(broker, raw, uid, 4)
    c.send(b"\xf0\x00")  # AUTH does not exist in 3.1.1
    expect_error_close(c, [])
    assert_broker_serves(broker, 4)


@pytest.mark.parametrize("prop", [(w.RECEIVE_MAXIMUM, 0), (w.MAXIMUM_PACKET_SIZE, 0)],
                         ids=["receive_maximum_0", "maximum_packet_size_0"])
def test_v5_connect_property_value_zero_is_protocol_error(broker, raw, uid, prop):
    c = raw(broker, 5)
    c.send(w.connect_packet(uid, 5, properties=[prop]))  # "It is a Protocol Error ... 0"
    closed, got = c.wait_closed(5)
    assert closed
    assert all(p.type == w.CONNACK for p in got), got
    if got:
        assert got[0].rc in (PROTOCOL_ERROR, MALFORMED), got
    assert_broker_serves(broker, 5)


@mosquitto_skip("accepts a client PUBLISH carrying a Subscription Identifier")
def test_v5_publish_with_subscription_identifier_is_protocol_error(broker, raw, uid):
    c = _connected(broker, raw, uid, 5)
    c.publish("it/" + uid, b"x", qos=0, properties=[(w.SUBSCRIPTION_ID, 3)])  # [MQTT-3.3.4-6]
    expect_error_close(c, [PROTOCOL_ERROR, MALFORMED])
    assert_broker_serves(broker, 5)
