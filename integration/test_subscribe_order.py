"""A SUBSCRIBE that reached roost before another client's PUBLISH takes effect first.

Paho's interoperability suite found this (v5 test_request_response, test_subscribe_options):
client B sends SUBSCRIBE without waiting for the SUBACK, client A then publishes on its own
connection, and B must get the message (MQTT 5.0 3.8.4: the server starts delivering once it
has accepted the subscription). roost lost that race in two ways:

- when the sockets of B and A were both readable by the time a worker thread woke (as
  when the client keeps its CPU between the two sends), tokio's LIFO slot ran the task
  woken last, A's, first;
- a SUBSCRIBE that came in the same segment as its CONNECT was handled only once the
  CONNACK's session record was stored (an fsync, for a persistent session).

Each case repeats the race many times against a broker of its own and counts the messages B
never got. The clients are raw sockets, so nothing but the two sends lies between them. The
broker runs one worker thread (tokio reads TOKIO_WORKER_THREADS): with two, a SUBSCRIBE and
a PUBLISH that arrive together may be served in parallel, in either order, which is fair;
what is tested is the order one thread takes them up in.

- Established connection: B's SUBSCRIBE and A's PUBLISH are sent back to back while the
  broker and the test share one CPU, so the broker runs only when the test waits and then
  wakes to both sockets at once, whatever the machine's core count.
- New connection: B sends CONNECT and SUBSCRIBE in one segment, and A publishes as soon as
  the broker has read them off B's socket (its receive queue, as sock_diag reports it, is
  empty): roost cannot subscribe a client whose connection it has not accepted yet.
"""

import contextlib
import os
import socket
import struct
import time

import pytest

import mqttraw as w
from conftest import VERSIONS

ROUNDS = 200
# After each round, so A's connection is idle again when the next round starts, as in
# Paho's test (a connection still busy with its last PUBACK reads its next PUBLISH itself,
# without waiting to be woken).
SETTLE = 0.001
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20


@contextlib.contextmanager
def _one_cpu(proc):
    """Runs every thread of the broker process and this test's thread on one CPU."""
    mine = os.sched_getaffinity(0)
    cpu = {min(mine)}
    for tid in os.listdir(f"/proc/{proc.pid}/task"):
        os.sched_setaffinity(int(tid), cpu)
    os.sched_setaffinity(0, cpu)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def _unread(nl, host, local_port, remote_port):
    """Bytes in the receive queue of the TCP connection local_port -> remote_port (the
    broker's end), as sock_diag reports it (what `ss` shows as Recv-Q); None if it is not
    there (yet)."""
    addr = socket.inet_aton(host) + bytes(12)
    # struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid:
    # ports (network order), source and destination addresses, interface, no cookie.
    req = (struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
           + struct.pack("!HH", local_port, remote_port) + addr + addr
           + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))
    nl.send(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, 1, 0, 0) + req)
    reply = nl.recv(65536)
    if struct.unpack_from("=H", reply, 4)[0] != _SOCK_DIAG_BY_FAMILY:
        return None
    # struct inet_diag_msg after the 16-byte netlink header: 4 bytes, the 48-byte sockid,
    # expires, rqueue. The lookup falls back to the listening socket: check the peer port.
    if struct.unpack_from("!H", reply, 16 + 6)[0] != remote_port:
        return None
    return struct.unpack_from("=I", reply, 16 + 56)[0]


def _wait_read_by_broker(broker, client, timeout=5.0):
    """Waits until the broker has read everything `client` sent."""
    client_port = client.sock.getsockname()[1]
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        while _unread(nl, broker.host, broker.port, client_port) != 0:
            assert time.monotonic() < deadline, \
                f"the broker did not read what port {client_port} sent in {timeout}s"


def _connect_packet(version, client_id, persistent):
    if version == 5:
        props = {w.SESSION_EXPIRY: 300} if persistent else None
        return w.connect_packet(client_id, version, clean=True, properties=props)
    return w.connect_packet(client_id, version, clean=not persistent)


def _missed(subscribers):
    """The topics of the subscribers (client, topic) that got no PUBLISH of their topic.
    A delivery that happened arrives at once, so all share one deadline (past it, each
    still reads what has come)."""
    deadline = time.monotonic() + 3.0
    missed = []
    for c, topic in subscribers:
        got = False
        while not got:
            p = c.recv(max(0.05, deadline - time.monotonic()))
            if p is None:
                break
            got = p.type == w.PUBLISH and p.topic == topic
        if not got:
            missed.append(topic)
    return missed


@pytest.mark.skipif(not hasattr(socket, "AF_NETLINK") or not hasattr(os, "sched_setaffinity"),
                    reason="needs Linux (sock_diag, sched_setaffinity)")
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("session", ["clean", "persistent"])
@pytest.mark.parametrize("connection", ["new", "established"])
def test_subscribe_takes_effect_before_a_later_publish(broker_with, raw, uid, monkeypatch,
                                                       version, session, connection):
    monkeypatch.setenv("TOKIO_WORKER_THREADS", "1")
    b = broker_with()
    persistent = session == "persistent"
    publisher = raw(b, version)
    publisher.connect(f"{uid}-pub")
    subscribers = []
    if connection == "established":
        for i in range(ROUNDS):
            c = raw(b, version)
            c.send(_connect_packet(version, f"{uid}-{i}", persistent))
            c.expect(w.CONNACK)
            subscribers.append((c, f"it/{uid}/{i}"))
    with _one_cpu(b.proc) if connection == "established" else contextlib.nullcontext():
        for i in range(ROUNDS):
            topic = f"it/{uid}/{i}"
            subscribe = w.subscribe_packet(1, [(topic, 1)], version)
            if connection == "new":
                c = raw(b, version)
                # In one segment, as a client that does not wait for the CONNACK sends them.
                c.send(_connect_packet(version, f"{uid}-{i}", persistent) + subscribe)
                subscribers.append((c, topic))
                _wait_read_by_broker(b, c)
            else:
                # Back to back, as Paho's test sends them.
                subscribers[i][0].send(subscribe)
            publisher.publish(topic, b"after the subscribe", qos=1, pid=i + 1)
            assert publisher.expect(w.PUBACK).pid == i + 1
            time.sleep(SETTLE)
    missed = _missed(subscribers)
    assert not missed, (f"{len(missed)} of {ROUNDS} subscribers never got the message published "
                        f"after their SUBSCRIBE reached the broker, e.g. {missed[:3]}")
