"""A node lost under load (issue 14, scenario 1, scaled to this 2-core machine): many
producers spread over a 3-node cluster (nodes in network namespaces; root only) produce
to a replicated queue at a steady rate (QoS 1, MQTT 5, several in flight each); the node
leading most partitions is killed (-9). No acknowledged message is lost (history
checker), writes go on (every producer is acknowledged again after the kill, those of
the dead node through another node), and the longest PUBACK gap of each producer on a
surviving node stays under 300 ms.

The issue's figure is 1,000 clients x 100 msg/s; three replicated nodes sharing 2 cores
take about 15,000 produces per second flat out (BENCHMARKS.md section 8), so this runs
PRODUCERS x RATE = 2,400 msg/s: a sixth of that, as the issue's load would be of a
cluster sized for it.
"""

from __future__ import annotations

import time
import uuid

import pytest

import history
from broker import IS_MOSQUITTO
from cluster import can_use_netns
from paced import PacedProducer
from test_cluster_queues import consumer, drain

pytestmark = [
    pytest.mark.skipif(IS_MOSQUITTO, reason="a roost cluster"),
    pytest.mark.skipif(not can_use_netns(), reason="needs root and `ip` for network namespaces"),
]

PRODUCERS = 48      # spread over the three nodes
RATE = 50           # produces per second each
GAP_GOAL = 0.300    # seconds


def leaders(node, q):
    code, info = node.api("GET", f"/api/v1/queues/{q}")
    assert code == 200, info
    return [p.get("leader") for p in info.get("placement") or []]


@pytest.mark.timeout(90)
def test_node_lost_under_load_loses_nothing_and_writes_go_on(netns_c3):
    c = netns_c3
    q = f"nl{uuid.uuid4().hex[:6]}"
    code, body = c[1].api("PUT", f"/api/v1/queues/{q}", {"partitions": 6})
    assert code in (200, 201), body
    deadline = time.monotonic() + 10
    while not (len(leaders(c[1], q)) == 6 and all(leaders(c[1], q))):
        assert time.monotonic() < deadline, leaders(c[1], q)
        time.sleep(0.1)

    log = history.History()
    pubs = []
    for i in range(PRODUCERS):
        home = 1 + i % 3
        order = [c[home]] + [c[n] for n in (1, 2, 3) if n != home]
        pubs.append((home, PacedProducer(order, q, RATE, log, keys=6).start()))
    time.sleep(3.0)
    led = leaders(c[1], q)
    victim = max((1, 2, 3), key=led.count)
    c[victim].kill()
    killed = time.monotonic()
    time.sleep(4.0)
    for _, p in pubs:
        p.halt()
    for _, p in pubs:
        p.stop()

    survivors = [p for home, p in pubs if home != victim]
    moved = [p for home, p in pubs if home == victim]
    gaps = [p.longest_gap(since=killed - 1.0) or 0.0 for p in survivors]
    moved_gaps = [p.longest_gap(since=killed - 1.0) or 0.0 for p in moved]
    acked = len(log.acked)
    unacked = [b for _, p in pubs for b in p.unacked]
    print(f"node lost under load: node {victim} (led {led.count(victim)} of 6) killed; "
          f"{PRODUCERS} producers x {RATE}/s; {acked} acknowledged, {len(unacked)} never; "
          f"longest PUBACK gap on survivors {max(gaps) * 1000:.0f} ms (median "
          f"{sorted(gaps)[len(gaps) // 2] * 1000:.0f} ms); producers of the dead node "
          f"reconnected and went on, their longest gap {max(moved_gaps) * 1000:.0f} ms; "
          f"refused {sum(p.refused for _, p in pubs)}")
    # Writes go on: every producer is acknowledged in the last second.
    for home, p in pubs:
        assert any(a > killed + 3.0 for a in p.acks), f"producer on node {home} stalled"
    assert all(p.reconnects >= 1 for p in moved)
    assert sum(p.refused for _, p in pubs) == 0

    # Nothing acknowledged is lost: consumers on the survivors get every message.
    cons = [consumer(c[n], q) for n in (1, 2, 3) if n != victim]
    drain(cons, log, timeout=30)
    try:
        dups = history.check(log, groups=["g"], produced_unacked=unacked)
    except history.Violation as e:
        ends = {n: [p.get("local_end") for p in c[n].api("GET", f"/api/v1/queues/{q}")[1]
                    .get("placement") or []] for n in (1, 2, 3) if n != victim}
        raise AssertionError(f"{e}; ends of each survivor's copies: {ends}") from e
    print(f"history: {acked} acknowledged, duplicates {dups}")

    # The goal: the partitions' leader lease (150 ms) plus an election and a commit.
    assert max(gaps) < GAP_GOAL, (
        f"longest PUBACK gap {max(gaps) * 1000:.0f} ms, over the {GAP_GOAL * 1000:.0f} ms goal")
