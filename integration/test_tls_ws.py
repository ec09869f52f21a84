"""TLS, mutual TLS, WebSocket and WebSocket-over-TLS listeners (roost only).

Certificates are made at test time (the `pki` fixture, certs.py): a test CA, a server
certificate for 127.0.0.1/localhost, client certificates from that CA, and a second
"rogue" CA whose certificates the broker must refuse. Clients: mosquitto_pub/sub
(--cafile/--cert/--key), paho-mqtt (TLS, transport="websockets"), Python's ssl module and
the raw wire client for plain TCP.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
import types
import uuid

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO, free_port, roost_binary, roost_passwd, wait_port
from conftest import (CLI_VERSIONS, VERSIONS, needs_mosquitto_clients, raw_subscriber,
                      tls_broker, wait_for, ws_broker)
from pahoclient import Client

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own TLS/WebSocket listener keys")


# -- helpers ---------------------------------------------------------------------------------

def at(port):
    """Something with host and port, for pahoclient.Client."""
    return types.SimpleNamespace(host="127.0.0.1", port=port)


def paho(port, version, transport="tcp", ca=None, cert=None, key=None, cid=None):
    c = Client(at(port), version, cid or f"tw-{uuid.uuid4().hex[:10]}", connect=False)
    c.c.transport = transport
    if transport == "websockets":
        c.c.ws_set_options(path="/mqtt")
    if ca:
        c.c.tls_set(ca_certs=str(ca), certfile=cert and str(cert), keyfile=key and str(key))
    return c.connect()


def mosquitto(tool, port, version, *args, timeout=10):
    return subprocess.run([tool, "-h", "127.0.0.1", "-p", str(port), "-V", version, *args],
                          capture_output=True, text=True, timeout=timeout)


def cli_roundtrip(port, version, tls_args, topic, payload):
    """mosquitto_sub waits for one message that mosquitto_pub sends, both over TLS."""
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", version,
                            "-t", topic, "-q", "1", "-C", "1", "-W", "10", *tls_args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # mosquitto_sub has no "subscribed" signal on stdout: publish until it gets one.
        deadline = time.monotonic() + 10
        while sub.poll() is None and time.monotonic() < deadline:
            r = mosquitto("mosquitto_pub", port, version, "-t", topic, "-m", payload, "-q", "1",
                          *tls_args)
            assert r.returncode == 0, f"mosquitto_pub over TLS failed: {r.stderr}"
            try:
                sub.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        out, err = sub.communicate(timeout=5)
    finally:
        if sub.poll() is None:
            sub.kill()
    assert sub.returncode == 0, f"mosquitto_sub over TLS failed: {err}"
    assert out.strip() == payload


def expect_on_plain(sub, topic, payload):
    msg = sub.expect(w.PUBLISH)
    assert (msg.topic, msg.payload, msg.qos) == (topic, payload, 1)
    sub.puback(msg.pid)


def tls_handshake(port, ca, maximum=None, minimum=None, cert=None, key=None):
    """A bare TLS handshake with Python's ssl; returns the negotiated version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    if minimum:
        ctx.minimum_version = minimum
    if maximum:
        ctx.maximum_version = maximum
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            # With TLS 1.3 a refused client certificate only shows on the first read.
            s.sendall(w.connect_packet(f"ssl-{uuid.uuid4().hex[:8]}", 4))
            first = s.recv(4)
            assert first[:1] == b"\x20", f"no CONNACK over TLS: {first!r}"
            return s.version()


# -- TLS -------------------------------------------------------------------------------------

@needs_mosquitto_clients
@pytest.mark.parametrize("version", CLI_VERSIONS)
def test_tls_mosquitto_clients_with_cafile(broker_with, pki, topic, version):
    b = tls_broker(broker_with, pki)
    cli_roundtrip(b.tls_port, version, ["--cafile", str(pki.ca.cert_path)], topic, "over tls")


@needs_mosquitto_clients
def test_tls_client_refuses_a_broker_it_does_not_trust(broker_with, pki, topic):
    b = tls_broker(broker_with, pki)
    r = mosquitto("mosquitto_pub", b.tls_port, "mqttv311", "-t", topic, "-m", "x",
                  "--cafile", str(pki.rogue_ca.cert_path))
    assert r.returncode != 0
    assert b.alive()


