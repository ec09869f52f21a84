"""Producers that publish to a queue at a steady rate (QoS 1, several in flight) and time
every PUBACK, for the cluster scenarios that measure what producers see: a slow replica,
a node lost under load.

Each producer sends on its own schedule from one thread and reads PUBACKs on another.
An acknowledged message goes to the `history.History`; one never acknowledged is kept
in `unacked` (the history checker accepts its delivery but does not require it). When
its connection breaks (its node was killed), the producer reconnects to the next of its
nodes and sends again what was not acknowledged, as an MQTT client does.
"""

from __future__ import annotations

import threading
import time
import uuid

import mqttraw as w


class PacedProducer:
    def __init__(self, nodes, queue, rate, log, name=None, keys=16, version=5):
        """nodes: the node to produce through, then the ones to fail over to."""
        self.nodes = list(nodes)
        self.queue = queue
        self.interval = 1.0 / rate
        self.log = log
        self.name = name or f"paced-{uuid.uuid4().hex[:8]}"
        self.keys = keys
        self.version = version
        self.latencies = []      # (send time, seconds to its PUBACK)
        self.acks = []           # time of each PUBACK (rc 0)
        self.refused = 0         # PUBACKs with a reason code >= 0x80
        self.reconnects = 0
        self.unacked = {}        # body -> key, sent and not (yet) acknowledged
        self._inflight = {}      # pid -> (body, key, send time)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = None
        self._broken = threading.Event()
        self._errors = []
        self._sender = threading.Thread(target=self._send_loop, daemon=True)
        self._reader = None
        self._node = 0

    # -- running -------------------------------------------------------------------------
    def start(self):
        self._connect()
        self._sender.start()
        return self

    def halt(self):
        """Stops sending (see stop())."""
        self._stop.set()

    def stop(self, drain=5.0):
        """Stops sending and waits up to `drain` s for the PUBACKs still due."""
        self._stop.set()
        self._sender.join()
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight:
                    break
            time.sleep(0.02)
        client = self._client
        if client is not None:
            client.close()
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        if self._errors:
            raise AssertionError(f"producer {self.name}: {self._errors[0]}")

    def _connect(self):
        last = None
        for _ in range(40):
            node = self.nodes[self._node % len(self.nodes)]
            try:
                c = w.RawClient(node.host, node.port, self.version, timeout=5.0)
                c.connect(self.name)
                break
            except Exception as e:  # noqa: BLE001 - try the next node
                last = e
                self._node += 1
                time.sleep(0.05)
        else:
            raise AssertionError(f"producer {self.name} cannot connect: {last!r}")
        self._client = c
        self._broken.clear()
        self._reader = threading.Thread(target=self._read_loop, args=(c,), daemon=True)
        self._reader.start()

    def _send_loop(self):
        i = 0
        next_at = time.monotonic()
        pid = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now < next_at:
                    time.sleep(min(next_at - now, 0.05))
                    continue
                next_at += self.interval
                if self._broken.is_set():
                    self._failover()
                    next_at = time.monotonic()
                    continue
                key = f"k{i % self.keys}"
                body = f"{self.name}:{i}".encode()
                i += 1
                with self._lock:
                    pid = self._free_pid(pid)
                    self._inflight[pid] = (body, key, time.monotonic())
                    self.unacked[body] = key
                self._publish(pid, body, key)
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self._errors.append(repr(e))

    def _free_pid(self, pid):
        for _ in range(65535):
            pid = pid % 65535 + 1
            if pid not in self._inflight:
                return pid
        raise AssertionError("65535 publishes in flight")

    def _publish(self, pid, body, key, dup=False):
        props = [(w.USER_PROPERTY, ("partition-key", key))] if self.version == 5 else None
        try:
            self._client.publish(f"$queue/{self.queue}/{key}", body, qos=1, pid=pid,
                                 dup=dup, properties=props)
        except (w.Closed, OSError):
            self._broken.set()

    def _failover(self):
        """The connection broke: connect to the next node, send again what is unacked."""
        self.reconnects += 1
        self._node += 1
        self._connect()
        with self._lock:
            again = sorted(self._inflight.items(), key=lambda kv: kv[1][2])
        for pid, (body, key, _) in again:
            self._publish(pid, body, key, dup=True)

    def _read_loop(self, client):
        while True:
            try:
                p = client.recv(1.0)
            except (w.Closed, OSError, AssertionError):
                if not self._stop.is_set():
                    self._broken.set()
                return
            if p is None:
                if client.closed:
                    return
                continue
            if p.type != w.PUBACK:
                continue
            now = time.monotonic()
            with self._lock:
                sent = self._inflight.pop(p.pid, None)
                if sent is None:
                    continue
                body, key, at = sent
                if p.rc in (None, 0):
                    self.unacked.pop(body, None)
                    self.log.produced(body, key)
                    self.latencies.append((at, now - at))
                    self.acks.append(now)
                else:
                    self.refused += 1

    # -- figures -------------------------------------------------------------------------
    def p99(self, since=0.0, until=float("inf")):
        lat = sorted(d for at, d in self.latencies if since <= at < until)
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))]

    def longest_gap(self, since=0.0, until=float("inf")):
        """The longest time between two PUBACKs (rc 0) within [since, until)."""
        acks = sorted(a for a in self.acks if since <= a < until)
        return max((b - a for a, b in zip(acks, acks[1:])), default=None)
