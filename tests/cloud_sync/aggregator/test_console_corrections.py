"""Issue 25 item 3: "not this student" strikes the student's attendance for the whole class
(every record of theirs in it, also those the device sends afterwards), holds the face as a
pending negative that reaches no device's roster until the course's teacher confirms it on the
correction's page (which says what it would turn away) or an admin approves; every correction
can be undone: the attendance is as it was, the negative leaves the roster and its ETag
changes. On SQLite and PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import AuditLog, FaceEmbedding, FaceNegative
from cloud_sync.protocol import EMBEDDER_IDS

from .conftest import World, batch, give_faces, record
from .console_helpers import csrf_of, login

PW = "correct horse battery"
SFACE = EMBEDDER_IDS["sface"]


def _statuses(world: World, day: str) -> dict[str, str]:
    report = world.client.get(f"/api/v1/attendance/course/CS101?date={day}",
                              headers=world.admin).json()
    return {s["student_id"]: s["status"] for s in report["sessions"][0]["students"]}


def _roster(world: World) -> tuple[dict[str, Any], str]:
    """CS101's roster as the LAB-301 device pulls it (S001's entry) and the ETag."""
    r = world.client.get("/api/v1/schedule", headers=world.device,
                         params={"room_id": "LAB-301", "at": world.at(0, 9, 30).isoformat(),
                                 "embedder": "sface"})
    assert r.status_code == 200, r.text
    entries = {e["student_id"]: e for e in r.json()["rosters"]["CS101"]}
    return entries["S001"], r.headers["etag"]


def _send(world: World, records: list[dict[str, Any]]) -> None:
    r = world.client.post("/api/v1/attendance", json=batch(world, records),
                          headers=world.device)
    assert r.status_code == 200 and r.json()["accepted"] == len(records), r.text


def _unit(v: np.ndarray) -> list[float]:
    return [float(x) for x in v / np.linalg.norm(v)]


def _audit(sessions: Any, action: str) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).where(AuditLog.action == action)) or 0)


def test_not_this_student_strikes_the_class_holds_the_face_and_undoes(
        world: World, sessions: Any) -> None:
    give_faces(sessions, ["S001", "S002", "S003", "S004"])
    with sessions() as session:
        own = np.frombuffer(session.scalars(select(FaceEmbedding.vector).where(
            FaceEmbedding.student_id == "S001")).one(), "<f4").astype(float)
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
        accounts.add_user(session, "kim", "teacher", PW, ["MA201"])
        accounts.add_user(session, "office", "admin", PW)
    rng = np.random.default_rng(3)
    lookalike = rng.normal(size=128)
    near_lookalike = lookalike + rng.normal(scale=0.05, size=128)
    near_own = own + rng.normal(scale=0.05, size=128)
    desc = {"descriptor_embedder": SFACE}
    first = record(world, "S001", world.at(0, 9, 2), descriptor=_unit(lookalike), **desc)
    clicked = record(world, "S001", world.at(0, 9, 40), descriptor=_unit(lookalike), **desc)
    third = record(world, "S001", world.at(0, 10, 10))  # no descriptor came with it
    # S001 a week earlier, once as themselves and once as someone like the look-alike
    week_before = [record(world, "S001", world.at(-7, 9, 5), descriptor=_unit(near_own), **desc),
                   record(world, "S001", world.at(-7, 9, 6),
                          descriptor=_unit(near_lookalike), **desc)]
    _send(world, [first, clicked, third, record(world, "S002", world.at(0, 9, 3)),
                  *week_before])
    day = world.monday.date().isoformat()
    assert _statuses(world, day)["S001"] == "present"
    before_entry, etag_before = _roster(world)
    assert before_entry["negatives"] == []

    c = world.client
    login(c, "lee", PW)
    token = csrf_of(c.get(f"/courses/CS101?date={day}").text)
    r = c.post("/courses/CS101/wrong", data={"csrf": token, "record_key": clicked["key"],
                                              "date": day, "reason": "a look-alike"},
               follow_redirects=False)
    assert r.status_code == 303, r.text
    assert "struck+for+the+whole+class" in r.headers["location"].replace("%20", "+")

    # the whole class is struck: the 09:02 record no longer makes S001 present
    assert _statuses(world, day) == {"S001": "absent", "S002": "present", "S003": "absent",
                                     "S004": "absent"}
    # the device still sends the look-alike as S001 (its roster has no negative yet): struck too
    _send(world, [record(world, "S001", world.at(0, 10, 20))])
    assert _statuses(world, day)["S001"] == "absent"
    # another class of S001 is untouched
    week = c.get(f"/api/v1/attendance/course/CS101?date={world.at(-7, 0).date().isoformat()}",
                 headers=world.admin).json()
    assert {s["student_id"]: s["status"] for s in week["sessions"][0]["students"]}[
        "S001"] == "present"

    # the faces are pending: nothing reaches the device
    with sessions() as session:
        negatives = session.scalars(select(FaceNegative)).all()
        assert [n.state for n in negatives] == ["pending", "pending"]
        correction_id = negatives[0].correction_id
    entry, etag = _roster(world)
    assert entry["negatives"] == [] and etag == etag_before

    # the page a teacher confirms on: what was struck, and what the faces would turn away
    page = c.get(f"/courses/CS101/corrections/{correction_id}")
    assert page.status_code == 200
    assert "2 faces waiting for your confirmation" in page.text
    assert "4 sightings no longer counted" in page.text
    # the week-before look-alike is among S001's other sightings it would turn away
    assert "1 other sighting of Student 1</strong>, still counted" in page.text
    assert "no face descriptor came with it" in page.text
    course = c.get(f"/courses/CS101?date={day}").text
    assert "confirm the face: 2 waiting" in course and "Undo" in course

    # a teacher of another course neither sees nor confirms it
    c.cookies.clear()
    login(c, "kim", PW)
    token_kim = csrf_of(c.get("/courses").text)
    assert c.get(f"/courses/CS101/corrections/{correction_id}").status_code == 403
    r = c.post(f"/courses/CS101/corrections/{correction_id}/confirm",
               data={"csrf": token_kim})
    assert r.status_code == 403
    r = c.post(f"/courses/MA201/corrections/{correction_id}/confirm",
               data={"csrf": token_kim})
    assert r.status_code == 404
    assert _roster(world)[0]["negatives"] == []

    # confirmed by the teacher: in the roster, the ETag changes
    c.cookies.clear()
    login(c, "lee", PW)
    token = csrf_of(c.get(f"/courses/CS101?date={day}").text)
    r = c.post(f"/courses/CS101/corrections/{correction_id}/confirm", data={"csrf": token})
    assert r.status_code == 200 and "Confirmed by lee" in r.text, r.text
    entry, etag_confirmed = _roster(world)
    assert len(entry["negatives"]) == 2 and etag_confirmed != etag_before
    r = c.post(f"/courses/CS101/corrections/{correction_id}/confirm", data={"csrf": token})
    assert r.status_code == 409

    # undone: the attendance as it was, the faces out of the roster, the ETag back
    r = c.post(f"/courses/CS101/corrections/{correction_id}/undo", data={"csrf": token},
               follow_redirects=False)
    assert r.status_code == 303 and f"date={day}" in r.headers["location"]
    assert _statuses(world, day)["S001"] == "present"
    entry, etag_undone = _roster(world)
    assert entry["negatives"] == []
    assert etag_undone != etag_confirmed and etag_undone == etag_before
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(FaceNegative)) == 0
    r = c.post(f"/courses/CS101/corrections/{correction_id}/undo", data={"csrf": token})
    assert r.status_code == 409 and "already undone" in r.text
    page = c.get(f"/courses/CS101/corrections/{correction_id}").text
    assert "Undone by lee" in page
    for action in ("attendance.not_student", "attendance.negative_confirm", "attendance.undo"):
        assert _audit(sessions, action) == 1, action

    # struck again after the undo (allowed), then approved by an admin
    r = c.post("/courses/CS101/wrong", data={"csrf": token, "record_key": clicked["key"],
                                              "date": day, "reason": "a look-alike"})
    assert r.status_code == 200
    r = c.post("/courses/CS101/wrong", data={"csrf": token, "record_key": first["key"],
                                              "date": day, "reason": "again"})
    assert r.status_code == 409  # the class is already struck for S001
    with sessions() as session:
        second = session.scalars(select(FaceNegative.correction_id)).first()
    c.cookies.clear()
    login(c, "office", PW)
    token = csrf_of(c.get(f"/courses/CS101/corrections/{second}").text)
    r = c.post(f"/courses/CS101/corrections/{second}/confirm", data={"csrf": token})
    assert r.status_code == 200
    assert len(_roster(world)[0]["negatives"]) == 2
    with sessions() as session:
        detail = session.scalars(select(AuditLog.detail).where(
            AuditLog.action == "attendance.negative_confirm").order_by(AuditLog.id)).all()
    assert "admin approval" in detail[-1]

    # "mark all present" leaves the student struck in this class alone
    r = c.post("/courses/CS101/present-all", data={"csrf": token,
                                                    "starts_at": world.at(0, 9).isoformat()},
               headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.json()["marked"] == 2, r.text
    assert _statuses(world, day) == {"S001": "absent", "S002": "present", "S003": "present",
                                     "S004": "present"}


def test_undo_a_mark_present(world: World, sessions: Any) -> None:
    give_faces(sessions, ["S001", "S002", "S003", "S004"])
    with sessions() as session:
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
    _send(world, [record(world, "S001", world.at(0, 9, 2))])  # the room's device was on
    day = world.monday.date().isoformat()
    c = world.client
    login(c, "lee", PW)
    token = csrf_of(c.get(f"/courses/CS101?date={day}").text)
    r = c.post("/courses/CS101/present", data={"csrf": token, "student_id": "S003",
                                                "starts_at": world.at(0, 9).isoformat(),
                                                "reason": "seen in class"})
    assert r.status_code == 200
    assert _statuses(world, day)["S003"] == "present"
    page = c.get(f"/courses/CS101?date={day}").text
    found = page.split('data-correction="')[1].split('"')[0]
    r = c.post(f"/courses/CS101/corrections/{found}/undo", data={"csrf": token})
    assert r.status_code == 200 and "undone: Student 3 marked present by hand" in r.text
    assert _statuses(world, day)["S003"] == "absent"
    assert "undone by lee" in r.text


def test_migration_0016_keeps_earlier_negatives_in_the_rosters(db_url: str) -> None:
    """Negatives from before 0016 were already on the devices: they stay ``confirmed``; an
    earlier correction has no span (it strikes its one record, as it did) and is not undone.
    The down-migration drops the columns again."""
    from alembic import command
    from sqlalchemy import text

    from cloud_sync.aggregator.db.migrate import (
        alembic_config,
        current_revision,
        head_revision,
        upgrade_engine,
    )
    from cloud_sync.aggregator.db.session import make_engine

    engine = make_engine(db_url)
    try:
        upgrade_engine(engine)
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0015")
        now = datetime.now(UTC)
        if engine.dialect.name == "sqlite":  # UtcDateTime stores naive UTC there
            now = now.replace(tzinfo=None)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO students (id, name, created_at) "
                              "VALUES ('M1', 'one', :now)"), {"now": now})
            conn.execute(text("INSERT INTO face_negatives (student_id, vector, embedder, "
                              "source, created_at) VALUES ('M1', :v, :e, 'record:x', :now)"),
                         {"v": b"\0" * 512, "e": SFACE, "now": now})
            conn.execute(text("INSERT INTO attendance_corrections (kind, student_id, at, "
                              "reason, by_user, created_at) VALUES ('not_student', 'M1', "
                              ":now, 'old', 'lee', :now)"), {"now": now})
        upgrade_engine(engine)
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            negatives = conn.execute(text(
                "SELECT state, correction_id FROM face_negatives WHERE student_id = 'M1'")).all()
            corrections = conn.execute(text(
                "SELECT span_from, span_to, undone_at FROM attendance_corrections "
                "WHERE student_id = 'M1'")).all()
        assert [tuple(r) for r in negatives] == [("confirmed", None)]
        assert [tuple(r) for r in corrections] == [(None, None, None)]
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM students WHERE id = 'M1'"))
    finally:
        engine.dispose()


def test_confirm_and_undo_push_a_roster_notice(world: World, sessions: Any, settings: Any,
                                               tmp_path: Path) -> None:
    """With the MQTT bridge (real Mosquitto of our own): confirming the faces and undoing the
    correction each publish the room's retained roster notice with the schedule's current
    ETag, so devices pull at once instead of at their next poll."""
    from fastapi.testclient import TestClient

    from cloud_sync.aggregator import config as aggregator_config
    from cloud_sync.aggregator.app import create_app
    from cloud_sync.protocol import roster_topic
    from tests.conftest import require
    from tests.support.harness import MOSQUITTO, MOSQUITTO_PASSWD, Broker, wait_until
    from tests.support.mqtt_client import TestClient as MqttClient

    require(MOSQUITTO.exists() and MOSQUITTO_PASSWD.exists(), "mosquitto is not installed")
    give_faces(sessions, ["S001", "S002", "S003", "S004"])
    with sessions() as session:
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
    rec = record(world, "S001", world.at(0, 9, 2), descriptor=_unit(np.ones(128)),
                 descriptor_embedder=SFACE)
    _send(world, [rec])
    broker = Broker(tmp_path / "broker", ["aggregator", "watcher"])
    broker.start()
    topic = roster_topic("north", "LAB-301")
    try:
        configured = aggregator_config.load(None, database_url=settings.database_url,
                                            mqtt_url=broker.url("aggregator"))
        with TestClient(create_app(configured)) as c:
            wait_until(lambda: c.get("/health").json()["mqtt"] == "connected", 15,
                       "bridge connected")
            watcher = MqttClient(broker, "watcher")
            watcher.wait_connected()
            watcher.subscribe(topic)

            def notices() -> list[str]:
                return [json.loads(p)["etag"] for t, p, _ in watcher.messages if t == topic]

            def current() -> str:
                return str(c.get("/api/v1/schedule", params={"room_id": "LAB-301"},
                                 headers=world.device).headers["etag"])

            day = world.monday.date().isoformat()
            login(c, "lee", PW)
            token = csrf_of(c.get(f"/courses/CS101?date={day}").text)
            r = c.post("/courses/CS101/wrong", data={"csrf": token, "record_key": rec["key"],
                                                      "date": day, "reason": "a look-alike"})
            assert r.status_code == 200
            with sessions() as session:
                correction = session.scalars(select(FaceNegative.correction_id)).one()
            time.sleep(0.5)
            seen = len(notices())  # a pending face is no roster change: nothing published
            r = c.post(f"/courses/CS101/corrections/{correction}/confirm", data={"csrf": token})
            assert r.status_code == 200
            wait_until(lambda: len(notices()) > seen, 15, "roster notice after confirm")
            assert notices()[-1] == current()
            seen = len(notices())
            r = c.post(f"/courses/CS101/corrections/{correction}/undo", data={"csrf": token})
            assert r.status_code == 200
            wait_until(lambda: len(notices()) > seen, 15, "roster notice after undo")
            assert notices()[-1] == current()
            watcher.client.loop_stop()
            watcher.client.disconnect()
    finally:
        broker.stop()
