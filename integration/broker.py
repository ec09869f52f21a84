"""Starting and stopping the broker under test (roost, or mosquitto for cross-checking).

ROOST_TEST_BROKER=roost (default) runs the real `roost` binary: ROOST_BIN if set, otherwise
`cargo build --release --bin roost` once in the workspace and target/release/roost.
ROOST_TEST_BROKER=mosquitto runs `mosquitto -c CONF` with the equivalent limits, so the suite
itself can be checked against a well known broker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

WORKSPACE = Path(__file__).resolve().parent.parent
KIND = os.environ.get("ROOST_TEST_BROKER", "roost").lower()
IS_MOSQUITTO = KIND == "mosquitto"

_built_bin = None


def roost_binary() -> str:
    global _built_bin
    if os.environ.get("ROOST_BIN"):
        return os.environ["ROOST_BIN"]
    if _built_bin is None:
        if os.environ.get("ROOST_NO_BUILD") != "1":
            r = subprocess.run(["cargo", "build", "--release", "--bin", "roost"], cwd=WORKSPACE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cargo build --release --bin roost failed:\n{r.stdout[-4000:]}")
        _built_bin = str(WORKSPACE / "target" / "release" / "roost")
    return _built_bin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1"):
    """Waits until host:port accepts connections (a listener besides the main one)."""
    deadline = time.monotonic() + timeout
    while not accepts(port, host):
        assert time.monotonic() < deadline, f"nothing listens on {host}:{port} after {timeout}s"
        time.sleep(0.05)


def roost_passwd(*args, check=True) -> subprocess.CompletedProcess:
    """Runs `roost passwd ARGS`; with check, it must succeed."""
    # A new session has no controlling terminal, so a prompt fails instead of waiting for
    # a developer's keyboard.
    r = subprocess.run([roost_binary(), "passwd", *map(str, args)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20,
                       start_new_session=True)
    if check:
        assert r.returncode == 0, f"roost passwd {args} failed: {r.stderr}"
    return r


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table, e.g. auth_hook = { url = "..." }
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


# roost config key -> mosquitto config line (None: mosquitto has no equivalent).
_MOSQUITTO_KEYS = {
    "max_packet_size": "max_packet_size",
    "max_inflight": None,  # mosquitto's CONNACK receive-maximum comes from max_inflight_messages
    "max_queued_messages": "max_queued_messages",
    "max_connections": "max_connections",
    "topic_alias_maximum": "max_topic_alias",
    "max_keep_alive": "max_keepalive",
    "max_topic_levels": None,
    "session_expiry_max": None,
}


class Broker:
    """One broker process on 127.0.0.1:<free port> with its own data directory."""

    def __init__(self, config: dict | None = None):
        self.config = dict(config or {})
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="roost-it-")
        self.dir = Path(self.tmp.name)
        self.log_path = self.dir / "broker.log"
        self.proc: subprocess.Popen | None = None
        self.kind = KIND
        self.returncode = None
        self.stopped = False
        # Extra environment variables for the broker process (fault injection hooks).
        self.env: dict | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def command(self):
        if IS_MOSQUITTO:
            conf = self.dir / "mosquitto.conf"
            lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                     "persistence false", "log_dest stderr", "log_type all"]
            for key, val in self.config.items():
                if key == "max_connections":  # mosquitto 2.0 admits max_connections + 1
                    lines.append(f"max_connections {val - 1}")
                    continue
                if key == "max_inflight":
                    lines.append(f"max_inflight_messages {val}")
                    continue
                mkey = _MOSQUITTO_KEYS.get(key)
                if mkey:
                    lines.append(f"{mkey} {val}")
            conf.write_text("\n".join(lines) + "\n")
            return ["mosquitto", "-c", str(conf)]
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        if not self.config:
            return [roost_binary(), "--bind", f"{self.host}:{self.port}", "--data-dir", str(data),
                    "--log-level", "debug"]
        cfg = {"bind": [f"{self.host}:{self.port}"], "data_dir": str(data), "log_level": "debug"}
        cfg.update(self.config)
        path = self.dir / "roost.toml"
        path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.items()))
        return [roost_binary(), "--config", str(path)]

    def start(self, timeout=15.0):
        cmd = self.command()
        self.log = open(self.log_path, "wb")
        env = None if self.env is None else {**os.environ, **self.env}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.dir, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited early with {self.proc.returncode}:\n"
                                   f"{' '.join(cmd)}\n{self.log_tail()}")
            if accepts(self.port, self.host):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"broker did not accept on port {self.port} within {timeout}s:\n"
                           f"{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout=10.0) -> int:
        """SIGTERM and wait; returns the exit code (kills it after timeout)."""
        return self.stop(signal.SIGTERM, timeout)

    def stop(self, sig, timeout=10.0):
        if self.proc is None:
            return 0
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = "timeout"
                return self.returncode
        self.returncode = self.proc.returncode
        self.log.close()
        return self.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self):
        self.kill()
        try:
            self.log.close()
        except Exception:
            pass
        self.tmp.cleanup()

    def log_tail(self, n=60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def __repr__(self):
        return f"<{self.kind} broker {self.host}:{self.port}>"
