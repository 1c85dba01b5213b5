"""GET /api/v1/schedule: the room's day, rosters of enrolled students only, ETag + 304."""

from __future__ import annotations

from typing import Any

import numpy as np

from cloud_sync.aggregator.services.faces import store_embedding
from cloud_sync.protocol import EMBEDDER_IDS, ScheduleResponse
from tests.cloud_sync.aggregator.conftest import World


def _add_faces(world: World, sessions: Any, settings: Any, students: list[str]) -> None:
    rng = np.random.default_rng(1)
    with sessions() as session:
        for sid in students:
            vector = rng.normal(size=128).astype(np.float32)
            store_embedding(session, settings, sid,
                            {EMBEDDER_IDS["sface"]: vector, EMBEDDER_IDS["dlib"]: -vector},
                            0.9, "test")


def _get(world: World, at: Any, headers: dict | None = None, **extra: Any) -> Any:
    return world.client.get("/api/v1/schedule",
                            params={"room_id": extra.pop("room", "LAB-301"),
                                    "at": at.isoformat()},
                            headers={**(headers or world.device), **extra})


def test_day_and_rosters(world: World, sessions: Any, settings: Any) -> None:
    _add_faces(world, sessions, settings, ["S001", "S002", "S004", "S005"])
    r = _get(world, world.at(0, 9, 30))
    assert r.status_code == 200, r.text
    sched = ScheduleResponse.model_validate(r.json())
    assert sched.current_course_id == "CS101"
    assert [s.course_id for s in sched.sessions] == ["CS101", "MA201"]
    assert sched.sessions[0].starts_at == world.at(0, 9)
    assert sched.date == world.at(0, 0).date()
    cs = {e.student_id: e for e in sched.rosters["CS101"]}
    assert set(cs) == {"S001", "S002", "S004"}  # S003 has no face; S005 is not enrolled
    assert len(cs["S001"].embeddings) == 1 and len(cs["S001"].embeddings[0]) == 128
    assert [e.student_id for e in sched.rosters["MA201"]] == ["S004"]
    between = ScheduleResponse.model_validate(_get(world, world.at(0, 10, 45)).json())
    assert between.current_course_id is None and len(between.sessions) == 2
    tuesday = ScheduleResponse.model_validate(_get(world, world.at(1, 9, 30)).json())
    assert tuesday.sessions == [] and tuesday.rosters == {}


def test_etag_and_304(world: World, sessions: Any, settings: Any) -> None:
    _add_faces(world, sessions, settings, ["S001"])
    first = _get(world, world.at(0, 9, 30))
    etag = first.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    again = _get(world, world.at(0, 9, 30), **{"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["etag"] == etag and again.content == b""
    # A change in the roster changes the ETag.
    _add_faces(world, sessions, settings, ["S002"])
    changed = _get(world, world.at(0, 9, 30), **{"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag


def test_device_reads_only_its_room(world: World) -> None:
    assert _get(world, world.at(0, 9), room="LAB-302").status_code == 403
    assert _get(world, world.at(0, 9), headers=world.other, room="LAB-302").status_code == 200
    assert _get(world, world.at(0, 9), headers=world.admin, room="LAB-302").status_code == 200
    assert _get(world, world.at(0, 9), headers=world.admin, room="NOPE").status_code == 404
    r = world.client.get("/api/v1/schedule", params={"room_id": "LAB-301"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    naive = world.client.get("/api/v1/schedule",
                             params={"room_id": "LAB-301", "at": "2026-01-05T09:00:00"},
                             headers=world.device)
    assert naive.status_code == 422


def test_rosters_per_embedder(world: World, sessions: Any, settings: Any) -> None:
    """Each device gets the descriptors of its own embedder; the response says which; an
    embedder the aggregator does not compute is a 422 with the fix."""
    _add_faces(world, sessions, settings, ["S001"])

    def roster(**params: str) -> tuple[str, list[float]]:
        r = world.client.get("/api/v1/schedule", headers=world.device,
                             params={"room_id": "LAB-301", "at": world.at(0, 9, 30).isoformat(),
                                     **params})
        assert r.status_code == 200, r.text
        sched = ScheduleResponse.model_validate(r.json())
        return sched.embedder, sched.rosters["CS101"][0].embeddings[0]

    default, vector = roster()
    assert default == EMBEDDER_IDS["sface"]
    assert roster(embedder="sface") == (default, vector)
    dlib, other = roster(embedder="dlib")
    assert dlib == EMBEDDER_IDS["dlib"] and np.allclose(other, -np.asarray(vector))
    bad = world.client.get("/api/v1/schedule", headers=world.device,
                           params={"room_id": "LAB-301", "embedder": "facenet"})
    assert bad.status_code == 422
