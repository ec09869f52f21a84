"""A tiny hand-rolled MQTT 3.1 / 3.1.1 / 5.0 wire client for exact-flow and bad-input tests.

Everything here is built byte by byte so tests can send what a real client library never
would (duplicate properties, QoS 3, bad UTF-8, ...) and see exactly what the broker sends
back (packet ids, DUP flags, reason codes, properties). It never acknowledges anything on
its own: the test drives every step.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8, 9, 10, 11, 12, 13, 14, 15)

PACKET_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

# MQTT 5 property identifiers.
PAYLOAD_FORMAT = 0x01
MESSAGE_EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_ID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
AUTH_METHOD = 0x15
AUTH_DATA = 0x16
REQUEST_PROBLEM_INFO = 0x17
WILL_DELAY = 0x18
REQUEST_RESPONSE_INFO = 0x19
RESPONSE_INFO = 0x1A
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_SUB_AVAILABLE = 0x28
SUB_ID_AVAILABLE = 0x29
SHARED_SUB_AVAILABLE = 0x2A

_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_U16 = {0x13, 0x21, 0x22, 0x23}
_U32 = {0x02, 0x11, 0x18, 0x27}
_STR = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
_BIN = {0x09, 0x16}
_VBI = {0x0B}
_PAIR = {0x26}
_MULTI = {USER_PROPERTY, SUBSCRIPTION_ID}


class Closed(Exception):
    """The broker closed the connection."""


def vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def string(s) -> bytes:
    """UTF-8 string with a two byte length; bytes are sent as given (for bad-input tests)."""
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return u16(len(b)) + b


def props(items) -> bytes:
    """Encode a property list: a list of (id, value) pairs (order and repeats kept), or a dict."""
    if items is None:
        items = []
    if isinstance(items, dict):
        flat = []
        for k, v in items.items():
            if k in _MULTI and isinstance(v, list):
                flat.extend((k, x) for x in v)
            else:
                flat.append((k, v))
        items = flat
    body = bytearray()
    for pid, val in items:
        body += vbi(pid)
        if pid in _BYTE:
            body.append(val)
        elif pid in _U16:
            body += u16(val)
        elif pid in _U32:
            body += u32(val)
        elif pid in _STR:
            body += string(val)
        elif pid in _BIN:
            body += string(val)
        elif pid in _VBI:
            body += vbi(val)
        elif pid in _PAIR:
            body += string(val[0]) + string(val[1])
        else:
            raise ValueError(f"unknown property {pid:#x}")
    return vbi(len(body)) + bytes(body)


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + vbi(len(body)) + body


def connect_packet(client_id="", version=4, clean=True, keepalive=60, will=None,
                   properties=None, username=None, password=None, reserved_flag=False,
                   protocol_name=None) -> bytes:
    """will = dict(topic, payload, qos=0, retain=False, properties=None)."""
    name = protocol_name or ("MQIsdp" if version == 3 else "MQTT")
    flags = 0
    if clean:
        flags |= 0x02
    if will:
        flags |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    if reserved_flag:
        flags |= 0x01
    body = string(name) + bytes([version, flags]) + u16(keepalive)
    if version == 5:
        body += props(properties)
    body += string(client_id)
    if will:
        if version == 5:
            body += props(will.get("properties"))
        body += string(will["topic"]) + string(will.get("payload", b""))
    if username is not None:
        body += string(username)
    if password is not None:
        body += string(password)
    return packet(CONNECT, 0, body)


def publish_packet(topic, payload=b"", qos=0, pid=None, retain=False, dup=False, version=4,
                   properties=None) -> bytes:
    flags = (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = string(topic)
    if qos:
        body += u16(pid if pid is not None else 1)
    if version == 5:
        body += props(properties)
    if isinstance(payload, str):
        payload = payload.encode()
    return packet(PUBLISH, flags, body + payload)


def ack_packet(ptype, pid, version=4, rc=None, properties=None) -> bytes:
    flags = 0x02 if ptype == PUBREL else 0
    body = u16(pid)
    if version == 5 and (rc is not None or properties):
        body += bytes([rc or 0])
        if properties:
            body += props(properties)
    return packet(ptype, flags, body)


def subscribe_packet(pid, filters, version=4, properties=None, flags=0x02) -> bytes:
    """filters: list of (filter, options_byte) where options_byte holds QoS (and v5 options)."""
    body = u16(pid)
    if version == 5:
        body += props(properties)
    for f, opts in filters:
        body += string(f) + bytes([opts])
    return packet(SUBSCRIBE, flags, body)


def sub_options(qos=0, no_local=False, retain_as_published=False, retain_handling=0) -> int:
    return qos | (0x04 if no_local else 0) | (0x08 if retain_as_published else 0) | (
        retain_handling << 4)


def unsubscribe_packet(pid, filters, version=4) -> bytes:
    body = u16(pid)
    if version == 5:
        body += props(None)
    for f in filters:
        body += string(f)
    return packet(UNSUBSCRIBE, 0x02, body)


def disconnect_packet(version=4, rc=None, properties=None) -> bytes:
    if version == 5 and (rc is not None or properties):
        return packet(DISCONNECT, 0, bytes([rc or 0]) + props(properties))
    return packet(DISCONNECT, 0, b"")


def auth_packet(rc, method=None, data=None, properties=None) -> bytes:
    """MQTT 5 AUTH (enhanced authentication): reason code, Authentication Method and Data."""
    items = []
    if method is not None:
        items.append((AUTH_METHOD, method))
    if data is not None:
        items.append((AUTH_DATA, data))
    items.extend(properties or [])
    return packet(AUTH, 0, bytes([rc]) + props(items))


PINGREQ_PACKET = packet(PINGREQ, 0, b"")


@dataclass
class Packet:
    type: int
    flags: int
    raw: bytes
    pid: int | None = None
    rc: int | None = None
    rcs: list = field(default_factory=list)
    props: dict = field(default_factory=dict)
    topic: str | None = None
    payload: bytes = b""
    session_present: bool | None = None

    @property
    def name(self):
        return PACKET_NAMES.get(self.type, f"type{self.type}")

    @property
    def qos(self):
        return (self.flags >> 1) & 3

    @property
    def dup(self):
        return bool(self.flags & 0x08)

    @property
    def retain(self):
        return bool(self.flags & 0x01)

    def user_props(self):
        return list(self.props.get(USER_PROPERTY, []))

    def __repr__(self):
        extra = []
        for k in ("pid", "rc", "topic", "session_present"):
            v = getattr(self, k)
            if v is not None:
                extra.append(f"{k}={v!r}")
        if self.type == PUBLISH:
            extra.append(f"qos={self.qos} dup={self.dup} retain={self.retain}")
            extra.append(f"payload={self.payload[:40]!r}")
        if self.rcs:
            extra.append(f"rcs={[hex(x) for x in self.rcs]}")
        if self.props:
            extra.append(f"props={self.props!r}")
        return f"<{self.name} {' '.join(extra)}>"


class _Reader:
    def __init__(self, data: bytes):
        self.d = data
        self.i = 0

    def left(self):
        return len(self.d) - self.i

    def byte(self):
        v = self.d[self.i]
        self.i += 1
        return v

    def u16(self):
        v = struct.unpack_from(">H", self.d, self.i)[0]
        self.i += 2
        return v

    def u32(self):
        v = struct.unpack_from(">I", self.d, self.i)[0]
        self.i += 4
        return v

    def vbi(self):
        mult, val = 1, 0
        while True:
            b = self.byte()
            val += (b & 0x7F) * mult
            if not b & 0x80:
                return val
            mult *= 128

    def binary(self):
        n = self.u16()
        v = self.d[self.i:self.i + n]
        self.i += n
        return bytes(v)

    def string(self):
        return self.binary().decode("utf-8")

    def rest(self):
        v = self.d[self.i:]
        self.i = len(self.d)
        return bytes(v)

    def props(self):
        n = self.vbi()
        end = self.i + n
        out: dict = {}
        while self.i < end:
            pid = self.vbi()
            if pid in _BYTE:
                v = self.byte()
            elif pid in _U16:
                v = self.u16()
            elif pid in _U32:
                v = self.u32()
            elif pid in _STR:
                v = self.string()
            elif pid in _BIN:
                v = self.binary()
            elif pid in _VBI:
                v = self.vbi()
            elif pid in _PAIR:
                v = (self.string(), self.string())
            else:
                raise ValueError(f"broker sent unknown property {pid:#x}")
            if pid in _MULTI:
                out.setdefault(pid, []).append(v)
            else:
                assert pid not in out, f"broker sent property {pid:#x} twice"
                out[pid] = v
        return out


def decode(first: int, body: bytes, version: int) -> Packet:
    ptype, flags = first >> 4, first & 0x0F
    p = Packet(type=ptype, flags=flags, raw=bytes([first]) + vbi(len(body)) + body)
    r = _Reader(body)
    if ptype == CONNACK:
        p.session_present = bool(r.byte() & 1)
        p.rc = r.byte()
        if version == 5 and r.left():
            p.props = r.props()
    elif ptype == PUBLISH:
        p.topic = r.binary().decode("utf-8", errors="replace")
        if p.qos:
            p.pid = r.u16()
        if version == 5:
            p.props = r.props()
        p.payload = r.rest()
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        p.pid = r.u16()
        p.rc = 0
        if r.left():
            p.rc = r.byte()
            if r.left():
                p.props = r.props()
    elif ptype in (SUBACK, UNSUBACK):
        p.pid = r.u16()
        if version == 5:
            p.props = r.props()
        p.rcs = list(r.rest())
    elif ptype in (DISCONNECT, AUTH):
        p.rc = 0
        if r.left():
            p.rc = r.byte()
            if r.left():
                p.props = r.props()
    return p


class RawClient:
    """One TCP connection speaking hand-built MQTT. Nothing is sent implicitly."""

    def __init__(self, host, port, version=4, timeout=10.0, source=None, rcvbuf=None):
        """source: local address to connect from (e.g. "127.0.0.2"); rcvbuf: SO_RCVBUF
        set before connecting (a small one makes a client that stops reading stall the
        broker's writes quickly)."""
        self.version = version
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((socket.gethostbyname(host), port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.closed = False

    # -- sending -----------------------------------------------------------------------
    def send(self, data: bytes):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Closed(str(e)) from e

    def connect(self, client_id="", clean=True, keepalive=60, will=None, properties=None,
                expect_rc=0, **kw) -> Packet:
        self.send(connect_packet(client_id, self.version, clean, keepalive, will, properties,
                                 **kw))
        ack = self.expect(CONNACK)
        if expect_rc is not None:
            assert ack.rc == expect_rc, f"CONNACK {ack!r}"
        return ack

    def publish(self, topic, payload=b"", qos=0, pid=None, retain=False, dup=False,
                properties=None):
        self.send(publish_packet(topic, payload, qos, pid, retain, dup, self.version, properties))

    def subscribe(self, filters, pid=1, properties=None, qos=None) -> Packet:
        """filters: a topic string (with qos=...) or a list of (filter, options_byte)."""
        if isinstance(filters, str):
            filters = [(filters, qos or 0)]
        self.send(subscribe_packet(pid, filters, self.version, properties))
        ack = self.expect(SUBACK)
        assert ack.pid == pid
        return ack

    def unsubscribe(self, filters, pid=1) -> Packet:
        self.send(unsubscribe_packet(pid, filters, self.version))
        ack = self.expect(UNSUBACK)
        assert ack.pid == pid
        return ack

    def ack(self, ptype, pid, rc=None, properties=None):
        self.send(ack_packet(ptype, pid, self.version, rc, properties))

    def puback(self, pid):
        self.ack(PUBACK, pid)

    def pingreq(self):
        self.send(PINGREQ_PACKET)

    def disconnect(self, rc=None, properties=None):
        try:
            self.send(disconnect_packet(self.version, rc, properties))
        except Closed:
            pass
        self.close()

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    # -- receiving ---------------------------------------------------------------------
    def _fill(self, deadline) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            raise Closed(str(e)) from e
        if not chunk:
            raise Closed("EOF")
        self.buf += chunk
        return True

    def _try_parse(self):
        if not self.buf:
            return None
        mult, length, i = 1, 0, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
            if i > 4:
                raise AssertionError("broker sent a malformed remaining length")
        if len(self.buf) < i + length:
            return None
        first = self.buf[0]
        body = bytes(self.buf[i:i + length])
        del self.buf[:i + length]
        return decode(first, body, self.version)

    def recv(self, timeout=5.0):
        """Next packet, or None if nothing arrives in time. Raises Closed on EOF."""
        deadline = time.monotonic() + timeout
        while True:
            p = self._try_parse()
            if p is not None:
                return p
            if self.closed:
                raise Closed("closed locally")
            if not self._fill(deadline):
                return None

    def expect(self, ptype, timeout=5.0, skip=()) -> Packet:
        """Wait for a packet of type ptype; packets of types in skip are ignored."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.recv(max(0.0, deadline - time.monotonic()))
            if p is None:
                raise AssertionError(f"no {PACKET_NAMES[ptype]} within {timeout}s")
            if p.type == ptype:
                return p
            if p.type in skip:
                continue
            raise AssertionError(f"expected {PACKET_NAMES[ptype]}, got {p!r}")

    def assert_nothing(self, wait):
        """Nothing arrives within `wait` seconds."""
        p = self.recv(wait)
        assert p is None, f"unexpected {p!r}"

    def recv_all(self, timeout=1.0, until_closed=False):
        """Collect packets until `timeout` passes with nothing new (or the connection closes)."""
        out = []
        try:
            while True:
                p = self.recv(timeout)
                if p is None:
                    return out
                out.append(p)
        except Closed:
            if until_closed:
                return out
            return out

    def wait_closed(self, timeout=5.0):
        """Read until the broker closes the socket. Returns (closed, packets_received)."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            try:
                p = self.recv(max(0.0, deadline - time.monotonic()))
            except Closed:
                return True, got
            if p is None:
                return False, got
            got.append(p)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
