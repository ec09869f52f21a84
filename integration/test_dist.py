"""What operators install (dist/): the example roost.toml runs a broker as it is, the
Grafana dashboard and the Prometheus alert rules query only metrics a running roost
exports, and `roost --version` names the version and the commit."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import mqttraw
from broker import IS_MOSQUITTO, free_port, roost_binary, wait_port
from conftest import wait_for
from test_admin import Admin

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own dist/ files")

DIST = Path(__file__).resolve().parent.parent / "dist"
METRIC = re.compile(r"\broost_[a-z0-9_]+\b")


def test_version_names_the_release_and_the_commit():
    out = subprocess.run([roost_binary(), "--version"], capture_output=True, text=True,
                         timeout=10, check=True).stdout.strip()
    assert re.fullmatch(r"roost \d+\.\d+\.\d+ \(commit ([0-9a-f]{12}|unknown)\)", out), out


def run_dist_config(extra_args, tmp: Path, appended=""):
    """roost on dist/roost.toml as shipped (plus `appended` TOML), with the listeners and
    data directory moved to this test's by flags (which win over the file)."""
    port = free_port()
    config = DIST / "roost.toml"
    if appended:
        config = tmp / "roost.toml"
        config.write_text((DIST / "roost.toml").read_text() + "\n" + appended)
    log = open(tmp / "roost.log", "wb")
    proc = subprocess.Popen([roost_binary(), "--config", str(config),
                             "--bind", f"127.0.0.1:{port}", "--data-dir", str(tmp / "data"),
                             *extra_args], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        wait_port(port)
    except Exception:
        proc.kill()
        raise AssertionError((tmp / "roost.log").read_text())
    return proc, port


def test_the_example_config_runs_a_broker(tmp_path):
    proc, port = run_dist_config([], tmp_path)
    try:
        sub = mqttraw.RawClient("127.0.0.1", port, 5)
        sub.connect("dist-sub")
        assert sub.subscribe("dist/#", qos=1).rcs == [1]
        pub = mqttraw.RawClient("127.0.0.1", port, 4)
        pub.connect("dist-pub")
        pub.publish("dist/x", b"from the example config", qos=1, pid=1)
        assert pub.expect(mqttraw.PUBACK).pid == 1
        assert sub.expect(mqttraw.PUBLISH).payload == b"from the example config"
        pub.disconnect()
        sub.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    assert rc == 0, (tmp_path / "roost.log").read_text()


def exprs_of_dashboard(node):
    """Every PromQL expression of a Grafana dashboard (panels' targets, variables)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                yield v
            else:
                yield from exprs_of_dashboard(v)
    elif isinstance(node, list):
        for v in node:
            yield from exprs_of_dashboard(v)


def test_dashboard_and_alerts_query_only_exported_metrics(tmp_path):
    yaml = pytest.importorskip("yaml")
    dashboard = json.loads((DIST / "grafana-dashboard.json").read_text())
    assert len(dashboard["panels"]) >= 10
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} queries nothing"
    rules = yaml.safe_load((DIST / "prometheus-alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    # The four: broker down, queue lag growing, drops, fsync p99.
    for name in ("RoostDown", "RoostQueueLagGrowing", "RoostMessagesDropped", "RoostFsyncSlow"):
        assert name in alerts, sorted(alerts)
    named = set()
    for expr in list(exprs_of_dashboard(dashboard)) + list(alerts.values()):
        named |= set(METRIC.findall(expr))
    assert len(named) >= 15, sorted(named)

    # A running roost with a queue, a consumer group and traffic, so every family has
    # samples, not just its HELP line.
    admin_port = free_port()
    # A bridge to a port nobody listens on, for the bridge families.
    bridge = ('[[bridge]]\nname = "nowhere"\naddress = "127.0.0.1:%d"\n'
              'topics = [{ filter = "b/#", direction = "out" }]\n' % free_port())
    proc, port = run_dist_config(["--admin-bind", f"127.0.0.1:{admin_port}"], tmp_path,
                                 appended=bridge)
    try:
        wait_port(admin_port)
        worker = mqttraw.RawClient("127.0.0.1", port, 4)
        worker.connect("dist-worker")
        assert worker.subscribe("$share/g/$queue/jobs", qos=1).rcs == [1]
        pub = mqttraw.RawClient("127.0.0.1", port, 4)
        pub.connect("dist-producer")
        pub.publish("$queue/jobs", b"job", qos=1, pid=1)
        assert pub.expect(mqttraw.PUBACK).pid == 1
        text = ""

        def scraped():
            nonlocal text
            status, text, _ = Admin(admin_port).call("GET", "/metrics")
            return status == 200 and "roost_queue_lag{" in text

        assert wait_for(scraped, 10), text
        exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line and not line.startswith("#")}
        missing = sorted(n for n in named if n not in exported)
        assert not missing, f"dist/ queries metrics roost does not export: {missing}"
        pub.disconnect()
        worker.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
