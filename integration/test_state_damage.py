"""A damaged session store does not keep roost from starting.

- A table file overwritten or cut: the store is moved aside into data/quarantine, the
  log says so at error level, `roost_storage_quarantined_total` counts it, and roost
  serves (without the sessions and retained messages it could not read).
- Its journal overwritten in the middle: the journal file is copied into
  data/quarantine/state/, the damaged bytes are cut out, and every write after them is
  kept (fjall alone stops at the damage and drops the rest without a word, or refuses
  the store whole).
"""

from __future__ import annotations

import re
import urllib.request

import pytest

import mqttraw as w
from broker import IS_MOSQUITTO, free_port
from conftest import publishes_until_quiet
from test_admin import Admin, value
from test_faults import _find_in, _overwrite, _wait_log

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
    # The store is opened after the listeners are bound: wait for its line.
    _wait_log(b, r"session store in \S* is damaged .*moved aside")
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


def test_a_damaged_session_store_journal_keeps_every_write_after_the_damage(broker_with):
    """roost is killed (-9) while the session store's last writes are only in its
    journal (fjall replays them on start), and one write in the middle of the journal
    is overwritten. roost starts, logs a warn line naming the journal file, copies it
    into data/quarantine/state/, counts it in roost_storage_quarantined_total, and keeps
    every write but the damaged one: the persistent session gets every acknowledged
    message queued for it but that one, and so do the retained messages."""
    admin = free_port()
    b = broker_with(admin_bind=[f"127.0.0.1:{admin}"], sys_interval=0, log_level="info")
    keeper = w.RawClient(b.host, b.port, 4)
    keeper.connect("keeper", clean=False)
    keeper.subscribe("t/#", qos=1)
    keeper.disconnect()
    p = w.RawClient(b.host, b.port, 4)
    p.connect("pub")
    n = 60
    for i in range(n):
        # One at a time: each publish is its own write (journal batch).
        p.publish(f"t/{i}", b"m%05d" % i + b"." * 40, qos=1, pid=i + 1, retain=True)
        assert p.expect(w.PUBACK).pid == i + 1
    b.kill()
    state = b.dir / "data" / "state"
    hit = n // 2
    journal, at = _find_in(state.glob("*.jnl"), b"m%05d" % hit)
    _overwrite(journal, 8, at=at)

    b.start()
    log = _wait_log(b, rf"session store journal \S*/{re.escape(journal.name)} is damaged .* "
                       rf"copied to \S*/quarantine/state/{re.escape(journal.name)}\.\d+")
    assert not re.search(r"session store in \S* is damaged", log), "moved aside whole"
    copies = list((b.dir / "data" / "quarantine" / "state").glob(f"{journal.name}.*"))
    assert len(copies) == 1, copies
    assert copies[0].read_bytes()[at:at + 8] == b"\xee" * 8
    assert value(Admin(admin).metrics(), "roost_storage_quarantined_total") == 1

    every = {b"m%05d" % i for i in range(n)}
    keeper = w.RawClient(b.host, b.port, 4)
    keeper.connect("keeper", clean=False)
    queued = {bytes(p.payload[:6]) for p in publishes_until_quiet(keeper)}
    # The damaged write held message `hit` for the session, its retained copy, or both.
    assert every - {b"m%05d" % hit} <= queued <= every, sorted(every - queued)
    fresh = w.RawClient(b.host, b.port, 4)
    fresh.connect("fresh")
    fresh.subscribe("t/#", qos=1)
    retained = {bytes(p.payload[:6]) for p in publishes_until_quiet(fresh)}
    assert every - {b"m%05d" % hit} <= retained <= every, sorted(every - retained)
    assert len(queued) + len(retained) < 2 * n, "the damaged write is lost, not kept"
