"""Replicated `$queue/` partitions (cluster II): three roost nodes on 127.0.0.1.

A queue on a cluster is kept on `replication_factor` nodes (default 3): a produce on any
node is acknowledged once a majority of the partition's replicas has it, consumers on
every node share the work, and what was acknowledged survives the kill -9 of any one
node. Every produce and every delivery is logged and checked by `history.check`.
"""

from __future__ import annotations

import time
import uuid

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO
from cluster import Cluster
import history

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="a roost cluster")


@pytest.fixture
def c3():
    with Cluster(3) as c:
        yield c


def produce(node, queue, n, log, start=0, version=5, key=None):
    """Produces n messages (QoS 1, one at a time) and logs each acknowledged one."""
    pub = w.RawClient(node.host, node.port, version)
    pub.connect(f"prod-{uuid.uuid4().hex[:8]}")
    refused = 0
    for i in range(start, start + n):
        body = f"m{i}".encode()
        props = [(w.USER_PROPERTY, ("partition-key", key or f"k{i % 16}"))] if version == 5 else None
        pub.publish(f"$queue/{queue}/dev{i % 16}", body, qos=1, pid=(i % 60000) + 1,
                    properties=props)
        ack = pub.expect(w.PUBACK)
        if ack.rc in (None, 0):
            log.produced(body, f"dev{i % 16}")
        else:
            refused += 1
    pub.disconnect()
    return refused


def consumer(node, queue, group="g"):
    c = w.RawClient(node.host, node.port, 5)
    c.connect(f"cons-{uuid.uuid4().hex[:8]}")
    ack = c.subscribe([(f"$share/{group}/$queue/{queue}", 1)])
    assert ack.rcs == [1], ack
    return c


