"""Clusters of real roost processes for the cluster tests.

Two layouts:
- loopback: every node on 127.0.0.1 with its own MQTT, cluster and admin ports (works
  without privileges);
- netns: each node in its own network namespace (10.88.X.N on a bridge), so the tests
  can cut links for real with routes that refuse the other side's address (root only).
  The test process reaches every node through the bridge.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from broker import Broker, accepts, free_port, roost_binary

TOKEN = "cluster-test-token"

_instances = itertools.count()

# Namespaced clusters not cleaned up yet: removed at exit, also when the process is
# ended by SIGTERM (a script run under `timeout`), so no namespace, bridge or node
# outlives the run that made it.
_live: list["Cluster"] = []


def _cleanup_live():
    for c in list(_live):
        c.cleanup()


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


atexit.register(_cleanup_live)


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args, check=True):
    r = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


class Node(Broker):
    """One cluster node: a Broker with a cluster listener and an admin API."""

    def __init__(self, node_id, host, cluster_port, peers, ns=None, name="roost", join=False,
                 token=True, settings=None):
        super().__init__({})
        self.node_id = node_id
        self.host = host
        self.ns = ns
        if ns is not None:
            self.port = 1883
            self.admin_port = 8080
        else:
            self.admin_port = free_port()
        self.cluster_port = cluster_port
        self.cluster_addr = f"{host}:{cluster_port}"
        self.config = {"admin_bind": [f"{host}:{self.admin_port}"]}
        if token:
            self.config["admin_token"] = TOKEN
        if ns is not None:
            # The `[cluster]` table of the config file...
            self.config["cluster"] = {"node_id": node_id, "bind": self.cluster_addr,
                                      "peers": peers, "name": name, "join": join,
                                      **(settings or {})}
            self.flags = []
        else:
            # ... or the flags (both are the contract).
            self.flags = ["--node-id", str(node_id), "--cluster-bind", self.cluster_addr,
                          "--cluster-peers", ",".join(peers), "--cluster-name", name]
            if join:
                self.flags.append("--cluster-join")
            if settings:
                # Keys without a flag go in a `[cluster]` table; the flags fill in the rest.
                self.config["cluster"] = {"node_id": node_id, "bind": self.cluster_addr,
                                          **settings}

    def command(self):
        cmd = super().command() + self.flags
        if self.ns is not None:
            return ["ip", "netns", "exec", self.ns, *cmd]
        return cmd

    def start(self, timeout=15.0):
        # The log of an earlier life (before a kill) is kept beside the new one.
        if self.log_path.exists():
            with open(self.dir / "earlier.log", "ab") as f:
                f.write(self.log_path.read_bytes())
        return super().start(timeout)

    def api(self, method, path, body=None, timeout=5.0):
        req = urllib.request.Request(
            f"http://{self.host}:{self.admin_port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def status(self, timeout=2.0):
        code, body = self.api("GET", "/api/v1/cluster", timeout=timeout)
        assert code == 200, (code, body)
        return body


class Cluster:
    """`n` nodes, started together; `netns=True` puts each in its own namespace;
    `settings`: more keys of every node's `[cluster]` table."""

    def __init__(self, n, netns=False, token=True, settings=None):
        self.netns = netns
        self.nodes: dict[int, Node] = {}
        self.cuts: list[tuple[str, str]] = []
        self.delayers: dict[int, subprocess.Popen] = {}
        tag = (os.getpid() * 7 + next(_instances)) % 100000
        if netns:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
            self.tag = f"rq{tag}"
            self.subnet = f"10.88.{tag % 250}"
            self.bridge = f"{self.tag}b"
            _live.append(self)
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            hosts = {}
            for i in range(1, n + 1):
                ns = f"{self.tag}n{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", f"{self.tag}h{i}", "type", "veth", "peer", "name", f"{self.tag}v{i}")
                _ip("link", "set", f"{self.tag}h{i}", "master", self.bridge, "up")
                _ip("link", "set", f"{self.tag}v{i}", "netns", ns)
                _ip("-n", ns, "addr", "add", f"{self.subnet}.{i}/24", "dev", f"{self.tag}v{i}")
                _ip("-n", ns, "link", "set", f"{self.tag}v{i}", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                hosts[i] = (f"{self.subnet}.{i}", 7000, ns)
        else:
            hosts = {i: ("127.0.0.1", free_port(), None) for i in range(1, n + 1)}
        peers = [f"{i}@{h}:{p}" for i, (h, p, _) in hosts.items()]
        self.peers = peers
        for i, (h, p, ns) in hosts.items():
            self.nodes[i] = Node(i, h, p, peers, ns=ns, token=token or netns, settings=settings)

    def __getitem__(self, i) -> Node:
        return self.nodes[i]

    def start(self):
        for node in self.nodes.values():
            node.start()
        self.wait_stable()
        return self

    def alive(self):
        return [i for i, n in self.nodes.items() if n.alive()]

    def leader(self, among=None, timeout=10.0):
        """The leader every node of `among` (default: the live ones) agrees on."""
        among = among or self.alive()
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = [self.nodes[i].status()["leader"] for i in among]
            except Exception:
                seen = None
            if seen and seen[0] is not None and len(set(seen)) == 1 and seen[0] in among:
                return seen[0]
            time.sleep(0.05)
        # Say what each node answers (or why not), and how its log ends, so that a
        # failure here can be told apart: a node that died, one that cannot reach the
        # others, or no election.
        report = []
        for i in among:
            node = self.nodes[i]
            try:
                answer = node.status()
            except Exception as e:  # noqa: BLE001 - reported, not handled
                answer = f"no answer: {e!r}"
            try:
                tail = node.log_path.read_text(errors="replace").splitlines()[-8:]
            except OSError as e:
                tail = [repr(e)]
            report.append(f"node {i} alive={node.alive()}: {answer}\n    " + "\n    ".join(tail))
        raise AssertionError(f"no agreed leader among {among}: {seen}\n" + "\n".join(report))

    def wait_stable(self, among=None, timeout=20.0):
        """A leader agreed on by `among`, each of them linked to all the others."""
        among = among or self.alive()
        deadline = time.monotonic() + timeout
        leader = self.leader(among, timeout)
        while time.monotonic() < deadline:
            ok = True
            for i in among:
                st = self.nodes[i].status()
                up = {m["id"] for m in st["members"] if m["up"]}
                if not set(among) <= up or not st["caught_up"]:
                    ok = False
            if ok:
                return leader
            time.sleep(0.05)
        raise AssertionError("cluster did not settle: " +
                             str({i: self.nodes[i].status() for i in among}))

    def add_node(self, node_id):
        """A new node (loopback layout) started with --cluster-join: it waits to be
        added through the admin API."""
        assert not self.netns
        port = free_port()
        node = Node(node_id, "127.0.0.1", port, self.peers + [f"{node_id}@127.0.0.1:{port}"],
                    join=True)
        self.nodes[node_id] = node
        return node.start()

    def others(self, *not_these):
        return [i for i in self.nodes if i not in not_these]

    # -- network cuts (netns only) -------------------------------------------------------
    def cut(self, side_a, side_b):
        """Nodes of side_a can no longer reach nodes of side_b, nor the other way."""
        assert self.netns
        for a in side_a:
            for b in side_b:
                for x, y in ((a, b), (b, a)):
                    ns = self.nodes[x].ns
                    _ip("-n", ns, "route", "add", "prohibit", f"{self.nodes[y].host}/32")
                    self.cuts.append((ns, f"{self.nodes[y].host}/32"))

    def slow(self, node_id, delay_ms):
        """What node `node_id` sends on cluster links (to or from a cluster port) is
        delayed by `delay_ms`: its round trip to every other node grows by that much.
        `netdelay.py` does it (this kernel has no `tc netem`)."""
        assert self.netns
        node = self.nodes[node_id]
        proc = self.delayers.get(node_id)
        if proc is None:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("netdelay.py")), node.ns,
                 f"{self.tag}v{node_id}", self.bridge, str(node.cluster_port)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            self.delayers[node_id] = proc
            if proc.stdout.readline().strip() != "ready":
                proc.stdin.close()
                raise RuntimeError(f"netdelay.py: {proc.stderr.read()}")
        proc.stdin.write(f"delay {delay_ms}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"

    def unslow(self, node_id):
        """Node `node_id`'s cluster traffic takes the direct path again (what was held
        goes out first)."""
        proc = self.delayers.pop(node_id, None)
        if proc is None:
            return
        proc.stdin.write("delay 0\n")
        proc.stdin.flush()
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def heal(self):
        for ns, dst in self.cuts:
            _ip("-n", ns, "route", "del", "prohibit", dst, check=False)
        self.cuts.clear()

    def __enter__(self):
        """Started and stable (see `start`); removed again if starting fails."""
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc):
        self.cleanup()

    def cleanup(self):
        for node_id in list(self.delayers):
            self.unslow(node_id)
        for node in self.nodes.values():
            node.cleanup()
        if self.netns:
            self.heal()
            for i, node in self.nodes.items():
                _ip("link", "del", f"{self.tag}h{i}", check=False)
                _ip("netns", "del", node.ns, check=False)
            _ip("link", "del", self.bridge, check=False)
            if self in _live:
                _live.remove(self)


def reachable(node: Node) -> bool:
    return accepts(node.port, node.host)


__all__ = ["Cluster", "Node", "can_use_netns", "reachable", "roost_binary", "TOKEN"]
