"""MQTT.js, the MQTT client web pages use, against roost's WebSocket listeners (roost only).

MQTT.js 5 runs under Node.js (integration/js: roundtrip.mjs, versions pinned by
package-lock.json; test.sh installs Node.js and runs `npm ci` there). The script
connects over ws:// or wss://, subscribes to PREFIX/# at QoS 2, publishes QoS 0, 1 and 2
messages plus one of 150 KiB (and on MQTT 5 user properties and topic aliases) and exits
0 only when every message came back to it intact. A plain TCP subscriber must see the same
messages, so what a browser publishes reaches everyone else too.

These tests do not skip when Node.js or the packages are missing: they fail and say what
to install, so a CI run without them cannot pass unnoticed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from broker import IS_MOSQUITTO
from conftest import raw_subscriber, receive_publishes, ws_broker

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's WebSocket listener keys")

JS_DIR = Path(__file__).resolve().parent / "js"
BIG = 150 * 1024


def run_mqttjs(url, version, prefix, ca=None):
    """Runs roundtrip.mjs; returns (exit code, its JSON summary or None, all output)."""
    node = shutil.which("node")
    assert node, "Node.js is not installed (test.sh installs it: apt-get install nodejs npm)"
    assert (JS_DIR / "node_modules" / "mqtt").is_dir(), \
        f"MQTT.js is not installed: run `npm ci` in {JS_DIR} (test.sh does)"
    cmd = [node, str(JS_DIR / "roundtrip.mjs"), url, str(version), prefix]
    if ca is not None:
        cmd.append(str(ca))
    r = subprocess.run(cmd, cwd=JS_DIR, capture_output=True, text=True, timeout=25,
                       stdin=subprocess.DEVNULL)
    output = f"$ {' '.join(cmd)}\nexit {r.returncode}\n{r.stdout}{r.stderr}"
    lines = r.stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        summary = None
    return r.returncode, summary, output


def expected_messages(prefix, version):
    """(topic, payload, qos) of what roundtrip.mjs publishes, in order."""
    msgs = [(f"{prefix}/qos0", b"zero", 0), (f"{prefix}/qos1", b"one", 1),
            (f"{prefix}/qos2", b"two", 2), (f"{prefix}/big", b"b" * BIG, 1)]
    if version == 5:
        msgs += [(f"{prefix}/props", b"with props", 1),
                 (f"{prefix}/aliased", b"alias first", 1),
                 (f"{prefix}/aliased", b"alias second", 1)]
    return msgs


def check_roundtrip(b, url, version, prefix, ca=None):
    tcp = raw_subscriber(b, 4, f"{prefix}/#", qos=2)
    try:
        rc, summary, output = run_mqttjs(url, version, prefix, ca)
        assert rc == 0, output
        assert summary is not None and summary["ok"], output
        want = expected_messages(prefix, version)
        got = sorted((m["topic"], m["bytes"], m["qos"]) for m in summary["received"])
        assert got == sorted((t, len(p), q) for t, p, q in want), output
        if version == 5:
            # The broker offers topic aliases, so MQTT.js sent with them and the broker
            # resolved them (the messages above came back under their full topics).
            assert summary["topicAliasesSent"] > 0, output
        # The TCP subscriber sees what the WebSocket client published, in publish order.
        seen = receive_publishes(tcp, len(want))
        assert [(p.topic, p.payload, p.qos) for p in seen] == want
    finally:
        tcp.close()
    assert b.alive(), b.log_tail()


@pytest.mark.parametrize("version", [pytest.param(5, id="v5"), pytest.param(4, id="v311"),
                                     pytest.param(3, id="v31")])
def test_mqttjs_over_websocket(broker_with, uid, version):
    b = ws_broker(broker_with)
    check_roundtrip(b, f"ws://127.0.0.1:{b.ws_port}/mqtt", version, f"js/{uid}")


@pytest.mark.parametrize("version", [pytest.param(5, id="v5"), pytest.param(4, id="v311")])
def test_mqttjs_over_secure_websocket(broker_with, pki, uid, version):
    b = ws_broker(broker_with, pki, wss=True)
    check_roundtrip(b, f"wss://localhost:{b.ws_port}/mqtt", version, f"js/{uid}",
                    ca=pki.ca.cert_path)


def test_mqttjs_refuses_a_wss_broker_it_does_not_trust(broker_with, pki, uid):
    """The wss test above is a real TLS check: with another CA, MQTT.js does not connect."""
    b = ws_broker(broker_with, pki, wss=True)
    rc, summary, output = run_mqttjs(f"wss://localhost:{b.ws_port}/mqtt", 5, f"js/{uid}",
                                     ca=pki.rogue_ca.cert_path)
    assert rc == 1, output
    assert summary is not None and not summary["ok"] and not summary["received"], output
    assert b.alive(), b.log_tail()
