"""The timetable's forms (issue 25 item 5): adding a room, a course (with its teacher) and a
weekly slot, and editing a slot, are each one transaction; a refusal shows the page again (422)
with what was typed and the reason beside the field, and nothing written. SQLite and
PostgreSQL."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import AuditLog, Course, CourseTeacher, Room, Schedule

from .conftest import World
from .console_helpers import csrf_of, login

PW = "correct horse battery"


def _office(world: World, sessions: Any) -> str:
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "lee", "teacher", PW)
    login(world.client, "office", PW)
    return csrf_of(world.client.get("/timetable").text)


def _audits(sessions: Any, action: str) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == action)) or 0


def test_add_room_keeps_the_input(world: World, sessions: Any) -> None:
    c = world.client
    token = _office(world, sessions)
    r = c.post("/timetable/rooms", data={"csrf": token, "room_id": "RM-12",
                                         "name": "Room twelve", "site": "north",
                                         "timezone": "Europe/Lodnon"})
    assert r.status_code == 422
    assert 'value="RM-12"' in r.text and 'value="Room twelve"' in r.text
    assert 'value="north"' in r.text and 'value="Europe/Lodnon"' in r.text
    assert re.search(r'id="err-room-timezone">[^<]*Europe/Lodnon', r.text), r.text
    assert "Nothing was saved" in r.text
    r = c.post("/timetable/rooms", data={"csrf": token, "room_id": "LAB-301", "name": "x"})
    assert r.status_code == 422
    assert 'id="err-room-room_id">LAB-301 already exists (LAB-301)<' in r.text
    assert 'value="x"' in r.text
    with sessions() as session:
        assert session.get(Room, "RM-12") is None
    assert _audits(sessions, "room.add") == 0
    r = c.post("/timetable/rooms", data={"csrf": token, "room_id": "RM-12",
                                         "name": "Room twelve", "site": "north",
                                         "timezone": "Europe/London"}, follow_redirects=False)
    assert r.status_code == 303
    with sessions() as session:
        room = session.get(Room, "RM-12")
        assert room is not None and room.timezone == "Europe/London"
    assert _audits(sessions, "room.add") == 1


def test_add_course_with_its_teacher_is_one_transaction(world: World, sessions: Any) -> None:
    c = world.client
    token = _office(world, sessions)
    # a teacher who is not there: the course is not added without them (it was, before)
    r = c.post("/timetable/courses", data={"csrf": token, "course_id": "BIO1",
                                           "name": "Biology", "teacher": "nobody"})
    assert r.status_code == 422
    assert 'value="BIO1"' in r.text and 'value="Biology"' in r.text
    assert 'id="err-course-teacher">there is no teacher “nobody”: pick one in the list<' in r.text
    with sessions() as session:
        assert session.get(Course, "BIO1") is None
    r = c.post("/timetable/courses", data={"csrf": token, "course_id": "CS101",
                                           "name": "", "teacher": "lee"})
    assert r.status_code == 422
    assert 'id="err-course-course_id">CS101 already exists (Intro CS)<' in r.text
    assert 'id="err-course-name">is empty<' in r.text
    assert re.search(r'<option selected>lee</option>', r.text)
    assert _audits(sessions, "course.add") == 0
    r = c.post("/timetable/courses", data={"csrf": token, "course_id": "BIO1",
                                           "name": "Biology", "teacher": "lee"},
               follow_redirects=False)
    assert r.status_code == 303
    with sessions() as session:
        assert session.get(Course, "BIO1") is not None
        assert session.scalar(select(func.count()).select_from(CourseTeacher).where(
            CourseTeacher.course_id == "BIO1")) == 1
    assert _audits(sessions, "course.add") == 1 and _audits(sessions, "user.assign") == 1


def test_schedule_forms_keep_the_input(world: World, sessions: Any) -> None:
    c = world.client
    token = _office(world, sessions)
    with sessions() as session:
        before = session.scalar(select(func.count()).select_from(Schedule))
    # end before start: beside the end time, the typed values kept
    r = c.post("/timetable/schedules", data={
        "csrf": token, "course_id": "PH1", "room_id": "LAB-302", "weekday": "2",
        "start_time": "14:00", "end_time": "13:00", "effective_from": "2026-09-01"})
    assert r.status_code == 422
    form = r.text.split('id="add-schedule"', 1)[1].split("</form>", 1)[0]
    assert 'value="14:00"' in form and 'value="13:00"' in form
    assert 'value="2026-09-01"' in form
    assert '<option value="2" selected>Wed</option>' in form
    assert '<option value="PH1" selected>PH1</option>' in form
    assert '<option value="LAB-302" selected>LAB-302</option>' in form
    assert re.search(r'id="err-schedule-end_time">[^<]*after start_time', form), form
    # an overlap with another class: said at the top of the form, with how to replace it
    r = c.post("/timetable/schedules", data={
        "csrf": token, "course_id": "PH1", "room_id": "LAB-301", "weekday": "0",
        "start_time": "09:30", "end_time": "10:00"})
    assert r.status_code == 422
    form = r.text.split('id="add-schedule"', 1)[1].split("</form>", 1)[0]
    assert "LAB-301 already has Intro CS (CS101)" in form and "replace the class" in form
    assert 'value="09:30"' in form
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Schedule)) == before
    assert _audits(sessions, "schedule.add") == 0
    # editing a slot: the refused edit stays open with what was typed
    with sessions() as session:
        ph1 = session.scalars(select(Schedule).where(Schedule.course_id == "PH1")).one()
    r = c.post(f"/timetable/schedules/{ph1.id}", data={
        "csrf": token, "course_id": "PH1", "room_id": "LAB-302", "weekday": "0",
        "start_time": "11:00", "end_time": "10:15"})
    assert r.status_code == 422
    form = r.text.split(f'id="edit-schedule-{ph1.id}"', 1)[1].split("</form>", 1)[0]
    assert 'value="11:00"' in form and 'value="10:15"' in form
    assert f'id="err-schedule-{ph1.id}-end_time"' in form
    assert re.search(r"<details open><summary>Edit</summary>\s*<form method=\"post\" "
                     rf'action="/timetable/schedules/{ph1.id}"', r.text)
    with sessions() as session:
        again = session.get(Schedule, ph1.id)
        assert again is not None and again.start_time.strftime("%H:%M") == "09:00"
    # the same forms accepted: one slot and one audit entry each
    r = c.post("/timetable/schedules", data={
        "csrf": token, "course_id": "PH1", "room_id": "LAB-302", "weekday": "2",
        "start_time": "13:00", "end_time": "14:00"}, follow_redirects=False)
    assert r.status_code == 303
    r = c.post(f"/timetable/schedules/{ph1.id}", data={
        "csrf": token, "course_id": "PH1", "room_id": "LAB-302", "weekday": "0",
        "start_time": "09:15", "end_time": "10:15"}, follow_redirects=False)
    assert r.status_code == 303
    assert _audits(sessions, "schedule.add") == 1 and _audits(sessions, "schedule.edit") == 1
