"""Reports: present / late / absent per class, percentages, CSV."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import update

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Enrollment, Heartbeat, Schedule
from tests.cloud_sync.aggregator.conftest import World, batch, give_faces, record
from tests.cloud_sync.aggregator.console_helpers import login


def _seed(world: World, sessions: Any) -> None:
    give_faces(sessions, ["S001", "S002", "S003", "S004"])
    last_week = world.monday - timedelta(days=7)
    recs = [
        record(world, "S001", world.at(0, 8, 55)),   # early arrival: present
        record(world, "S001", world.at(0, 9, 40)),   # second sighting, ignored
        record(world, "S002", world.at(0, 9, 25)),   # late (> 10 min)
        record(world, "S004", world.at(0, 9, 5)),    # present in CS101 ...
        record(world, "S004", world.at(0, 11, 2)),   # ... and in MA201
        record(world, "S003", last_week + timedelta(hours=9, minutes=1)),  # last week only
    ]
    r = world.client.post("/api/v1/attendance", json=batch(world, recs), headers=world.device)
    assert r.json()["accepted"] == 6


def test_course_day(world: World, sessions: Any) -> None:
    _seed(world, sessions)
    day = world.at(0, 0).date().isoformat()
    r = world.client.get("/api/v1/attendance/course/CS101", params={"date": day},
                         headers=world.admin)
    assert r.status_code == 200, r.text
    body = r.json()
    [session] = body["sessions"]
    status = {s["student_id"]: s["status"] for s in session["students"]}
    assert status == {"S001": "present", "S002": "late", "S003": "absent", "S004": "present"}
    assert (session["present"], session["late"], session["absent"]) == (2, 1, 1)
    assert body["late_after_min"] == 10.0
    as_csv = world.client.get("/api/v1/attendance/course/CS101",
                              params={"date": day, "format": "csv"}, headers=world.admin)
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert {r["student_id"]: r["status"] for r in rows} == status
    accept = world.client.get("/api/v1/attendance/course/CS101", params={"date": day},
                              headers={**world.admin, "Accept": "text/csv"})
    assert accept.text == as_csv.text


def test_percentages(world: World, sessions: Any) -> None:
    _seed(world, sessions)
    start = (world.monday - timedelta(days=7)).date().isoformat()
    end = world.at(0, 0).date().isoformat()
    r = world.client.get("/api/v1/attendance/course/CS101", params={"from": start, "to": end},
                         headers=world.admin)
    assert r.status_code == 200, r.text
    pct = {p["student_id"]: p for p in r.json()["students"]}
    assert {p["held"] for p in pct.values()} == {2}  # two Mondays in range
    assert pct["S001"]["percentage"] == 50.0 and pct["S003"]["percentage"] == 50.0
    assert (pct["S002"]["late"], pct["S002"]["present"], pct["S002"]["absent"]) == (1, 0, 1)
    assert pct["S004"]["percentage"] == 50.0
    student = world.client.get("/api/v1/attendance/student/S004",
                               params={"from": start, "to": end}, headers=world.admin)
    assert student.status_code == 200
    courses = {c["course_id"]: c for c in student.json()["courses"]}
    assert set(courses) == {"CS101", "MA201"}
    assert len(student.json()["records"]) == 2
    summary_csv = world.client.get(
        "/api/v1/attendance/student/S004",
        params={"from": start, "to": end, "format": "csv", "view": "summary"},
        headers=world.admin,
    )
    assert {r["course_id"] for r in csv.DictReader(io.StringIO(summary_csv.text))} == {
        "CS101", "MA201"}
    records_csv = world.client.get("/api/v1/attendance/student/S004",
                                   params={"format": "csv"}, headers=world.admin)
    assert len(list(csv.DictReader(io.StringIO(records_csv.text)))) == 2


def test_reports_need_admin_and_valid_input(world: World) -> None:
    url = "/api/v1/attendance/course/CS101"
    assert world.client.get(url, headers=world.device).status_code == 403
    assert world.client.get(url).status_code == 401
    assert world.client.get("/api/v1/attendance/course/NOPE", headers=world.admin
                            ).status_code == 404
    assert world.client.get(url, params={"date": "yesterday"}, headers=world.admin
                            ).status_code == 422
    assert world.client.get(url, params={"from": "2020-01-01", "to": "2026-01-01"},
                            headers=world.admin).status_code == 400


def _beats(sessions: Any, device: str, start: datetime, end: datetime) -> None:
    """Heartbeats a minute apart from ``start`` to ``end`` (a device online meanwhile)."""
    with sessions() as session:
        at = start
        while at < end:
            session.add(Heartbeat(device_id=device, received_at=at, sent_at=at,
                                  clock_synced=True, software_version="1", uptime_s=1,
                                  outbox_depth=0))
            at += timedelta(minutes=1)
        session.commit()


def _day(world: World, course: str, day: datetime) -> dict[str, Any]:
    r = world.client.get(f"/api/v1/attendance/course/{course}",
                         params={"date": day.date().isoformat()}, headers=world.admin)
    assert r.status_code == 200, r.text
    return r.json()


def test_no_data_when_no_device_of_the_room_was_online(world: World, sessions: Any) -> None:
    """Issue 25 item 2: a class during which the room's device was offline is "no data" for
    everyone, not "everyone missing"; it is out of the percentages and listed to fill in."""
    give_faces(sessions, ["S001", "S002", "S003", "S004"])
    # last week: the device online for CS101 (09:00-10:30), nobody seen -> absent
    last_week = world.monday - timedelta(days=7)
    _beats(sessions, world.device_id, last_week + timedelta(hours=8, minutes=50),
           last_week + timedelta(hours=10, minutes=30))
    # the device of the *other* room online during this Monday's class: no data still
    _beats(sessions, world.other_device_id, world.at(0, 8), world.at(0, 11))
    # online for only the first 20 minutes of MA201 (11:00-12:00): less than half, no data
    _beats(sessions, world.device_id, world.at(0, 11), world.at(0, 11, 18))
    day = _day(world, "CS101", world.at(0, 0))
    [cls] = day["sessions"]
    assert {s["status"] for s in cls["students"]} == {"no_data"}
    assert (cls["no_data"], cls["absent"], cls["device_online"]) == (4, 0, False)
    assert {s["status"] for s in _day(world, "MA201", world.at(0, 0))["sessions"][0][
        "students"]} == {"no_data"}
    before = _day(world, "CS101", last_week)["sessions"][0]
    assert before["device_online"] and before["absent"] == 4
    summary = world.client.get("/api/v1/attendance/course/CS101", headers=world.admin, params={
        "from": last_week.date().isoformat(), "to": world.at(0, 0).date().isoformat()}).json()
    pct = {p["student_id"]: p for p in summary["students"]}
    assert (pct["S001"]["held"], pct["S001"]["no_data"], pct["S001"]["percentage"]) == (1, 1, 0.0)
    [unfilled] = summary["unfilled"]
    assert unfilled["reason"] == "no_data" and unfilled["starts_at"].startswith(
        world.at(0, 9).date().isoformat())
    assert unfilled["student_ids"] == ["S001", "S002", "S003", "S004"]
    # one record of the course in the class proves a device watched it: data for everyone
    assert world.client.post("/api/v1/attendance", json=batch(world, [
        record(world, "S001", world.at(0, 9, 2))]), headers=world.device).json()["accepted"] == 1
    cls = _day(world, "CS101", world.at(0, 0))["sessions"][0]
    assert (cls["present"], cls["absent"], cls["no_data"]) == (1, 3, 0)


def test_enrolment_consent_and_face_data_bound_what_counts(world: World, sessions: Any) -> None:
    """Issue 25 items 2 and 4: a student enrolled today has no "missed" classes from before;
    one without consent or face data is "no_face_data" (take by hand), not missing."""
    give_faces(sessions, ["S001", "S002"])
    with sessions() as session:  # S002 enrolled only after last Monday's class
        session.execute(update(Enrollment).where(Enrollment.student_id == "S002")
                        .values(created_at=world.at(0, 12)))
        session.commit()
    assert world.client.post("/api/v1/students/S004/consent", json={"state": "withdrawn"},
                             headers=world.admin).status_code == 200
    _beats(sessions, world.device_id, world.at(0, 8, 55), world.at(0, 10, 30))
    cls = _day(world, "CS101", world.at(0, 0))["sessions"][0]
    status = {s["student_id"]: s["status"] for s in cls["students"]}
    assert status == {"S001": "absent", "S003": "no_face_data", "S004": "no_face_data"}
    assert cls["no_face_data"] == 2
    with sessions() as session:
        accounts.add_user(session, "office", "admin", "correct horse battery")
    login(world.client, "office", "correct horse battery")
    page = world.client.get(f"/courses/CS101?date={world.at(0, 0).date().isoformat()}").text
    assert page.count("no face data: take by hand") == 3  # the count line and two rows
    summary_page = world.client.get("/courses/CS101/summary", params={
        "from": world.at(-7, 0).date().isoformat(), "to": world.at(0, 0).date().isoformat()})
    assert "To fill in by hand" in summary_page.text and "no device online" in summary_page.text
    summary = world.client.get("/api/v1/attendance/course/CS101", headers=world.admin, params={
        "from": world.at(-7, 0).date().isoformat(),
        "to": world.at(0, 0).date().isoformat()}).json()
    pct = {p["student_id"]: p for p in summary["students"]}
    assert (pct["S002"]["held"], pct["S002"]["absent"], pct["S002"]["percentage"]) == (0, 0, None)
    assert (pct["S003"]["held"], pct["S003"]["no_data"]) == (0, 2)
    assert pct["S001"]["held"] == 1  # last week: no device online -> not held
    # marked present by hand, a student without face data counts
    with sessions() as session:
        from cloud_sync.aggregator.db.models import AttendanceCorrection

        session.add(AttendanceCorrection(kind="present", student_id="S003", course_id="CS101",
                                         at=world.at(0, 9), reason="seen in class",
                                         by_user="office", created_at=world.at(0, 10)))
        session.commit()
    status = {s["student_id"]: s["status"] for s in _day(
        world, "CS101", world.at(0, 0))["sessions"][0]["students"]}
    assert status["S003"] == "present"


def test_class_in_progress_is_not_held(world: World, sessions: Any) -> None:
    """Issue 25 item 2: during a class, not-yet-seen is "not_seen_yet" and the class is not
    in the percentages until it ends."""
    give_faces(sessions, ["S005"])
    now = datetime.now(UTC)
    start = max(now - timedelta(minutes=10), now.replace(hour=0, minute=0, second=0))
    end = min(now + timedelta(minutes=30), now.replace(hour=23, minute=59, second=0))
    with sessions() as session:
        session.add(Schedule(course_id="PH1", room_id="LAB-302", weekday=now.weekday(),
                             start_time=time(start.hour, start.minute),
                             end_time=time(end.hour, end.minute),
                             effective_from=now.date(), effective_to=now.date()))
        session.commit()
    _beats(sessions, world.other_device_id, start, now)
    day = _day(world, "PH1", now)
    running = next(s for s in day["sessions"] if s["ends_at"] > now.isoformat()[:19])
    assert running["ended"] is False and running["device_online"] is True
    assert [s["status"] for s in running["students"]] == ["not_seen_yet"]
    summary = world.client.get("/api/v1/attendance/course/PH1", headers=world.admin, params={
        "from": now.date().isoformat(), "to": now.date().isoformat()}).json()
    over = sum(s["ended"] for s in day["sessions"])  # PH1's weekly Monday class, no device
    assert [(p["held"], p["no_data"]) for p in summary["students"]] == [(0, over)]
