"""By hand, not a test: what a damaged session-store (fjall) file does to roost
(RELIABILITY.md, "Found, not fixed"). Stores 300 retained messages and a persistent
session, stops roost, damages one file of data/state, starts roost again and prints
what happened.  ROOST_BIN=target/release/roost python3 scripts/probe_session_store_damage.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import mqttraw as w
from broker import Broker
def run(mode):
    b = Broker({"log_level": "info"}).start()
    try:
        c = w.RawClient(b.host, b.port, 4)
        c.connect("persist1", clean=False)
        c.subscribe("t/#", qos=1)
        for i in range(300):
            c.publish(f"r/{i}", b"x" * 200, qos=1, pid=i + 1, retain=True)
            c.expect(w.PUBACK)
        c.disconnect()
        assert b.terminate() == 0
        state = b.dir / "data" / "state"
        files = sorted((p for p in state.rglob("*") if p.is_file() and p.stat().st_size > 64), key=lambda p: -p.stat().st_size)
        print(mode, "files:", [(str(p.relative_to(state)), p.stat().st_size) for p in files][:8])
        victim = [p for p in files if "tables" in str(p)][0] if mode.endswith("table") else files[0]
        data = bytearray(victim.read_bytes())
        if mode.startswith("truncate"):
            victim.write_bytes(bytes(data[: len(data) // 2]))
        else:
            mid = len(data) // 2 if mode.endswith("table") else 3000
            data[mid:mid + 64] = b"\xee" * 64
            victim.write_bytes(bytes(data))
        print(mode, "damaged", victim.relative_to(state))
        b.log = open(b.log_path, "ab")
        try:
            b.start()
            print(mode, "STARTED")
            c = w.RawClient(b.host, b.port, 4); c.connect("reader")
            c.subscribe("r/#", qos=1)
            n = 0
            while True:
                p = c.recv(1.0)
                if p is None: break
                if p.type == w.PUBLISH: n += 1
            print(mode, "retained read back:", n)
        except Exception as e:
            print(mode, "FAILED TO START:", str(e)[-1500:])
        print("\n".join(l for l in b.log_tail(40).splitlines() if "WARN" in l or "ERROR" in l or "store" in l)[-2500:])
    finally:
        b.cleanup()
for m in ("overwrite-table", "truncate-table", "overwrite-journal", "truncate-journal"):
    run(m)
