"""A history checker for queues: from the log of every acknowledged produce and every
delivery, checks that each acknowledged message was delivered to every group at least
once, that order per key held within each partition, and that nothing was delivered
that was never produced. Duplicates (redeliveries after a failover) are counted."""

from __future__ import annotations

from collections import defaultdict


class History:
    def __init__(self):
        self.acked = {}            # payload -> key
        self.deliveries = []       # (group, payload, partition, offset)
        self.counts = []           # delivery-count of each delivery

    def produced(self, payload: bytes, key: str):
        self.acked[bytes(payload)] = key

    def delivered(self, group: str, payload: bytes, partition, offset, count=1):
        self.deliveries.append((group, bytes(payload),
                                None if partition is None else int(partition),
                                None if offset is None else int(offset)))
        self.counts.append(count)


class Violation(AssertionError):
    pass


def check(h: History, groups, produced_unacked=()):
    """Raises Violation on a lost acknowledged message, a delivery of something never
    produced, or a key's messages delivered out of order within a partition. Returns
    the number of duplicate deliveries per group."""
    known = set(h.acked) | {bytes(p) for p in produced_unacked}
    dups = {}
    for g in groups:
        seen = defaultdict(int)
        order = defaultdict(list)  # (partition, key) -> [offsets in delivery order, firsts only]
        for group, payload, partition, offset in h.deliveries:
            if group != g:
                continue
            if payload not in known:
                raise Violation(f"group {g}: delivered {payload!r}, which was never produced")
            seen[payload] += 1
            if seen[payload] == 1 and payload in h.acked:
                order[(partition, h.acked[payload])].append(offset)
        lost = [p for p in h.acked if p not in seen]
        if lost:
            raise Violation(f"group {g}: {len(lost)} acknowledged messages never delivered, "
                            f"e.g. {sorted(lost)[:5]}")
        for (partition, key), offsets in order.items():
            if offsets != sorted(offsets):
                raise Violation(f"group {g}: key {key} out of order in partition {partition}: "
                                f"{offsets[:20]}")
        dups[g] = sum(n - 1 for n in seen.values())
    return dups
