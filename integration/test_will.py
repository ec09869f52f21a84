"""Will messages: when they are sent, when not, and v5 will delay."""

import time

import pytest

import mqttraw as w
from conftest import TIMER_SLACK, VERSIONS


def _will(topic, payload=b"gone", qos=1, retain=False, properties=None):
    return {"topic": topic, "payload": payload, "qos": qos, "retain": retain,
            "properties": properties}


@pytest.fixture
def watcher(broker, clients, topic):
    c = clients(broker, 5)
    c.subscribe(topic + "/will", qos=1)
    return c


@pytest.mark.parametrize("version", VERSIONS)
def test_will_sent_on_keep_alive_timeout(broker, raw, watcher, topic, uid, version):
    c = raw(broker, version)
    c.connect(uid, keepalive=1, will=_will(topic + "/will", b"timed out"))
    t0 = time.monotonic()
    m = watcher.get(timeout=1.5 + TIMER_SLACK)
    assert m.payload == b"timed out" and m.qos == 1
    assert time.monotonic() - t0 >= 0.9  # not before the keep-alive ran out
    closed, _ = c.wait_closed(2)
    assert closed


@pytest.mark.parametrize("version", VERSIONS)
def test_will_sent_on_socket_close_without_disconnect(broker, raw, watcher, topic, uid, version):
    c = raw(broker, version)
    c.connect(uid, will=_will(topic + "/will", b"lost"))
    c.close()
    assert watcher.get(timeout=5).payload == b"lost"


@pytest.mark.parametrize("version", VERSIONS)
def test_will_sent_on_protocol_error(broker, raw, watcher, topic, uid, version):
    c = raw(broker, version)
    c.connect(uid, will=_will(topic + "/will", b"garbage"))
    c.send(b"\x00\x00\xde\xad\xbe\xef")  # packet type 0 is reserved: malformed
    assert watcher.get(timeout=5).payload == b"garbage"
    closed, _ = c.wait_closed(3)
    assert closed


@pytest.mark.parametrize("version", VERSIONS)
def test_will_not_sent_on_normal_disconnect(broker, raw, watcher, topic, uid, version):
    c = raw(broker, version)
    c.connect(uid, will=_will(topic + "/will", b"should not appear"))
    c.disconnect()
    watcher.assert_nothing(1.5)


@pytest.mark.parametrize("version", VERSIONS)
def test_will_retained_and_qos(broker, raw, clients, topic, uid, version):
    c = raw(broker, version)
    c.connect(uid, will=_will(topic + "/will", b"retained will", qos=2, retain=True))
    c.close()
    time.sleep(0.5)
    late = clients(broker, version)
    late.subscribe(topic + "/will", qos=2)
    m = late.get(timeout=5)
    assert m.payload == b"retained will" and m.retain and m.qos == 2


def test_v5_disconnect_with_will_message_0x04_sends_will(broker, raw, watcher, topic, uid):
    c = raw(broker, 5)
    c.connect(uid, will=_will(topic + "/will", b"asked for it"))
    c.disconnect(rc=0x04)
    assert watcher.get(timeout=5).payload == b"asked for it"


def test_v5_will_properties_passed_through(broker, raw, watcher, topic, uid):
    c = raw(broker, 5)
    wp = [(w.CONTENT_TYPE, "text/plain"), (w.USER_PROPERTY, ("k", "v1")),
          (w.USER_PROPERTY, ("k", "v2"))]
    c.connect(uid, will=_will(topic + "/will", b"props", properties=wp))
    c.close()
    m = watcher.get(timeout=5)
    assert m.properties.ContentType == "text/plain"
    assert m.properties.UserProperty == [("k", "v1"), ("k", "v2")]


def test_v5_will_delay_interval_delays_will(broker, raw, watcher, topic, uid):
    c = raw(broker, 5)
    c.connect(uid, properties={w.SESSION_EXPIRY: 30},
              will=_will(topic + "/will", b"delayed", properties=[(w.WILL_DELAY, 2)]))
    c.close()
    t0 = time.monotonic()
    m = watcher.get(timeout=8)
    elapsed = time.monotonic() - t0
    assert m.payload == b"delayed"
    assert elapsed >= 1.8, f"will arrived after {elapsed:.2f}s, delay was 2s"


def test_v5_will_delay_cancelled_by_reconnect(broker, raw, watcher, topic, uid):
    c = raw(broker, 5)
    c.connect(uid, properties={w.SESSION_EXPIRY: 30},
              will=_will(topic + "/will", b"must not appear", properties=[(w.WILL_DELAY, 3)]))
    c.close()
    time.sleep(0.5)
    c2 = raw(broker, 5)
    ack = c2.connect(uid, clean=False, properties={w.SESSION_EXPIRY: 30})
    assert ack.session_present
    watcher.assert_nothing(4.0)
    c2.disconnect()


def test_v5_will_sent_when_session_expires_before_delay(broker, raw, watcher, topic, uid):
    # will delay 30 s but session expiry 1 s: the will goes when the session ends
    c = raw(broker, 5)
    c.connect(uid, properties={w.SESSION_EXPIRY: 1},
              will=_will(topic + "/will", b"session ended", properties=[(w.WILL_DELAY, 30)]))
    c.close()
    assert watcher.get(timeout=6).payload == b"session ended"
