"""MQTT transport of the sync agent (paho-mqtt 2.x, callback API v2, MQTT 5).

- Credentials and TLS come from the URL: ``mqtt://user:pass@host:1883`` or ``mqtts://...``.
- Last Will: ``offline`` (retained, QoS 1) on the device's status topic, so the broker announces
  a vanished device at once; ``online`` (retained) is published on every connect and
  ``offline`` on a clean stop.
- A batch (or an event) is published with QoS 1 on the device's attendance (events) topic and
  counts as delivered only when the aggregator's application-level ack (a ``BatchResult`` whose
  ``batch_id`` is the batch id, or the event key) arrives on the device's ack topic. A PUBACK
  only means the broker has it.
- The retained roster topic of the room tells the agent to pull the schedule again.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ValidationError

from appliance.sync.errors import BatchRefusedError, TransportError
from cloud_sync.protocol import (
    AttendanceBatch,
    BatchResult,
    Event,
    Heartbeat,
    device_topic,
    roster_topic,
)

_LOGGER = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"


@dataclass(frozen=True)
class MqttEndpoint:
    """Where and how to connect, parsed from an ``mqtt://`` / ``mqtts://`` URL."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> MqttEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("MQTT URL must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError("MQTT URL has no host")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )

    def __repr__(self) -> str:  # never show the password
        return f"MqttEndpoint({self.host}:{self.port}, user={self.username!r}, tls={self.tls})"


class RosterNotice(BaseModel):
    """Payload of the retained roster topic."""

    v: int = 1
    etag: str | None = None


class _Waiter:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: BatchResult | None = None


