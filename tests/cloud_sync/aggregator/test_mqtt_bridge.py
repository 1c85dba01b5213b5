"""The MQTT bridge on a real Mosquitto and the aggregator's real ingest services (SQLite):
acks, dead letters, events, heartbeats, Home Assistant discovery, roster notices."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from cloud_sync.protocol import (
    AttendanceBatch,
    BatchResult,
    Event,
    Heartbeat,
    UpdateReport,
    device_topic,
    roster_topic,
)
from tests.support.harness import (
    DEVICE,
    OTHER_DEVICE,
    OTHER_ROOM,
    ROOM,
    SITE,
    Aggregator,
    Broker,
    make_records,
    run_bridge,
    wait_until,
)
from tests.support.mqtt_client import TestClient

pytestmark = pytest.mark.mqtt


def _device(broker: Broker) -> TestClient:
    dev = TestClient(broker, DEVICE)
    assert not dev.wait_connected().is_failure
    dev.subscribe(device_topic(SITE, ROOM, DEVICE, "ack"))
    return dev


def _acks(dev: TestClient) -> list[BatchResult]:
    return [BatchResult.model_validate_json(p)
            for p in dev.received(device_topic(SITE, ROOM, DEVICE, "ack"))]


def test_batch_acked_once_stored_and_resend_counted_once(
    broker: Broker, bridge: object, aggregator_db: tuple[Aggregator, dict[str, str]]
) -> None:
    agg, _ = aggregator_db
    dev = _device(broker)
    try:
        batch = AttendanceBatch(device_id=DEVICE, records=make_records(25))
        topic = device_topic(SITE, ROOM, DEVICE, "attendance")
        dev.publish(topic, batch.model_dump_json())
        dev.publish(topic, batch.model_dump_json())  # the same batch again
        acks = wait_until(lambda: len(_acks(dev)) >= 2 and _acks(dev), 20, "two acks")
        assert [a.batch_id for a in acks] == [batch.batch_id, batch.batch_id]
        assert (acks[0].accepted, acks[0].duplicate, acks[0].rejected) == (25, 0, [])
        assert (acks[1].accepted, acks[1].duplicate) == (0, 25)
        keys = agg.attendance_keys()
        assert sorted(keys) == sorted(str(r.key) for r in batch.records)
    finally:
        dev.close()


def test_malformed_and_foreign_messages_are_dead_lettered(
    broker: Broker, bridge: object, aggregator_db: tuple[Aggregator, dict[str, str]]
) -> None:
    from cloud_sync.aggregator.metrics import REGISTRY

    def counted() -> float:
        return REGISTRY.get_sample_value(
            "aggregator_mqtt_messages_total", {"kind": "attendance", "result": "dead_letter"}
        ) or 0.0

    before = counted()
    agg, _ = aggregator_db
    dev = _device(broker)
    try:
        topic = device_topic(SITE, ROOM, DEVICE, "attendance")
        dev.publish(topic, b"not json")
        dev.publish(topic, b'{"v": 1, "device_id": "pi-lab301", "records": [{"key": "x"}]}')
        # A batch naming another device than the topic's.
        forged = AttendanceBatch(device_id=OTHER_DEVICE,
                                 records=make_records(2, device=OTHER_DEVICE, room=OTHER_ROOM))
        dev.publish(topic, forged.model_dump_json())
        # Our device under another room's topic: the broker's ACL refuses it ...
        wrong_room = device_topic(SITE, OTHER_ROOM, DEVICE, "attendance")
        assert dev.publish(wrong_room, AttendanceBatch(
            device_id=DEVICE, records=make_records(1)).model_dump_json()).is_failure
        # ... and the bridge refuses a device whose registration moved to another room (the
        # ACL file not regenerated yet).
        agg.execute("UPDATE devices SET room_id = ? WHERE id = ?", OTHER_ROOM, DEVICE)
        dev.publish(topic, AttendanceBatch(device_id=DEVICE,
                                           records=make_records(1)).model_dump_json())
        # its heartbeat too: a dead letter that names the real cause, and the refused
        # contact on the device's row for the console (issue 25 item 8)
        dev.publish(device_topic(SITE, ROOM, DEVICE, "heartbeat"), Heartbeat(
            device_id=DEVICE, room_id=ROOM, sent_at=datetime.now(UTC), clock_synced=True,
            software_version="t", uptime_s=1, outbox_depth=0).model_dump_json())
        wait_until(lambda: agg.scalar("SELECT count(*) FROM dead_letters") >= 5, 20,
                   "five dead letters")
        rows = __import__("sqlite3").connect(str(agg.db_path)).execute(
            "SELECT source, reason FROM dead_letters ORDER BY id").fetchall()
        reasons = " | ".join(r for (_, r) in rows)
        assert "invalid batch" in reasons
        assert "is not the topic's" in reasons
        mismatch = (f"room mismatch: device {DEVICE!r} is registered to room {OTHER_ROOM!r} "
                    f"but configured for {ROOM!r}")
        assert [s.rsplit("/", 1)[-1] for (s, r) in rows if r.startswith(mismatch)] == [
            "attendance", "heartbeat"]
        assert agg.scalar("SELECT refused_reason FROM devices WHERE id = ?",
                          DEVICE) == "room_mismatch"
        assert agg.scalar("SELECT refused_room FROM devices WHERE id = ?", DEVICE) == ROOM
        assert agg.attendance_keys() == []
        assert _acks(dev) == []  # nothing is acknowledged that was not stored
        assert counted() - before == 4
    finally:
        dev.close()


def test_events_and_heartbeats(
    broker: Broker, bridge: object, aggregator_db: tuple[Aggregator, dict[str, str]]
) -> None:
    agg, _ = aggregator_db
    dev = _device(broker)
    try:
        now = datetime.now(UTC)
        event = Event(device_id=DEVICE, room_id=ROOM, kind="device_started", severity="info",
                      message="hello", at=now)
        topic = device_topic(SITE, ROOM, DEVICE, "events")
        dev.publish(topic, event.model_dump_json())
        dev.publish(topic, event.model_dump_json())
        acks = wait_until(lambda: len(_acks(dev)) >= 2 and _acks(dev), 20, "event acks")
        assert [(a.batch_id, a.accepted, a.duplicate) for a in acks] == [
            (event.key, 1, 0), (event.key, 0, 1)]
        hb = Heartbeat(device_id=DEVICE, room_id=ROOM, software_version="t", sent_at=now,
                       uptime_s=5, outbox_depth=3)
        dev.publish(device_topic(SITE, ROOM, DEVICE, "heartbeat"), hb.model_dump_json())
        wait_until(lambda: agg.scalar("SELECT count(*) FROM heartbeats") == 1, 20, "heartbeat")
        assert agg.scalar("SELECT outbox_depth FROM heartbeats") == 3
        assert agg.scalar(
            "SELECT last_heartbeat_at IS NOT NULL FROM devices WHERE id = ?", DEVICE) == 1
        # the updater's report it repeats: kept once in the device's update history
        report = UpdateReport(state="refused", version="9.9", running="t", at=now,
                              reason="bad signature")
        for _ in range(2):
            dev.publish(device_topic(SITE, ROOM, DEVICE, "heartbeat"),
                        hb.model_copy(update={"update": report}).model_dump_json())
        wait_until(lambda: agg.scalar("SELECT count(*) FROM heartbeats") == 3, 20, "heartbeats")
        assert agg.scalar("SELECT count(*) FROM device_updates WHERE device_id = ? AND "
                          "state = 'refused' AND version = '9.9'", DEVICE) == 1
    finally:
        dev.close()


def test_home_assistant_discovery_and_roster_notice(
    broker: Broker, bridge: object, aggregator_db: tuple[Aggregator, dict[str, str]]
) -> None:
    ha = TestClient(broker, "homeassistant")
    dev = _device(broker)
    try:
        ha.wait_connected()
        ha.subscribe("homeassistant/#")
        ha.subscribe(f"classroom/{SITE}/{ROOM}/state")
        node = f"attendance_{SITE}_LAB-301"
        present_cfg = f"homeassistant/sensor/{node}/present/config"
        online_cfg = f"homeassistant/binary_sensor/{node}/{DEVICE}_online/config"
        wait_until(lambda: ha.received(present_cfg) and ha.received(online_cfg), 20,
                   "discovery configs")
        config = json.loads(ha.received(online_cfg)[-1])
        assert config["state_topic"] == device_topic(SITE, ROOM, DEVICE, "status")
        assert config["payload_on"] == "online"
        assert config["device"]["identifiers"] == [node]
        # A batch makes the room's state (present count of the running class) update.
        batch = AttendanceBatch(device_id=DEVICE, records=make_records(30))
        dev.publish(device_topic(SITE, ROOM, DEVICE, "attendance"), batch.model_dump_json())

        def present() -> int | None:
            states = [json.loads(p) for p in ha.received(f"classroom/{SITE}/{ROOM}/state")]
            return states[-1]["present_count"] if states else None

        # The seeded schedule runs CS101 in LAB-301 now: 30 distinct students seen in it.
        wait_until(lambda: present() == 30, 30, "present count")
        # Roster change notice: retained, so a device subscribing later still gets it.
        bridge.notify_roster_changed(SITE, ROOM, "etag-42")  # type: ignore[attr-defined]
        late = TestClient(broker, OTHER_DEVICE)
        late.wait_connected()
        late.subscribe(roster_topic(SITE, ROOM))
        wait_until(lambda: late.received(roster_topic(SITE, ROOM)), 10, "retained roster")
        assert json.loads(late.received(roster_topic(SITE, ROOM))[0])["etag"] == "etag-42"
        late.close()
    finally:
        ha.close()
        dev.close()


def test_two_bridges_share_the_traffic_and_one_takes_over_when_the_other_stops(
    broker: Broker, aggregator_db: tuple[Aggregator, dict[str, str]]
) -> None:
    """MQTT 5 shared subscription: two bridges in one share group each get some of the
    batches (never both the same one); once one stops, the other gets every batch."""
    from cloud_sync.aggregator.config import load
    from cloud_sync.aggregator.db.session import make_engine, make_session_factory
    from cloud_sync.aggregator.mqtt_bridge import MESSAGES, MqttBridge

    agg, _ = aggregator_db
    settings = load(None, database_url=agg.db_url, mqtt_url=broker.url("aggregator"),
                    ha_discovery=False)
    engine = make_engine(agg.db_url)
    factory = make_session_factory(engine)
    bridges = [MqttBridge(settings, factory, instance=name) for name in ("a", "b")]
    assert bridges[0].client_id != bridges[1].client_id
    ok = MESSAGES.labels("attendance", "ok")
    dev = _device(broker)
    topic = device_topic(SITE, ROOM, DEVICE, "attendance")
    try:
        for bridge in bridges:
            bridge.start()
        wait_until(lambda: all(b.state == "connected" for b in bridges), 10, "bridges")
        time.sleep(0.3)  # subscriptions
        handled: dict[str, int] = {}
        original = MqttBridge._handle

        def counting(self: MqttBridge, *args: object) -> None:
            original(self, *args)  # type: ignore[arg-type]
            handled[self.client_id] = handled.get(self.client_id, 0) + 1

        MqttBridge._handle = counting  # type: ignore[method-assign]
        try:
            before = ok._value.get()
            for _ in range(10):
                batch = AttendanceBatch(device_id=DEVICE, records=make_records(5))
                dev.publish(topic, batch.model_dump_json())
            wait_until(lambda: len(agg.attendance_keys()) == 50, 20, "10 batches stored")
            assert ok._value.get() - before == 10  # each batch handled once, not twice
            assert sorted(handled) == sorted(b.client_id for b in bridges), handled
            bridges[0].stop()
            handled.clear()
            for _ in range(6):
                batch = AttendanceBatch(device_id=DEVICE, records=make_records(5))
                dev.publish(topic, batch.model_dump_json())
            wait_until(lambda: len(agg.attendance_keys()) == 80, 20, "6 more batches stored")
            assert handled == {bridges[1].client_id: 6}
        finally:
            MqttBridge._handle = original  # type: ignore[method-assign]
        wait_until(lambda: len(_acks(dev)) == 16, 10, "16 acks")
    finally:
        for bridge in bridges:
            bridge.stop()
        dev.close()
        engine.dispose()


def test_home_assistant_classroom_entities_and_unknown_face_trigger(
    broker: Broker, bridge: object, aggregator_db: tuple[Aggregator, dict[str, str]]
) -> None:
    """Availability on the room sensors, configuration_url, class now, occupancy from the
    devices' occupancy events, and unknown-face alerts firing the device triggers."""
    from cloud_sync.aggregator.ha_discovery import room_alert_topic

    ha = TestClient(broker, "homeassistant")
    dev = _device(broker)
    node = f"attendance_{SITE}_LAB-301"
    try:
        ha.wait_connected()
        ha.subscribe("homeassistant/#")
        ha.subscribe(f"classroom/{SITE}/{ROOM}/state")
        ha.subscribe(room_alert_topic(SITE, ROOM))
        configs = {name: f"homeassistant/{name}/config" for name in (
            f"sensor/{node}/present", f"sensor/{node}/class_now", f"sensor/{node}/occupancy",
            f"device_automation/{node}/unknown_face_warning",
            f"device_automation/{node}/unknown_face_critical")}
        wait_until(lambda: all(ha.received(t) for t in configs.values()), 20, "configs")
        present = json.loads(ha.received(configs[f"sensor/{node}/present"])[-1])
        assert present["availability_mode"] == "any"
        assert present["availability"] == [{
            "topic": device_topic(SITE, ROOM, DEVICE, "status"),
            "payload_available": "online", "payload_not_available": "offline"}]
        assert present["device"]["configuration_url"] == f"http://{DEVICE}.local:8080/"
        trigger = json.loads(ha.received(
            configs[f"device_automation/{node}/unknown_face_critical"])[-1])
        assert trigger == {"automation_type": "trigger", "topic": room_alert_topic(SITE, ROOM),
                           "type": "unknown_face", "subtype": "critical",
                           "payload": "critical", "device": present["device"]}
        now = datetime.now(UTC)
        session = f"CS101@{now.date().isoformat()}"
        occupancy = Event(device_id=DEVICE, room_id=ROOM, kind="occupancy", severity="info",
                          message="17 of 30 people", at=now, session_id=session,
                          data={"count": 17, "faces": 16, "turned_away": 1, "capacity": 30,
                                "free": 13, "occupied_share": 0.567, "window_s": 10.0})
        alert = Event(device_id=DEVICE, room_id=ROOM, kind="unknown_face", severity="critical",
                      message="3 unknown faces during the class", at=now, session_id=session,
                      data={"alert_level": "CRITICAL", "alert_message": "3 unknown faces",
                            "details": {"unknown_faces": 3}})
        for event in (occupancy, alert):
            dev.publish(device_topic(SITE, ROOM, DEVICE, "events"), event.model_dump_json())

        def state() -> dict[str, object] | None:
            states = [json.loads(p) for p in ha.received(f"classroom/{SITE}/{ROOM}/state")]
            return states[-1] if states else None

        # the seeded schedule runs CS101 ("Intro to CS") in LAB-301 now
        wait_until(lambda: (s := state()) and s["occupancy"] and s["class_now"], 30, "state")
        latest = state()
        assert latest is not None and latest["class_now"] == "Intro to CS"
        assert latest["occupancy"]["count"] == 17 and latest["occupancy"]["free"] == 13
        wait_until(lambda: ha.received(room_alert_topic(SITE, ROOM)), 30, "the alert trigger")
        assert ha.received(room_alert_topic(SITE, ROOM)) == [b"critical"]
    finally:
        ha.close()
        dev.close()


