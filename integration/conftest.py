"""Fixtures: the broker under test, client factories, and helpers shared by the tests."""

from __future__ import annotations

import itertools
import os
import shutil
import time
import uuid

import pytest

import mqttraw
from broker import IS_MOSQUITTO, KIND, Broker, free_port, wait_port
from pahoclient import Client

# Extra seconds allowed past a protocol deadline (keep-alive 1.5x, will delay, expiry).
# mosquitto 2.0 checks keep-alive only every few seconds, so it gets a wider margin.
TIMER_SLACK = 7.0 if IS_MOSQUITTO else 1.5

VERSIONS = [pytest.param(4, id="v311"), pytest.param(5, id="v5")]
# The same two versions as mosquitto_pub/mosquitto_sub's -V argument.
CLI_VERSIONS = [pytest.param("mqttv311", id="v311"), pytest.param("mqttv5", id="v5")]

needs_mosquitto_clients = pytest.mark.skipif(shutil.which("mosquitto_pub") is None,
                                             reason="mosquitto-clients not installed "
                                                    "(apt-get install mosquitto-clients)")


def pytest_sessionstart(session):
    # Build before any test runs, so the build is not charged to a test's timeout.
    if not IS_MOSQUITTO and not session.config.option.collectonly:
        from broker import roost_binary
        try:
            roost_binary()
        except RuntimeError as e:
            pytest.exit(str(e), returncode=2)


def pytest_report_header(config):
    return f"broker under test: {KIND} (ROOST_TEST_BROKER)"


def mosquitto_skip(reason):
    """Skip a test only when the suite runs against mosquitto (for mosquitto's own gaps)."""
    skip = IS_MOSQUITTO and os.environ.get("ROOST_TEST_NO_SKIP") != "1"
    return pytest.mark.skipif(skip, reason=f"mosquitto 2.0: {reason}")


# -- brokers ---------------------------------------------------------------------------------

class _Shared:
    broker: Broker | None = None


def _start(config=None):
    return Broker(config).start()


@pytest.fixture(scope="session")
def _shared_holder():
    yield _Shared
    b = _Shared.broker
    if b is not None:
        rc = b.terminate()
        log = b.log_tail()
        b.cleanup()
        assert rc == 0, f"shared broker exited with {rc} on SIGTERM:\n{log}"


@pytest.fixture
def broker(_shared_holder, request):
    """The shared broker with default limits (restarted if an earlier test killed it).

    After the test, the broker must still be running: a panic or crash fails the test that
    caused it, with the broker's log in the failure."""
    b = _shared_holder.broker
    if b is None or not b.alive():
        if b is not None:
            b.cleanup()
        b = _shared_holder.broker = _start()
    yield b
    if not b.alive():
        log = b.log_tail()
        pytest.fail(f"broker died during the test (exit {b.proc.returncode}):\n{log}")


@pytest.fixture
def broker_with():
    """Factory: a dedicated broker with extra config keys, e.g. broker_with(max_packet_size=1024).

    Stopped with SIGTERM after the test; it must exit 0."""
    started = []

    def make(**config):
        b = _start(config)
        started.append(b)
        return b

    yield make
    problems = []
    for b in started:
        alive = b.alive() or b.stopped
        rc = b.terminate()
        if not alive or rc != 0:
            problems.append(f"{b!r} {'died during the test' if not alive else 'exited'} "
                            f"with {rc}:\n{b.log_tail()}")
        b.cleanup()
    if problems:
        pytest.fail("\n".join(problems))


def tls_broker(broker_with, pki, **extra):
    """A dedicated broker with a TLS listener (the pki's server certificate) on b.tls_port."""
    port = free_port()
    b = broker_with(tls_bind=[f"127.0.0.1:{port}"], tls_cert=str(pki.server.cert_path),
                    tls_key=str(pki.server.key_path), **extra)
    wait_port(port)
    b.tls_port = port
    return b


