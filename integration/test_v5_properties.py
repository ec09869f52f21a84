"""MQTT 5 properties a user sees end to end: expiry, subscription ids, no-local,
request/response, user properties, payload format, content type, reason codes."""

import time

import pytest

import mqttraw as w
from pahoclient import publish_props


def test_user_properties_passed_through_in_order_with_repeats(broker, clients, topic):
    sub = clients(broker, 5)
    sub.subscribe(topic, qos=1)
    pub = clients(broker, 5)
    ups = [("region", "eu"), ("trace", "1"), ("region", "us"), ("empty", ""), ("ünï", "cödé"),
           ("trace", "2")]
    pub.publish(topic, b"x", qos=1, properties=publish_props(UserProperty=ups))
    m = sub.get()
    assert m.properties.UserProperty == ups


def test_user_properties_raw_order_preserved_for_qos0_and_retained(broker, raw, clients, uid):
    t = "it/" + uid
    ups = [(w.USER_PROPERTY, ("b", "2")), (w.USER_PROPERTY, ("a", "1")),
           (w.USER_PROPERTY, ("b", "3"))]
    p = raw(broker, 5)
    p.connect(uid + "p")
    p.publish(t, b"r", qos=0, retain=True, properties=ups)
    p.publish(t + "/sync", b"", qos=1, pid=1)
    p.expect(w.PUBACK)
    s = raw(broker, 5)
    s.connect(uid + "s")
    s.send(w.subscribe_packet(1, [(t, 1)], 5))
    got = [x for x in s.recv_all(0.6) if x.type == w.PUBLISH]
    assert len(got) == 1
    assert got[0].user_props() == [("b", "2"), ("a", "1"), ("b", "3")]


def test_request_response_properties_passed_through(broker, clients, topic):
    responder = clients(broker, 5)
    responder.subscribe(topic + "/req", qos=1)
    requester = clients(broker, 5)
    requester.subscribe(topic + "/resp", qos=1)
    requester.publish(topic + "/req", b"ping", qos=1, properties=publish_props(
        ResponseTopic=topic + "/resp", CorrelationData=b"\x00\x01corr\xff"))
    req = responder.get()
    assert req.properties.ResponseTopic == topic + "/resp"
    assert req.properties.CorrelationData == b"\x00\x01corr\xff"
    responder.publish(req.properties.ResponseTopic, b"pong", qos=1,
                      properties=publish_props(CorrelationData=req.properties.CorrelationData))
    resp = requester.get()
    assert resp.payload == b"pong" and resp.properties.CorrelationData == b"\x00\x01corr\xff"


def test_payload_format_and_content_type_passed_through(broker, clients, topic):
    sub = clients(broker, 5)
    sub.subscribe(topic, qos=2)
    pub = clients(broker, 5)
    pub.publish(topic, '{"t": 21}'.encode(), qos=2, properties=publish_props(
        PayloadFormatIndicator=1, ContentType="application/json; charset=utf-8"))
    m = sub.get()
    assert m.properties.PayloadFormatIndicator == 1
    assert m.properties.ContentType == "application/json; charset=utf-8"


def test_v311_subscriber_gets_v5_message_without_properties(broker, clients, topic):
    sub = clients(broker, 4)
    sub.subscribe(topic, qos=1)
    clients(broker, 5).publish(topic, b"cross-version", qos=1,
                               properties=publish_props(UserProperty=[("a", "b")]))
    assert sub.get().payload == b"cross-version"


def test_subscription_identifier_on_delivered_messages(broker, clients, topic):
    sub = clients(broker, 5)
    sub.subscribe(topic + "/+", qos=1, sub_id=42)
    sub.subscribe(topic + "/plain", qos=1)  # no identifier
    pub = clients(broker, 5)
    pub.publish(topic + "/a", b"with id", qos=1)
    m = sub.get()
    assert m.properties.SubscriptionIdentifier == [42]


def test_subscription_identifier_absent_when_not_given(broker, raw, clients, uid):
    t = "it/" + uid
    s = raw(broker, 5)
    s.connect(uid)
    s.subscribe(t, qos=0)
    clients(broker, 5).publish(t, b"x", qos=1)
    m = s.expect(w.PUBLISH)
    assert w.SUBSCRIPTION_ID not in m.props