def test_dead_letters_are_bounded(
    broker: Broker, aggregator_db: tuple[Aggregator, dict[str, str]]
) -> None:
    """Issue 12 #4: 20 messages of 500 KB used to add 10 MB to dead_letters. Over
    mqtt_max_message_bytes a message is refused unread; a dead letter keeps only a prefix; the
    table keeps dead_letter_max_rows rows and dead_letter_max_age_days days."""
    agg, _ = aggregator_db
    agg.execute("INSERT INTO dead_letters (source, payload, reason, received_at) "
                "VALUES ('old', x'00', 'old', '2000-01-01 00:00:00')")
    dev = _device(broker)
    limits = {"mqtt_max_message_bytes": 100_000, "dead_letter_keep_bytes": 1000,
              "dead_letter_max_rows": 100}
    try:
        with run_bridge(broker, agg, **limits):
            topic = device_topic(SITE, ROOM, DEVICE, "heartbeat")
            for _ in range(20):
                dev.publish(topic, b"{" * 500_000)
            wait_until(lambda: agg.scalar("SELECT count(*) FROM dead_letters") >= 20, 30,
                       "twenty dead letters")
            assert agg.scalar("SELECT count(*) FROM dead_letters WHERE source = 'old'") == 0
            assert agg.scalar("SELECT max(length(payload)) FROM dead_letters") == 1000
            reason = agg.scalar("SELECT reason FROM dead_letters ORDER BY id DESC LIMIT 1")
            assert "500000 bytes is over mqtt_max_message_bytes" in reason
            assert "first 1000 kept" in reason
            for i in range(110):
                dev.publish(topic, f"not json {i}".encode())
            wait_until(lambda: agg.scalar(
                "SELECT count(*) FROM dead_letters WHERE payload = CAST('not json 109' AS BLOB)"
            ) == 1, 30, "the last dead letter")
            assert agg.scalar("SELECT count(*) FROM dead_letters") == 100
            assert agg.scalar("SELECT sum(length(payload)) FROM dead_letters") < 100 * 1000
    finally:
        dev.close()
