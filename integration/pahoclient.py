"""A thin synchronous wrapper over paho-mqtt 2.x: the "real library" client of the suite."""

from __future__ import annotations

import queue
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

PROTOCOLS = {3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}


def publish_props(**kw) -> Properties:
    """Properties(PUBLISH) from keyword args named like paho's attributes (UserProperty=...)."""
    p = Properties(PacketTypes.PUBLISH)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def connect_props(**kw) -> Properties:
    p = Properties(PacketTypes.CONNECT)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


class Client:
    """A connected paho client whose received messages land in a queue."""

    def __init__(self, broker, version=4, client_id="", clean=True, keepalive=30, will=None,
                 properties=None, manual_ack=False, connect=True):
        self.broker = broker
        self.version = version
        self.client_id = client_id
        self.messages: queue.Queue = queue.Queue()
        self.connacks: queue.Queue = queue.Queue()
        self.disconnects: queue.Queue = queue.Queue()
        self._subacks: dict = {}
        self._unsubacks: dict = {}
        self._cond = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=(clean if version != 5 else None),
                             protocol=PROTOCOLS[version], reconnect_on_failure=False,
                             manual_ack=manual_ack)
        self.clean = clean
        self.keepalive = keepalive
        self.properties = properties
        if will:
            self.c.will_set(will["topic"], will.get("payload"), will.get("qos", 0),
                            will.get("retain", False), will.get("properties"))
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_disconnect = self._on_disconnect
        self.connack = None
        if connect:
            self.connect()

    # -- callbacks ---------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, rc, props):
        self.connacks.put((flags, rc, props))

    def _on_message(self, client, userdata, msg):
        self.messages.put(msg)

    def _on_subscribe(self, client, userdata, mid, rcs, props):
        with self._cond:
            self._subacks[mid] = [int(r.value) for r in rcs]
            self._cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, rcs, props):
        with self._cond:
            self._unsubacks[mid] = [int(r.value) for r in rcs]
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, rc, props):
        self.disconnects.put(rc)

    # -- operations --------------------------------------------------------------------
    def connect(self, timeout=10):
        kw = {}
        if self.version == 5:
            kw["clean_start"] = bool(self.clean)
            kw["properties"] = self.properties
        self.c.connect(self.broker.host, self.broker.port, self.keepalive, **kw)
        self.c.loop_start()
        try:
            flags, rc, props = self.connacks.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no CONNACK for {self.client_id!r} within {timeout}s")
        assert not rc.is_failure, f"connect refused: {rc}"
        self.connack = (flags, rc, props)
        return self

    @property
    def session_present(self):
        return bool(self.connack[0].session_present)

    def subscribe(self, topic, qos=0, no_local=False, retain_as_published=False,
                  retain_handling=0, sub_id=None, timeout=10):
        props = None
        if self.version == 5:
            opts = SubscribeOptions(qos=qos, noLocal=no_local,
                                    retainAsPublished=retain_as_published,
                                    retainHandling=retain_handling)
            if sub_id is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            rc, mid = self.c.subscribe(topic, options=opts, properties=props)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return self._wait(self._subacks, mid, timeout, "SUBACK")

    def unsubscribe(self, topic, timeout=10):
        rc, mid = self.c.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return self._wait(self._unsubacks, mid, timeout, "UNSUBACK")

    def _wait(self, table, mid, timeout, what):
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in table:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout}s")
                self._cond.wait(left)
            return table.pop(mid)

    def publish(self, topic, payload=b"", qos=0, retain=False, properties=None, wait=True,
                timeout=10):
        info = self.c.publish(topic, payload, qos, retain, properties)
        if wait and qos > 0:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"publish to {topic} not acknowledged in {timeout}s"
        return info

    def get(self, timeout=5.0):
        """The next message; fails the test if none arrives in time."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id!r}: no message within {timeout}s")

    def get_n(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            try:
                out.append(self.messages.get(timeout=max(0.01, left)))
            except queue.Empty:
                raise AssertionError(f"{self.client_id!r}: got {len(out)} of {n} messages: "
                                     f"{[(m.topic, m.payload) for m in out]}")
        return out

    def drain(self, wait=0.5):
        """All messages that arrive within `wait` seconds of quiet."""
        out = []
        while True:
            try:
                out.append(self.messages.get(timeout=wait))
            except queue.Empty:
                return out

    def assert_nothing(self, wait=1.0):
        got = self.drain(wait)
        assert not got, f"{self.client_id!r} unexpectedly got {[(m.topic, m.payload) for m in got]}"

    def disconnect(self, reason=None, properties=None):
        try:
            if reason is not None:
                from paho.mqtt.reasoncodes import ReasonCode
                self.c.disconnect(ReasonCode(PacketTypes.DISCONNECT, identifier=reason),
                                  properties)
            else:
                self.c.disconnect()
        finally:
            self.c.loop_stop()

    def close(self):
        """Stop without DISCONNECT (drop the socket)."""
        try:
            self.c.loop_stop()
        finally:
            sock = self.c.socket()
            if sock is not None:
                sock.close()
