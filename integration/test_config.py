"""The roost command line and config file as a user meets them (roost only)."""

import subprocess

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO, Broker, free_port, roost_binary
from conftest import TIMER_SLACK

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own command line and config")


def _run(args, tmp_path, timeout=10):
    return subprocess.run([roost_binary(), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def test_help_documents_every_flag(tmp_path):
    r = _run(["--help"], tmp_path)
    assert r.returncode == 0
    for flag in ("--bind", "--data-dir", "--log-level", "--config", "--max-packet-size",
                 "--max-inflight", "--max-queued-messages", "--max-topic-levels",
                 "--max-connections", "--topic-alias-maximum", "--max-keep-alive"):
        assert flag in r.stdout, f"{flag} missing from --help"


@pytest.mark.parametrize("content,key", [
    ('no_such_key = 1\n', "no_such_key"),
    ('max_packet_size = "lots"\n', "max_packet_size"),
    ('bind = 1883\n', "bind"),
])
def test_bad_config_file_is_a_clear_error_naming_the_key(tmp_path, content, key):
    cfg = tmp_path / "roost.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n' + content)
    r = _run(["--config", str(cfg)], tmp_path)
    assert r.returncode != 0, "bad config accepted"
    out = r.stdout + r.stderr
    assert key in out, f"error does not name {key!r}:\n{out}"
    assert "panicked" not in out


def test_unknown_flag_is_an_error(tmp_path):
    r = _run(["--no-such-flag"], tmp_path)
    assert r.returncode != 0 and "--no-such-flag" in (r.stdout + r.stderr)


def test_repeated_bind_listens_on_every_address(tmp_path):
    p1, p2 = free_port(), free_port()
    proc = subprocess.Popen([roost_binary(), "--bind", f"127.0.0.1:{p1}", "--bind",
                             f"127.0.0.1:{p2}", "--data-dir", str(tmp_path / "d")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        for port in (p1, p2):
            c = None
            for _ in range(100):
                try:
                    c = w.RawClient("127.0.0.1", port, 4)
                    break
                except OSError:
                    import time
                    time.sleep(0.05)
            assert c is not None, f"port {port} not listening"
            assert c.connect(f"bind-{port}").rc == 0
            c.disconnect()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_flags_win_over_config_file(tmp_path):
    b = Broker({"max_keep_alive": 100})
    b.start()  # uses --config; now start a second one with the same file plus a flag
    try:
        port = free_port()
        cfg = b.dir / "roost.toml"
        text = cfg.read_text().replace(f"127.0.0.1:{b.port}", f"127.0.0.1:{port}")
        cfg2 = tmp_path / "roost.toml"
        cfg2.write_text(text.replace(str(b.dir / "data"), str(tmp_path / "data")))
        proc = subprocess.Popen([roost_binary(), "--config", str(cfg2), "--max-keep-alive", "7"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=tmp_path)
        try:
            import time
            c = None
            for _ in range(100):
                try:
                    c = w.RawClient("127.0.0.1", port, 5)
                    break
                except OSError:
                    time.sleep(0.05)
            assert c is not None
            ack = c.connect("flags-win", keepalive=60)
            assert ack.props.get(w.SERVER_KEEP_ALIVE) == 7
            c.close()
        finally:
            proc.terminate()
            assert proc.wait(10) == 0
    finally:
        b.terminate()
        b.cleanup()


def test_session_expiry_max_caps_v5_session_expiry(broker_with, raw, uid):
    import time
    b = broker_with(session_expiry_max=1)
    c = raw(b, 5)
    ack = c.connect(uid, properties={w.SESSION_EXPIRY: 3600})
    # the server uses a shorter interval and says so in CONNACK [MQTT-3.2.2.3.2]
    assert ack.props.get(w.SESSION_EXPIRY) == 1, ack
    c.subscribe("it/" + uid, qos=1)
    c.disconnect()
    time.sleep(1 + TIMER_SLACK)
    c = raw(b, 5)
    assert c.connect(uid, clean=False, properties={w.SESSION_EXPIRY: 3600}).session_present \
        is False


def test_bad_input_is_logged_with_client_id(broker, raw, uid):
    c = raw(broker, 5)
    c.connect(uid)
    c.send(b"\x30\xff\xff\xff\xff\x7f")
    c.wait_closed(5)
    import time
    time.sleep(0.3)
    log = broker.log_path.read_text(errors="replace")
    lines = [l for l in log.splitlines() if uid in l]
    assert lines, "the broker log never mentions the client id"
    assert any(k in l.lower() for l in lines for k in ("malformed", "protocol", "invalid",
                                                       "length", "error")), lines
    assert "panicked" not in log


def test_json_log_format_writes_one_json_object_per_line(broker_with):
    import json
    import time
    if IS_MOSQUITTO:
        pytest.skip("roost's log format")
    b = broker_with(log_format="json")
    c = w.RawClient(b.host, b.port, 4)
    c.connect("json-log-client")
    c.disconnect()
    time.sleep(0.3)
    lines = [l for l in b.log_path.read_text().splitlines() if l.strip()]
    records = [json.loads(l) for l in lines]
    assert any(r.get("fields", {}).get("client_id") == "json-log-client" for r in records), lines[-5:]


def test_sys_topics_are_published_retained_and_not_matched_by_hash(broker_with):
    if IS_MOSQUITTO:
        pytest.skip("roost's $SYS interval key")
    b = broker_with(sys_interval=1)
    watcher = w.RawClient(b.host, b.port, 4)
    watcher.connect("sys-watcher")
    watcher.subscribe([("$SYS/broker/#", 0)])
    everything = w.RawClient(b.host, b.port, 4)
    everything.connect("hash-watcher")
    everything.subscribe([("#", 0)])
    import time
    seen = {}
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        p = watcher.recv(0.2)
        if p is not None and p.type == w.PUBLISH:
            seen[p.topic] = p.payload
    assert seen.get("$SYS/broker/version", b"").startswith(b"roost ")
    assert int(seen["$SYS/broker/clients/connected"]) >= 2
    assert seen["$SYS/broker/uptime"].endswith(b" seconds")
    # The rest of Mosquitto's tree: byte counters, peaks and load averages.
    assert int(seen["$SYS/broker/bytes/received"]) > 0
    assert int(seen["$SYS/broker/clients/maximum"]) >= 2
    for name in ["messages/received", "bytes/sent", "connections"]:
        for window in ["1min", "5min", "15min"]:
            float(seen[f"$SYS/broker/load/{name}/{window}"])
    leaked = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        p = everything.recv(0.2)
        if p is not None and p.type == w.PUBLISH and p.topic.startswith("$SYS"):
            leaked.append(p.topic)
    assert not leaked, "# does not match $SYS topics"
    late = w.RawClient(b.host, b.port, 4)
    late.connect("sys-late")
    late.subscribe([("$SYS/broker/uptime", 0)])
    p = late.expect(w.PUBLISH)
    assert p.retain, "status topics are retained"