@pytest.mark.parametrize("version", VERSIONS)
def test_tls_paho_qos1_to_plain_tcp_subscriber(broker_with, pki, topic, version):
    b = tls_broker(broker_with, pki)
    sub = raw_subscriber(b, 4, topic)
    pub = paho(b.tls_port, version, ca=pki.ca.cert_path)
    try:
        pub.publish(topic, b"tls to tcp", qos=1)
        expect_on_plain(sub, topic, b"tls to tcp")
    finally:
        pub.disconnect()
        sub.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_12_and_13_accepted_11_refused(broker_with, pki):
    b = tls_broker(broker_with, pki)
    assert tls_handshake(b.tls_port, pki.ca.cert_path,
                         maximum=ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert tls_handshake(b.tls_port, pki.ca.cert_path,
                         minimum=ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this Python/OpenSSL cannot offer TLS 1.1: {e}")
    with socket.create_connection(("127.0.0.1", b.tls_port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with ctx.wrap_socket(raw) as s:
                s.sendall(w.connect_packet("tls11", 4))
                assert not s.recv(4), "a TLS 1.1 session was served"
    assert b.alive()


def test_silent_tls_client_does_not_block_others(broker_with, pki):
    """The handshake runs in the connection's task: a client that never speaks TLS holds
    only its own connection, and is dropped after connect_timeout."""
    b = tls_broker(broker_with, pki, connect_timeout=2)
    idle = [socket.create_connection(("127.0.0.1", b.tls_port)) for _ in range(3)]
    try:
        started = time.monotonic()
        assert tls_handshake(b.tls_port, pki.ca.cert_path) in ("TLSv1.2", "TLSv1.3")
        assert time.monotonic() - started < 1.5
        idle[0].settimeout(6)
        assert idle[0].recv(16) == b"", "silent TLS client not dropped"
    finally:
        for s in idle:
            s.close()


def test_tls_and_plain_listeners_serve_together(broker_with, pki, topic):
    b = tls_broker(broker_with, pki)
    pub = w.RawClient(b.host, b.port, 4)
    sub = paho(b.tls_port, 4, ca=pki.ca.cert_path)
    try:
        assert sub.subscribe(topic, qos=1) == [1]
        pub.connect(f"plain-{uuid.uuid4().hex[:8]}")
        pub.publish(topic, b"tcp to tls", qos=1, pid=7)
        assert pub.expect(w.PUBACK).pid == 7
        m = sub.get()
        assert (m.topic, m.payload, m.qos) == (topic, b"tcp to tls", 1)
    finally:
        sub.disconnect()
        pub.close()


# -- mutual TLS -----------------------------------------------------------------------------

@needs_mosquitto_clients
@pytest.mark.parametrize("version", CLI_VERSIONS)
def test_mtls_client_certificate_accepted(broker_with, pki, topic, version):
    b = tls_broker(broker_with, pki, tls_client_ca=str(pki.ca.cert_path))
    cli_roundtrip(b.tls_port, version,
                  ["--cafile", str(pki.ca.cert_path), "--cert", str(pki.client.cert_path),
                   "--key", str(pki.client.key_path)], topic, "mutual")


@needs_mosquitto_clients
@pytest.mark.parametrize("which", ["none", "rogue"])
def test_mtls_missing_or_unknown_client_certificate_refused(broker_with, pki, topic, which):
    b = tls_broker(broker_with, pki, tls_client_ca=str(pki.ca.cert_path))
    extra = [] if which == "none" else ["--cert", str(pki.rogue_client.cert_path),
                                        "--key", str(pki.rogue_client.key_path)]
    r = mosquitto("mosquitto_pub", b.tls_port, "mqttv311", "-t", topic, "-m", "x", "-q", "1",
                  "--cafile", str(pki.ca.cert_path), *extra)
    assert r.returncode != 0, "publish without a trusted client certificate succeeded"
    # Python's ssl, for an exact check that no CONNACK comes back.
    kw = {} if which == "none" else {"cert": pki.rogue_client.cert_path,
                                     "key": pki.rogue_client.key_path}
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, AssertionError)):
        tls_handshake(b.tls_port, pki.ca.cert_path, **kw)
    assert b.alive()


@pytest.mark.parametrize("version", VERSIONS)
def test_mtls_common_name_as_username(broker_with, pki, topic, version):
    """With tls_use_cn_as_username the certificate's CN is the client's username (it
    replaces what CONNECT says); the session works as any other."""
    b = tls_broker(broker_with, pki, tls_client_ca=str(pki.ca.cert_path),
                   tls_use_cn_as_username=True)
    sub = raw_subscriber(b, 4, topic)
    pub = Client(at(b.tls_port), version, f"cn-{uuid.uuid4().hex[:8]}", connect=False)
    pub.c.tls_set(ca_certs=str(pki.ca.cert_path), certfile=str(pki.client.cert_path),
                  keyfile=str(pki.client.key_path))
    pub.c.username_pw_set("someone-else")
    pub.connect()
    try:
        pub.publish(topic, b"as sensor-1", qos=1)
        expect_on_plain(sub, topic, b"as sensor-1")
        assert wait_for(lambda: "username=sensor-1" in b.log_tail(400)), b.log_tail()
    finally:
        pub.disconnect()
        sub.close()


# -- WebSocket -------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_websocket_paho_qos1_both_ways_with_plain_tcp(broker_with, topic, version):
    b = ws_broker(broker_with)
    ws = paho(b.ws_port, version, transport="websockets")
    tcp = w.RawClient(b.host, b.port, 4)
    try:
        # WebSocket subscriber, TCP publisher.
        assert ws.subscribe(f"{topic}/to-ws", qos=1) == [1]
        tcp.connect(f"plain-{uuid.uuid4().hex[:8]}")
        for i in range(20):
            tcp.publish(f"{topic}/to-ws", b"m%d" % i + b"x" * (i * 500), qos=1, pid=i + 1)
            assert tcp.expect(w.PUBACK).pid == i + 1
        got = ws.get_n(20)
        assert [m.payload for m in got] == [b"m%d" % i + b"x" * (i * 500) for i in range(20)]
        assert all(m.qos == 1 for m in got)
        # WebSocket publisher, TCP subscriber.
        assert tcp.subscribe(f"{topic}/to-tcp", qos=1, pid=99).rcs == [1]
        ws.publish(f"{topic}/to-tcp", b"from the browser side", qos=1)
        expect_on_plain(tcp, f"{topic}/to-tcp", b"from the browser side")
    finally:
        ws.disconnect()
        tcp.close()


def test_websocket_mqtt_split_across_frames(broker_with, topic):
    """MQTT bytes in any split over binary frames: a CONNECT in three frames, then a
    SUBSCRIBE and a PINGREQ in one frame."""
    b = ws_broker(broker_with)
    s = ws_connect(b.ws_port)
    try:
        connect = w.connect_packet(f"split-{uuid.uuid4().hex[:8]}", 4)
        for part in (connect[:1], connect[1:5], connect[5:]):
            ws_send(s, part)
        assert ws_recv(s)[:2] == b"\x20\x02"
        ws_send(s, w.subscribe_packet(1, [(topic, 1)], 4) + b"\xc0\x00")
        got = b""
        while len(got) < 7:
            got += ws_recv(s)
        assert got[:1] == b"\x90" and got[-2:] == b"\xd0\x00", got
    finally:
        s.close()


def test_websocket_wrong_path_or_subprotocol_refused(broker_with):
    b = ws_broker(broker_with)
    for path, proto in [("/other", "mqtt"), ("/mqtt", "chat")]:
        s = socket.create_connection(("127.0.0.1", b.ws_port), timeout=5)
        try:
            s.sendall(_upgrade_request(path, proto))
            status = s.recv(4096).split(b"\r\n", 1)[0]
            assert b" 101 " not in status, f"{path} {proto}: {status!r}"
            assert b" 404 " in status or b" 400 " in status, status
        finally:
            s.close()
    s = ws_connect(b.ws_port)
    s.close()


def test_wss_paho_qos1_with_plain_tcp(broker_with, pki, topic):
    b = ws_broker(broker_with, pki, wss=True)
    sub = raw_subscriber(b, 4, topic)
    ws = paho(b.ws_port, 5, transport="websockets", ca=pki.ca.cert_path)
    try:
        ws.publish(topic, b"over wss", qos=1)
        expect_on_plain(sub, topic, b"over wss")
        assert ws.subscribe(f"{topic}/back", qos=1) == [1]
        pub = w.RawClient(b.host, b.port, 4)
        pub.connect(f"plain-{uuid.uuid4().hex[:8]}")
        pub.publish(f"{topic}/back", b"to wss", qos=1, pid=3)
        assert pub.expect(w.PUBACK).pid == 3
        pub.close()
        assert ws.get().payload == b"to wss"
    finally:
        ws.disconnect()
        sub.close()


def test_wss_with_client_certificates(broker_with, pki, topic):
    b = ws_broker(broker_with, pki, wss=True, tls_client_ca=str(pki.ca.cert_path))
    ws = paho(b.ws_port, 4, transport="websockets", ca=pki.ca.cert_path,
              cert=pki.client.cert_path, key=pki.client.key_path)
    try:
        assert ws.subscribe(topic, qos=1) == [1]
    finally:
        ws.disconnect()
    with pytest.raises((AssertionError, ssl.SSLError, ConnectionError, OSError)):
        paho(b.ws_port, 4, transport="websockets", ca=pki.ca.cert_path)


def _upgrade_request(path, proto):
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {proto}\r\n\r\n").encode()


def ws_connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(_upgrade_request("/mqtt", "mqtt"))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, "closed during the upgrade"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"sec-websocket-protocol: mqtt" in head.lower(), head
    return s


def ws_send(s, payload):
    """One masked binary frame (clients must mask)."""
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = b"\x82" + (bytes([0x80 | n]) if n < 126 else b"\xfe" + n.to_bytes(2, "big"))
    s.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))


