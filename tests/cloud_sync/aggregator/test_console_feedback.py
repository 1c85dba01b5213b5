"""A wrong recognition fed back: the device sent the descriptor it matched with the record; a
teacher marks it "not this student" and confirms the face it holds; the descriptor becomes a
negative example in the student's roster entry, and the device's matcher no longer gives that
face to the student while the student's own photos still match. Real photos (face_recognition
examples), real encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from appliance.recognition import Matcher, Roster
from appliance.vision.embedding import spec
from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import FaceNegative, RecordDescriptor
from cloud_sync.protocol import ScheduleResponse
from tests.cloud_sync.aggregator.conftest import World, batch, record

from .console_helpers import csrf_of, login

PW = "correct horse battery"


def _embed(client: TestClient, admin: dict, student: str, path: Path) -> None:
    r = client.post(f"/api/v1/students/{student}/faces", headers=admin,
                    files={"photo": (path.name, path.read_bytes(), "image/jpeg")})
    assert r.status_code == 201, r.text


def _roster(client: TestClient, world: World) -> Roster:
    sched = client.get("/api/v1/schedule", headers=world.device,
                       params={"room_id": "LAB-301", "at": world.at(0, 9, 30).isoformat()})
    answer = ScheduleResponse.model_validate(sched.json())
    return Roster.from_entries(answer.rosters["CS101"], answer.embedder)


def _lenient(roster: Roster) -> Matcher:
    """One student and any distance accepted (no margin), in the roster embedder's metric."""
    return Matcher(roster, threshold=2.0, margin=0.0,
                   metric=spec(roster.embedder.split("/")[0]).metric)


def test_not_this_student_becomes_a_negative(world: World, faces_dir: Path, model_dir: Path,
                                             settings: Any, tmp_path: Path) -> None:
    examples = faces_dir / "face_recognition" / "examples"
    configured = aggregator_config.load(None, database_url=settings.database_url,
                                        model_dir=model_dir, data_dir=tmp_path / "agg")
    app = create_app(configured)
    with TestClient(app) as client:
        _embed(client, world.admin, "S001", examples / "obama.jpg")  # S001 is Obama
        _embed(client, world.admin, "S002", examples / "biden.jpg")  # a stranger's face,
        biden = _roster(client, world).embeddings[1]                 # for its descriptor
        client.delete("/api/v1/students/S002", headers=world.admin)
        _embed(client, world.admin, "S003", examples / "obama2.jpg")
        obama2 = _roster(client, world).embeddings[1]
        client.delete("/api/v1/students/S003", headers=world.admin)

        # a lenient matcher (one student, wide threshold) gives Biden's face to S001
        before = _lenient(_roster(client, world)).match(np.stack([biden, obama2]))
        assert [m.student_id for m in before] == ["S001", "S001"]

        rec = record(world, "S001", world.at(0, 9, 5), descriptor=[float(v) for v in biden],
                     descriptor_embedder=_roster(client, world).embedder)
        assert client.post("/api/v1/attendance", json=batch(world, [rec]),
                           headers=world.device).json()["accepted"] == 1
        sessions = app.state.ctx.sessions
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(RecordDescriptor)) == 1
            accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
        login(client, "lee", PW)
        day = world.monday.date().isoformat()
        token = csrf_of(client.get(f"/courses/CS101?date={day}").text)
        r = client.post("/courses/CS101/wrong", data={"csrf": token, "record_key": rec["key"],
                                                       "date": day, "reason": "that was Joe"})
        assert r.status_code == 200
        with sessions() as session:
            negative = session.scalars(select(FaceNegative)).one()
            assert negative.state == "pending"  # held until the teacher confirms it
        assert "S001" not in _roster(client, world).negatives
        r = client.post(f"/courses/CS101/corrections/{negative.correction_id}/confirm",
                        data={"csrf": token})
        assert r.status_code == 200, r.text

        roster = _roster(client, world)
        assert "S001" in roster.negatives
        after = _lenient(roster).match(np.stack([biden, obama2]))
        assert after[0].student_id is None  # the same face is no longer S001
        assert after[1].student_id == "S001"  # S001's own other photo still is

        # a parent's request: the face data goes, negatives and record descriptors too
        token = csrf_of(client.get("/students/S001").text)
        with sessions() as session:
            accounts.add_user(session, "office", "admin", PW)
        login(client, "office", PW)
        token = csrf_of(client.get("/students/S001").text)
        r = client.post("/students/S001/faces/delete", data={"csrf": token})
        assert r.status_code == 200
        with sessions() as session:
            for model in (FaceNegative, RecordDescriptor):
                assert session.scalar(select(func.count()).select_from(model)) == 0
