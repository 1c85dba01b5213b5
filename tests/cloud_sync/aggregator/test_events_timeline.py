"""Classroom events on the aggregator (SQLite and PostgreSQL): the per-session occupancy and
attention timeline in the reports API, event retention, and schema versions over HTTP."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from cloud_sync.aggregator.db.models import DeadLetter, EventRow
from cloud_sync.aggregator.services.events import prune_events
from tests.cloud_sync.aggregator.conftest import World


def event(world: World, kind: str, at_h: float, data: dict[str, Any], *, session: str,
          severity: str = "info") -> dict[str, Any]:
    return {"v": 2, "key": str(uuid.uuid4()), "device_id": world.device_id,
            "room_id": "LAB-301", "kind": kind, "severity": severity, "message": kind,
            "at": (world.at(0, 9) + timedelta(hours=at_h)).isoformat(), "session_id": session,
            "data": data}


def occupancy(n: int) -> dict[str, Any]:
    return {"count": n, "faces": n, "turned_away": 0, "capacity": 30, "free": 30 - n,
            "occupied_share": round(n / 30, 3), "window_s": 10.0}


def test_session_timeline_and_retention(world: World, sessions: Any) -> None:
    day = world.at(0, 9).date().isoformat()
    cs, ma = f"CS101@{day}", f"MA201@{day}"
    posted = [
        event(world, "occupancy", 0.0, occupancy(12), session=cs),
        event(world, "attention", 0.1, {"faces": 12, "facing_front": 9, "share": 0.75,
                                        "window_s": 10.0}, session=cs),
        event(world, "occupancy", 0.5, occupancy(25), session=cs),
        event(world, "unknown_face", 0.6, {"alert_level": "WARNING", "alert_message": "x",
                                           "details": {"unknown_faces": 1}},
              session=cs, severity="warning"),
        event(world, "occupancy", 2.0, occupancy(8), session=ma),
    ]
    for e in posted:
        r = world.client.post("/api/v1/events", json=e, headers=world.device)
        assert r.status_code == 200, r.text
    r = world.client.get("/api/v1/reports/timeline", params={"room_id": "LAB-301",
                         "session_id": cs}, headers=world.admin)
    assert r.status_code == 200
    body = r.json()
    assert [(p["count"], p["free"]) for p in body["occupancy"]] == [(12, 18), (25, 5)]
    assert [p["share"] for p in body["attention"]] == [0.75]
    assert [(a["severity"], a["unknown_faces"]) for a in body["unknown_face_alerts"]] == [
        ("warning", 1)]
    assert body["truncated"] is False
    # admin only; a malformed session id is a 422
    assert world.client.get("/api/v1/reports/timeline", params={"room_id": "LAB-301",
                            "session_id": cs}, headers=world.device).status_code == 403
    assert world.client.get("/api/v1/reports/timeline", params={"room_id": "LAB-301",
                            "session_id": "CS101"}, headers=world.admin).status_code == 422
    # the event list shows the schema version and the session
    listed = world.client.get("/api/v1/events", params={"kind": "occupancy"},
                              headers=world.admin).json()
    assert {(e["v"], e["session_id"]) for e in listed} == {(2, cs), (2, ma)}
    # retention: keep 1 day, now = the next day 10:30: the MA201 event (11:00) stays
    with sessions() as session:
        deleted = prune_events(session, 1, now=world.at(1, 10, 30))
        left = session.scalar(select(func.count()).select_from(EventRow))
    assert deleted == 4 and left == 1


def test_event_versions_over_http(world: World, sessions: Any) -> None:
    day = world.at(0, 9).date().isoformat()
    future = event(world, "occupancy", 0, occupancy(3), session=f"CS101@{day}") | {"v": 3}
    r = world.client.post("/api/v1/events", json=future, headers=world.device)
    assert r.status_code == 422
    assert r.json()["detail"] == ("event schema version 3 is not supported (this side reads "
                                  "1, 2)")
    with sessions() as session:
        reasons = session.scalars(select(DeadLetter.reason)).all()
    assert reasons == [r.json()["detail"]]
    wrong = event(world, "attention", 0, occupancy(3), session=f"CS101@{day}")
    r = world.client.post("/api/v1/events", json=wrong, headers=world.device)
    assert r.status_code == 422 and "attention payload" in r.text
    v1_with_session = event(world, "device_started", 0, {}, session=f"CS101@{day}") | {"v": 1}
    assert world.client.post("/api/v1/events", json=v1_with_session,
                             headers=world.device).status_code == 422