def ws_recv(s):
    """The payload of the next binary frame from the server (unmasked)."""
    def exact(n):
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            assert chunk, "closed"
            out += chunk
        return out
    b0, b1 = exact(2)
    assert b0 == 0x82, f"not a final binary frame: {b0:#x}"
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(exact(2), "big")
    elif n == 127:
        n = int.from_bytes(exact(8), "big")
    return exact(n)


# -- reload and config ----------------------------------------------------------------------

@needs_mosquitto_clients
def test_sighup_reloads_the_certificate(broker_with, pki, topic):
    """Replacing the cert/key files and sending SIGHUP switches new handshakes to the new
    certificate; the broker keeps running, and a connection made before stays up."""
    cert = pki.dir / f"live-{uuid.uuid4().hex[:6]}.crt"
    key = pki.dir / f"live-{uuid.uuid4().hex[:6]}.key"
    shutil.copy(pki.server.cert_path, cert)
    shutil.copy(pki.server.key_path, key)
    port = free_port()
    b = broker_with(tls_bind=[f"127.0.0.1:{port}"], tls_cert=str(cert), tls_key=str(key))
    wait_port(port)
    before = paho(port, 4, ca=pki.ca.cert_path)

    def pub_with(ca):
        return mosquitto("mosquitto_pub", port, "mqttv311", "-t", topic, "-m", "x",
                         "--cafile", str(ca)).returncode == 0

    assert pub_with(pki.ca.cert_path) and not pub_with(pki.rogue_ca.cert_path)
    shutil.copy(pki.rogue_server.cert_path, cert)
    shutil.copy(pki.rogue_server.key_path, key)
    b.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: pub_with(pki.rogue_ca.cert_path), timeout=10), b.log_tail()
    assert not pub_with(pki.ca.cert_path)
    assert b.alive()
    # A broken file on reload keeps the certificate in force.
    key.write_text("garbage")
    b.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "TLS reload failed" in b.log_tail(400), timeout=10), b.log_tail()
    assert pub_with(pki.rogue_ca.cert_path)
    try:
        assert before.subscribe(topic, qos=1) == [1], "connection made before reload broke"
    finally:
        before.disconnect()


