"""The Debian mosquitto_pub / mosquitto_sub command-line clients as a second real client."""

import queue
import signal
import subprocess
import threading
import time

import pytest

from conftest import CLI_VERSIONS, needs_mosquitto_clients
from pahoclient import publish_props

pytestmark = needs_mosquitto_clients
FMT = "MSG|%t|%q|%r|%P|%C|%p"


class CliSub:
    """mosquitto_sub running in the background; its output lines collected in a queue."""

    def __init__(self, broker, topic, version, qos=1, extra=(), fmt=FMT):
        self.cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-V", version,
                    "-t", topic, "-q", str(qos), "-d", "-F", fmt, *extra]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.all = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.all.append(line)
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pred, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.cmd}: timed out; output so far:\n{''.join(self.all)}")
            if line is None:
                raise AssertionError(f"{self.cmd} exited; output:\n{''.join(self.all)}")
            if pred(line):
                return line

    def ready(self):
        self.wait_for(lambda l: "received SUBACK" in l)
        return self

    def message(self, timeout=10):
        return self.wait_for(lambda l: l.startswith("MSG|"), timeout).split("|", 6)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cli_subs():
    made = []

    def make(*a, **kw):
        s = CliSub(*a, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop(signal.SIGKILL)


def pub(broker, version, topic, message, *extra):
    msg = ["-m", message] if message is not None else []
    r = subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-V", version,
                        "-t", topic, *msg, *extra], capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, f"mosquitto_pub failed ({r.returncode}): {r.stderr}"


@pytest.mark.parametrize("version", CLI_VERSIONS)
def test_cli_pub_sub(broker, cli_subs, topic, version):
    s = cli_subs(broker, topic + "/#", version).ready()
    pub(broker, version, topic + "/a", "hello from the command line", "-q", "1")
    _, t, qos, retain, _, _, payload = s.message()
    assert (t, qos, retain, payload) == (topic + "/a", "1", "0", "hello from the command line")


@pytest.mark.parametrize("version", CLI_VERSIONS)
def test_cli_qos2(broker, cli_subs, topic, version):
    s = cli_subs(broker, topic, version, qos=2).ready()
    pub(broker, version, topic, "exactly once", "-q", "2")
    _, _, qos, _, _, _, payload = s.message()
    assert (qos, payload) == ("2", "exactly once")
    time.sleep(0.3)
    assert not [l for l in s.all[-5:] if l.startswith("MSG|") and "exactly once" in l][1:]


@pytest.mark.parametrize("version", CLI_VERSIONS)
def test_cli_retained(broker, cli_subs, topic, version):
    pub(broker, version, topic, "retained value", "-q", "1", "-r")
    s = cli_subs(broker, topic, version, extra=["-C", "1", "-W", "10"])
    _, t, _, retain, _, _, payload = s.message()
    assert (t, retain, payload) == (topic, "1", "retained value")
    assert s.proc.wait(10) == 0
    pub(broker, version, topic, None, "-q", "1", "-r", "-n")  # clear it
    s2 = cli_subs(broker, topic, version, extra=["-W", "2"]).ready()
    assert s2.proc.wait(10) != 0 or not [l for l in s2.all if l.startswith("MSG|")]
    assert not [l for l in s2.all if l.startswith("MSG|")]


def test_cli_v5_user_properties_and_content_type(broker, cli_subs, clients, topic):
    s = cli_subs(broker, topic, "mqttv5").ready()
    psub = clients(broker, 5)
    psub.subscribe(topic, qos=1)
    pub(broker, "mqttv5", topic, "{}", "-q", "1",
        "-D", "PUBLISH", "user-property", "site", "north",
        "-D", "PUBLISH", "user-property", "site", "south",
        "-D", "PUBLISH", "user-property", "build", "42",
        "-D", "PUBLISH", "content-type", "application/json")
    _, _, _, _, props, ctype, payload = s.message()
    assert payload == "{}" and ctype == "application/json"
    assert "site:north" in props and "site:south" in props and "build:42" in props
    m = psub.get()
    assert m.properties.UserProperty == [("site", "north"), ("site", "south"), ("build", "42")]


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_paho_publishes_to_cli_subscriber(broker, cli_subs, clients, topic, version):
    cli_version = "mqttv5" if version == 5 else "mqttv311"
    s = cli_subs(broker, topic, cli_version, qos=2).ready()
    props = publish_props(UserProperty=[("from", "paho")]) if version == 5 else None
    clients(broker, version).publish(topic, b"cross-client", qos=2, properties=props)
    _, _, qos, _, up, _, payload = s.message()
    assert (qos, payload) == ("2", "cross-client")
    if version == 5:
        assert "from:paho" in up


@pytest.mark.parametrize("version", CLI_VERSIONS)
def test_cli_will_on_killed_client(broker, cli_subs, clients, topic, version):
    watcher = clients(broker, 5)
    watcher.subscribe(topic + "/status", qos=1)
    s = cli_subs(broker, topic + "/cmd", version,
                 extra=["--will-topic", topic + "/status", "--will-payload", "offline",
                        "--will-qos", "1"]).ready()
    s.stop(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
    assert watcher.get(timeout=5).payload == b"offline"


@pytest.mark.parametrize("version", CLI_VERSIONS)
def test_cli_persistent_session_gets_offline_messages(broker, cli_subs, topic, uid, version):
    cid = ("cli" + uid)[:23]
    extra = ["-c", "-i", cid] + (["-x", "60"] if version == "mqttv5" else [])
    s = cli_subs(broker, topic, version, extra=extra).ready()
    s.stop(signal.SIGINT)  # clean DISCONNECT, session kept
    pub(broker, version, topic, "while you were away", "-q", "1")
    s2 = cli_subs(broker, topic, version, extra=extra + ["-C", "1", "-W", "10"])
    _, _, qos, _, _, _, payload = s2.message()
    assert (qos, payload) == ("1", "while you were away")
