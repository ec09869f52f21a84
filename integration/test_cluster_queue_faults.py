"""Replicated `$queue/` partitions under network cuts made for real (each node in its
own network namespace; routes refuse the other side). Root only: skipped otherwise.

Which side of a cut takes produces is decided per partition: the side with a majority
of that partition's replicas. These tests give the queue as many replicas as nodes, so
that side is the side with most nodes (the scenarios of the issue: five nodes cut 2|3,
four nodes cut 2|2). Every produce and delivery goes to `history.check`.
"""

from __future__ import annotations

import time
import uuid

import pytest

import history
import mqttraw as w
from broker import IS_MOSQUITTO
from cluster import can_use_netns
from test_cluster_queues import consumer, drain, ends, produce

pytestmark = [
    pytest.mark.skipif(IS_MOSQUITTO, reason="a roost cluster"),
    pytest.mark.skipif(not can_use_netns(), reason="needs root and `ip` for network namespaces"),
]


def replicated_queue(node, replicas):
    q = f"nq{uuid.uuid4().hex[:6]}"
    code, body = node.api("PUT", f"/api/v1/queues/{q}",
                          {"partitions": 4, "replication_factor": replicas})
    assert code in (200, 201), body
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, info = node.api("GET", f"/api/v1/queues/{q}")
        placement = info.get("placement") or []
        if placement and all(p["leader"] for p in placement):
            return q
        time.sleep(0.1)
    raise AssertionError(f"queue {q} has no leaders: {info}")


def producers(node, v5_only=False):
    """Producers connected to `node` now (a CONNECT needs the control plane, which the
    minority side of a cut cannot reach)."""
    made = []
    for version in (5,) if v5_only else (5, 4):
        pub = w.RawClient(node.host, node.port, version, timeout=10)
        pub.connect(f"cut-{uuid.uuid4().hex[:8]}")
        made.append(pub)
    return made


def refused(pubs, q):
    """A produce is not acknowledged: v5 gets 0x97, 3.1.1 no PUBACK."""
    for pub in pubs:
        pub.publish(f"$queue/{q}/x", f"cut-v{pub.version}".encode(), qos=1, pid=1)
        if pub.version == 5:
            ack = pub.expect(w.PUBACK)
            assert ack.rc == 0x97, ack
        else:
            assert pub.recv(3.0) is None, "a 3.1.1 producer was acknowledged on the wrong side"
        pub.close()


@pytest.mark.timeout(90)
def test_five_nodes_cut_2_3_the_minority_refuses_produce_and_replicas_agree_after(cluster_of):
    c = cluster_of(5)
    q = replicated_queue(c[1], 5)
    log = history.History()
    # Producers connected on both sides before the cut (a new CONNECT needs the
    # control plane, which the minority has not either).
    assert produce(c[4], q, 40, log) == 0
    minority, majority = [4, 5], [1, 2, 3]
    pubs = producers(c[4])
    c.cut(minority, majority)
    refused(pubs, q)
    assert produce(c[2], q, 60, log, start=40) == 0
    c.heal()
    c.wait_stable(among=[1, 2, 3, 4, 5])
    deadline = time.monotonic() + 15
    while len({tuple(ends(c[i], q)) for i in range(1, 6)}) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len({tuple(ends(c[i], q)) for i in range(1, 6)}) == 1, \
        [ends(c[i], q) for i in range(1, 6)]
    cons = [consumer(c[5], q)]
    drain(cons, log)
    history.check(log, groups=["g"], produced_unacked=[b"cut-v5", b"cut-v4"])


@pytest.mark.timeout(90)
def test_four_nodes_cut_2_2_no_side_takes_produce_reads_go_on(cluster_of):
    c = cluster_of(4)
    q = replicated_queue(c[1], 4)
    log = history.History()
    assert produce(c[1], q, 40, log) == 0
    # Consumers on both sides before the cut.
    cons = [consumer(c[i], q) for i in (1, 2, 3, 4)]
    time.sleep(0.5)
    pubs = producers(c[1], v5_only=True) + producers(c[3], v5_only=True)
    c.cut([1, 2], [3, 4])
    refused(pubs, q)
    # What was committed is read on the side of its partition's leader (settles
    # cannot commit meanwhile: they may come again after healing).
    cut_log = history.History()
    cut_log.acked = dict(log.acked)
    drain(cons, cut_log, timeout=10)
    got = {d[1] for d in cut_log.deliveries}
    assert got == set(log.acked), f"not read during the cut: {sorted(set(log.acked) - got)[:5]}"
    c.heal()
    c.wait_stable(among=[1, 2, 3, 4])
    deadline = time.monotonic() + 15
    while len({tuple(ends(c[i], q)) for i in range(1, 5)}) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len({tuple(ends(c[i], q)) for i in range(1, 5)}) == 1, \
        [ends(c[i], q) for i in range(1, 5)]
    t0 = time.monotonic()
    assert produce(c[3], q, 20, log, start=40) == 0
    log.deliveries = list(cut_log.deliveries)
    drain(cons, log)
    print(f"after healing: produce and drain took {time.monotonic() - t0:.1f}s")
    history.check(log, groups=["g"], produced_unacked=[b"cut-v5"])
