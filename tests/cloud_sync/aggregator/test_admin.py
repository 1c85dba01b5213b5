"""Admin CRUD, credentials, CSV import, rate limiting, events."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.db.models import Device
from cloud_sync.aggregator.services.security import hash_secret
from tests.cloud_sync.aggregator.conftest import World, auth


def test_crud_cycle(world: World) -> None:
    c, admin = world.client, world.admin
    assert c.post("/api/v1/students", json={"id": "S100", "name": "Ada"},
                  headers=admin).status_code == 201
    assert c.post("/api/v1/students", json={"id": "S100", "name": "Ada"},
                  headers=admin).status_code == 409
    r = c.patch("/api/v1/students/S100", json={"email": "ada@example.org"}, headers=admin)
    assert r.status_code == 200 and r.json()["email"] == "ada@example.org"
    assert c.get("/api/v1/students/S100", headers=admin).json()["name"] == "Ada"
    assert len(c.get("/api/v1/students", params={"limit": 2}, headers=admin).json()) == 2
    assert c.delete("/api/v1/students/S100", headers=admin).status_code == 204
    assert c.get("/api/v1/students/S100", headers=admin).status_code == 404
    # schedules
    r = c.post("/api/v1/schedules", json={"course_id": "PH1", "room_id": "LAB-302",
                                          "weekday": "Friday", "start_time": "14:00",
                                          "end_time": "13:00"}, headers=admin)
    assert r.status_code == 422 and "end_time" in r.text
    r = c.post("/api/v1/schedules", json={"course_id": "PH1", "room_id": "LAB-302",
                                          "weekday": "Friday", "start_time": "14:00",
                                          "end_time": "15:00"}, headers=admin)
    assert r.status_code == 201 and r.json()["weekday"] == 4
    sid = r.json()["id"]
    assert c.patch(f"/api/v1/schedules/{sid}", json={"end_time": "13:00"},
                   headers=admin).status_code == 400
    assert c.patch(f"/api/v1/schedules/{sid}", json={"end_time": "16:00"},
                   headers=admin).json()["end_time"] == "16:00:00"
    assert c.post("/api/v1/schedules", json={"course_id": "NOPE", "room_id": "LAB-302",
                                             "weekday": 1, "start_time": "14:00",
                                             "end_time": "15:00"}, headers=admin
                  ).status_code == 404
    assert c.delete(f"/api/v1/schedules/{sid}", headers=admin).status_code == 204
    # enrollments
    assert c.post("/api/v1/enrollments", json={"student_id": "S001", "course_id": "CS101"},
                  headers=admin).status_code == 409
    listed = c.get("/api/v1/enrollments", params={"course_id": "CS101"}, headers=admin).json()
    assert {e["student_id"] for e in listed} == {"S001", "S002", "S003", "S004"}
    assert c.delete("/api/v1/enrollments/S001/CS101", headers=admin).status_code == 204
    # rooms: bad time zone; room with devices cannot go
    assert c.post("/api/v1/rooms", json={"id": "X1", "timezone": "Mars/Base"},
                  headers=admin).status_code == 422
    assert c.delete("/api/v1/rooms/LAB-301", headers=admin).status_code == 409
    assert c.post("/api/v1/students", json={"id": "S 1", "name": "x"},
                  headers=admin).status_code == 422


def test_devices_keys_hashed_and_rotated(world: World, sessions: Any) -> None:
    c, admin = world.client, world.admin
    r = c.post("/api/v1/devices", json={"room_id": "LAB-302", "id": "pi-new"}, headers=admin)
    assert r.status_code == 201
    key = r.json()["api_key"]
    with sessions() as session:
        device = session.scalars(select(Device).where(Device.id == "pi-new")).one()
        assert device.key_hash == hash_secret(key) and key not in device.key_hash
    assert "api_key" not in c.get("/api/v1/devices/pi-new", headers=admin).json()
    assert c.get("/api/v1/schedule", params={"room_id": "LAB-302"},
                 headers=auth(key)).status_code == 200
    new = c.post("/api/v1/devices/pi-new/rotate-key", headers=admin).json()["api_key"]
    assert c.get("/api/v1/schedule", params={"room_id": "LAB-302"},
                 headers=auth(key)).status_code == 401
    assert c.get("/api/v1/schedule", params={"room_id": "LAB-302"},
                 headers=auth(new)).status_code == 200
    assert c.delete("/api/v1/devices/pi-new", headers=admin).status_code == 204
    assert c.get("/api/v1/schedule", params={"room_id": "LAB-302"},
                 headers=auth(new)).status_code == 401
    assert c.post("/api/v1/devices", json={"room_id": "NOPE"}, headers=admin).status_code == 404


def test_write_endpoints_authenticated(world: World) -> None:
    c = world.client
    for method, url in (("post", "/api/v1/attendance"), ("post", "/api/v1/heartbeat"),
                        ("post", "/api/v1/events"), ("post", "/api/v1/students"),
                        ("post", "/api/v1/import/students"), ("delete", "/api/v1/rooms/LAB-301"),
                        ("post", "/api/v1/students/S001/faces")):
        assert getattr(c, method)(url).status_code == 401, url
        assert getattr(c, method)(url, headers=auth("dk_wrong")).status_code == 401, url
    # a device key is not an admin token, and an admin token is not a device key
    assert c.post("/api/v1/students", json={"id": "S9", "name": "x"},
                  headers=world.device).status_code == 403
    assert c.post("/api/v1/attendance", json={"device_id": "pi-301", "records": []},
                  headers=world.admin).status_code == 403


def test_csv_import_reports_row_errors(world: World) -> None:
    c, admin = world.client, world.admin
    text = "id,name,email\nS200,Alan,\nS201,,x@y\nbad id,Bob,\nS001,Renamed,\n"
    r = c.post("/api/v1/import/students", content=text.encode(),
               headers={**admin, "Content-Type": "text/csv"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert (report["rows"], report["created"], report["updated"]) == (4, 1, 1)
    assert [e["row"] for e in report["errors"]] == [3, 4]
    assert "name" in report["errors"][0]["error"]
    r = c.post("/api/v1/import/enrollments", headers=admin,
               files={"file": ("e.csv", b"student_id,course_id\nS200,CS101\nS200,NOPE\n")})
    assert r.json()["created"] == 1 and "NOPE" in r.json()["errors"][0]["error"]
    sched = ("course_id,room_id,weekday,start_time,end_time,effective_from,effective_to\n"
             "CS101,LAB-302,Wed,08:00,09:00,2026-01-01,2026-12-31\n"
             "CS101,LAB-302,Wed,08:00,09:00,2026-01-01,2026-12-31\n"
             "CS101,LAB-302,Xday,08:00,09:00,,\n")
    r = c.post("/api/v1/import/schedules", content=sched, headers=admin).json()
    assert (r["created"], r["unchanged"], len(r["errors"])) == (1, 1, 1)
    rooms = "id,name,site,timezone\nR9,Room 9,south,Europe/Berlin\nR10,,south,Nowhere/X\n"
    r = c.post("/api/v1/import/rooms", content=rooms, headers=admin).json()
    assert r["created"] == 1 and r["errors"][0]["row"] == 3
    assert c.post("/api/v1/import/students", content="name\nx\n",
                  headers=admin).status_code == 400
    assert c.post("/api/v1/import/teachers", content="id\n", headers=admin).status_code == 422
    assert c.post("/api/v1/import/students", content=b"id,name\n\xff\xfe,x\n",
                  headers=admin).status_code == 400


def test_events_idempotent(world: World) -> None:
    event = {"v": 1, "key": str(uuid.uuid4()), "device_id": "pi-301", "room_id": "LAB-301",
             "kind": "camera_offline", "message": "no frames for 30 s",
             "at": world.at(0, 9).isoformat(), "data": {"seconds": 30}}
    first = world.client.post("/api/v1/events", json=event, headers=world.device)
    assert first.status_code == 200 and first.json() == {"stored": True, "duplicate": False}
    again = world.client.post("/api/v1/events", json=event, headers=world.device)
    assert again.json() == {"stored": False, "duplicate": True}
    event["room_id"] = "LAB-302"
    assert world.client.post("/api/v1/events", json=event,
                             headers=world.device).status_code == 403
    started = {**event, "key": str(uuid.uuid4()), "room_id": "LAB-301", "kind": "device_started",
               "severity": "info", "message": "started", "at": world.at(0, 10).isoformat()}
    assert world.client.post("/api/v1/events", json=started, headers=world.device).json()[
        "stored"]
    # the admin reads them, newest first, filtered; a device cannot
    listed = world.client.get("/api/v1/events", headers=world.admin)
    assert listed.status_code == 200
    assert [e["kind"] for e in listed.json()] == ["device_started", "camera_offline"]
    assert listed.json()[1]["data"] == {"seconds": 30}
    only = world.client.get("/api/v1/events", params={"kind": "camera_offline",
                            "device_id": "pi-301"}, headers=world.admin).json()
    assert [e["message"] for e in only] == ["no frames for 30 s"]
    later = world.client.get("/api/v1/events", params={"since": world.at(0, 9, 30).isoformat()},
                             headers=world.admin).json()
    assert [e["kind"] for e in later] == ["device_started"]
    assert world.client.get("/api/v1/events", headers=world.device).status_code == 403
    assert world.client.get("/api/v1/events", params={"kind": "meteor"},
                            headers=world.admin).status_code == 422


def test_rate_limit_429_with_retry_after(world: World, settings: Any) -> None:
    limited = aggregator_config.load(None, database_url=settings.database_url,
                                     rate_limit_per_min=3)
    with TestClient(create_app(limited)) as client:
        codes = [client.get("/api/v1/schedule", params={"room_id": "LAB-301"},
                            headers=world.device) for _ in range(4)]
        assert [r.status_code for r in codes] == [200, 200, 200, 429]
        assert int(codes[-1].headers["retry-after"]) >= 1
        # per device: the other device is not limited
        assert client.get("/api/v1/schedule", params={"room_id": "LAB-302"},
                          headers=world.other).status_code == 200
        # admins are not rate limited
        assert all(client.get("/api/v1/rooms", headers=world.admin).status_code == 200
                   for _ in range(5))
