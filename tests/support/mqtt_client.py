"""A small synchronous MQTT 5 test client (paho 2.x) that records what it receives."""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.harness import Broker, wait_until


class TestClient:
    __test__ = False

    def __init__(self, broker: Broker, user: str, client_id: str | None = None,
                 port: int | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.suback: list[list[ReasonCode]] = []
        self.puback: dict[int, ReasonCode] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.connect_reason: ReasonCode | None = None
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or user,
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.username_pw_set(user, broker.passwords.get(user, "wrong"))
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        self.client = client
        client.connect("127.0.0.1", port or broker.port_of(user), keepalive=10)
        client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connect_reason = reason
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[ReasonCode],
                      _p: Any) -> None:
        with self._lock:
            self.suback.append(reasons)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._lock:
            self.puback[mid] = reason

    def wait_connected(self) -> ReasonCode:
        assert self.connected.wait(10), "no CONNACK"
        assert self.connect_reason is not None
        return self.connect_reason

    def subscribe(self, topic: str) -> list[ReasonCode]:
        before = len(self.suback)
        self.client.subscribe(topic, qos=1)
        wait_until(lambda: len(self.suback) > before, 10, f"SUBACK for {topic}")
        return self.suback[before]

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_until(lambda: info.mid in self.puback, 10, f"PUBACK for {topic}")
        return self.puback[info.mid]

    def received(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
