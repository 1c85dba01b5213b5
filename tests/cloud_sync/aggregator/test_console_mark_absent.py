"""A class without data (no device of the room online, or no face data) filled in by hand
(issue 25): the office marks those on the register present and the others absent, one student
or all the rest at once; absent by hand counts in the percentages and leaves the office's list
of classes to fill (``CourseSummary.unfilled``); a student seen or marked present, one already
absent, or a class not over is refused in words; a teacher of another course cannot; undo
gives the class back its "no data". SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import AttendanceCorrection, AuditLog

from .conftest import World, give_faces
from .console_helpers import csrf_of, login

PW = "correct horse battery"


def _day(world: World) -> dict[str, tuple[str, str | None]]:
    day = world.monday.date().isoformat()
    report = world.client.get(f"/api/v1/attendance/course/CS101?date={day}",
                              headers=world.admin).json()
    return {s["student_id"]: (s["status"], s["source"])
            for s in report["sessions"][0]["students"]}


def _summary(world: World) -> dict[str, Any]:
    day = world.monday.date().isoformat()
    return world.client.get(f"/api/v1/attendance/course/CS101?from={day}&to={day}",
                            headers=world.admin).json()


def test_office_fills_a_class_without_data_by_hand(world: World, sessions: Any) -> None:
    give_faces(sessions, ["S001", "S002", "S003", "S004"])
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "kim", "teacher", PW, ["MA201"])
    c = world.client
    starts = world.at(0, 9).isoformat()
    # no device online for last Monday's class: no data for anyone, on the office's list
    assert {s for s, _ in _day(world).values()} == {"no_data"}
    unfilled = _summary(world)["unfilled"]
    assert [(u["reason"], sorted(u["student_ids"])) for u in unfilled] == [
        ("no_data", ["S001", "S002", "S003", "S004"])]

    login(c, "kim", PW)  # another course's teacher
    token = csrf_of(c.get("/courses").text)
    assert c.post("/courses/CS101/absent", data={
        "csrf": token, "student_id": "S002", "starts_at": starts}).status_code == 403
    c.post("/logout", data={"csrf": token})

    login(c, "office", PW)
    day = world.monday.date().isoformat()
    page = c.get(f"/courses/CS101?date={day}").text
    assert page.count('class="inline mark-absent"') == 4
    assert "Mark the 4 without data absent" in page
    token = csrf_of(page)
    assert c.post("/courses/CS101/present", data={
        "csrf": token, "student_id": "S001", "starts_at": starts,
        "reason": "on the paper register"}, follow_redirects=False).status_code == 303
    r = c.post("/courses/CS101/absent", data={"csrf": token, "student_id": "S002",
                                               "starts_at": starts},
               headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json() == {"marked": 1, "message": "Student 2 marked absent"}
    statuses = _day(world)
    assert statuses["S001"] == ("present", "manual")
    assert statuses["S002"] == ("absent", "manual")
    assert statuses["S003"][0] == statuses["S004"][0] == "no_data"
    # refusals, in words, nothing written
    for student, words in (("S001", "Student 1 counts as present in this class (marked by "
                                    "hand): undo that correction"),
                           ("S002", "Student 2 is already absent from this class")):
        r = c.post("/courses/CS101/absent", data={"csrf": token, "student_id": student,
                                                   "starts_at": starts},
                   headers={"Accept": "application/json"})
        assert r.status_code == 409 and words in r.json()["detail"], r.text
    r = c.post("/courses/CS101/absent", data={"csrf": token, "student_id": "S002",
                                               "starts_at": world.at(0, 9, 5).isoformat()})
    assert r.status_code == 404  # no class starts then
    # the rest at once: one transaction, one correction and audit line each
    r = c.post("/courses/CS101/absent-rest", data={"csrf": token, "starts_at": starts,
                                                    "reason": "absent on the register"},
               follow_redirects=False)
    assert r.status_code == 303
    statuses = _day(world)
    assert [statuses[s] for s in ("S003", "S004")] == [("absent", "manual")] * 2
    summary = _summary(world)
    assert summary["unfilled"] == []  # nothing left to fill in
    pct = {p["student_id"]: p for p in summary["students"]}
    assert (pct["S002"]["held"], pct["S002"]["absent"], pct["S002"]["percentage"]) == (1, 1, 0)
    assert (pct["S001"]["held"], pct["S001"]["percentage"]) == (1, 100)
    assert c.post("/courses/CS101/absent-rest", data={
        "csrf": token, "starts_at": starts}).status_code == 409  # nobody left without data
    csv = c.get(f"/courses/CS101/day.csv?date={day}").text
    assert csv.count(",absent,") == 3
    with sessions() as session:
        rows = session.scalars(select(AttendanceCorrection).where(
            AttendanceCorrection.kind == "absent").order_by(AttendanceCorrection.id)).all()
        assert [r.student_id for r in rows] == ["S002", "S003", "S004"]
        assert rows[1].reason == "absent on the register" and rows[0].by_user == "office"
        assert session.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == "attendance.mark_absent")) == 3
    page = c.get(f"/courses/CS101?date={day}").text
    assert "marked absent" in page and "mark-absent" not in page
    # undone: the class is without data for S002 again
    r = c.post(f"/courses/CS101/corrections/{rows[0].id}/undo", data={"csrf": token},
               follow_redirects=False)
    assert r.status_code == 303
    assert _day(world)["S002"] == ("no_data", None)
    assert [u["student_ids"] for u in _summary(world)["unfilled"]] == [["S002"]]


def test_a_sighting_wins_over_absent_by_hand(world: World, sessions: Any) -> None:
    """No face data for S003 (marked absent by hand): a device record of them that arrives
    later (an outbox drained after the class) makes them present, as a sighting always does."""
    from .conftest import batch, record

    give_faces(sessions, ["S001", "S002", "S004"])
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
    c = world.client
    recs = [record(world, "S001", world.at(0, 9, 2))]  # the device was online: data
    assert c.post("/api/v1/attendance", json=batch(world, recs),
                  headers=world.device).json()["accepted"] == 1
    assert _day(world)["S003"] == ("no_face_data", None)
    login(c, "office", PW)
    token = csrf_of(c.get("/courses").text)
    starts = world.at(0, 9).isoformat()
    assert c.post("/courses/CS101/absent", data={"csrf": token, "student_id": "S003",
                                                  "starts_at": starts},
                  follow_redirects=False).status_code == 303
    assert _day(world)["S003"] == ("absent", "manual")
    late = [record(world, "S003", world.at(0, 9, 4))]
    assert c.post("/api/v1/attendance", json=batch(world, late),
                  headers=world.device).json()["accepted"] == 1
    assert _day(world)["S003"] == ("present", "device")
