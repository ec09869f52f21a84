"""MQTT 5 enhanced authentication with SCRAM-SHA-256 (RFC 5802 / RFC 7677), driven by hand.

The client side of SCRAM is written out here with hashlib/hmac, independently of the
broker's Rust code, and the AUTH packets are built byte by byte (mqttraw), so each step of
CONNECT -> AUTH 0x18 -> AUTH 0x18 -> CONNACK is checked as a client sees it, including the
server signature that proves the broker knows the user's verifier.

roost-specific (the password file and `roost passwd`), so skipped against mosquitto.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import signal
import time

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO, roost_passwd as passwd
from conftest import wait_for

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own password file and CLI")

METHOD = "SCRAM-SHA-256"


class ScramClient:
    """The client half of one SCRAM-SHA-256 exchange (no channel binding)."""

    def __init__(self, user: str, password: str):
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        name = user.replace("=", "=3D").replace(",", "=2C")
        self.bare = f"n={name},r={self.nonce}"
        self.expected_server_final = None

    def first(self) -> bytes:
        return f"n,,{self.bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(a.split("=", 1) for a in text.split(","))
        assert attrs["r"].startswith(self.nonce) and len(attrs["r"]) > len(self.nonce), text
        salt = base64.b64decode(attrs["s"])
        iterations = int(attrs["i"])
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        stored_key = hashlib.sha256(client_key).digest()
        server_key = hmac.new(salted, b"Server Key", "sha256").digest()
        without_proof = f"c={base64.b64encode(b'n,,').decode()},r={attrs['r']}"
        auth_message = f"{self.bare},{text},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_signature = hmac.new(server_key, auth_message, "sha256").digest()
        self.expected_server_final = b"v=" + base64.b64encode(server_signature)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def start(b, uid, user, password, **connect_kw):
    """Sends CONNECT with the client-first-message; returns (raw client, SCRAM client, AUTH)."""
    c = w.RawClient(b.host, b.port, 5)
    scram = ScramClient(user, password)
    props = [(w.AUTH_METHOD, METHOD), (w.AUTH_DATA, scram.first())]
    c.send(w.connect_packet(uid, 5, properties=props, **connect_kw))
    return c, scram, c.recv()


def scram_connect(b, uid, user, password):
    """The whole exchange; returns (client, CONNACK, SCRAM client)."""
    c, scram, challenge = start(b, uid, user, password)
    assert challenge.type == w.AUTH, challenge
    assert challenge.rc == 0x18, challenge
    assert challenge.props[w.AUTH_METHOD] == METHOD
    c.send(w.auth_packet(0x18, METHOD, scram.final(challenge.props[w.AUTH_DATA])))
    return c, c.expect(w.CONNACK), scram


def refused(c, ack, code):
    assert ack.rc == code, f"CONNACK {ack!r}, expected {code:#x}"
    closed, _ = c.wait_closed(5)
    assert closed, "connection left open after a refused authentication"
    c.close()


def still_serves(b):
    """The broker is alive and lets alice in with her plain password."""
    c = w.RawClient(b.host, b.port, 5)
    c.connect("still-serves", username="alice", password=b"wonderland")
    c.pingreq()
    c.expect(w.PINGRESP)
    c.disconnect()
    c.close()


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "passwd"
    passwd("-b", path, "alice", "wonderland")
    passwd("-b", path, "bob,=odd", "builder")
    return path


def test_good_password_gets_connack_with_a_server_signature_the_client_checks(
        broker_with, password_file, uid):
    b = broker_with(password_file=str(password_file))
    c, ack, scram = scram_connect(b, uid, "alice", "wonderland")
    assert ack.rc == 0, ack
    assert ack.props[w.AUTH_METHOD] == METHOD, ack.props
    assert ack.props[w.AUTH_DATA] == scram.expected_server_final, ack.props
    # The session works like any other.
    c.subscribe(f"s/{uid}", qos=1)
    c.publish(f"s/{uid}", b"hi", qos=1, pid=7)
    got = {p.type: p for p in (c.recv(), c.recv())}
    assert got[w.PUBLISH].payload == b"hi" and got[w.PUBACK].pid == 7, got
    c.disconnect()
    c.close()
    # One `roost passwd` line serves plain CONNECT too, for 3.1.1 and 5.0 alike.
    for version in (4, 5):
        p = w.RawClient(b.host, b.port, version)
        p.connect(f"{uid}-p{version}", username="alice", password=b"wonderland")
        p.disconnect()
        p.close()
    # ',' and '=' in a username travel escaped.
    c, ack, scram = scram_connect(b, f"{uid}-odd", "bob,=odd", "builder")
    assert ack.rc == 0 and ack.props[w.AUTH_DATA] == scram.expected_server_final
    c.close()


def test_wrong_password_and_unknown_user_are_refused_alike(broker_with, password_file, uid):
    b = broker_with(password_file=str(password_file))
    for user, password in (("alice", "Wonderland"), ("mallory", "wonderland")):
        c, ack, _ = scram_connect(b, f"{uid}-{user}", user, password)
        assert ack.props.get(w.AUTH_DATA) == b"e=invalid-proof", ack.props
        assert "password" in ack.props.get(w.REASON_STRING, ""), ack.props
        refused(c, ack, 0x86)
    # The log names the user and the address of a refusal.
    assert wait_for(lambda: '"mallory"' in b.log_tail(300), 5), b.log_tail()
    assert "127.0.0.1" in b.log_tail(300)
    still_serves(b)


def test_user_without_a_verifier_fails_scram_but_keeps_plain_connect(
        broker_with, tmp_path, uid):
    path = tmp_path / "passwd"
    passwd("-b", "--no-scram", path, "carol", "secret")
    assert path.read_text().count(":") == 1, "no SCRAM field"
    b = broker_with(password_file=str(path))
    c, ack, _ = scram_connect(b, uid, "carol", "secret")
    refused(c, ack, 0x86)
    p = w.RawClient(b.host, b.port, 5)
    p.connect(f"{uid}-plain", username="carol", password=b"secret")
    p.close()


def test_unknown_method_gets_0x8c(broker_with, password_file, uid):
    b = broker_with(password_file=str(password_file))
    c = w.RawClient(b.host, b.port, 5)
    c.send(w.connect_packet(uid, 5, properties=[(w.AUTH_METHOD, "SCRAM-SHA-1"),
                                                (w.AUTH_DATA, b"n,,n=alice,r=abc")]))
    refused(c, c.expect(w.CONNACK), 0x8C)


@pytest.mark.parametrize("first,code,error", [
    (b"garbage", 0x87, b"e=invalid-encoding"),
    (b"p=tls-server-end-point,,n=alice,r=abc", 0x87, b"e=channel-binding-not-supported"),
    (b"", 0x87, b"e=invalid-encoding"),
], ids=["garbage", "channel-binding", "empty"])
def test_malformed_client_first_message_gets_a_clear_refusal(broker_with, password_file, uid,
                                                             first, code, error):
    b = broker_with(password_file=str(password_file))
    c = w.RawClient(b.host, b.port, 5)
    c.send(w.connect_packet(uid, 5, properties=[(w.AUTH_METHOD, METHOD), (w.AUTH_DATA, first)]))
    ack = c.expect(w.CONNACK)
    assert ack.props.get(w.AUTH_DATA) == error, ack.props
    assert ack.props.get(w.REASON_STRING), "a reason string says what was wrong"
    refused(c, ack, code)
    still_serves(b)


def test_bad_client_final_and_other_packets_are_refused(broker_with, password_file, uid):
    b = broker_with(password_file=str(password_file))
    # A client-final-message that is not SCRAM.
    c, _, challenge = start(b, f"{uid}-1", "alice", "wonderland")
    assert challenge.type == w.AUTH
    c.send(w.auth_packet(0x18, METHOD, b"\xff\x00nonsense"))
    ack = c.expect(w.CONNACK)
    assert ack.props.get(w.AUTH_DATA) == b"e=invalid-encoding", ack.props
    refused(c, ack, 0x87)
    # A PUBLISH instead of AUTH before CONNACK is a protocol error.
    c, _, _ = start(b, f"{uid}-2", "alice", "wonderland")
    c.publish("x", b"too early")
    refused(c, c.expect(w.CONNACK), 0x82)
    # AUTH with another method.
    c, scram, challenge = start(b, f"{uid}-3", "alice", "wonderland")
    c.send(w.auth_packet(0x18, "SCRAM-SHA-1", scram.final(challenge.props[w.AUTH_DATA])))
    refused(c, c.expect(w.CONNACK), 0x82)
    # A CONNECT username that is not the SCRAM user.
    c, scram, challenge = start(b, f"{uid}-4", "alice", "wonderland", username="bob,=odd")
    c.send(w.auth_packet(0x18, METHOD, scram.final(challenge.props[w.AUTH_DATA])))
    refused(c, c.expect(w.CONNACK), 0x87)
    still_serves(b)


def test_exchange_is_bounded_by_connect_timeout(broker_with, password_file, uid):
    b = broker_with(password_file=str(password_file), connect_timeout=1)
    c, _, challenge = start(b, uid, "alice", "wonderland")
    assert challenge.type == w.AUTH
    t0 = time.monotonic()
    ack = c.expect(w.CONNACK, timeout=5)
    assert time.monotonic() - t0 < 3
    assert "connect_timeout" in ack.props.get(w.REASON_STRING, ""), ack.props
    refused(c, ack, 0x87)


def test_sighup_reload_applies_to_scram(broker_with, password_file, uid):
    b = broker_with(password_file=str(password_file))
    c, ack, _ = scram_connect(b, f"{uid}-a", "grace", "hopper")
    refused(c, ack, 0x86)
    passwd("-b", password_file, "grace", "hopper")
    b.proc.send_signal(signal.SIGHUP)

    def grace_gets_in():
        c, ack, scram = scram_connect(b, f"{uid}-b", "grace", "hopper")
        c.close()
        return ack.rc == 0 and ack.props.get(w.AUTH_DATA) == scram.expected_server_final

    assert wait_for(grace_gets_in, 10), b.log_tail()


def reauthenticate(c, user, password):
    """AUTH 0x19 -> AUTH 0x18 -> AUTH 0x18 on a live connection; returns (reply, client)."""
    scram = ScramClient(user, password)
    c.send(w.auth_packet(0x19, METHOD, scram.first()))
    challenge = c.expect(w.AUTH)
    assert challenge.rc == 0x18 and challenge.props[w.AUTH_METHOD] == METHOD, challenge
    c.send(w.auth_packet(0x18, METHOD, scram.final(challenge.props[w.AUTH_DATA])))
    return c.recv(), scram


def test_reauthentication(broker_with, password_file, uid):
    b = broker_with(password_file=str(password_file))
    c, ack, _ = scram_connect(b, uid, "alice", "wonderland")
    assert ack.rc == 0
    reply, scram = reauthenticate(c, "alice", "wonderland")
    assert reply.type == w.AUTH and reply.rc == 0x00, reply
    assert reply.props[w.AUTH_DATA] == scram.expected_server_final
    # Still connected and working.
    c.pingreq()
    assert c.expect(w.PINGRESP)
    # A wrong password on re-authentication ends the connection with 0x87.
    reply, _ = reauthenticate(c, "alice", "nope")
    assert reply.type == w.DISCONNECT and reply.rc == 0x87, reply
    closed, _ = c.wait_closed(5)
    assert closed
    c.close()
    # A client that did not use SCRAM at CONNECT may not re-authenticate.
    p = w.RawClient(b.host, b.port, 5)
    p.connect(f"{uid}-plain", username="alice", password=b"wonderland")
    p.send(w.auth_packet(0x19, METHOD, ScramClient("alice", "wonderland").first()))
    d = p.expect(w.DISCONNECT)
    assert d.rc == 0x82, d
    p.close()
