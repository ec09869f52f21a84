"""Backpressure: a slow QoS 1 subscriber slows its publishers instead of losing messages.

roost holds a bounded number of messages per subscriber (its in-flight window, its session
queue and a delivery channel). When they are full, a QoS 1/2 publisher's acknowledgement
waits for room, up to `max_delivery_wait_ms`; only a subscriber that stays stuck that long
starts losing messages (and then at once, so it cannot hold publishers back forever).
"""

from __future__ import annotations

import time

import pytest

import mqttraw
from broker import IS_MOSQUITTO
from conftest import VERSIONS

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's backpressure (mosquitto drops past max_queued_messages)")

N = 80


def publish_burst(pub, topic, n):
    for i in range(1, n + 1):
        pub.publish(topic, f"m{i}".encode(), qos=1, pid=i)


def count_pubacks(pub, wait):
    return sum(p.type == mqttraw.PUBACK for p in pub.recv_all(timeout=wait))


@pytest.mark.parametrize("version", VERSIONS)
def test_slow_subscriber_slows_publisher_and_loses_nothing(broker_with, raw, uid, topic, version):
    b = broker_with(max_queued_messages=5, max_inflight=2)
    sub = raw(b, version)
    sub.connect(f"slow-{uid}")
    sub.subscribe(topic, qos=1)
    pub = raw(b, version)
    pub.connect(f"fast-{uid}")
    publish_burst(pub, topic, N)
    # The subscriber acknowledges nothing yet: its buffers fill up and the publisher's
    # acknowledgements stop, instead of messages being thrown away.
    acked = count_pubacks(pub, 1.0)
    assert acked < N, "the publisher was held back while the subscriber was full"

    got, deadline = [], time.monotonic() + 20
    while len(got) < N and time.monotonic() < deadline:
        p = sub.recv(1.0)
        if p is not None and p.type == mqttraw.PUBLISH:
            got.append(p.payload)
            sub.puback(p.pid)
    assert got == [f"m{i}".encode() for i in range(1, N + 1)], "all messages, in order"
    acked += count_pubacks(pub, 1.0)
    assert acked == N, "every publish was acknowledged once the subscriber caught up"


@pytest.mark.parametrize("version", VERSIONS)
def test_stuck_subscriber_holds_publisher_back_only_for_the_wait(broker_with, raw, uid, topic, version):
    b = broker_with(max_queued_messages=5, max_inflight=2, max_delivery_wait_ms=300)
    sub = raw(b, version)
    sub.connect(f"stuck-{uid}")
    sub.subscribe(topic, qos=1)
    pub = raw(b, version)
    pub.connect(f"pub-{uid}")
    start = time.monotonic()
    publish_burst(pub, topic, N)
    acked = 0
    while acked < N and time.monotonic() - start < 5:
        acked += count_pubacks(pub, 0.5)
    assert acked == N, "a stuck subscriber costs the publisher one bounded wait, not a stall"
    # Another subscriber on the same topic was not affected by the stuck one.
    other = raw(b, version)
    other.connect(f"other-{uid}")
    other.subscribe(topic, qos=1)
    pub.publish(topic, b"later", qos=1, pid=1)
    assert pub.expect(mqttraw.PUBACK).pid == 1
    p = other.expect(mqttraw.PUBLISH)
    assert p.payload == b"later"
