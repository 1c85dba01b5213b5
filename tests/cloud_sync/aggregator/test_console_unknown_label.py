"""Labelling unknown faces (issue 25 item 10): the picker has no default student (an empty
pick does nothing), it is searched by name or id, an ambiguous or unknown name is refused in
words, and nothing is enrolled before a confirmation page shows the faces beside the name."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
from sqlalchemy import func, select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import FaceEmbedding, Student, UnknownFace
from cloud_sync.protocol import EMBEDDING_DIM

from .conftest import World
from .console_helpers import csrf_of, login

PW = "correct horse battery"


def _faces(sessions: Any, world: World, n: int = 3) -> list[int]:
    rng = np.random.default_rng(7)
    base = rng.normal(size=EMBEDDING_DIM).astype("<f4")
    crop = cv2.imencode(".jpg", np.full((48, 48, 3), 128, np.uint8))[1].tobytes()
    now = datetime.now(UTC)
    with sessions() as session:
        rows = [UnknownFace(key=uuid.uuid4(), device_id=world.device_id, room_id="LAB-301",
                            at=now, received_at=now, crop=crop, embedder="sface/test",
                            vector=(base + 0.001 * i).astype("<f4").tobytes())
                for i in range(n)]
        session.add_all(rows)
        session.add(Student(id="S100", name="Student 1", created_at=now))  # a namesake
        session.commit()
        accounts.add_user(session, "office", "admin", PW)
        return [r.id for r in rows]


def _enrolled(sessions: Any, student: str) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).where(
            FaceEmbedding.student_id == student)) or 0)


def test_label_needs_a_pick_and_a_confirmation(world: World, sessions: Any) -> None:
    ids = _faces(sessions, world)
    c = world.client
    login(c, "office", PW)
    page = c.get("/unknown").text
    assert "<select" not in page and " selected" not in page  # no student picked for you
    assert '<option value="S002 · Student 2">' in page  # the list the search offers
    token = csrf_of(page)
    label = {"csrf": token, "face_ids": ids}
    r = c.post("/unknown/label", data={**label, "student": ""})
    assert r.status_code == 400 and "type the student" in r.text
    r = c.post("/unknown/label", data={**label, "student": "Student 1"})
    assert r.status_code == 400 and "several students are called" in r.text
    r = c.post("/unknown/label", data={**label, "student": "Nobody Here"})
    assert r.status_code == 404
    r = c.post("/unknown/label", data={**label, "student": "student 2"})  # a unique name
    assert r.status_code == 200 and "Are these 3 faces Student 2?" in r.text
    assert r.text.count('src="/unknown/') == 3  # the faces beside the name
    assert 'name="confirm" value="yes"' in r.text and 'value="S002"' in r.text
    assert _enrolled(sessions, "S002") == 0  # nothing yet
    r = c.post("/unknown/label", data={**label, "student_id": "S002", "confirm": "yes"})
    assert r.status_code == 200 and "3 faces enrolled as Student 2 (S002)" in r.text
    assert _enrolled(sessions, "S002") == 3
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(UnknownFace)) == 0