class MqttTransport:
    """One MQTT connection of one device; thread-safe send methods."""

    name = "mqtt"

    def __init__(
        self,
        url: str,
        *,
        site: str,
        room_id: str,
        device_id: str,
        ack_timeout_s: float,
        on_roster_notice: Callable[[str | None], None] | None = None,
        keepalive_s: int = 30,
    ) -> None:
        self._endpoint = MqttEndpoint.from_url(url)
        self._device_id = device_id
        self._ack_timeout_s = ack_timeout_s
        self._on_roster_notice = on_roster_notice
        self._keepalive_s = keepalive_s
        self.topic_attendance = device_topic(site, room_id, device_id, "attendance")
        self.topic_events = device_topic(site, room_id, device_id, "events")
        self.topic_heartbeat = device_topic(site, room_id, device_id, "heartbeat")
        self.topic_status = device_topic(site, room_id, device_id, "status")
        self.topic_ack = device_topic(site, room_id, device_id, "ack")
        self.topic_roster = roster_topic(site, room_id)
        self._waiters: dict[uuid.UUID, _Waiter] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()  # connected and subscribed to the ack topic
        self._interrupted = threading.Event()  # the device is stopping: no new sends
        self._ack_sub_mid: int | None = None
        self.last_error: str | None = None
        self.reachable = False

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if self._endpoint.username is not None:
            client.username_pw_set(self._endpoint.username, self._endpoint.password)
        if self._endpoint.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.will_set(self.topic_status, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        _LOGGER.info("MQTT: connecting to %s:%s as %s", self._endpoint.host,
                     self._endpoint.port, self._device_id)
        self._interrupted.clear()
        self._client.connect_async(
            self._endpoint.host, self._endpoint.port, keepalive=self._keepalive_s,
            clean_start=True,
        )
        self._client.loop_start()

    def interrupt(self) -> None:
        """The device is stopping: end every wait for an ack now, and refuse new sends until
        :meth:`start`. The batch stays in the outbox and is sent again after the restart (the
        aggregator drops what it already has); a stop must not wait ``ack_timeout_s`` for an
        answer it will not use."""
        self._interrupted.set()
        self.release_waiters()

    def release_waiters(self) -> None:
        """End every wait for an ack now, as failed (a disconnect, or :meth:`interrupt`)."""
        with self._lock:
            waiting = list(self._waiters.values())
        for waiter in waiting:
            waiter.done.set()

    def close(self, timeout_s: float = 3.0) -> None:
        """Announce ``offline`` (a clean disconnect does not fire the Last Will) and stop."""
        if self._ready.is_set():
            info = self._client.publish(self.topic_status, OFFLINE, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()
        self._ready.clear()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    # -- paho callbacks (network thread) -----------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, _userdata: object, _flags: mqtt.ConnectFlags,
        reason: ReasonCode, _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self.last_error = f"MQTT connect refused: {reason}"
            _LOGGER.warning("%s", self.last_error)
            return
        self.reachable = True
        _LOGGER.info("MQTT connected")
        client.publish(self.topic_status, ONLINE, qos=1, retain=True)
        result, mid = client.subscribe([(self.topic_ack, 1), (self.topic_roster, 1)])
        if result != mqtt.MQTT_ERR_SUCCESS:
            self.last_error = f"MQTT subscribe failed: {result}"
            return
        self._ack_sub_mid = mid

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: object, mid: int,
        reasons: list[ReasonCode], _props: Properties | None,
    ) -> None:
        if mid != self._ack_sub_mid:
            return
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            # Most likely the ACL: this device may not read its ack or roster topic.
            self.last_error = f"MQTT subscription refused: {', '.join(failed)}"
            _LOGGER.error("%s", self.last_error)
            return
        self.last_error = None
        self._ready.set()

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: object, _flags: mqtt.DisconnectFlags,
        reason: ReasonCode, _props: Properties | None,
    ) -> None:
        self._ready.clear()
        self.reachable = False
        self.release_waiters()  # fail fast: the batch is sent again after the reconnect
        if reason.is_failure:
            self.last_error = f"MQTT disconnected: {reason}"
            _LOGGER.warning("%s (reconnecting)", self.last_error)

    def _on_message(
        self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        if message.topic == self.topic_ack:
            self._handle_ack(message.payload)
        elif message.topic == self.topic_roster:
            self._handle_roster(message.payload)

    def _handle_ack(self, payload: bytes) -> None:
        try:
            result = BatchResult.model_validate_json(payload)
        except ValidationError as err:
            _LOGGER.warning("MQTT: ignoring a malformed ack: %s", err.errors()[:1])
            return
        if result.batch_id is None:
            _LOGGER.warning("MQTT: ignoring an ack without batch_id")
            return
        with self._lock:
            waiter = self._waiters.get(result.batch_id)
        if waiter is None:
            _LOGGER.debug("MQTT: late ack for %s (already re-sent)", result.batch_id)
            return
        waiter.result = result
        waiter.done.set()

    def _handle_roster(self, payload: bytes) -> None:
        if not payload:
            return  # retained message cleared
        try:
            notice = RosterNotice.model_validate_json(payload)
        except ValidationError:
            _LOGGER.warning("MQTT: malformed roster notice ignored")
            return
        if self._on_roster_notice is not None:
            self._on_roster_notice(notice.etag)

    # -- sending -----------------------------------------------------------------------------
    def _publish_and_wait(self, topic: str, payload: str, ack_id: uuid.UUID) -> BatchResult:
        if not self._ready.is_set():
            raise TransportError(self.last_error or "MQTT not connected")
        waiter = _Waiter()
        with self._lock:
            self._waiters[ack_id] = waiter
        try:
            if self._interrupted.is_set():
                raise TransportError("stopping")
            info = self._client.publish(topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise TransportError(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
            if not waiter.done.wait(self._ack_timeout_s):
                raise TransportError(
                    f"no ack from the aggregator within {self._ack_timeout_s:.0f} s"
                )
        finally:
            with self._lock:
                self._waiters.pop(ack_id, None)
        if waiter.result is None:
            raise TransportError("MQTT connection lost before the ack")
        return waiter.result

    def send_batch(self, batch: AttendanceBatch) -> BatchResult:
        return self._publish_and_wait(
            self.topic_attendance, batch.model_dump_json(), batch.batch_id
        )

    def send_event(self, event: Event) -> bool:
        """The bridge acks an event with a BatchResult whose batch_id is the event key."""
        result = self._publish_and_wait(self.topic_events, event.model_dump_json(), event.key)
        if result.rejected:
            raise BatchRefusedError(result.rejected[0].reason)
        return result.accepted > 0

    def send_heartbeat(self, heartbeat: Heartbeat) -> None:
        if not self._ready.is_set():
            raise TransportError(self.last_error or "MQTT not connected")
        info = self._client.publish(self.topic_heartbeat, heartbeat.model_dump_json(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
