"""Three roost nodes as one broker: publisher and subscriber on different nodes.

The nodes run on 127.0.0.1 with their own MQTT, cluster and admin ports (the layout of
the README's Cluster section). Faults (kill -9, network cuts) are in
test_cluster_faults.py.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import uuid

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO
import urllib.request

from cluster import TOKEN, Cluster
from pahoclient import connect_props, publish_props

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="a roost cluster")


@pytest.fixture(scope="module")
def c3():
    with Cluster(3) as c:
        yield c


def tid():
    return f"cl/{uuid.uuid4().hex[:8]}"


def test_every_node_names_the_same_leader_and_members(c3):
    statuses = [c3[i].status() for i in (1, 2, 3)]
    assert [s["node_id"] for s in statuses] == [1, 2, 3]
    leaders = {s["leader"] for s in statuses}
    assert len(leaders) == 1 and leaders.pop() in (1, 2, 3)
    for s in statuses:
        members = {m["id"]: m for m in s["members"]}
        assert set(members) == {1, 2, 3}
        assert all(m["up"] and m["voter"] for m in members.values())
        assert members[2]["cluster_addr"] == c3[2].cluster_addr


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("pub_qos,sub_qos", [(0, 0), (1, 1), (2, 2), (2, 1), (1, 0)])
def test_publish_reaches_subscribers_on_other_nodes(c3, clients, version, pub_qos, sub_qos):
    t = tid()
    subs = [clients(c3[i], version) for i in (2, 3)]
    for s in subs:
        s.subscribe(t, qos=sub_qos)
    pub = clients(c3[1], version)
    for n in range(5):
        pub.publish(t, f"m{n}".encode(), qos=pub_qos)
    for s in subs:
        got = s.get_n(5)
        assert [m.payload for m in got] == [f"m{n}".encode() for n in range(5)]
        assert {m.qos for m in got} == {min(pub_qos, sub_qos)}
        s.assert_nothing(0.3)


def test_wildcards_across_nodes(c3, clients):
    base = tid()
    sub = clients(c3[3], 4)
    sub.subscribe(f"{base}/+/temp", qos=1)
    sub.subscribe(f"{base}/b/#", qos=1)
    pub = clients(c3[1], 4)
    pub.publish(f"{base}/a/temp", b"1", qos=1)
    pub.publish(f"{base}/a/humidity", b"no", qos=1)
    pub.publish(f"{base}/b/x/y", b"2", qos=1)
    pub.publish(f"{base}/b/temp", b"3", qos=1)  # matches both filters: delivered once
    got = sorted(m.payload for m in sub.get_n(3))
    assert got == [b"1", b"2", b"3"]
    sub.assert_nothing(0.5)


def metric(node, name):
    with urllib.request.urlopen(urllib.request.Request(
            f"http://{node.host}:{node.admin_port}/metrics",
            headers={"Authorization": f"Bearer {TOKEN}"}), timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return int(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_a_message_crosses_to_a_node_once_for_all_its_subscribers(c3, clients):
    t = tid()
    subs = [clients(c3[2], 4) for _ in range(5)]
    for s in subs:
        s.subscribe(t, qos=1)
    before = metric(c3[2], "roost_cluster_received_total")
    pub = clients(c3[1], 4)
    pub.publish(t, b"fan", qos=1)
    for s in subs:
        assert s.get().payload == b"fan"
    assert metric(c3[2], "roost_cluster_received_total") - before == 1


def test_retained_messages_are_seen_from_every_node(c3, clients):
    t = tid()
    pub = clients(c3[1], 5)
    pub.publish(t, b"state", qos=1, retain=True)
    time.sleep(0.2)
    for i in (1, 2, 3):
        s = clients(c3[i], 5)
        s.subscribe(t, qos=1)
        m = s.get()
        assert (m.payload, m.retain) == (b"state", True), i
    # Cleared from another node: gone everywhere.
    clients(c3[3], 5).publish(t, b"", qos=1, retain=True)
    time.sleep(0.2)
    for i in (1, 2, 3):
        s = clients(c3[i], 5)
        s.subscribe(t, qos=1)
        s.assert_nothing(0.3)


def test_shared_subscriptions_spread_over_members_on_all_nodes(c3, clients):
    t = tid()
    members = {i: clients(c3[i], 5) for i in (2, 3)}
    for m in members.values():
        m.subscribe(f"$share/g/{t}", qos=1)
    pub = clients(c3[1], 5)
    for n in range(60):
        pub.publish(t, str(n).encode(), qos=1)
    got = {i: [m.payload for m in c.drain(0.7)] for i, c in members.items()}
    everything = sorted(int(p) for ps in got.values() for p in ps)
    assert everything == list(range(60)), "each message exactly once in the group"
    assert all(len(ps) > 0 for ps in got.values()), {i: len(p) for i, p in got.items()}


def test_v5_properties_cross_nodes(c3, clients):
    t = tid()
    sub = clients(c3[2], 5)
    sub.subscribe(t, qos=1, sub_id=77)
    pub = clients(c3[3], 5)
    props = publish_props(UserProperty=[("k", "v"), ("k", "w")], ContentType="text/x",
                          ResponseTopic="reply/here", CorrelationData=b"\x01\x02",
                          PayloadFormatIndicator=1, MessageExpiryInterval=60)
    pub.publish(t, b"props", qos=1, properties=props)
    m = sub.get()
    p = m.properties
    assert p.UserProperty == [("k", "v"), ("k", "w")]
    assert p.ContentType == "text/x"
    assert p.ResponseTopic == "reply/here"
    assert p.CorrelationData == b"\x01\x02"
    assert p.PayloadFormatIndicator == 1
    assert 55 <= p.MessageExpiryInterval <= 60
    assert p.SubscriptionIdentifier == [77]


def test_no_local_holds_and_other_nodes_still_get_it(c3, clients):
    t = tid()
    me = clients(c3[1], 5)
    me.subscribe(t, qos=1, no_local=True)
    other = clients(c3[2], 5)
    other.subscribe(t, qos=1)
    me.publish(t, b"mine", qos=1)
    assert other.get().payload == b"mine"
    me.assert_nothing(0.5)


def test_will_published_on_one_node_reaches_another(c3, clients):
    t = tid()
    sub = clients(c3[3], 4)
    sub.subscribe(t, qos=1)
    dying = w.RawClient(c3[1].host, c3[1].port, 4)
    dying.connect(f"will-{uuid.uuid4().hex[:6]}", will={"topic": t, "payload": b"gone", "qos": 1})
    dying.sock.close()  # no DISCONNECT: the will stands
    m = sub.get()
    assert m.payload == b"gone"


def test_session_moves_with_its_queued_messages(c3, clients):
    t = tid()
    cid = f"mover-{uuid.uuid4().hex[:6]}"
    a = clients(c3[1], 5, client_id=cid, clean=False,
               properties=connect_props(SessionExpiryInterval=600))
    a.subscribe(t, qos=1)
    a.disconnect()
    pub = clients(c3[3], 5)
    for n in range(5):
        pub.publish(t, f"q{n}".encode(), qos=1)
    b = clients(c3[2], 5, client_id=cid, clean=False,
               properties=connect_props(SessionExpiryInterval=600))
    assert b.session_present
    assert [m.payload for m in b.get_n(5)] == [f"q{n}".encode() for n in range(5)]
    # Its subscription moved too: new messages find it on node 2.
    pub.publish(t, b"after", qos=1)
    assert b.get().payload == b"after"
    code, sessions = c3[1].api("GET", "/api/v1/sessions")
    assert cid not in [s["client_id"] for s in sessions], "node 1 gave the session up"
    code, sessions = c3[2].api("GET", "/api/v1/sessions")
    assert cid in [s["client_id"] for s in sessions]


def test_live_takeover_across_nodes(c3, clients):
    t = tid()
    cid = f"taken-{uuid.uuid4().hex[:6]}"
    old = w.RawClient(c3[1].host, c3[1].port, 5)
    old.connect(cid, clean=False, properties=[(w.SESSION_EXPIRY, 300)])
    old.subscribe([(t, 1)])
    new = w.RawClient(c3[2].host, c3[2].port, 5)
    ack = new.connect(cid, clean=False, properties=[(w.SESSION_EXPIRY, 300)])
    assert ack.session_present, "session present: it moved from node 1"
    closed, got = old.wait_closed(5)
    assert closed, "the old connection on node 1 was left open"
    assert [p.rc for p in got if p.type == w.DISCONNECT] == [0x8E], got
    clients(c3[3], 5).publish(t, b"to the new one", qos=1)
    m = new.expect(w.PUBLISH)
    assert m.payload == b"to the new one"
    new.puback(m.pid)
    new.disconnect()


def _hello(cluster, node):
    body = json.dumps({"cluster": cluster, "node": node, "version": 1}).encode()
    return struct.pack(">IB", len(body) + 1, 0) + body


@pytest.mark.parametrize("what,send,logged", [
    ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "cluster peer refused"),
    ("wrong cluster", _hello("other", 9), "of cluster \"other\""),
    ("taken node id", _hello("roost", 2), "node id 2 is already linked"),
    ("this node's id", _hello("roost", 1), "claims this node's id 1"),
])
def test_bad_peers_are_refused_with_a_log_line(c3, clients, what, send, logged):
    node = c3[1]
    s = socket.create_connection(("127.0.0.1", node.cluster_port), timeout=5)
    s.sendall(send)
    s.settimeout(5)
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
    s.close()
    deadline = time.monotonic() + 5
    while logged not in node.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{what}: no log line {logged!r}"
        time.sleep(0.05)
    assert node.alive()
    # The cluster is unharmed.
    t = tid()
    sub = clients(c3[2], 4)
    sub.subscribe(t, qos=1)
    clients(node, 4).publish(t, b"still fine", qos=1)
    assert sub.get().payload == b"still fine"
    assert all(m["up"] for m in node.status()["members"])


def test_members_are_added_and_removed_through_the_admin_api(c3, clients):
    new = c3.add_node(4)
    try:
        code, body = c3[1].api("POST", "/api/v1/cluster/members",
                               {"id": 4, "cluster_addr": new.cluster_addr}, timeout=15)
        assert code == 200, body
        c3.wait_stable(among=[1, 2, 3, 4])
        st = new.status()
        assert {m["id"] for m in st["members"]} == {1, 2, 3, 4}
        assert st["leader"] in (1, 2, 3, 4)
        t = tid()
        sub = clients(new, 4)
        sub.subscribe(t, qos=1)
        clients(c3[2], 4).publish(t, b"to the new node", qos=1)
        assert sub.get().payload == b"to the new node"
        sub.disconnect()
        code, body = c3[2].api("DELETE", "/api/v1/cluster/members/4", timeout=15)
        assert code == 200, body
        deadline = time.monotonic() + 10
        while 4 in {m["id"] for m in c3[1].status()["members"]}:
            assert time.monotonic() < deadline, c3[1].status()
            time.sleep(0.05)
        assert c3.leader(among=[1, 2, 3]) in (1, 2, 3)
        code, body = c3[1].api("POST", "/api/v1/cluster/members", {"id": 0})
        assert code == 400, body
        code, body = c3[1].api("DELETE", "/api/v1/cluster/members/x")
        assert code == 400, body
    finally:
        new.cleanup()
        del c3.nodes[4]
