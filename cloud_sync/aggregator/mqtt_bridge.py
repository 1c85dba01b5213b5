"""The MQTT bridge: devices' MQTT messages in, the same ingest services as HTTP, acks out.

- paho-mqtt 2.x (callback API v2), MQTT 5, QoS 1 **shared** subscriptions
  ``$share/<mqtt_share_group>/classroom/+/+/+/{attendance,heartbeat,events}``: every aggregator
  process runs a bridge, all in one share group, and the broker hands each device message to
  one of them. Client id ``<mqtt_client_id>-<instance>-<pid>``, a clean session (no session
  expiry): a bridge that is gone gets nothing more, its share goes to the others at once
  (measured on Mosquitto 2.0: a persistent session of a dead member keeps receiving its round-
  robin share until it returns, which a lost server never does).
- Manual acknowledgement (``manual_ack_set``): the PUBACK is sent only after the message is
  committed (or dead-lettered). A message the broker had handed to a bridge that died before
  acknowledging is not redelivered by Mosquitto; the device sends the batch again after its
  ack timeout (its outbox keeps every record until the application ack below), and ingest is
  idempotent on record keys: nothing lost, nothing counted twice.
- After an attendance batch is stored, the ``BatchResult`` (with the batch id) is published with
  QoS 1 on the device's ``ack`` topic; only that makes the device mark its records sent. An
  event is acknowledged the same way, with the event key as ``batch_id``.
- Trust: the device id and room in the topic are believed only because the broker's ACL lets a
  device publish under its own ``classroom/<site>/<room>/<device>/`` only (see
  config/mosquitto/acl and docs/MQTT.md). The bridge still checks that the device exists, is in
  that room and that the room is on that site, and that the payload names the same device.
- A message larger than ``mqtt_max_message_bytes`` is refused unread. A message that cannot be
  used (too large, bad topic, bad JSON, failed validation, unknown device, wrong room) becomes
  a dead-letter row (``services.ingest.record_dead_letter``: table ``dead_letters`` + counter;
  its first ``dead_letter_keep_bytes`` only, the table pruned to ``dead_letter_max_rows`` and
  ``dead_letter_max_age_days``) and is not acknowledged; a database outage is not a dead
  letter: the device re-sends after its ack timeout.
- Home Assistant discovery (``ha_discovery``) and the rooms' state are published retained, by
  one bridge of the group at a time (``leader.Leader``: a PostgreSQL advisory lock; another
  takes over within a tick when it goes), so unknown-face triggers fire once, not once per
  process.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import threading
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import Counter
from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud_sync.aggregator import ha_discovery, metrics
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import Attendance, Device, Room
from cloud_sync.aggregator.leader import HA_PUBLISHER_LOCK_ID, Leader
from cloud_sync.aggregator.metrics import REGISTRY
from cloud_sync.aggregator.services.common import RoomMismatchError, ServiceError, utcnow
from cloud_sync.aggregator.services.devices import note_refusal
from cloud_sync.aggregator.services.events import latest_occupancy, new_alerts
from cloud_sync.aggregator.services.ingest import (
    DEFAULT_EARLY_ARRIVAL_MIN,
    EARLY_ARRIVAL_INFO_KEY,
    DeadLetterLimits,
    ingest_batch,
    record_dead_letter,
    record_event,
    record_heartbeat,
)
from cloud_sync.aggregator.services.timetable import Occurrence, room_timetable, zone
from cloud_sync.protocol import (
    AttendanceBatch,
    BatchResult,
    Heartbeat,
    RecordRejection,
    UnsupportedVersionError,
    device_topic,
    make_session_id,
    parse_event,
    roster_topic,
)

_LOGGER = logging.getLogger(__name__)

LEAVES = ("attendance", "heartbeat", "events")


def subscriptions(group: str) -> list[tuple[str, int]]:
    """The bridge's QoS 1 shared subscriptions (MQTT 5 ``$share/<group>/<filter>``)."""
    return [(f"$share/{group}/classroom/+/+/+/{leaf}", 1) for leaf in LEAVES]


