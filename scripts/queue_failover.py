#!/usr/bin/env python3
"""Leader failover of replicated `$queue/` partitions: kill -9 of the node that leads
the most partitions of a 3-node cluster (replication_factor 3) while a producer on
another node produces without pause (QoS 1, MQTT 5, one message in flight), over
several kills (each killed node is restarted before the next). Nodes run in network
namespaces (root), on the release binary unless ROOST_BIN says otherwise.

Leaders do not move back to a node that restarts, so after a few kills one node leads
every partition: the victim is whichever node leads most now (any of the three), and
the producer connects to the lowest-numbered other node.

    sudo python3 scripts/queue_failover.py [RUNS]

Per kill it prints: the time until every partition the victim led has a new leader
(polled through the admin API of a survivor, so up to one poll of delay is
included), the longest gap between two PUBACKs around the kill, and how many
produces were refused (0x97) meanwhile. Then worst and median of each.
"""

import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

import mqttraw as w  # noqa: E402
from cluster import Cluster  # noqa: E402


def leaders(node, q):
    _, info = node.api("GET", f"/api/v1/queues/{q}", timeout=1.0)
    return {p["partition"]: p["leader"] for p in info["placement"]}


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    c = Cluster(3, netns=True)
    results = []
    try:
        c.start()
        c.wait_stable()
        q = f"fo{uuid.uuid4().hex[:6]}"
        c[1].api("PUT", f"/api/v1/queues/{q}", {"partitions": 6})
        time.sleep(1.0)
        for run in range(runs):
            c.wait_stable(among=[1, 2, 3])
            led = leaders(c[1], q)
            counts = {n: list(led.values()).count(n) for n in (1, 2, 3)}
            victim = max(counts, key=counts.get)
            survivor = min(n for n in (1, 2, 3) if n != victim)
            acks, refused, stop = [], [0], threading.Event()

            def producer():
                pub = w.RawClient(c[survivor].host, c[survivor].port, 5, timeout=10)
                pub.connect(f"fo-{uuid.uuid4().hex[:8]}")
                i = 0
                while not stop.is_set():
                    i += 1
                    pub.publish(f"$queue/{q}/k{i % 12}", b"x", qos=1, pid=(i % 60000) + 1)
                    ack = pub.expect(w.PUBACK)
                    if ack.rc in (None, 0):
                        acks.append(time.monotonic())
                    else:
                        refused[0] += 1
                pub.close()

            t = threading.Thread(target=producer)
            t.start()
            time.sleep(1.0)
            c[victim].kill()
            killed = time.monotonic()
            while True:
                now = leaders(c[survivor], q)
                if all(now[p] not in (None, victim) for p in now):
                    break
                time.sleep(0.005)
            took = time.monotonic() - killed
            time.sleep(1.0)
            stop.set()
            t.join()
            around = [a for a in acks if killed - 1.0 <= a]
            gap = max(b - a for a, b in zip(around, around[1:]))
            results.append((took, gap, refused[0]))
            print(f"kill {run + 1}: node {victim} (led {counts[victim]} of {len(led)}): "
                  f"new leaders after {took * 1000:.0f} ms, longest PUBACK gap "
                  f"{gap * 1000:.0f} ms, refused {refused[0]}", flush=True)
            c[victim].start()
        takes = [r[0] for r in results]
        gaps = [r[1] for r in results]
        print(f"new leaders: worst {max(takes) * 1000:.0f} ms, median "
              f"{statistics.median(takes) * 1000:.0f} ms; longest PUBACK gap: worst "
              f"{max(gaps) * 1000:.0f} ms, median {statistics.median(gaps) * 1000:.0f} ms; "
              f"refused {sum(r[2] for r in results)} over {len(results)} kills")
    finally:
        c.cleanup()


if __name__ == "__main__":
    main()