def drain(consumers, log, group="g", quiet=1.0, timeout=20.0):
    """Receives and acknowledges on every consumer until every acknowledged produce has
    come and nothing more arrives for `quiet` seconds (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    seen = {d[1] for d in log.deliveries if d[0] == group}
    while time.monotonic() < deadline:
        if time.monotonic() - last > quiet and set(log.acked) <= seen:
            break
        for c in consumers:
            p = c.recv(0.02)
            if p is None:
                continue
            if p.type == w.PUBLISH:
                props = dict(p.user_props())
                log.delivered(group, p.payload, props.get("partition"), props.get("offset"),
                              int(props.get("delivery-count", 1)))
                seen.add(bytes(p.payload))
                c.puback(p.pid)
                last = time.monotonic()


def test_produce_on_any_node_is_replicated_and_consumed_from_every_node(c3):
    q = f"rq{uuid.uuid4().hex[:6]}"
    log = history.History()
    assert produce(c3[1], q, 120, log) == 0
    assert produce(c3[2], q, 120, log, start=120) == 0
    code, info = c3[3].api("GET", f"/api/v1/queues/{q}")
    assert code == 200, info
    placement = info["placement"]
    assert len(placement) == 8
    for p in placement:
        assert sorted(p["replicas"]) == [1, 2, 3], p
    leaders = set()
    for i in (1, 2, 3):
        _, info = c3[i].api("GET", f"/api/v1/queues/{q}")
        for p in info["placement"]:
            assert p["leader"] in (1, 2, 3), p
            leaders.add((p["partition"], p["leader"]))
    # Every node names the same leader per partition.
    assert len(leaders) == 8, leaders
    cons = [consumer(c3[i], q) for i in (1, 2, 3)]
    drain(cons, log)
    history.check(log, groups=["g"])


def test_one_consumer_gets_every_partition_wherever_its_leader_is(c3):
    q = f"ro{uuid.uuid4().hex[:6]}"
    log = history.History()
    assert produce(c3[2], q, 240, log) == 0
    _, info = c3[3].api("GET", f"/api/v1/queues/{q}")
    assert {p["leader"] for p in info["placement"]} != {3}, "every partition led by node 3"
    cons = [consumer(c3[3], q)]
    drain(cons, log)
    dups = history.check(log, groups=["g"])
    assert dups == {"g": 0}, dups
    # Settled everywhere: a new consumer of the group gets nothing more.
    late = consumer(c3[1], q)
    assert late.recv(1.5) is None


def test_kill_of_a_node_loses_no_acknowledged_message(c3):
    q = f"rk{uuid.uuid4().hex[:6]}"
    log = history.History()
    assert produce(c3[1], q, 100, log) == 0
    _, info = c3[1].api("GET", f"/api/v1/queues/{q}")
    led_by = {}
    for p in info["placement"]:
        led_by.setdefault(p["leader"], []).append(p["partition"])
    # Kill the node that leads the most partitions (never node 1: the producer's).
    victim = max((n for n in led_by if n != 1), key=lambda n: len(led_by[n]), default=2)
    c3[victim].kill()
    t0 = time.monotonic()
    refused = produce(c3[1], q, 200, log, start=100)
    took = time.monotonic() - t0
    assert refused == 0, f"{refused} produces refused with one node of three down"
    # One consumer, on the producer's node: it gets every partition, wherever the
    # leaders are now.
    cons = [consumer(c3[1], q)]
    drain(cons, log)
    history.check(log, groups=["g"])
    print(f"200 produces with node {victim} killed took {took:.2f}s")


def ends(node, q):
    _, info = node.api("GET", f"/api/v1/queues/{q}")
    return [p["local_end"] for p in info["placement"]]


def test_cascading_failures_refuse_produce_at_two_losses_and_a_restart_catches_up(c3):
    q = f"rc{uuid.uuid4().hex[:6]}"
    log = history.History()
    assert produce(c3[1], q, 60, log) == 0
    # One loss of three: produce goes on.
    c3[3].kill()
    assert produce(c3[1], q, 60, log, start=60) == 0
    # Two losses: no majority for any partition; a v5 producer (connected before:
    # without a majority no CONNECT is taken) gets 0x97 and nothing is acknowledged.
    pub = w.RawClient(c3[1].host, c3[1].port, 5, timeout=10)
    pub.connect(f"prod-{uuid.uuid4().hex[:8]}")
    c3[2].kill()
    pub.publish(f"$queue/{q}/dev0", b"refused", qos=1, pid=1)
    ack = pub.expect(w.PUBACK)
    assert ack.rc == 0x97, ack
    pub.disconnect()
    # A node comes back: produce goes on, and the restarted node's copy catches up.
    c3[3].start()
    deadline = time.monotonic() + 20
    while produce(c3[1], q, 1, log, start=1000) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert produce(c3[1], q, 40, log, start=120) == 0
    deadline = time.monotonic() + 10
    while ends(c3[3], q) != ends(c3[1], q) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ends(c3[3], q) == ends(c3[1], q)
    # The refused produce may be stored after all (its entry stayed in the leader's
    # log and was committed once a majority was back): refused is "not acknowledged",
    # not "not stored".
    assert len(log.acked) <= sum(ends(c3[1], q)) <= len(log.acked) + 1
    # Every acknowledged message, once, from a consumer on the restarted node.
    cons = [consumer(c3[3], q)]
    drain(cons, log)
    dups = history.check(log, groups=["g"], produced_unacked=[b"refused"])
    print(f"duplicates: {dups}")


def test_delivery_counts_and_settings_survive_a_failover(c3):
    """A message nacked once and delivered twice is delivered a third time by the
    partition's next leader (delivery-count 3, not 1), so `max_deliveries` = 3 holds
    across the failover: its third nack dead-letters it. Every replica's copy of the
    queue has the settings it was created with."""
    q = f"rd{uuid.uuid4().hex[:6]}"
    code, body = c3[1].api("PUT", f"/api/v1/queues/{q}",
                           {"partitions": 1, "max_deliveries": 3, "ack_timeout_ms": 60000,
                            "backoff_initial_ms": 50, "backoff_max_ms": 50})
    assert code in (200, 201), body
    deadline = time.monotonic() + 10
    leader = None
    while time.monotonic() < deadline and not leader:
        _, info = c3[1].api("GET", f"/api/v1/queues/{q}")
        leader = (info.get("placement") or [{}])[0].get("leader")
        time.sleep(0.1)
    assert leader, info
    for i in (1, 2, 3):
        deadline = time.monotonic() + 10
        while True:
            code, info = c3[i].api("GET", f"/api/v1/queues/{q}")
            if code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert code == 200, (i, info)
        assert info["config"]["max_deliveries"] == 3, (i, info["config"])
    log = history.History()
    home = next(i for i in (1, 2, 3) if i != leader)
    assert produce(c3[home], q, 1, log) == 0
    con = consumer(c3[home], q)

    def delivery():
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            p = con.recv(0.2)
            if p is not None and p.type == w.PUBLISH:
                return p, int(dict(p.user_props())["delivery-count"])
        raise AssertionError("no delivery")

    p, count = delivery()
    assert count == 1
    con.ack(w.PUBACK, p.pid, rc=0x80)  # nack: delivered again after 50 ms
    p, count = delivery()
    assert count == 2
    time.sleep(1.0)  # the count is replicated asynchronously, like a settle
    c3[leader].kill()
    p, count = delivery()
    assert count == 3, f"the next leader delivered it as delivery {count}"
    con.ack(w.PUBACK, p.pid, rc=0x80)  # the third nack: dead-lettered
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        p = con.recv(0.2)
        assert p is None or p.type != w.PUBLISH, "delivered past max_deliveries"


def test_a_nacks_backoff_and_a_dead_letter_survive_a_failover(c3):
    """A nack's backoff is replicated with the partition: the next leader does not
    deliver the message again before the backoff the old leader gave it is over. A
    message the old leader dead-lettered is settled on every replica: the next leader
    does not dead-letter it a second time (its dead-letter queue stays empty; the
    copy lives on the node that moved it)."""
    q, leader = placed_queue(c3[1], {"max_deliveries": 5, "ack_timeout_ms": 60000,
                                     "backoff_initial_ms": 4000, "backoff_max_ms": 4000})
    log = history.History()
    home = next(i for i in (1, 2, 3) if i != leader)
    assert produce(c3[home], q, 2, log) == 0
    con = consumer(c3[home], q)
    got = {}
    deadline = time.monotonic() + 15
    while len(got) < 2 and time.monotonic() < deadline:
        p = con.recv(0.2)
        if p is not None and p.type == w.PUBLISH:
            got[p.payload] = p
    assert sorted(got) == [b"m0", b"m1"], got
    nacked = time.monotonic()
    con.ack(w.PUBACK, got[b"m0"].pid, rc=0x80)  # again in 4 s
    con.publish(f"$queue/{q}/$reject", b"", qos=0,
                properties=[(w.USER_PROPERTY,
                             ("message-id", dict(got[b"m1"].user_props())["message-id"]))])
    time.sleep(1.0)  # replicated asynchronously, like a settle
    c3[leader].kill()
    p = None
    while time.monotonic() < nacked + 10:
        p = con.recv(0.2)
        if p is not None and p.type == w.PUBLISH:
            break
    assert p is not None and p.type == w.PUBLISH, "m0 never came again"
    came = time.monotonic() - nacked
    assert p.payload == b"m0", f"{p.payload!r} came again after it was dead-lettered"
    assert dict(p.user_props())["delivery-count"] == "2"
    assert came >= 3.7, f"the next leader delivered m0 again {came:.1f} s after the nack"
    con.ack(w.PUBACK, p.pid)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        p = con.recv(0.2)
        assert p is None or p.type != w.PUBLISH, f"{p.payload!r} came again"
    # Nor was it dead-lettered a second time by the next leader.
    for i in (1, 2, 3):
        if i != leader:
            _, info = c3[i].api("GET", f"/api/v1/queues/{q}")
            assert info.get("dead_letters") == 0, (i, info.get("dead_letters"))


def placed_queue(node, settings):
    q = f"ra{uuid.uuid4().hex[:6]}"
    code, body = node.api("PUT", f"/api/v1/queues/{q}", {"partitions": 1, **settings})
    assert code in (200, 201), body
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, info = node.api("GET", f"/api/v1/queues/{q}")
        leader = (info.get("placement") or [{}])[0].get("leader")
        if leader:
            return q, leader
        time.sleep(0.1)
    raise AssertionError(f"queue {q} has no leader: {info}")


def test_ack_mode_leader_acknowledges_from_the_leaders_disk_and_quorum_waits_for_a_majority(c3):
    """With both followers of a partition gone, a produce to its leader is acknowledged
    under `ack_mode = "leader"` (the leader's own disk has it) and refused under
    `"quorum"` (0x97: no majority). The leader-mode messages are delivered once a
    follower is back and they are committed."""
    q, leader = placed_queue(c3[1], {"ack_mode": "leader"})
    _, info = c3[leader].api("GET", f"/api/v1/queues/{q}")
    assert info["config"]["ack_mode"] == "leader", info["config"]
    # The quorum queue with the same leader, for the comparison.
    for _ in range(20):
        qq, qleader = placed_queue(c3[leader], {"ack_mode": "quorum"})
        if qleader == leader:
            break
    else:
        pytest.skip("no quorum queue got the same leader")
    log = history.History()
    assert produce(c3[leader], q, 5, log) == 0
    pub = w.RawClient(c3[leader].host, c3[leader].port, 5, timeout=10)
    pub.connect(f"prod-{uuid.uuid4().hex[:8]}")
    followers = [i for i in (1, 2, 3) if i != leader]
    for i in followers:
        c3[i].kill()
    t0 = time.monotonic()
    pub.publish(f"$queue/{q}/dev0", b"early", qos=1, pid=1)
    ack = pub.expect(w.PUBACK)
    took = time.monotonic() - t0
    assert (ack.rc or 0) == 0, f"leader mode refused with {ack.rc:#x}"
    assert took < 1.5, f"leader mode waited {took:.2f}s"
    log.produced(b"early", "dev0")
    pub.publish(f"$queue/{qq}/dev0", b"quorum", qos=1, pid=2)
    ack = pub.expect(w.PUBACK)
    assert ack.rc == 0x97, f"quorum mode without a majority answered {ack.rc}"
    pub.disconnect()
    # A follower returns: the entry commits and is delivered.
    c3[followers[0]].start()
    cons = [consumer(c3[leader], q)]
    drain(cons, log, timeout=30)
    history.check(log, groups=["g"])
