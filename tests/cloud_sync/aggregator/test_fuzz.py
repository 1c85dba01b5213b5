"""Malformed input gets a 4xx with a reason, never a 500 (nor a stored row)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cloud_sync.aggregator.db.models import Attendance
from tests.cloud_sync.aggregator.conftest import World, batch, record


def _good(world: World) -> dict[str, Any]:
    return batch(world, [record(world, "S001", world.at(0, 9, 1))])


def _bodies(world: World) -> list[tuple[str, bytes]]:
    good = _good(world)
    rec = good["records"][0]

    def variant(**changes: Any) -> bytes:
        return json.dumps(batch(world, [{**rec, **changes}])).encode()

    return [
        ("malformed json", b'{"device_id": "pi-301", "records": ['),
        ("non-utf8", b'\xff\xfe{\x00"\x00v\x00"\x00:\x001\x00}'),
        ("latin-1 in string", b'{"device_id": "pi-\xe9", "records": []}'),
        ("empty body", b""),
        ("json null", b"null"),
        ("json array", b"[1, 2, 3]"),
        ("records not a list", json.dumps({**good, "records": "x"}).encode()),
        ("confidence wrong type", variant(confidence="high")),
        ("confidence out of range", variant(confidence=7)),
        ("confidence NaN", variant(confidence=float("nan")).replace(b"NaN", b"NaN")),
        ("naive datetime", variant(seen_at="2026-01-05T09:00:00")),
        ("bad uuid", variant(key="not-a-uuid")),
        ("unknown record field", variant(colour="blue")),
        ("unknown top field", json.dumps({**good, "extra": 1}).encode()),
        ("wrong protocol version", json.dumps({**good, "v": 2}).encode()),
        ("id with slash", variant(student_id="../etc")),
        ("huge batch", json.dumps(batch(world, [
            record(world, "S001", world.at(0, 9)) for _ in range(1001)])).encode()),
        ("deep nesting", b"[" * 5000 + b"]" * 5000),
    ]


@pytest.fixture
def raw(world: World) -> TestClient:
    return TestClient(world.client.app, raise_server_exceptions=False)


def test_malformed_attendance_bodies(world: World, raw: TestClient, sessions: Any) -> None:
    for name, body in _bodies(world):
        r = raw.post("/api/v1/attendance", content=body,
                     headers={**world.device, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert "detail" in r.json(), name
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Attendance)) == 0


def test_semantically_bad_records_get_reasons(world: World, raw: TestClient) -> None:
    rec = _good(world)["records"][0]
    for changes in ({"seen_at": "9999-12-31T23:59:59-12:00"},
                    {"seen_at": "0001-01-01T00:00:00+14:00"},
                    {"seen_at": "1969-12-31T23:59:59+00:00"},
                    {"boot_id": "a\u0000b", "clock_synced": False},
                    {"monotonic_s": 1e300}, {"monotonic_s": "1e400"}):
        r = raw.post("/api/v1/attendance", json=batch(world, [{**rec, **changes}]),
                     headers=world.device)
        assert r.status_code in (200, 422), (changes, r.text)
        if r.status_code == 200:
            assert r.json()["accepted"] == 0 and r.json()["rejected"], changes


def test_malformed_heartbeats_and_events(world: World, raw: TestClient) -> None:
    hb = {"v": 1, "device_id": "pi-301", "room_id": "LAB-301", "software_version": "1",
          "sent_at": world.at(0, 9).isoformat(), "uptime_s": 1, "outbox_depth": 0}
    for changes in ({"outbox_depth": 10**30}, {"outbox_depth": -1}, {"cpu_temp_c": "hot"},
                    {"software_version": "x\u0000"}, {"sent_at": "9999-12-31T23:00:00-12:00"},
                    {"uptime_s": None}, {"boot_id": "b" * 65}, {"fps": 1e400},
                    {"outbox_depth": 2**40}, {"cpu_temp_c": 1e6}, {"uptime_s": 1e300}):
        body = json.dumps({**hb, **changes}).replace("Infinity", "1e400")
        r = raw.post("/api/v1/heartbeat", content=body,
                     headers={**world.device, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (changes, r.status_code, r.text)
    event = {"v": 1, "key": str(uuid.uuid4()), "device_id": "pi-301", "room_id": "LAB-301",
             "kind": "camera_offline", "message": "m", "at": world.at(0, 9).isoformat()}
    for changes in ({"kind": "meteor"}, {"message": "x" * 501}, {"message": "a\u0000"},
                    {"data": {"k": "\u0000"}}, {"at": "soon"}, {"key": 5}):
        r = raw.post("/api/v1/events", json={**event, **changes}, headers=world.device)
        assert 400 <= r.status_code < 500, (changes, r.status_code, r.text)


def test_malformed_admin_requests(world: World, raw: TestClient) -> None:
    cases = [
        ("post", "/api/v1/students", b"{oops"),
        ("post", "/api/v1/students", json.dumps({"id": "S1", "name": 5}).encode()),
        ("post", "/api/v1/students", json.dumps({"id": "S1", "name": "a\u0000"}).encode()),
        ("post", "/api/v1/schedules", json.dumps({"course_id": "CS101", "room_id": "LAB-301",
                                                  "weekday": 9, "start_time": "25:00",
                                                  "end_time": "x"}).encode()),
        ("patch", "/api/v1/schedules/999999999999999999999", b"{}"),
        ("patch", "/api/v1/schedules/abc", b"{}"),
        ("get", "/api/v1/students/..%2F..", b""),
        ("post", "/api/v1/students/S001/faces", b"not multipart"),
    ]
    for method, url, body in cases:
        r = raw.request(method.upper(), url, content=body,
                        headers={**world.admin, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (url, body[:40], r.status_code, r.text)
    bad_photo = raw.post("/api/v1/students/S001/faces", headers=world.admin,
                         files={"photo": ("x.jpg", b"definitely not a jpeg", "image/jpeg")})
    assert bad_photo.status_code in (400, 503), bad_photo.text
    missing = raw.post("/api/v1/students/NOPE/faces", headers=world.admin,
                       files={"photo": ("x.jpg", b"\xff\xd8", "image/jpeg")})
    assert missing.status_code == 404
