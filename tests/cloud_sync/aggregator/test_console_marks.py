"""Marking by hand from the course page (issue 25 item 9): one student or the whole class not
yet seen, in one transaction, as JSON for the page's script (no reload) or a redirect without
it; a teacher of another course cannot."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import AttendanceCorrection, AuditLog

from .conftest import World, batch, record
from .console_helpers import csrf_of, login

PW = "correct horse battery"


def _statuses(world: World, day: str) -> dict[str, str]:
    report = world.client.get(f"/api/v1/attendance/course/CS101?date={day}",
                              headers=world.admin).json()
    return {s["student_id"]: s["status"] for s in report["sessions"][0]["students"]}


def test_mark_all_present_marks_only_those_not_seen(world: World, sessions: Any) -> None:
    with sessions() as session:
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
        accounts.add_user(session, "kim", "teacher", PW, ["MA201"])
    c = world.client
    recs = [record(world, "S001", world.at(0, 9, 2)), record(world, "S002", world.at(0, 9, 20))]
    assert c.post("/api/v1/attendance", json=batch(world, recs),
                  headers=world.device).json()["accepted"] == 2
    day = world.monday.date().isoformat()
    starts = world.at(0, 9).isoformat()

    login(c, "kim", PW)
    token = csrf_of(c.get("/courses").text)
    r = c.post("/courses/CS101/present-all", data={"csrf": token, "starts_at": starts})
    assert r.status_code == 403
    c.cookies.clear()

    login(c, "lee", PW)
    token = csrf_of(c.get(f"/courses/CS101?date={day}").text)
    page = c.get(f"/courses/CS101?date={day}").text
    assert "Mark all 2 present" in page  # S003 and S004 were not seen
    r = c.post("/courses/CS101/present-all", data={"csrf": token, "starts_at": starts},
               headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json() == {"marked": 2, "message": "2 students marked present"}
    after = _statuses(world, day)
    assert after == {"S001": "present", "S002": "late", "S003": "present", "S004": "present"}
    with sessions() as session:
        marks = session.scalars(select(AttendanceCorrection.student_id)).all()
        audit = session.scalar(select(func.count()).where(
            AuditLog.action == "attendance.mark_present"))
    assert sorted(marks) == ["S003", "S004"] and audit == 2  # the late S002 is left alone
    r = c.post("/courses/CS101/present-all", data={"csrf": token, "starts_at": starts},
               headers={"Accept": "application/json"})
    assert r.status_code == 409 and "already present" in r.json()["detail"]
    r = c.post("/courses/CS101/present-all", data={
        "csrf": token, "starts_at": world.at(0, 13).isoformat()})
    assert r.status_code == 404  # no class then
    r = c.post("/courses/CS101/present-all", data={"starts_at": starts})
    assert r.status_code == 403  # CSRF as every console write


def test_mark_one_present_answers_json_with_the_name(world: World, sessions: Any) -> None:
    with sessions() as session:
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
    c = world.client
    login(c, "lee", PW)
    day = world.monday.date().isoformat()
    token = csrf_of(c.get(f"/courses/CS101?date={day}").text)
    r = c.post("/courses/CS101/present", data={
        "csrf": token, "student_id": "S003", "reason": "seen in class",
        "starts_at": world.at(0, 9).isoformat()}, headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.json()["message"] == "Student 3 marked present"
    r = c.post("/courses/CS101/present", data={
        "csrf": token, "student_id": "S004", "reason": "seen in class",
        "starts_at": world.at(0, 9).isoformat()}, follow_redirects=False)
    assert r.status_code == 303 and "Student%204%20marked%20present" in r.headers["location"]
    assert _statuses(world, day)["S003"] == "present"