def client_id(settings: AggregatorSettings, instance: str, pid: int) -> str:
    """Unique per process: ``<mqtt_client_id>-<instance>-<pid>-<6 random hex>`` (64 characters
    at most): the random part keeps it unguessable by a client of the bridges' listener."""
    suffix = f"-{instance}-{pid}-{secrets.token_hex(3)}"
    return settings.mqtt_client_id[:64 - len(suffix)] + suffix[-64:]

STATE_TICK_S = 5.0
STATE_FULL_S = 60.0
MEMORY_DEAD_LETTERS = 1000

MESSAGES = Counter(
    "aggregator_mqtt_messages", "MQTT messages handled by the bridge.", ["kind", "result"],
    registry=REGISTRY,
)
DEAD_LETTERS_UNSTORED = Counter(
    "aggregator_mqtt_dead_letters_unstored",
    "Dead letters the database could not take (kept in memory, bounded).",
    registry=REGISTRY,
)


class RosterNotice(BaseModel):
    v: int = 1
    etag: str | None = None


def parse_url(url: str) -> tuple[str, int, str | None, str | None, bool]:
    """host, port, username, password, tls from ``mqtt://user:pass@host:port`` / ``mqtts://``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError("mqtt_url must look like mqtt://user:pass@host:1883 (or mqtts://)")
    tls = parts.scheme == "mqtts"
    return (
        parts.hostname, parts.port or (8883 if tls else 1883),
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None, tls,
    )


class _RefusedError(Exception):
    """The message cannot be used: dead-letter it with this reason."""


class MqttBridge:
    """Start with ``start()`` (non-blocking), stop with ``stop()``; ``state`` for /health."""

    def _update_report(self, session: Session, device_id: str, hb: Heartbeat) -> None:
        """The device's updater report the heartbeat repeats: kept once (a revert or refusal
        halts the rollout, as over HTTP); the offer itself reaches MQTT devices through
        classroom-update.timer (GET /api/v1/releases/assigned)."""
        report = hb.update
        if report is None or self._reports.get(device_id) == (report.state, report.at):
            return
        from cloud_sync.aggregator.services.releases import record_report

        record_report(session, device_id, report)
        self._reports[device_id] = (report.state, report.at)

    def __init__(
        self, settings: AggregatorSettings, session_factory: sessionmaker[Session],
        instance: str = "aggregator",
    ) -> None:
        self._reports: dict[str, tuple[str, datetime]] = {}
        if settings.mqtt_url is None:
            raise ValueError("MqttBridge needs settings.mqtt_url")
        self._settings = settings
        self._sessions = session_factory
        self._dead_letter_limits = DeadLetterLimits(
            settings.dead_letter_keep_bytes, settings.dead_letter_max_rows,
            settings.dead_letter_max_age_days)
        self._host, self._port, user, password, tls = parse_url(
            settings.mqtt_url.get_secret_value()
        )
        self.state = "disconnected"
        self.dead_letters: collections.deque[tuple[str, bytes, str]] = collections.deque(
            maxlen=MEMORY_DEAD_LETTERS
        )
        self._dirty_rooms: set[tuple[str, str]] = set()
        self._last_sync: dict[tuple[str, str], datetime] = {}
        self._announced: dict[tuple[str, str], tuple[str, ...]] = {}
        self._alerts_since = utcnow()  # unknown-face alerts received after this go to HA
        engine = session_factory.kw.get("bind")
        self._leader = Leader(engine, HA_PUBLISHER_LOCK_ID, "Home Assistant publishing") \
            if engine is not None else None
        self.publishes_ha = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._state_thread: threading.Thread | None = None
        self.client_id = client_id(settings, instance, os.getpid())
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.manual_ack_set(True)
        if user is not None:
            client.username_pw_set(user, password)
        if tls:
            client.tls_set()
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        _LOGGER.info("MQTT bridge connecting to %s:%s as %s (share group %s)", self._host,
                     self._port, self.client_id, self._settings.mqtt_share_group)
        self._client.connect_async(self._host, self._port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if self._settings.ha_discovery:
            self._stop.clear()
            self._state_thread = threading.Thread(
                target=self._state_loop, name="mqtt-ha-state", daemon=True
            )
            self._state_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._state_thread is not None:
            self._state_thread.join(10)
            self._state_thread = None
        if self._leader is not None:
            self._leader.close()
        self._client.disconnect()
        self._client.loop_stop()
        self.state = "disconnected"

    def notify_roster_changed(self, site: str, room_id: str, etag: str) -> None:
        """Tell the room's devices to pull the schedule now (retained, QoS 1)."""
        payload = RosterNotice(etag=etag).model_dump_json()
        self._client.publish(roster_topic(site, room_id), payload, qos=1, retain=True)

    # -- paho callbacks ----------------------------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, _userdata: object, flags: mqtt.ConnectFlags,
        reason: ReasonCode, _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            _LOGGER.error("MQTT bridge: connection refused: %s", reason)
            return
        self.state = "connected"
        metrics.MQTT_CONNECTED.set(1)
        _LOGGER.info("MQTT bridge connected (session present: %s)", flags.session_present)
        client.subscribe(subscriptions(self._settings.mqtt_share_group))
        with self._lock:
            self._announced.clear()  # re-announce HA configs after a reconnect

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: object, _flags: mqtt.DisconnectFlags,
        reason: ReasonCode, _props: Properties | None,
    ) -> None:
        self.state = "disconnected"
        metrics.MQTT_CONNECTED.set(0)
        if reason.is_failure:
            _LOGGER.warning("MQTT bridge disconnected: %s (reconnecting)", reason)

    def _on_message(
        self, client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        topic, payload = message.topic, message.payload
        parts = topic.split("/")
        leaf = parts[-1] if parts else ""
        try:
            cap = self._settings.mqtt_max_message_bytes
            if len(payload) > cap:
                raise _RefusedError(
                    f"message of {len(payload)} bytes is over mqtt_max_message_bytes ({cap})")
            self._handle(client, parts, payload)
        except _RefusedError as err:
            MESSAGES.labels(leaf, "dead_letter").inc()
            _LOGGER.warning("MQTT dead letter from %s: %s", topic, err)
            self._dead_letter(topic, payload, str(err))
        except (SQLAlchemyError, OSError) as err:
            # Not the message's fault: no ack, the device sends it again.
            MESSAGES.labels(leaf, "error").inc()
            _LOGGER.error("MQTT bridge: cannot store %s now: %s", topic, err)
        except Exception:  # never let one message kill the network thread
            MESSAGES.labels(leaf, "error").inc()
            _LOGGER.exception("MQTT bridge: unexpected error on %s", topic)
        # Committed, dead-lettered, or failed for a reason the device's re-send will meet
        # again later (its ack never came): the broker may forget the message now.
        client.ack(message.mid, message.qos)

    # -- processing --------------------------------------------------------------------------
    def _check_device(self, session: Session, site: str, room_id: str, device_id: str) -> None:
        device = session.get(Device, device_id)
        if device is None:
            raise _RefusedError(f"unknown device {device_id!r}")
        if device.room_id != room_id:
            # its key... its topic names the room it is configured for: say so, and record
            # the refused contact on its row (the console names the cause, issue 25 item 8)
            err = RoomMismatchError(device_id, device.room_id, room_id)
            note_refusal(session, device_id, err.code, room_id)
            raise _RefusedError(err.message)
        room = session.get(Room, room_id)
        if room is None or room.site != site:
            raise _RefusedError(f"room {room_id!r} is not on site {site!r}")

    def _handle(self, client: mqtt.Client, parts: list[str], payload: bytes) -> None:
        if len(parts) != 5 or parts[0] != "classroom" or parts[4] not in LEAVES:
            raise _RefusedError("unexpected topic")
        _, site, room_id, device_id, leaf = parts
        with self._sessions() as session:
            self._check_device(session, site, room_id, device_id)
            session.rollback()
            if leaf == "attendance":
                try:
                    batch = AttendanceBatch.model_validate_json(payload)
                except ValidationError as err:
                    raise _RefusedError(f"invalid batch: {_short(err)}") from err
                if batch.device_id != device_id:
                    raise _RefusedError(f"batch device_id {batch.device_id!r} is not the topic's")
                try:
                    result = ingest_batch(session, device_id, batch)
                except RoomMismatchError as err:
                    raise _RefusedError(err.message) from err
                result = result.model_copy(update={"batch_id": batch.batch_id})
                self._ack(client, site, room_id, device_id, result)
                MESSAGES.labels(leaf, "ok").inc()
            elif leaf == "heartbeat":
                try:
                    hb = Heartbeat.model_validate_json(payload)
                    record_heartbeat(session, device_id, hb)
                    self._update_report(session, device_id, hb)
                except ValidationError as err:
                    raise _RefusedError(f"invalid heartbeat: {_short(err)}") from err
                except ServiceError as err:
                    raise _RefusedError(str(err)) from err
                MESSAGES.labels(leaf, "ok").inc()
            else:
                try:
                    event = parse_event(payload)
                except UnsupportedVersionError as err:
                    raise _RefusedError(str(err)) from err
                except ValidationError as err:
                    raise _RefusedError(f"invalid event: {_short(err)}") from err
                try:
                    inserted = record_event(session, device_id, event)
                except ServiceError as err:
                    session.rollback()
                    result = BatchResult(batch_id=event.key, accepted=0, duplicate=0,
                                         rejected=[RecordRejection(key=str(event.key),
                                                                   reason=str(err))])
                    self._ack(client, site, room_id, device_id, result)
                    raise _RefusedError(str(err)) from err
                result = BatchResult(batch_id=event.key, accepted=int(inserted),
                                     duplicate=int(not inserted))
                self._ack(client, site, room_id, device_id, result)
                MESSAGES.labels(leaf, "ok").inc()
        with self._lock:
            self._last_sync[(site, room_id)] = utcnow()
            self._dirty_rooms.add((site, room_id))

    def _ack(
        self, client: mqtt.Client, site: str, room_id: str, device_id: str, result: BatchResult
    ) -> None:
        client.publish(
            device_topic(site, room_id, device_id, "ack"), result.model_dump_json(), qos=1
        )

    def _dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        try:
            with self._sessions() as session:
                record_dead_letter(session, topic, payload, reason, self._dead_letter_limits)
        except SQLAlchemyError as err:
            _LOGGER.error("dead letter kept in memory only (database: %s)", err)
            DEAD_LETTERS_UNSTORED.inc()
            keep = self._dead_letter_limits.keep_bytes
            self.dead_letters.append((topic, payload[:keep], reason))

    # -- Home Assistant ----------------------------------------------------------------------
    def _state_loop(self) -> None:
        last_full = 0.0
        while not self._stop.wait(STATE_TICK_S if last_full else 0.5):
            if self.state != "connected":
                continue
            if not self._take_ha():
                last_full = time.monotonic()  # not ours: the leader publishes
                continue
            full = time.monotonic() - last_full >= STATE_FULL_S
            try:
                self.publish_ha(full=full)
            except SQLAlchemyError as err:
                _LOGGER.warning("Home Assistant state not published: %s", err)
                continue
            if full:
                last_full = time.monotonic()

    def _take_ha(self) -> bool:
        """Whether this bridge publishes for Home Assistant now (one of the group does)."""
        held = self._leader is None or self._leader.held()
        if held and not self.publishes_ha:
            with self._lock:
                self._announced.clear()  # a new publisher announces every room again
            # alerts stored just before the takeover may have gone out from the old one
            self._alerts_since = max(self._alerts_since,
                                     utcnow() - timedelta(seconds=2 * STATE_TICK_S))
        self.publishes_ha = held
        return held

    def publish_ha(self, *, full: bool = True) -> int:
        """Publish discovery configs (new or changed rooms) and room states; returns how many
        rooms' states were published. ``full``: every room, else only rooms with new data."""
        prefix = self._settings.ha_discovery_prefix
        with self._sessions() as session:
            rooms = session.scalars(select(Room)).all()
            devices = session.execute(select(Device.id, Device.room_id)).all()
            by_room: dict[str, list[str]] = collections.defaultdict(list)
            for device_id, room_id in devices:
                by_room[room_id].append(device_id)
            with self._lock:
                dirty = set(self._dirty_rooms)
                self._dirty_rooms.clear()
            published = 0
            for room in rooms:
                key = (room.site, room.id)
                ids = tuple(sorted(by_room.get(room.id, [])))
                template = self._settings.ha_device_url
                info = ha_discovery.RoomInfo(
                    room.site, room.id, room.name, ids,
                    template.format(device_id=ids[0]) if template and ids else None,
                )
                if self._announced.get(key) != info.device_ids:
                    for topic, payload in ha_discovery.discovery_messages(prefix, info):
                        self._client.publish(topic, payload, qos=1, retain=True)
                    self._announced[key] = info.device_ids
                    full_room = True
                else:
                    full_room = False
                if not (full or full_room or key in dirty):
                    continue
                occ = self._running(session, room)
                count = self._present_count(session, room, occ)
                # this bridge's own last message from the room, or (the others got theirs)
                # the room's last heartbeat, whichever is newer
                seen = [t for t in (self._last_sync.get(key), session.scalar(
                    select(func.max(Device.last_heartbeat_at)).where(Device.room_id == room.id)
                )) if t is not None]
                last = max(seen) if seen else None
                occupancy = None if occ is None else latest_occupancy(
                    session, room.id, make_session_id(occ.course_id, utcnow().date()))
                self._client.publish(
                    ha_discovery.room_state_topic(room.site, room.id),
                    ha_discovery.room_state_payload(
                        count, last, occ.course_name if occ else None, occupancy),
                    qos=1, retain=True,
                )
                published += 1
            self._publish_alerts(session, {r.id: r.site for r in rooms})
        return published

    def _publish_alerts(self, session: Session, sites: dict[str, str]) -> None:
        """Unknown-face alerts stored since the last round (over MQTT or HTTP) fire the
        rooms' Home Assistant device triggers."""
        since = self._alerts_since
        alerts = new_alerts(session, since)
        for room_id, severity, received_at in alerts:
            if room_id in sites:
                self._client.publish(ha_discovery.room_alert_topic(sites[room_id], room_id),
                                     severity, qos=1)
            since = max(since, received_at)
        self._alerts_since = since

    @staticmethod
    def _running(session: Session, room: Room) -> Occurrence | None:
        """The class running now in the room, if any."""
        now = utcnow()
        day = now.astimezone(zone(room.timezone)).date()
        running = [
            o for o in room_timetable(session, room).occurrences(day, room.id)
            if o.starts_at <= now < o.ends_at
        ]
        return running[-1] if running else None

    @staticmethod
    def _present_count(session: Session, room: Room, occ: Occurrence | None) -> int:
        """Distinct students recorded for the class running now in the room (0 if none)."""
        if occ is None:
            return 0
        early = float(session.info.get(EARLY_ARRIVAL_INFO_KEY, DEFAULT_EARLY_ARRIVAL_MIN))
        return int(session.scalar(
            select(func.count(func.distinct(Attendance.student_id))).where(
                Attendance.room_id == room.id,
                Attendance.course_id == occ.course_id,
                Attendance.at >= occ.starts_at - timedelta(minutes=early),
                Attendance.at < occ.ends_at,
            )
        ) or 0)


def _short(err: ValidationError) -> str:
    first: dict[str, Any] = dict(err.errors()[0]) if err.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return f"{err.error_count()} error(s), first: {loc}: {first.get('msg', '')}"[:400]


def publish_once(settings: AggregatorSettings, notices: list[tuple[str, str, str]],
                 timeout_s: float = 10.0) -> None:
    """Publish retained roster notices ``(site, room_id, etag)`` with a short-lived client of
    its own (the CLI: the server's bridge keeps its fixed client id). Raises OSError when the
    broker does not take them within ``timeout_s``."""
    if settings.mqtt_url is None:
        raise ValueError("no mqtt_url configured")
    host, port, user, password, tls = parse_url(settings.mqtt_url.get_secret_value())
    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"{settings.mqtt_client_id}-cli"[:64],
                         protocol=MQTTProtocolVersion.MQTTv5)
    if user is not None:
        client.username_pw_set(user, password)
    if tls:
        client.tls_set()
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        for site, room_id, etag in notices:
            info = client.publish(roster_topic(site, room_id),
                                  RosterNotice(etag=etag).model_dump_json(), qos=1, retain=True)
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise OSError(f"broker did not take the roster notice of {room_id}")
    finally:
        client.disconnect()
        client.loop_stop()
