"""Authentication (password file, `roost passwd`, SIGHUP reload, HTTP auth hook) and ACLs.

roost-specific: the files, the CLI and the hook are roost's own, so these tests are skipped
when the suite runs against mosquitto.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import stat
import subprocess
import threading
import time
import uuid

import pytest

import mqttraw
from broker import IS_MOSQUITTO, free_port, roost_binary, roost_passwd
from conftest import VERSIONS, publishes_until_quiet, wait_for
from pahoclient import Client

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own auth files, CLI and hook")

# CONNACK codes: (MQTT 3.1.1 return code, MQTT 5.0 reason code).
BAD_CREDENTIALS = {4: 4, 5: 0x86}
NOT_AUTHORIZED = {4: 5, 5: 0x87}
UNAVAILABLE = {4: 3, 5: 0x88}
# A refused subscription: 3.1.1 knows only 0x80, 5.0 says 0x87 not authorized.
SUB_DENIED = {4: 0x80, 5: 0x87}


def cid():
    return f"auth-{uuid.uuid4().hex[:10]}"


def connect_rc(broker, version, **kw):
    """Connects a raw client and returns (client, CONNACK code); the client stays open."""
    c = mqttraw.RawClient(broker.host, broker.port, version)
    ack = c.connect(kw.pop("client_id", cid()), expect_rc=None, **kw)
    return c, ack.rc


def assert_refused(broker, version, code, **kw):
    c, rc = connect_rc(broker, version, **kw)
    try:
        assert rc == code, f"CONNACK {rc:#x}, expected {code:#x}"
        closed, _ = c.wait_closed(5)
        assert closed, "connection left open after a refused CONNECT"
    finally:
        c.close()


def assert_accepted(broker, version, **kw):
    c, rc = connect_rc(broker, version, **kw)
    try:
        assert rc == 0, f"CONNACK {rc:#x}, expected success"
    finally:
        c.disconnect()
        c.close()


@pytest.fixture
def password_file(tmp_path):
    """A password file made with `roost passwd -b`: alice/wonderland, bob/builder."""
    path = tmp_path / "passwd"
    roost_passwd("-b", path, "alice", "wonderland")
    roost_passwd("-b", path, "bob", "builder")
    return path


# -- password file ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_anonymous_denied_with_password_file(broker_with, password_file, version):
    b = broker_with(password_file=str(password_file))
    assert_refused(b, version, NOT_AUTHORIZED[version])
    assert_accepted(b, version, username="alice", password=b"wonderland")


@pytest.mark.parametrize("version", VERSIONS)
def test_good_and_bad_password(broker_with, password_file, version):
    b = broker_with(password_file=str(password_file))
    assert_accepted(b, version, username="alice", password=b"wonderland")
    assert_accepted(b, version, username="bob", password=b"builder")
    bad = BAD_CREDENTIALS[version]
    assert_refused(b, version, bad, username="alice", password=b"builder")
    assert_refused(b, version, bad, username="alice")
    assert_refused(b, version, bad, username="mallory", password=b"wonderland")
    # A v5 client is told why; the log names the client and its address, not the password.
    if version == 5:
        c = mqttraw.RawClient(b.host, b.port, 5)
        ack = c.connect("why-c", username="alice", password=b"nope-secret", expect_rc=None)
        c.close()
        assert ack.rc == 0x86
        assert "password" in ack.props.get(mqttraw.REASON_STRING, ""), ack.props
    assert wait_for(lambda: "bad username or password" in b.log_tail(300), 5), b.log_tail()
    log = b.log_tail(300)
    assert "127.0.0.1" in log and "nope" not in log and "wonderland" not in log


def test_real_client_logs_in(broker_with, password_file, uid):
    b = broker_with(password_file=str(password_file))
    for version in (4, 5):
        c = Client(b, version, f"{uid}-{version}", connect=False)
        c.c.username_pw_set("alice", "wonderland")
        c.connect()
        c.subscribe(f"t/{uid}", qos=1)
        c.publish(f"t/{uid}", b"hi", qos=1)
        assert c.get().payload == b"hi"
        c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_allow_anonymous_next_to_password_file(broker_with, password_file, version):
    b = broker_with(password_file=str(password_file), allow_anonymous=True)
    assert_accepted(b, version)
    assert_refused(b, version, BAD_CREDENTIALS[version], username="alice", password=b"x")


def test_allow_anonymous_false_without_users(broker_with):
    b = broker_with(allow_anonymous=False)
    assert_refused(b, 4, NOT_AUTHORIZED[4])
    assert_refused(b, 5, NOT_AUTHORIZED[5])


# -- roost passwd -----------------------------------------------------------------------------

def test_passwd_batch_creates_a_working_file(tmp_path, broker_with):
    path = tmp_path / "users"
    roost_passwd("-b", path, "carol", "s3cret pass")
    text = path.read_text()
    assert text.startswith("carol:$argon2id$"), text
    assert "s3cret" not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Salted: the same password twice gives different hashes.
    roost_passwd("-b", path, "dave", "s3cret pass")
    hashes = [line.split(":", 1)[1] for line in path.read_text().splitlines()]
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    b = broker_with(password_file=str(path))
    assert_accepted(b, 4, username="carol", password=b"s3cret pass")
    assert_accepted(b, 5, username="dave", password=b"s3cret pass")
    # Changing a password replaces the line.
    roost_passwd("-b", path, "carol", "new")
    assert len(path.read_text().splitlines()) == 2


def test_passwd_delete_removes_the_user(tmp_path, broker_with):
    path = tmp_path / "users"
    roost_passwd("-b", path, "erin", "pw1")
    roost_passwd("-b", path, "frank", "pw2")
    roost_passwd("-D", path, "erin")
    assert [line.split(":")[0] for line in path.read_text().splitlines()] == ["frank"]
    r = roost_passwd("-D", path, "erin", check=False)
    assert r.returncode != 0 and "erin" in r.stderr
    b = broker_with(password_file=str(path))
    assert_refused(b, 5, BAD_CREDENTIALS[5], username="erin", password=b"pw1")
    assert_accepted(b, 5, username="frank", password=b"pw2")


def test_passwd_usage_errors(tmp_path):
    path = tmp_path / "users"
    for args in (["-b", path, "x"], [path, "x", "pw"], ["-b", path, "a:b", "pw"],
                 ["-D", tmp_path / "missing", "x"]):
        r = roost_passwd(*args, check=False)
        assert r.returncode != 0, args
        assert r.stderr.strip(), args
    # Without -b and without a terminal there is nobody to ask: a clear error, no file.
    r = roost_passwd(path, "x", check=False)
    assert r.returncode != 0 and "password" in r.stderr.lower()
    assert not path.exists()


def test_broker_refuses_a_bad_password_file(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("alice:wonderland\n")
    data = tmp_path / "data"
    r = subprocess.run([roost_binary(), "--bind", f"127.0.0.1:{free_port()}", "--data-dir",
                        str(data), "--password-file", str(path)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert r.returncode != 0
    assert "password_file" in r.stderr and "line 1" in r.stderr, r.stderr


# -- SIGHUP -----------------------------------------------------------------------------------

def test_sighup_reloads_users_without_dropping_connections(broker_with, password_file, uid):
    acl = password_file.parent / "acl"
    acl.write_text(f"everyone\nallow all t/{uid}/#\n")
    b = broker_with(password_file=str(password_file), acl_file=str(acl))
    alice = mqttraw.RawClient(b.host, b.port, 5)
    alice.connect(f"{uid}-alice", username="alice", password=b"wonderland")
    assert alice.subscribe(f"t/{uid}/#", qos=1).rcs == [1]
    assert_refused(b, 5, BAD_CREDENTIALS[5], username="grace", password=b"hopper")

    roost_passwd("-b", password_file, "grace", "hopper")
    b.proc.send_signal(signal.SIGHUP)

    def grace_gets_in():
        c, rc = connect_rc(b, 5, client_id=f"{uid}-grace", username="grace",
                           password=b"hopper")
        if rc != 0:
            c.close()
            return None
        return c

    grace = None
    deadline = time.monotonic() + 5
    while grace is None and time.monotonic() < deadline:
        grace = grace_gets_in()
        if grace is None:
            time.sleep(0.1)
    assert grace is not None, f"new user refused after SIGHUP:\n{b.log_tail()}"
    # The connection made before the reload is still there and still served.
    grace.publish(f"t/{uid}/x", b"after reload", qos=1, pid=1)
    assert grace.expect(mqttraw.PUBACK).rc == 0
    msg = alice.expect(mqttraw.PUBLISH)
    assert msg.payload == b"after reload"
    alice.puback(msg.pid)

    # A broken file on the next SIGHUP keeps the previous users.
    password_file.write_text("grace:plaintext\n")
    b.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "keeping the previous version" in b.log_tail(200), 5), b.log_tail()
    assert_accepted(b, 5, username="grace", password=b"hopper")
    assert b.alive()
    grace.disconnect()
    alice.disconnect()


def test_sighup_reloads_acl_for_live_connections(broker_with, tmp_path, uid):
    acl = tmp_path / "acl"
    acl.write_text(f"everyone\nallow write t/{uid}/a\n")
    b = broker_with(acl_file=str(acl))
    c = mqttraw.RawClient(b.host, b.port, 5)
    c.connect(f"{uid}-c")
    c.publish(f"t/{uid}/b", b"x", qos=1, pid=1)
    assert c.expect(mqttraw.PUBACK).rc == 0x87
    acl.write_text(f"everyone\nallow write t/{uid}/b\n")
    b.proc.send_signal(signal.SIGHUP)
    pid = iter(range(2, 1000))

    def allowed():
        p = next(pid)
        c.publish(f"t/{uid}/b", b"x", qos=1, pid=p)
        return c.expect(mqttraw.PUBACK).rc == 0

    assert wait_for(allowed, 5, 0.1), b.log_tail()
    c.publish(f"t/{uid}/a", b"x", qos=1, pid=999)
    assert c.expect(mqttraw.PUBACK).rc == 0x87
    c.disconnect()


# -- ACLs -------------------------------------------------------------------------------------

ACL = """\
# test ACL
everyone
allow read,subscribe public/#
allow all users/%u/#
allow all clients/%c/#