def test_overlapping_subscription_identifiers(broker, raw, clients, uid):
    t = "it/" + uid
    s = raw(broker, 5)
    s.connect(uid)
    s.subscribe([(t + "/+", 1)], pid=1, properties={w.SUBSCRIPTION_ID: 7})
    s.subscribe([(t + "/#", 1)], pid=2, properties={w.SUBSCRIPTION_ID: 900000})
    clients(broker, 5).publish(t + "/a", b"x", qos=1)
    got = [p for p in s.recv_all(0.6) if p.type == w.PUBLISH]
    # one copy carrying both identifiers, or one copy per subscription [MQTT-3.3.4-3..5]
    ids = sorted(i for p in got for i in p.props.get(w.SUBSCRIPTION_ID, []))
    assert ids == [7, 900000], got
    assert 1 <= len(got) <= 2


@pytest.mark.parametrize("no_local", [True, False])
def test_no_local(broker, clients, topic, no_local):
    me = clients(broker, 5)
    me.subscribe(topic, qos=1, no_local=no_local)
    me.publish(topic, b"mine", qos=1)
    clients(broker, 5).publish(topic, b"theirs", qos=1)
    got = sorted(m.payload for m in me.drain(0.7))
    assert got == ([b"theirs"] if no_local else [b"mine", b"theirs"])


def test_message_expiry_decremented_for_retained(broker, raw, clients, uid):
    t = "it/" + uid
    clients(broker, 5).publish(t, b"fresh-ish", qos=1, retain=True,
                               properties=publish_props(MessageExpiryInterval=10))
    time.sleep(2.2)
    s = raw(broker, 5)
    s.connect(uid)
    s.send(w.subscribe_packet(1, [(t, 1)], 5))
    m = [p for p in s.recv_all(0.5) if p.type == w.PUBLISH][0]
    left = m.props.get(w.MESSAGE_EXPIRY)
    assert left is not None and 6 <= left <= 8, f"expiry {left}, expected about 10-2"


def test_expired_retained_message_not_delivered(broker, clients, topic):
    clients(broker, 5).publish(topic, b"stale", qos=1, retain=True,
                               properties=publish_props(MessageExpiryInterval=1))
    time.sleep(2.2)
    sub = clients(broker, 5)
    sub.subscribe(topic, qos=1)
    sub.assert_nothing(0.6)


def test_message_expiry_for_queued_messages(broker, raw, clients, uid):
    t = "it/" + uid
    s = raw(broker, 5)
    s.connect(uid, clean=True, properties={w.SESSION_EXPIRY: 60})
    s.subscribe(t, qos=1)
    s.disconnect()
    pub = clients(broker, 5)
    pub.publish(t, b"short", qos=1, properties=publish_props(MessageExpiryInterval=1))
    pub.publish(t, b"long", qos=1, properties=publish_props(MessageExpiryInterval=30))
    pub.publish(t, b"forever", qos=1)
    time.sleep(2.3)
    s = raw(broker, 5)
    assert s.connect(uid, clean=False, properties={w.SESSION_EXPIRY: 60}).session_present
    got = {}
    for _ in range(3):
        p = s.recv(0.8)
        if p is None:
            break
        got[p.payload] = p
        s.puback(p.pid)
    assert set(got) == {b"long", b"forever"}, got  # the expired one is never delivered
    assert 26 <= got[b"long"].props.get(w.MESSAGE_EXPIRY, 0) <= 28
    assert w.MESSAGE_EXPIRY not in got[b"forever"].props


def test_suback_reason_codes_granted_qos(broker, raw, uid):
    c = raw(broker, 5)
    c.connect(uid)
    t = "it/" + uid
    ack = c.subscribe([(t + "/0", 0), (t + "/1", 1), (t + "/2", 2)], pid=3)
    assert ack.rcs == [0, 1, 2]


def test_puback_reason_code_success_or_no_matching_subscribers(broker, raw, clients, uid):
    c = raw(broker, 5)
    c.connect(uid)
    c.publish("it/" + uid + "/nobody", b"x", qos=1, pid=1)
    assert c.expect(w.PUBACK).rc in (0x00, 0x10)
    clients(broker, 5).subscribe("it/" + uid + "/someone", qos=1)
    c.publish("it/" + uid + "/someone", b"x", qos=2, pid=2)
    assert c.expect(w.PUBREC).rc == 0x00


def test_pubrel_for_unknown_packet_id(broker, raw, uid):
    c = raw(broker, 5)
    c.connect(uid)
    c.ack(w.PUBREL, 4242)
    comp = c.expect(w.PUBCOMP)
    # 0x92 (packet identifier not found) is the precise answer; 0x00 is tolerated
    assert comp.pid == 4242 and comp.rc in (0x00, 0x92)


