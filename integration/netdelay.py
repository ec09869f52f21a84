"""Latency added to one node's cluster traffic, for kernels without `tc netem` (this
machine's has none: `tc qdisc ... netem` answers "Specified qdisc kind is unknown").

What the node sends to or from the cluster port goes, by a `tc` filter on its
interface (inside its namespace), to a TAP device; this process reads each frame from
the TAP, holds it for the delay, and sends it on the cluster's bridge, which forwards
it to the node it is addressed to. Everything else the node sends (to clients, to the
admin API) takes the direct path. Frames keep their order; when the delay is lowered,
frames held longer wait for the ones before them.

    python3 netdelay.py NETNS IFACE BRIDGE PORT    (as root; then on stdin: "delay MS")

Cluster.slow() and Cluster.unslow() run it; it removes its filter and TAP at exit.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def run(*args, check=True):
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def main():
    ns, iface, bridge, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tap = f"{iface[:10]}d"
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
    run("ip", "link", "set", tap, "netns", ns)
    run("ip", "-n", ns, "link", "set", tap, "up")
    out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    out.bind((bridge, 0))
    run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", iface, "clsact")
    for field in ("dport", "sport"):
        run("ip", "netns", "exec", ns, "tc", "filter", "add", "dev", iface, "egress",
            "protocol", "ip", "u32", "match", "ip", field, str(port), "0xffff",
            "action", "mirred", "egress", "redirect", "dev", tap)

    delay = [0.0]
    held: deque[tuple[float, bytes]] = deque()  # (when to send, frame), in order
    lock = threading.Condition()
    stop = threading.Event()      # the sender stops
    closing = threading.Event()   # stdin closed: no more frames are taken

    def sender():
        while not stop.is_set():
            with lock:
                if not held:
                    lock.wait(0.1)
                    continue
                due, frame = held[0]
                wait = due - time.monotonic()
                if wait > 0:
                    lock.wait(wait)
                    continue
                held.popleft()
            try:
                out.send(frame)
            except OSError:
                pass

    def control():
        for line in sys.stdin:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "delay":
                with lock:
                    delay[0] = float(parts[1]) / 1000.0
                    lock.notify()
                print("ok", flush=True)
        closing.set()

    threading.Thread(target=sender, daemon=True).start()
    threading.Thread(target=control, daemon=True).start()
    print("ready", flush=True)

    def take(timeout):
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return False
        frame = os.read(fd, 65536)
        with lock:
            # Never before a frame read earlier: order is kept.
            due = time.monotonic() + delay[0]
            if held and held[-1][0] > due:
                due = held[-1][0]
            held.append((due, frame))
            lock.notify()
        return True

    try:
        while not closing.is_set():
            take(0.2)
    finally:
        # The direct path again; then what was taken before goes out, in order.
        run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", iface, "clsact",
            check=False)
        while take(0.0):
            pass
        deadline = time.monotonic() + 2.0
        while held and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        os.close(fd)


if __name__ == "__main__":
    main()
