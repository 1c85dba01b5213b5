"""POST /api/v1/attendance and the ingest service: idempotency, rejections, course by time."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select

from cloud_sync.aggregator.db.models import Attendance
from cloud_sync.aggregator.services.ingest import ingest_batch
from cloud_sync.protocol import AttendanceBatch, BatchResult
from tests.cloud_sync.aggregator.conftest import World, batch, record


def _post(world: World, records: list[dict[str, Any]], headers: dict | None = None) -> Any:
    return world.client.post("/api/v1/attendance", json=batch(world, records),
                             headers=headers or world.device)


def _rows(sessions: Any) -> list[Attendance]:
    with sessions() as session:
        return list(session.scalars(select(Attendance).order_by(Attendance.id)))


def test_batch_is_idempotent(world: World, sessions: Any) -> None:
    recs = [record(world, f"S00{i}", world.at(0, 9, i)) for i in range(1, 5)]
    first = _post(world, recs)
    assert first.status_code == 200, first.text
    result = BatchResult.model_validate(first.json())
    assert (result.accepted, result.duplicate, result.rejected) == (4, 0, [])
    again = BatchResult.model_validate(_post(world, recs).json())
    assert (again.accepted, again.duplicate) == (0, 4)
    mixed = [*recs[:2], record(world, "S001", world.at(0, 9, 30))]
    third = BatchResult.model_validate(_post(world, mixed).json())
    assert (third.accepted, third.duplicate) == (1, 2)
    assert len(_rows(sessions)) == 5


def test_bad_records_rejected_with_reason_rest_kept(world: World, sessions: Any) -> None:
    good = record(world, "S001", world.at(0, 9, 5))
    other_room = record(world, "S002", world.at(0, 9, 5), room_id="LAB-302")
    other_device = record(world, "S003", world.at(0, 9, 5), device_id="pi-302")
    unknown = record(world, "S999", world.at(0, 9, 5))
    dup_in_batch = dict(good)
    r = _post(world, [good, other_room, other_device, unknown, dup_in_batch])
    assert r.status_code == 200, r.text
    result = BatchResult.model_validate(r.json())
    assert result.accepted == 1 and result.duplicate == 1
    reasons = {rej.key: rej.reason for rej in result.rejected}
    assert "room" in reasons[other_room["key"]]
    assert "device" in reasons[other_device["key"]]
    assert "unknown student" in reasons[unknown["key"]]
    assert [a.student_id for a in _rows(sessions)] == ["S001"]


def test_batch_for_another_device_is_forbidden(world: World) -> None:
    body = batch(world, [record(world, "S001", world.at(0, 9))], device_id="pi-302")
    r = world.client.post("/api/v1/attendance", json=body, headers=world.device)
    assert r.status_code == 403
    r = world.client.post("/api/v1/attendance", json=body, headers=world.other)
    assert r.status_code == 200
    assert len(r.json()["rejected"]) == 1  # the record itself names pi-301 and LAB-301


def test_course_decided_by_schedule_not_device(world: World, sessions: Any) -> None:
    recs = [
        record(world, "S001", world.at(0, 9, 10), course_id="MA201"),  # during CS101
        record(world, "S004", world.at(0, 10, 55)),  # 5 min before MA201: early arrival
        record(world, "S002", world.at(0, 13, 0)),  # no class
        record(world, "S003", world.at(1, 9, 10)),  # Tuesday: no class
    ]
    assert _post(world, recs).json()["accepted"] == 4
    rows = {a.student_id: a for a in _rows(sessions)}
    assert rows["S001"].course_id == "CS101" and rows["S001"].device_course_id == "MA201"
    assert rows["S004"].course_id == "MA201"
    assert rows["S002"].course_id is None
    assert rows["S003"].course_id is None
    assert all(not a.time_uncertain and a.correction == "none" for a in rows.values())


def test_service_signature_used_by_mqtt_bridge(world: World, sessions: Any) -> None:
    recs = [record(world, "S001", world.at(0, 9, 1)), record(world, "S002", world.at(0, 9, 2))]
    model = AttendanceBatch.model_validate(batch(world, recs))
    with sessions() as session:
        first = ingest_batch(session, world.device_id, model)
    with sessions() as session:
        second = ingest_batch(session, world.device_id, model)
    assert (first.accepted, second.duplicate) == (2, 2)
    assert first.batch_id == model.batch_id
    with sessions() as session:
        wrong = ingest_batch(session, world.other_device_id, model)
        unknown = ingest_batch(session, "no-such-device", model)
        total = session.scalar(select(func.count()).select_from(Attendance))
    assert wrong.accepted == 0 and len(wrong.rejected) == 2
    assert unknown.accepted == 0 and "unknown device" in unknown.rejected[0].reason
    assert total == 2


def test_full_batch_of_1000(world: World, sessions: Any) -> None:
    recs = [record(world, f"S00{1 + i % 4}", world.at(0, 9, 0, i % 3600)) for i in range(1000)]
    r = _post(world, recs)
    assert r.status_code == 200 and r.json()["accepted"] == 1000
    recs.append(record(world, "S001", world.at(0, 9)))
    assert _post(world, recs).status_code == 422  # 1,001 records
    assert len(_rows(sessions)) == 1000


def test_same_key_twice_counts_once(world: World) -> None:
    key = str(uuid.uuid4())
    a = record(world, "S001", world.at(0, 9, 1), key=key)
    b = record(world, "S001", world.at(0, 9, 2), key=key)
    result = _post(world, [a, b]).json()
    assert (result["accepted"], result["duplicate"]) == (1, 1)