def test_request_problem_information_0_suppresses_reason_strings(broker, raw, uid):
    c = raw(broker, 5)
    c.connect(uid, properties={w.REQUEST_PROBLEM_INFO: 0})
    ack = c.unsubscribe(["it/" + uid + "/never"], pid=2)
    assert ack.rcs == [0x11]
    # [MQTT-3.1.2-29]: no Reason String / User Property on anything but PUBLISH, CONNACK,
    # DISCONNECT when the client asked for none
    assert w.REASON_STRING not in ack.props and w.USER_PROPERTY not in ack.props
    c.publish("it/" + uid + "/nobody", b"x", qos=1, pid=3)
    pa = c.expect(w.PUBACK)
    assert w.REASON_STRING not in pa.props and w.USER_PROPERTY not in pa.props


def test_v5_refused_puback_carries_a_reason_string(broker, raw, uid):
    """A PUBACK that refuses a message says why in words (and only when it refuses)."""
    c = raw(broker, 5)
    c.connect(uid)
    c.publish("it/" + uid + "/nobody", b"x", qos=1, pid=3)
    ok = c.expect(w.PUBACK)
    assert ok.pid == 3 and ok.rc in (None, 0x00, 0x10), ok
    assert w.REASON_STRING not in ok.props, ok
    # Payload Format Indicator 1 promises UTF-8; 0xFF is not: 0x99 Payload format invalid.
    c.publish("it/" + uid + "/nobody", b"\xff\xfe", qos=1, pid=4,
              properties={w.PAYLOAD_FORMAT: 1})
    refused = c.expect(w.PUBACK)
    assert refused.pid == 4 and refused.rc == 0x99, refused
    why = refused.props.get(w.REASON_STRING)
    assert isinstance(why, str) and "UTF-8" in why, refused


def test_subscription_identifier_on_retained_delivery(broker, raw, clients, uid):
    t = "it/" + uid
    clients(broker, 5).publish(t, b"r", qos=1, retain=True)
    c = raw(broker, 5)
    c.connect(uid)
    c.send(w.subscribe_packet(1, [(t, 1)], 5, properties={w.SUBSCRIPTION_ID: 5}))
    pubs = [p for p in c.recv_all(0.6) if p.type == w.PUBLISH]
    assert len(pubs) == 1 and pubs[0].props.get(w.SUBSCRIPTION_ID) == [5], pubs


def test_resubscribe_replaces_subscription_identifier(broker, raw, clients, uid):
    t = "it/" + uid
    c = raw(broker, 5)
    c.connect(uid)
    c.subscribe([(t, 1)], pid=1, properties={w.SUBSCRIPTION_ID: 1})
    c.subscribe([(t, 1)], pid=2, properties={w.SUBSCRIPTION_ID: 2})
    clients(broker, 5).publish(t, b"x", qos=1)
    pubs = [p for p in c.recv_all(0.6) if p.type == w.PUBLISH]
    assert len(pubs) == 1 and pubs[0].props.get(w.SUBSCRIPTION_ID) == [2], pubs


def _resolve_aliases(pubs, alias_max):
    """Apply the broker's outbound topic aliases the way a client must; returns topics."""
    table, topics = {}, []
    for p in pubs:
        alias = p.props.get(w.TOPIC_ALIAS)
        if alias is not None:
            assert 1 <= alias <= alias_max, f"alias {alias} above our maximum {alias_max}"
            if p.topic:
                table[alias] = p.topic
            else:
                assert alias in table, f"alias {alias} used before it was set"
            topics.append(table[alias])
        else:
            assert p.topic, "empty topic without an alias"
            topics.append(p.topic)
    return topics


@pytest.mark.parametrize("alias_max", [0, 2])
def test_outbound_topic_aliases_respect_client_maximum(broker, raw, clients, uid, alias_max):
    t = "it/" + uid
    c = raw(broker, 5)
    props = {w.TOPIC_ALIAS_MAXIMUM: alias_max} if alias_max else None
    c.connect(uid, properties=props)
    c.subscribe(t + "/#", qos=0)
    pub = clients(broker, 5)
    sent = [f"{t}/{n}" for n in ("a", "b", "a", "c", "a", "b", "d", "a")]
    for topic in sent:
        pub.publish(topic, b"x", qos=1)
    got = [p for p in c.recv_all(0.6) if p.type == w.PUBLISH]
    if alias_max == 0:
        assert all(w.TOPIC_ALIAS not in p.props for p in got)  # [MQTT-3.3.2-11]
    assert _resolve_aliases(got, alias_max) == sent
