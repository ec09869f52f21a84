#!/usr/bin/env python3
"""Measures how long a 3-node roost cluster is without a control-plane leader after
kill -9 of the leader, over several kills (each killed node is restarted before the
next). Nodes run in network namespaces (root), on the release binary unless ROOST_BIN
says otherwise.

    sudo python3 scripts/cluster_failover.py [RUNS]

Prints one line per kill and the worst and median times: from the kill to the moment
both survivors name the same new leader (polled every few milliseconds through the
admin API, so the figure includes up to one poll of delay).
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from cluster import Cluster  # noqa: E402


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    c = Cluster(3, netns=True)
    times = []
    try:
        c.start()
        for run in range(runs):
            leader = c.wait_stable(among=[1, 2, 3])
            survivors = c.others(leader)
            time.sleep(0.5)
            c[leader].kill()
            start = time.monotonic()
            while True:
                seen = set()
                for i in survivors:
                    try:
                        seen.add(c[i].status(timeout=0.5)["leader"])
                    except Exception:
                        seen.add(None)
                if len(seen) == 1 and (new := seen.pop()) not in (None, leader):
                    break
                if time.monotonic() - start > 10:
                    raise SystemExit(f"run {run}: no new leader after 10 s")
                time.sleep(0.002)
            took = (time.monotonic() - start) * 1000
            times.append(took)
            print(f"kill {run + 1}: leader {leader} killed, node {new} leads after {took:.0f} ms",
                  flush=True)
            c[leader].start()
        print(f"{runs} kills: worst {max(times):.0f} ms, median {statistics.median(times):.0f} ms")
    finally:
        c.cleanup()


if __name__ == "__main__":
    main()