@pytest.mark.parametrize("keys,named", [
    ({"tls_bind": ["127.0.0.1:1"]}, ["tls_bind", "tls_cert"]),
    ({"wss_bind": ["127.0.0.1:1"], "tls_cert": "c.pem"}, ["wss_bind", "tls_key"]),
    ({"tls_bind": ["127.0.0.1:1"], "tls_cert": "/nonexistent/c.pem",
      "tls_key": "/nonexistent/k.pem"}, ["tls_cert", "/nonexistent/c.pem"]),
    ({"tls_use_cn_as_username": True}, ["tls_use_cn_as_username"]),
])
def test_bad_tls_config_is_a_clear_error(tmp_path, keys, named):
    from broker import _toml_value
    cfg = tmp_path / "roost.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\nbind = ["127.0.0.1:{free_port()}"]\n'
                   + "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items()))
    r = subprocess.run([roost_binary(), "--config", str(cfg)], capture_output=True, text=True,
                       timeout=10, cwd=tmp_path)
    assert r.returncode != 0, "bad TLS config accepted"
    out = r.stdout + r.stderr
    for name in named:
        assert name in out, f"error does not name {name!r}:\n{out}"
    assert "panicked" not in out


def test_help_lists_listener_flags():
    r = subprocess.run([roost_binary(), "--help"], capture_output=True, text=True, timeout=10)
    for flag in ("--tls-bind", "--tls-cert", "--tls-key", "--tls-client-ca", "--ws-bind",
                 "--wss-bind", "--tls-use-cn-as-username"):
        assert flag in r.stdout, f"{flag} missing from --help"


