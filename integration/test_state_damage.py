"""A damaged session store (fjall table file overwritten or cut) does not keep roost from
starting: the store is moved aside into data/quarantine, the log says so at error level,
`roost_storage_quarantined_total` counts it, and roost serves (without the sessions and
retained messages it could not read)."""

from __future__ import annotations

import urllib.request

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO, free_port

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own store")


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_a_damaged_session_store_is_moved_aside(broker_with, damage):
    admin = free_port()
    b = broker_with(admin_bind=[f"127.0.0.1:{admin}"], sys_interval=0)
    c = w.RawClient(b.host, b.port, 4)
    c.connect("keeper", clean=False)
    c.subscribe("t/#", qos=1)
    for i in range(300):
        c.publish(f"r/{i}", b"x" * 200, qos=1, pid=i + 1, retain=True)
        c.expect(w.PUBACK)
    c.disconnect()
    assert b.terminate() == 0
    state = b.dir / "data" / "state"
    tables = sorted((p for p in state.rglob("*") if p.is_file() and "tables" in str(p)
                     and p.stat().st_size > 1024), key=lambda p: -p.stat().st_size)
    assert tables, "the store wrote no table file"
    victim = tables[0]
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        mid = len(data) // 2
        data[mid:mid + 64] = b"\xee" * 64
        victim.write_bytes(bytes(data))
    b.log = open(b.log_path, "ab")
    b.start()
    log = b.log_path.read_text(errors="replace")
    assert "session store in" in log and "is damaged" in log and "moved aside" in log, log[-3000:]
    assert list((b.dir / "data" / "quarantine").glob("state-*")), "nothing in quarantine"
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert "roost_storage_quarantined_total 1" in metrics
    # It serves: a new session, pub/sub, a retained message.
    s = w.RawClient(b.host, b.port, 5)
    s.connect("after")
    s.subscribe([("after/#", 1)])
    p = w.RawClient(b.host, b.port, 5)
    p.connect("pub-after")
    p.publish("after/x", b"works", qos=1, pid=1, retain=True)
    assert p.expect(w.PUBACK).pid == 1
    assert s.expect(w.PUBLISH).payload == b"works"
