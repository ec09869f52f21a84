"""Topic filters: `+` and `#`, and `$`-topics hidden from leading wildcards."""

import pytest

from broker import IS_MOSQUITTO
from conftest import VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_single_level_wildcard(broker, clients, topic, version):
    sub = clients(broker, version)
    sub.subscribe(topic + "/+/temp", qos=1)
    pub = clients(broker, version)
    for t in ("/kitchen/temp", "/hall/temp", "/kitchen/humidity", "/a/b/temp", "/temp",
              "//temp"):
        pub.publish(topic + t, t.encode(), qos=1)
    got = sorted(m.topic for m in sub.drain(0.7))
    # '+' matches exactly one level, including an empty one
    assert got == sorted([topic + "/kitchen/temp", topic + "/hall/temp", topic + "//temp"])


@pytest.mark.parametrize("version", VERSIONS)
def test_multi_level_wildcard_matches_parent_and_all_children(broker, clients, topic, version):
    sub = clients(broker, version)
    sub.subscribe(topic + "/house/#", qos=1)
    pub = clients(broker, version)
    for t in ("/house", "/house/a", "/house/a/b/c", "/houses", "/garden/house"):
        pub.publish(topic + t, b"x", qos=1)
    got = sorted(m.topic for m in sub.drain(0.7))
    assert got == sorted([topic + "/house", topic + "/house/a", topic + "/house/a/b/c"])


@pytest.mark.parametrize("version", VERSIONS)
def test_dollar_topics_not_matched_by_leading_wildcards(broker, clients, uid, version):
    hash_sub = clients(broker, version)
    hash_sub.subscribe("#", qos=1)
    plus_sub = clients(broker, version)
    plus_sub.subscribe(f"+/{uid}/x", qos=1)
    dollar_sub = clients(broker, version)
    dollar_sub.subscribe(f"$it/{uid}/#", qos=1)
    pub = clients(broker, version)
    pub.publish(f"$it/{uid}/x", b"dollar", qos=1)
    pub.publish(f"it/{uid}/x", b"plain", qos=1)
    assert dollar_sub.get().payload == b"dollar"  # an explicit $ filter does match
    got_hash = [(m.topic, m.payload) for m in hash_sub.drain(0.7) if uid in m.topic]
    got_plus = [(m.topic, m.payload) for m in plus_sub.drain(0.3)]
    assert got_hash == [(f"it/{uid}/x", b"plain")]
    assert got_plus == [(f"it/{uid}/x", b"plain")]
    dollar_sub.assert_nothing(0.2)


@pytest.mark.parametrize("version", VERSIONS)
def test_overlapping_filters_deliver_at_least_once_with_max_qos(broker, clients, topic, version):
    if IS_MOSQUITTO and version == 4:
        pytest.skip("mosquitto 2.0 sends 3.1.1 clients one copy at the first match's QoS "
                    "(violates MQTT-3.3.5-1)")
    sub = clients(broker, version)
    sub.subscribe(topic + "/+", qos=0)
    sub.subscribe(topic + "/#", qos=2)
    pub = clients(broker, version)
    pub.publish(topic + "/a", b"x", qos=2)
    got = sub.drain(0.7)
    # one copy or one per subscription; either way a copy at the highest granted QoS
    assert 1 <= len(got) <= 2
    assert max(m.qos for m in got) == 2, [(m.topic, m.qos) for m in got]
