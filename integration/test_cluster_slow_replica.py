"""A slow replica of a replicated `$queue/` partition (issue 14, scenario 5): with 100 ms
added to what one follower sends on cluster links (`netdelay.py`, a user-space stand-in
for `tc netem`, which this kernel lacks; nodes in network namespaces; root only), it leaves the partition's in-sync set, produce goes on at PUBACK p99 under
20 ms (a majority, the leader and the other follower, acknowledges without it), and
once the latency is gone it catches up and returns. Every produce and delivery goes to
`history.check`.

A replica is in sync while it lags its leader by at most `in_sync_lag_ms` (default
1000 ms): it has every entry the leader had that long ago and answered within it.
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
    pytest.mark.skipif(not can_use_netns(), reason="needs root, `ip` and `tc` for netem"),
]

RATE = 200          # produces per second
DELAY_MS = 100      # added to what the slow replica sends
P99_GOAL = 0.020    # seconds


def placement(node, q):
    """Partition 0's placement as `node` tells it ({} before the queue is placed)."""
    code, info = node.api("GET", f"/api/v1/queues/{q}")
    assert code == 200, info
    return (info.get("placement") or [{}])[0]


def wait_for(what, check, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout}s")


@pytest.mark.timeout(90)
def test_slow_replica_leaves_in_sync_produce_stays_fast_and_it_returns(netns_c3):
    c = netns_c3
    q = f"sl{uuid.uuid4().hex[:6]}"
    # replication_factor: the cluster's default, 3.
    code, body = c[1].api("PUT", f"/api/v1/queues/{q}", {"partitions": 1})
    assert code in (200, 201), body
    wait_for("a partition leader", lambda: placement(c[1], q).get("leader"), 10)
    assert sorted(placement(c[1], q)["replicas"]) == [1, 2, 3]
    leader = placement(c[1], q)["leader"]
    # The slow one leads neither the partition nor the control plane (a slow leader
    # slows everything it leads: that is not this scenario).
    control = c.leader()
    slow = next(i for i in (1, 2, 3) if i not in (leader, control))
    lead = c[leader]
    wait_for("every replica in sync",
             lambda: sorted(placement(lead, q)["in_sync"]) == [1, 2, 3], 10)

    log = history.History()
    pub = PacedProducer([lead], q, RATE, log).start()
    time.sleep(2.0)
    c.slow(slow, DELAY_MS)
    slowed = time.monotonic()
    left = wait_for(f"node {slow} out of the in-sync set",
                    lambda: slow not in placement(lead, q)["in_sync"], 15)
    p = placement(lead, q)
    assert sorted(p["in_sync"]) == sorted({1, 2, 3} - {slow}), p
    # Out because it lags: it is still linked.
    assert p["lag_ms"][str(slow)] is None, p
    assert any(m["id"] == slow and m["up"] for m in lead.status()["members"])
    # Produce goes on while it is out.
    time.sleep(5.0)
    healed = time.monotonic()
    c.unslow(slow)
    back = wait_for(f"node {slow} back in the in-sync set",
                    lambda: slow in placement(lead, q)["in_sync"], 20)
    time.sleep(1.0)
    pub.stop()

    healthy = pub.p99(until=slowed)
    during = pub.p99(since=slowed, until=healed)
    gap = pub.longest_gap(since=slowed, until=healed)
    sent_during = sum(1 for at, _ in pub.latencies if slowed <= at < healed)
    print(f"slow replica: node {slow} (leader {leader}, control plane {control}); left in-sync "
          f"{(left - slowed) * 1000:.0f} ms after the delay, back {(back - healed) * 1000:.0f} "
          f"ms after it was removed; PUBACK p99 {healthy * 1000:.1f} ms before, "
          f"{during * 1000:.1f} ms while slow ({sent_during} produces), longest gap "
          f"{gap * 1000:.0f} ms; refused {pub.refused}, unacknowledged {len(pub.unacked)}")
    assert pub.refused == 0 and not pub.unacked
    assert sent_during >= RATE * 5 * 0.8, "produce did not go on while the replica was slow"
    assert during < P99_GOAL, (
        f"PUBACK p99 {during * 1000:.1f} ms while a replica was slow "
        f"(before: {healthy * 1000:.1f} ms)")

    # It catches up: its copy ends where the leader's does.
    wait_for(f"node {slow}'s copy caught up with the leader's",
             lambda: placement(c[slow], q)["local_end"] == placement(lead, q)["local_end"], 15)
    p = placement(c[slow], q)
    assert sorted(p["in_sync"]) == [1, 2, 3], p
    assert p["local_end"] == len(log.acked), (p, len(log.acked))

    cons = [consumer(lead, q)]
    drain(cons, log)
    dups = history.check(log, groups=["g"])
    print(f"history: {len(log.acked)} acknowledged, duplicates {dups}")
    # One consumer and no failover: nothing comes twice. (Before settles were batched,
    # the drain's one entry per settle starved the leader's heartbeats, another
    # replica took over, and the settles still queued were lost: about a thousand
    # duplicates.) A leader change on a loaded machine would explain a few: what the
    # old leader had in flight is delivered again.
    now_leader = placement(lead, q)["leader"]
    if now_leader == leader:
        assert dups == {"g": 0}, dups
    else:
        print(f"the partition's leader moved from node {leader} to node {now_leader}")
        assert dups["g"] <= 512, dups
