"""The console's words (issue 25 item 12): the match in the device's words beside the number,
"absent" as in the CSV, recognisers by name (not "sface/sface-2021dec-int8bq" or "()"),
notices naming students, a low-quality photo enrolled with a warning."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import update

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import FaceEmbedding
from cloud_sync.aggregator.services import faces
from cloud_sync.words import match_bands, match_label, recogniser

from .conftest import World, batch, last_monday, record
from .console_helpers import csrf_of, login

PW = "correct horse battery"


def test_words_match_the_device_and_the_csv(world: World, sessions: Any) -> None:
    c = world.client
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
        settings = c.app.state.ctx.settings  # type: ignore[attr-defined]
        faces.store_embedding(session, settings, "S002",
                              {"sface/sface-2021dec-int8bq": np.ones(128, "<f4")}, 0.05,
                              "test")
        # enrolled before the term's classes (a face stored after a class makes that class
        # "no face data: take by hand" for the student, not "absent")
        session.execute(update(FaceEmbedding).where(FaceEmbedding.student_id == "S002")
                        .values(created_at=last_monday() - timedelta(days=28)))
        session.commit()
    rec = record(world, "S001", world.at(0, 9, 2), confidence=0.45)
    assert c.post("/api/v1/attendance", json=batch(world, [rec]),
                  headers=world.device).json()["accepted"] == 1
    login(c, "office", PW)
    day = world.monday.date().isoformat()
    page = c.get(f"/courses/CS101?date={day}").text
    # the device's word for 0.45 in the bands of the fleet's embedder (SFace: "good", within
    # its 1 % false-accept point; the same number from a dlib fleet is "borderline")
    assert match_label(0.45, match_bands("sface")) == "good"
    assert match_label(0.45, match_bands("dlib")) == "borderline"
    assert "good · 0.45" in page and ">Match<" in page
    # a dlib fleet (the aggregator's first embedder): the console reads the number in dlib's
    # bands, as a dlib device's status page does
    ctx = c.app.state.ctx  # type: ignore[attr-defined]
    ctx.settings = ctx.settings.model_copy(update={"embedders": ["dlib", "sface"]})
    assert "borderline · 0.45" in c.get(f"/courses/CS101?date={day}").text
    ctx.settings = ctx.settings.model_copy(update={"embedders": ["sface", "dlib"]})
    assert "missing" not in page and "absent</td>" in page  # the CSV's word
    assert ",absent," in c.get(f"/courses/CS101/day.csv?date={day}").text
    student = c.get("/students/S002").text
    assert "recognised with SFace" in student and "sface-2021dec" not in student
    assert "low: add a sharper, frontal photo" in student  # quality 0.05
    empty = c.get("/students/S003").text
    assert "No face data: the devices cannot recognise Student 3" in empty
    assert "()" not in empty
    token = csrf_of(student)
    r = c.post("/students/S003/consent", data={"csrf": token, "state": "withdrawn"})
    assert "consent to face recognition withdrawn for Student 3" in r.text
    r = c.post("/students/S005/enrol", data={"csrf": token, "course_id": "CS101"})
    assert "Student 5 enrolled in Intro CS" in r.text


def test_shared_words() -> None:
    sface, dlib = match_bands("sface"), match_bands("dlib")
    assert [match_label(x, sface) for x in (0.9, 0.45, 0.3, None)] == [
        "clear", "good", "borderline", None]
    assert [match_label(x, dlib) for x in (0.9, 0.5, 0.45, None)] == [
        "clear", "good", "borderline", None]
    assert recogniser("sface/sface-2021dec-int8bq") == "SFace"
    assert recogniser("dlib/dlib-resnet-v1") == "dlib" and recogniser(None) == "dlib"