def ws_broker(broker_with, pki=None, wss=False, **extra):
    """A dedicated broker with a WebSocket listener on b.ws_port: plain, or with wss=True
    over TLS with the pki's server certificate. Path /mqtt, subprotocol mqtt."""
    port = free_port()
    if wss:
        b = broker_with(wss_bind=[f"127.0.0.1:{port}"], tls_cert=str(pki.server.cert_path),
                        tls_key=str(pki.server.key_path), **extra)
    else:
        b = broker_with(ws_bind=[f"127.0.0.1:{port}"], **extra)
    wait_port(port)
    b.ws_port = port
    return b


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Test certificates (certs.make_pki): ca, server, client, and a rogue CA with its own."""
    pytest.importorskip("cryptography.x509")
    import certs
    return certs.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _show_broker_log(request):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and _Shared.broker is not None:
        print(f"--- broker log tail ({_Shared.broker!r}) ---\n{_Shared.broker.log_tail(40)}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# -- names and clients ------------------------------------------------------------------------

_counter = itertools.count()


@pytest.fixture
def uid(request):
    """A short unique string for client ids and topics of this test."""
    return f"{request.node.name[:24].replace('[', '-').replace(']', '')}-{next(_counter)}-" \
           f"{uuid.uuid4().hex[:6]}"


@pytest.fixture
def topic(uid):
    return f"it/{uid}"


@pytest.fixture
def clients():
    """Factory for paho clients: clients(broker, version, client_id, **kw). Closed after the test."""
    made = []

    def make(broker, version=4, client_id=None, **kw):
        cid = client_id if client_id is not None else f"p-{uuid.uuid4().hex[:10]}"
        c = Client(broker, version, cid, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.disconnect()
        except Exception:
            pass


@pytest.fixture
def raw():
    """Factory for raw wire clients: raw(broker, version). Closed after the test."""
    made = []

    def make(broker, version=4, timeout=10.0):
        c = mqttraw.RawClient(broker.host, broker.port, version, timeout)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def raw_subscriber(broker, version, topic_filter, qos=1, client_id=None, properties=None):
    """A connected raw client subscribed to one filter; the broker must grant `qos`."""
    c = mqttraw.RawClient(broker.host, broker.port, version)
    c.connect(client_id or f"sub-{uuid.uuid4().hex[:8]}")
    ack = c.subscribe([(topic_filter, qos)], properties=properties)
    assert ack.rcs == [qos], f"SUBACK {ack!r}"
    return c


def publish_acked(broker, version, topic, payloads, qos=1, retain=False):
    """A fresh raw client publishes each payload and waits for its PUBACK / PUBCOMP before
    the next; the broker must accept each one. `topic` is one topic or one per payload."""
    pub = mqttraw.RawClient(broker.host, broker.port, version)
    pub.connect(f"pub-{uuid.uuid4().hex[:8]}")
    for i, payload in enumerate(payloads, start=1):
        pub.publish(topic if isinstance(topic, str) else topic[i - 1], payload, qos=qos, pid=i,
                    retain=retain)
        if qos == 1:
            ack = pub.expect(mqttraw.PUBACK)
            assert ack.pid == i and ack.rc in (None, 0), f"PUBACK {ack!r}"
        elif qos == 2:
            assert pub.expect(mqttraw.PUBREC).pid == i
            pub.ack(mqttraw.PUBREL, i)
            assert pub.expect(mqttraw.PUBCOMP).pid == i
    pub.disconnect()


def receive_publishes(c, n, ack=True, timeout=10.0):
    """Receives n PUBLISH packets on raw client `c`, completing each QoS flow when ack is
    true (the broker may interleave its PUBRELs with further PUBLISHes). Any other packet
    fails the test."""
    got, open_qos2 = [], set()
    deadline = time.monotonic() + timeout
    while len(got) < n or (ack and open_qos2):
        p = c.recv(max(0.0, deadline - time.monotonic()))
        assert p is not None, f"only {len(got)} of {n} messages arrived"
        if p.type == mqttraw.PUBLISH:
            got.append(p)
            if ack and p.qos == 1:
                c.puback(p.pid)
            elif ack and p.qos == 2:
                c.ack(mqttraw.PUBREC, p.pid)
                open_qos2.add(p.pid)
        elif p.type == mqttraw.PUBREL and ack:
            assert p.pid in open_qos2, f"PUBREL for unknown id {p.pid}"
            open_qos2.discard(p.pid)
            c.ack(mqttraw.PUBCOMP, p.pid)
        else:
            raise AssertionError(f"unexpected {p!r}")
    return got


def publishes_until_quiet(c, quiet=1.0):
    """PUBLISH packets on raw client `c` until none arrives for `quiet` seconds, each QoS 1
    one acknowledged. Any other packet fails the test."""
    got = []
    while True:
        p = c.recv(quiet)
        if p is None:
            return got
        assert p.type == mqttraw.PUBLISH, f"unexpected {p!r}"
        got.append(p)
        if p.qos == 1:
            c.puback(p.pid)


def assert_broker_serves(broker, version=4):
    """The broker is alive and routes a QoS 1 message between two fresh clients."""
    assert broker.alive(), f"broker process is gone:\n{broker.log_tail()}"
    t = f"it/alive/{uuid.uuid4().hex[:8]}"
    sub = mqttraw.RawClient(broker.host, broker.port, version)
    pub = mqttraw.RawClient(broker.host, broker.port, version)
    try:
        sub.connect(f"alive-s-{uuid.uuid4().hex[:8]}")
        assert sub.subscribe(t, qos=1).rcs == [1]
        pub.connect(f"alive-p-{uuid.uuid4().hex[:8]}")
        pub.publish(t, b"still here", qos=1, pid=1)
        pub.expect(mqttraw.PUBACK)
        msg = sub.expect(mqttraw.PUBLISH)
        assert msg.topic == t and msg.payload == b"still here"
        sub.puback(msg.pid)
        pub.disconnect()
        sub.disconnect()
    finally:
        sub.close()
        pub.close()


# A v5 server SHOULD send DISCONNECT with the reason code before closing on a malformed
# packet or protocol error [MQTT-4.13.1]; roost promises to. mosquitto often just closes.
REQUIRE_V5_DISCONNECT = not IS_MOSQUITTO


def expect_error_close(c, codes, timeout=5.0):
    """The broker closes `c` because of what it just sent.

    v5: a DISCONNECT before the close, if any, carries one of `codes` (and one is required
    unless running against mosquitto). 3.1.1: the connection is simply closed (a 3.1.1
    server has no DISCONNECT to send). Returns the packets received before the close."""
    closed, got = c.wait_closed(timeout)
    assert closed, f"connection left open after bad input; received {got}"
    discs = [p for p in got if p.type == mqttraw.DISCONNECT]
    if c.version == 5:
        if discs:
            assert discs[-1].rc in codes, (
                f"DISCONNECT {discs[-1].rc:#x}, expected one of {[hex(x) for x in codes]}")
            assert discs[-1] is got[-1], f"packets after DISCONNECT: {got}"
        else:
            assert not REQUIRE_V5_DISCONNECT, (
                f"closed without DISCONNECT; expected reason {[hex(x) for x in codes]}")
    else:
        assert not discs, f"3.1.1 server sent DISCONNECT: {got}"
    return got


def wait_for(pred, timeout=5.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes several seconds (timers)")


@pytest.fixture
def netns_c3():
    """A 3-node roost cluster, each node in its own network namespace (root only; see
    `cluster.py`), started and stable; removed after the test."""
    from cluster import Cluster

    with Cluster(3, netns=True) as c:
        yield c


@pytest.fixture
def cluster_of():
    """`cluster_of(n)`: an n-node roost cluster, each node in its own network namespace,
    started and stable; every one made is removed after the test."""
    from cluster import Cluster

    made = []

    def make(n):
        c = Cluster(n, netns=True)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.cleanup()
