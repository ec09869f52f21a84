"""The web dashboard on the admin listener, in a real browser: headless Chromium (Debian's
`chromium`, installed by test.sh) loads it against a running roost; the test asserts on
the DOM the page built from the admin API and saves a screenshot as a test artifact
(`integration/artifacts/dashboard.png`, or under $ROOST_ARTIFACTS)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import mqttraw
from broker import IS_MOSQUITTO, free_port
from conftest import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own dashboard"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
]

ARTIFACTS = Path(os.environ.get("ROOST_ARTIFACTS", Path(__file__).parent / "artifacts"))


def chromium(url, *args):
    with tempfile.TemporaryDirectory(prefix="roost-chromium-") as profile:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", f"--user-data-dir={profile}",
                            "--window-size=1280,1000", "--virtual-time-budget=8000",
                            *args, url], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def cell_texts(dom, table_id):
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', dom, re.S)
    assert table, f"no table {table_id}"
    return [re.sub(r"<[^>]+>", "", c).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", table.group(1), re.S)]


@pytest.mark.timeout(180)
def test_the_dashboard_shows_clients_queues_and_rates_in_chromium(broker_with):
    admin = free_port()
    b = broker_with(admin_bind=[f"127.0.0.1:{admin}"], sys_interval=0)
    url = f"http://127.0.0.1:{admin}/"
    # Something to show: a connected v5 client with a subscription, a queue whose group
    # has not settled everything, messages flowing.
    viewer = mqttraw.RawClient(b.host, b.port, 5)
    viewer.connect("dash-viewer")
    assert viewer.subscribe("dash/#", qos=1).rcs == [1]
    worker = mqttraw.RawClient(b.host, b.port, 4)
    worker.connect("dash-worker")
    assert worker.subscribe("$share/workers/$queue/dashq", qos=1).rcs == [1]
    pub = mqttraw.RawClient(b.host, b.port, 4)
    pub.connect("dash-producer")
    for i in range(3):
        pub.publish("$queue/dashq", b"job", qos=1, pid=i + 1)
        assert pub.expect(mqttraw.PUBACK).pid == i + 1
    pub.publish("dash/t", b"x", qos=1, pid=9)
    assert pub.expect(mqttraw.PUBACK).pid == 9

    dom = chromium(url, "--dump-dom")
    assert 'data-ready="1"' in dom, dom[-3000:]
    assert re.search(r'id="status"[^>]*>live<', dom), "the page reached the API"
    connections = re.search(r'id="stat-connections">(\d+)<', dom)
    assert connections and int(connections.group(1)) == 3, dom[:3000]
    assert re.search(r'id="stat-subscriptions">(\d+)<', dom).group(1) == "1"
    clients = cell_texts(dom, "clients")
    for client_id in ("dash-viewer", "dash-worker", "dash-producer"):
        assert client_id in clients, clients
    assert "5.0" in clients and "3.1.1" in clients
    queues = cell_texts(dom, "queues")
    assert queues[0] == "dashq" and queues[1] == "3", queues
    assert "workers" in queues and "dash-worker" in queues, queues
    assert "<svg class=\"spark\"" in dom, "sparklines drawn"
    dropped = cell_texts(dom, "dropped")
    assert "session_queue_full" in dropped, dropped
    # A rate was computed from two reads of /metrics (the page polls every 2 s).
    assert re.search(r'id="stat-in-rate">[\d.]+<', dom), "no message rate"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(url, f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 1000) and len(data) > 20_000, (width, height, len(data))
    for c in (viewer, worker, pub):
        c.disconnect()


def test_the_page_needs_no_token_but_its_data_does(broker_with):
    admin = free_port()
    broker_with(admin_bind=[f"127.0.0.1:{admin}"], admin_token="dash-secret")
    base = f"http://127.0.0.1:{admin}"
    for path, kind in (("/", "text/html"), ("/dashboard.js", "text/javascript"),
                       ("/dashboard.css", "text/css")):
        with urllib.request.urlopen(base + path, timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith(kind)
            body = r.read().decode()
            assert "dash-secret" not in body
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/api/v1/clients", timeout=10)
    assert e.value.code == 401
    # The page asks for the token when the API wants one.
    dom = chromium(base + "/", "--dump-dom")
    assert re.search(r'<form id="login"(?![^>]*hidden)', dom), "login form shown"
    assert 'data-ready="1"' not in dom


@pytest.mark.timeout(180)
def test_the_dashboard_shows_the_cluster_and_redrives_dead_letters(broker_with):
    """On a cluster node the page lists the nodes and the leader; a queue with dead
    letters gets a redrive button, and the API it calls moves them back."""
    import json
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from cluster import Cluster

    c = Cluster(3, token=False)
    try:
        c.start()
        node = c[1]
        # Kept on this node alone (its dead letters are this node's; dead-letter queues
        # of replicated queues live on the partition's leader: see the README).
        code, body = node.api("PUT", "/api/v1/queues/dlqd", {"replication_factor": 1})
        assert code in (200, 201), body
        worker = mqttraw.RawClient(node.host, node.port, 5)
        worker.connect("dash-rejecter")
        worker.subscribe([("$share/w/$queue/dlqd", 1)])
        pub = mqttraw.RawClient(node.host, node.port, 5)
        pub.connect("dash-pub")
        pub.publish("$queue/dlqd", b"bad job", qos=1, pid=1)
        assert pub.expect(mqttraw.PUBACK).pid == 1
        m = worker.expect(mqttraw.PUBLISH)
        mid = dict(m.user_props())["message-id"]
        worker.publish("$queue/dlqd/$reject", b"", qos=1, pid=7,
                       properties=[(mqttraw.USER_PROPERTY, ("message-id", mid))])
        worker.puback(m.pid)
        assert wait_for(
            lambda: node.api("GET", "/api/v1/queues/dlqd")[1]["dead_letters"] == 1), \
            node.api("GET", "/api/v1/queues/dlqd")
        dom = chromium(f"http://{node.host}:{node.admin_port}/", "--dump-dom")
        assert 'data-ready="1"' in dom, dom[-3000:]
        assert re.search(r'<section id="cluster-section"(?![^>]*hidden)', dom), "cluster shown"
        nodes = cell_texts(dom, "nodes")
        leader = c.leader()
        assert "1 (this node)" in nodes and "leader" in nodes, nodes
        assert nodes.count("up") == 3 and nodes.count("voter") == 3, nodes
        assert f"leader: node {leader}" in dom
        assert re.search(r'<button class="redrive" data-queue="dlqd">redrive</button>', dom), \
            "no redrive button for a queue with dead letters"
        # What the button posts.
        code, body = node.api("POST", "/api/v1/queues/dlqd/dlq/redrive", {})
        assert code == 200, body
        assert node.api("GET", "/api/v1/queues/dlqd")[1]["dead_letters"] == 0
        again = worker.expect(mqttraw.PUBLISH, skip=(mqttraw.PUBACK,))
        assert again.payload == b"bad job", again
        assert "moved" in json.dumps(body) or body, body
    finally:
        c.cleanup()
