"""Clock correction of records made before the device clock was synchronised."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from cloud_sync.aggregator.db.models import Attendance, Device
from tests.cloud_sync.aggregator.conftest import World, batch, record

STALE = datetime.fromisoformat("2020-01-01T00:00:00+00:00")  # a Pi booted offline


def _heartbeat(world: World, sent_at: datetime, *, synced: bool, boot: str,
               mono: float | None) -> Any:
    body = {
        "v": 1, "device_id": world.device_id, "room_id": "LAB-301", "software_version": "1.0",
        "sent_at": sent_at.isoformat(), "clock_synced": synced, "boot_id": boot,
        "monotonic_s": mono, "uptime_s": mono or 0.0, "outbox_depth": 3,
    }
    return world.client.post("/api/v1/heartbeat", json=body, headers=world.device)


def _unsynced(world: World, student: str, mono: float, boot: str = "boot-1") -> dict:
    return record(world, student, STALE + timedelta(seconds=mono), clock_synced=False,
                  boot_id=boot, monotonic_s=mono)


def _by_student(sessions: Any) -> dict[str, Attendance]:
    with sessions() as session:
        return {a.student_id: a for a in session.scalars(select(Attendance))}


def test_synced_heartbeat_of_same_boot_corrects_by_monotonic(world: World, sessions: Any) -> None:
    # The device booted at 09:00 true time (monotonic 0); the clock synced later. A heartbeat
    # at monotonic 3600 says 10:00 with a synced clock.
    assert _heartbeat(world, world.at(0, 10), synced=True, boot="boot-1",
                      mono=3600.0).status_code == 200
    rec = _unsynced(world, "S001", mono=300.0)  # truly 09:05
    r = world.client.post("/api/v1/attendance", json=batch(world, [rec]), headers=world.device)
    assert r.json()["accepted"] == 1
    row = _by_student(sessions)["S001"]
    assert row.correction == "heartbeat_sync" and not row.time_uncertain
    assert abs((row.at - world.at(0, 9, 5)).total_seconds()) < 1e-3
    assert row.seen_at == STALE + timedelta(seconds=300)
    assert row.course_id == "CS101"


def test_unsynced_heartbeat_gives_offset(world: World, sessions: Any) -> None:
    # Device clock is stuck in 2020; the heartbeat arrives now: offset = now - device time.
    assert _heartbeat(world, STALE + timedelta(seconds=1000), synced=False, boot="boot-2",
                      mono=None).status_code == 200
    rec = record(world, "S002", STALE + timedelta(seconds=940), clock_synced=False,
                 boot_id="boot-2")
    world.client.post("/api/v1/attendance", json=batch(world, [rec]), headers=world.device)
    row = _by_student(sessions)["S002"]
    assert row.correction == "heartbeat_offset" and not row.time_uncertain
    with sessions() as session:
        device = session.get(Device, world.device_id)
        assert device is not None and device.clock_offset_s is not None
        expected = STALE + timedelta(seconds=940 + device.clock_offset_s)
    assert abs((row.at - expected).total_seconds()) < 1.0


def test_no_heartbeat_flags_then_later_heartbeat_recorrects(world: World, sessions: Any) -> None:
    recs = [_unsynced(world, "S003", mono=600.0, boot="boot-3"),    # truly 09:10 -> CS101
            _unsynced(world, "S004", mono=7500.0, boot="boot-3")]   # truly 11:05 -> MA201
    world.client.post("/api/v1/attendance", json=batch(world, recs), headers=world.device)
    rows = _by_student(sessions)
    assert all(r.time_uncertain and r.correction == "uncertain" for r in rows.values())
    assert rows["S003"].at == STALE + timedelta(seconds=600)
    assert rows["S003"].course_id is None  # 2020-01-01 was a Wednesday: no class
    # Later the clock syncs; a heartbeat at monotonic 9000 says 11:30 true time.
    assert _heartbeat(world, world.at(0, 9, 0, 9000), synced=True, boot="boot-3",
                      mono=9000.0).status_code == 200
    rows = _by_student(sessions)
    assert not rows["S003"].time_uncertain and rows["S003"].correction == "heartbeat_sync"
    assert abs((rows["S003"].at - world.at(0, 9, 10)).total_seconds()) < 1e-3
    assert rows["S003"].course_id == "CS101"
    assert rows["S004"].course_id == "MA201"


def test_heartbeat_of_other_boot_does_not_correct(world: World, sessions: Any) -> None:
    _heartbeat(world, world.at(0, 10), synced=True, boot="other-boot", mono=3600.0)
    rec = _unsynced(world, "S001", mono=300.0, boot="boot-4")
    world.client.post("/api/v1/attendance", json=batch(world, [rec]), headers=world.device)
    assert _by_student(sessions)["S001"].time_uncertain


def test_heartbeat_for_other_device_or_room_is_forbidden(world: World) -> None:
    body = {"v": 1, "device_id": "pi-302", "room_id": "LAB-302", "software_version": "1",
            "sent_at": world.at(0, 9).isoformat(), "uptime_s": 1, "outbox_depth": 0}
    assert world.client.post("/api/v1/heartbeat", json=body,
                             headers=world.device).status_code == 403
    body.update(device_id=world.device_id)
    assert world.client.post("/api/v1/heartbeat", json=body,
                             headers=world.device).status_code == 403