user alice
allow write public/#
allow subscribe feed/#
allow read feed/public/#

user watcher
allow read,subscribe #
allow read,subscribe $SYS/#
allow read,subscribe $queue/#

user producer
allow write $queue/jobs/#
allow write $SYS/test/#

user consumer
allow subscribe,read $queue/jobs/#

user feeder
allow write feed/#
"""


@pytest.fixture
def acl_broker(broker_with, tmp_path):
    path = tmp_path / "acl"
    path.write_text(ACL)
    return broker_with(acl_file=str(path))


def raw_client(broker, version, username=None, client_id=None):
    c = mqttraw.RawClient(broker.host, broker.port, version)
    c.connect(client_id or cid(), username=username)
    return c


@pytest.mark.parametrize("version", VERSIONS)
def test_acl_publish_allow_and_deny(acl_broker, version):
    b = acl_broker
    watcher = raw_client(b, 5, "watcher")
    assert watcher.subscribe("#", qos=1).rcs == [1]
    bob = raw_client(b, version, "bob")
    # Denied: v5 says 0x87 on PUBACK/PUBREC; 3.1.1 acknowledges and drops.
    bob.publish("public/news", b"denied-0", qos=0)
    bob.publish("public/news", b"denied-1", qos=1, pid=1)
    ack = bob.expect(mqttraw.PUBACK)
    assert ack.pid == 1 and ack.rc == (0x87 if version == 5 else 0)
    bob.publish("public/news", b"denied-2", qos=2, pid=2)
    rec = bob.expect(mqttraw.PUBREC)
    assert rec.pid == 2 and rec.rc == (0x87 if version == 5 else 0)
    if version == 4:
        bob.ack(mqttraw.PUBREL, 2)
        assert bob.expect(mqttraw.PUBCOMP).pid == 2
    # Allowed: under the user's own tree (%u), and alice may write public/#.
    bob.publish("users/bob/x", b"allowed-bob", qos=1, pid=3)
    assert bob.expect(mqttraw.PUBACK).rc == 0
    alice = raw_client(b, version, "alice")
    alice.publish("public/news", b"allowed-alice", qos=1, pid=1)
    assert alice.expect(mqttraw.PUBACK).rc == 0
    got = [m.payload for m in publishes_until_quiet(watcher)]
    assert sorted(got) == [b"allowed-alice", b"allowed-bob"], got
    # The denied publishes did not cost the connections.
    bob.pingreq()
    assert bob.expect(mqttraw.PINGRESP)
    for c in (bob, alice, watcher):
        c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_acl_subscribe_allow_and_deny(acl_broker, version):
    c = raw_client(acl_broker, version, "bob", client_id="dev-9")
    ack = c.subscribe([("public/#", 1), ("secret/#", 1), ("users/bob/+", 0),
                       ("users/alice/#", 0), ("clients/dev-9/#", 1), ("#", 0)])
    denied = SUB_DENIED[version]
    assert ack.rcs == [1, denied, 0, denied, 1, denied]
    c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_acl_filters_deliveries_per_topic(acl_broker, version):
    """A wildcard subscription only brings what the client may read, retained included."""
    b = acl_broker
    feeder = raw_client(b, 5, "feeder")
    feeder.publish("feed/private/r", b"private-retained", qos=1, pid=1, retain=True)
    feeder.publish("feed/public/r", b"public-retained", qos=1, pid=2, retain=True)
    assert [feeder.expect(mqttraw.PUBACK).rc for _ in range(2)] == [0, 0]
    alice = raw_client(b, version, "alice")
    assert alice.subscribe("feed/#", qos=1).rcs == [1]
    first = alice.expect(mqttraw.PUBLISH)
    assert first.payload == b"public-retained" and first.retain
    alice.puback(first.pid)
    for i, t in enumerate(["feed/private/1", "feed/public/1", "feed/private/2",
                           "feed/public/2"]):
        feeder.publish(t, t.encode(), qos=1, pid=10 + i)
        assert feeder.expect(mqttraw.PUBACK).rc == 0
    got = [m.topic for m in publishes_until_quiet(alice)]
    assert got == ["feed/public/1", "feed/public/2"]
    alice.disconnect()
    feeder.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_acl_dollar_topics_are_covered(acl_broker, version):
    b = acl_broker
    bob = raw_client(b, version, "bob")
    # `#`-style grants never reach $SYS or $queue: bob has none for them.
    bob.publish("$SYS/test/x", b"x", qos=1, pid=1)
    assert bob.expect(mqttraw.PUBACK).rc == (0x87 if version == 5 else 0)
    bob.publish("$queue/jobs", b"x", qos=1, pid=2)
    assert bob.expect(mqttraw.PUBACK).rc == (0x87 if version == 5 else 0)
    denied = SUB_DENIED[version]
    ack = bob.subscribe([("$SYS/#", 0), ("$queue/jobs", 1), ("$share/g/$queue/jobs", 1)])
    assert ack.rcs == [denied, denied, denied]
    # Rules that name them grant them.
    producer = raw_client(b, version, "producer")
    producer.publish("$queue/jobs", b"job", qos=1, pid=1)
    assert producer.expect(mqttraw.PUBACK).rc == 0
    producer.publish("$SYS/test/x", b"x", qos=1, pid=2)
    assert producer.expect(mqttraw.PUBACK).rc == 0
    consumer = raw_client(b, version, "consumer")
    ack = consumer.subscribe([("$share/g/$queue/jobs", 1), ("$queue/jobs/+", 1),
                              ("$queue/other", 1)])
    assert ack.rcs == [1, 1, denied]
    for c in (bob, producer, consumer):
        c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_acl_will_topic_must_be_writable(acl_broker, version):
    assert_refused(acl_broker, version, NOT_AUTHORIZED[version], username="bob",
                   will=dict(topic="public/will", payload=b"bye"))
    assert_accepted(acl_broker, version, username="bob",
                    will=dict(topic="users/bob/will", payload=b"bye"))


# -- HTTP auth hook ---------------------------------------------------------------------------

class Hook:
    """A tiny HTTP auth service on a free loopback port: allows hooky/letmein."""

    def __init__(self, delay=0.0):
        self.requests = []
        self.delay = delay
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = json.loads(body)
                hook.requests.append(req)
                if hook.delay:
                    time.sleep(hook.delay)
                ok = req.get("username") == "hooky" and req.get("password") == "letmein"
                if req.get("username") == "bodydeny":
                    out = b'{"result": "deny"}'
                    self.send_response(200)
                else:
                    out = b'{"result": "allow"}' if ok else b'{}'
                    self.send_response(200 if ok else 403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/mqtt/auth"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.stop()


@pytest.mark.parametrize("version", VERSIONS)
def test_auth_hook_allows_and_denies(broker_with, hook, version):
    b = broker_with(auth_hook={"url": hook.url, "timeout_ms": 2000, "cache_seconds": 60})
    client_id = cid()
    assert_accepted(b, version, client_id=client_id, username="hooky", password=b"letmein")
    req = hook.requests[-1]
    assert req["client_id"] == client_id
    assert req["username"] == "hooky"
    assert req["password"] == "letmein" and req["password_encoding"] == "utf-8"
    assert req["peer"].startswith("127.0.0.1:")
    assert req["protocol"] == ("5.0" if version == 5 else "3.1.1")
    assert_refused(b, version, BAD_CREDENTIALS[version], username="hooky", password=b"nope")
    assert_refused(b, version, BAD_CREDENTIALS[version], username="bodydeny", password=b"x")
    # Anonymous clients are asked about too (allow_anonymous defaults to false with a hook).
    assert_refused(b, version, BAD_CREDENTIALS[version])
    # The same credentials again come from the cache.
    asked = len(hook.requests)
    assert_accepted(b, version, client_id=client_id, username="hooky", password=b"letmein")
    assert len(hook.requests) == asked


@pytest.mark.parametrize("on_error", ["unavailable", "deny"])
def test_auth_hook_down(broker_with, on_error):
    port = free_port()  # nobody listens there
    b = broker_with(auth_hook={"url": f"http://127.0.0.1:{port}/auth", "timeout_ms": 500,
                               "on_error": on_error})
    codes = UNAVAILABLE if on_error == "unavailable" else BAD_CREDENTIALS
    for version in (4, 5):
        assert_refused(b, version, codes[version], username="hooky", password=b"letmein")
    assert b.alive()


def test_auth_hook_timeout_is_bounded(broker_with):
    slow = Hook(delay=5.0)
    try:
        b = broker_with(auth_hook={"url": slow.url, "timeout_ms": 300})
        start = time.monotonic()
        assert_refused(b, 5, UNAVAILABLE[5], username="hooky", password=b"letmein")
        assert time.monotonic() - start < 3.0
        # The broker keeps serving meanwhile.
        assert b.alive()
    finally:
        slow.delay = 0
        slow.stop()


def test_auth_hook_next_to_password_file(broker_with, password_file, hook):
    b = broker_with(password_file=str(password_file), auth_hook={"url": hook.url})
    # Users in the file are decided by the file, without asking the hook.
    assert_accepted(b, 5, username="alice", password=b"wonderland")
    assert_refused(b, 5, BAD_CREDENTIALS[5], username="alice", password=b"letmein")
    assert all(r["username"] != "alice" for r in hook.requests)
    # Others go to the hook.
    assert_accepted(b, 5, username="hooky", password=b"letmein")
