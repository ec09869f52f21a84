"""Keep-alive: the 1.5x rule, PINGREQ keeps a connection, v5 server keep-alive."""

import time

import pytest

import mqttraw as w
from conftest import TIMER_SLACK, VERSIONS, mosquitto_skip


@pytest.mark.parametrize("version", VERSIONS)
def test_idle_connection_closed_after_one_and_a_half_keep_alive(broker, raw, uid, version):
    c = raw(broker, version)
    c.connect(uid, keepalive=1)
    t0 = time.monotonic()
    closed, got = c.wait_closed(1.5 + TIMER_SLACK)
    elapsed = time.monotonic() - t0
    assert closed, "idle connection still open"
    # not before one and a half times the keep-alive (small margin for timer granularity)
    assert elapsed >= 1.35, f"closed after only {elapsed:.2f}s with keep-alive 1s"
    if version == 5:
        # the server may say why before closing: 0x8D keep alive timeout
        assert all(p.type == w.DISCONNECT and p.rc == 0x8D for p in got), got


@pytest.mark.parametrize("version", VERSIONS)
def test_pingreq_keeps_connection_alive(broker, raw, uid, version):
    c = raw(broker, version)
    c.connect(uid, keepalive=1)
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        c.pingreq()
        resp = c.expect(w.PINGRESP, timeout=2)
        assert resp.raw == b"\xd0\x00"
        time.sleep(0.5)
    c.subscribe("it/" + uid, qos=0)  # still usable
    c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_keep_alive_zero_means_no_timeout(broker, raw, uid, version):
    c = raw(broker, version)
    c.connect(uid, keepalive=0)
    assert c.recv(2.5) is None  # nothing sent, connection not closed
    c.pingreq()
    assert c.expect(w.PINGRESP)


def test_v5_server_keep_alive_when_client_asks_more_than_max(broker_with, raw, uid):
    b = broker_with(max_keep_alive=10)
    c = raw(b, 5)
    ack = c.connect(uid, keepalive=60)
    assert ack.props.get(w.SERVER_KEEP_ALIVE) == 10, ack


@mosquitto_skip("refuses max_keepalive below 10, so the test would take 15 s")
def test_v5_server_keep_alive_is_enforced(broker_with, raw, uid):
    b = broker_with(max_keep_alive=1)
    c = raw(b, 5)
    ack = c.connect(uid, keepalive=60)
    assert ack.props.get(w.SERVER_KEEP_ALIVE) == 1, ack
    closed, _ = c.wait_closed(1.5 + TIMER_SLACK)
    assert closed, "server keep-alive of 1s not enforced"


def test_v5_no_server_keep_alive_needed_within_max(broker_with, raw, uid):
    b = broker_with(max_keep_alive=100)
    c = raw(b, 5)
    ack = c.connect(uid, keepalive=30)
    assert ack.props.get(w.SERVER_KEEP_ALIVE, 30) == 30


def test_v5_keep_alive_zero_gets_server_keep_alive_when_limited(broker_with, raw, uid):
    b = broker_with(max_keep_alive=10)
    c = raw(b, 5)
    ack = c.connect(uid, keepalive=0)  # 0 = "no keep-alive", longer than any maximum
    assert ack.props.get(w.SERVER_KEEP_ALIVE) == 10, ack


@pytest.mark.parametrize("version", VERSIONS)
def test_any_packet_counts_as_keep_alive_traffic(broker, raw, uid, version):
    c = raw(broker, version)
    c.connect(uid, keepalive=1)
    end = time.monotonic() + 3.5
    pid = 1
    while time.monotonic() < end:
        c.publish("it/" + uid, b"tick", qos=1, pid=pid)
        assert c.expect(w.PUBACK).pid == pid
        pid += 1
        time.sleep(0.5)
    c.pingreq()
    assert c.expect(w.PINGRESP)