def test_listener_flags_on_the_command_line(tmp_path, pki, topic):
    tcp, tls, ws = free_port(), free_port(), free_port()
    proc = subprocess.Popen([roost_binary(), "--bind", f"127.0.0.1:{tcp}", "--tls-bind",
                             f"127.0.0.1:{tls}", "--tls-cert", str(pki.server.cert_path),
                             "--tls-key", str(pki.server.key_path), "--tls-client-ca",
                             str(pki.ca.cert_path), "--ws-bind", f"127.0.0.1:{ws}",
                             "--data-dir", str(tmp_path / "d")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        for port in (tcp, tls, ws):
            wait_port(port)
        assert tls_handshake(tls, pki.ca.cert_path, cert=pki.client.cert_path,
                             key=pki.client.key_path)
        ws_connect(ws).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_mtls_common_name_is_the_username_for_auth_and_acl(broker_with, pki, tmp_path, topic,
                                                           version):
    """With a password file and an ACL: the certificate's CN (sensor-1) logs in without a
    password, whatever username CONNECT claims, and the ACL's `user sensor-1` and `%u`
    rules apply to it; the same username over plain TCP without a password is refused."""
    pw = tmp_path / "passwd"
    roost_passwd("-b", pw, "watcher", "pw")
    acl = tmp_path / "acl"
    acl.write_text(f"user watcher\nallow read,subscribe {topic}/#\n"
                   f"user sensor-1\nallow write {topic}/devices/%u/#\n")
    b = tls_broker(broker_with, pki, tls_client_ca=str(pki.ca.cert_path),
                   tls_use_cn_as_username=True, password_file=str(pw), acl_file=str(acl))
    sub = w.RawClient(b.host, b.port, version)
    sub.connect(f"watch-{uuid.uuid4().hex[:8]}", username="watcher", password=b"pw")
    assert sub.subscribe(f"{topic}/#", qos=1).rcs == [1]
    dev = Client(at(b.tls_port), version, f"cn-{uuid.uuid4().hex[:8]}", connect=False)
    dev.c.tls_set(ca_certs=str(pki.ca.cert_path), certfile=str(pki.client.cert_path),
                  keyfile=str(pki.client.key_path))
    dev.c.username_pw_set("watcher")  # replaced by the CN: no password needed, no watcher rights
    dev.connect()
    try:
        dev.publish(f"{topic}/devices/sensor-1/t", b"21.5", qos=1)
        msg = sub.expect(w.PUBLISH)
        assert (msg.topic, msg.payload) == (f"{topic}/devices/sensor-1/t", b"21.5")
        sub.puback(msg.pid)
        dev.publish(f"{topic}/devices/sensor-2/t", b"spoof", qos=1)
        assert dev.subscribe(f"{topic}/#", qos=1) == ([0x87] if version == 5 else [0x80])
        with pytest.raises(AssertionError):
            sub.expect(w.PUBLISH, timeout=1)
    finally:
        dev.disconnect()
        sub.close()
    plain = w.RawClient(b.host, b.port, version)
    try:
        ack = plain.connect(f"plain-{uuid.uuid4().hex[:8]}", username="sensor-1", expect_rc=None)
        assert ack.rc == (0x86 if version == 5 else 4), f"CONNACK {ack.rc:#x}"
    finally:
        plain.close()
