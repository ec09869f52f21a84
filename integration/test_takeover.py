"""Client takeover: a second connection with the same client id replaces the first."""

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO
from conftest import VERSIONS, mosquitto_skip


@pytest.mark.parametrize("version", VERSIONS)
def test_takeover_closes_old_connection(broker, raw, clients, uid, topic, version):
    old = raw(broker, version)
    old.connect(uid)
    old.subscribe(topic, qos=1)
    new = raw(broker, version)
    new.connect(uid)
    closed, got = old.wait_closed(5)
    assert closed, "old connection left open after takeover"
    if version == 5:
        # [MQTT-3.1.4-3] with reason 0x8E (session taken over), if it sends one
        assert [p.rc for p in got if p.type == w.DISCONNECT] in ([0x8E], []), got
    else:
        assert got == []
    # the new connection works
    new.subscribe(topic, qos=1, pid=2)
    clients(broker, version).publish(topic, b"to the new one", qos=1)
    m = new.expect(w.PUBLISH)
    assert m.payload == b"to the new one"


@mosquitto_skip("2.0.11 just closes the old connection, no DISCONNECT 0x8E")
def test_v5_takeover_sends_disconnect_0x8e(broker, raw, uid):
    old = raw(broker, 5)
    old.connect(uid)
    raw(broker, 5).connect(uid)
    closed, got = old.wait_closed(5)
    assert closed
    assert [p.rc for p in got if p.type == w.DISCONNECT] == [0x8E], got


@pytest.mark.parametrize("version", VERSIONS)
def test_takeover_with_paho_old_client_notified(broker, clients, uid, version):
    old = clients(broker, version, client_id=uid)
    new = clients(broker, version, client_id=uid)
    rc = old.disconnects.get(timeout=5)
    if version == 5 and not IS_MOSQUITTO:  # mosquitto 2.0.11 sends no DISCONNECT 0x8E
        assert rc.value == 0x8E
    new.subscribe("it/" + uid, qos=1)


@pytest.mark.parametrize("version", VERSIONS)
def test_takeover_keeps_persistent_session(broker, raw, clients, uid, topic, version):
    persist = {w.SESSION_EXPIRY: 60} if version == 5 else None
    old = raw(broker, version)
    old.connect(uid, clean=False, properties=persist)
    old.subscribe(topic, qos=1)
    new = raw(broker, version)
    ack = new.connect(uid, clean=False, properties=persist)
    assert ack.session_present is True
    clients(broker, version).publish(topic, b"still subscribed", qos=1)
    assert new.expect(w.PUBLISH).payload == b"still subscribed"
