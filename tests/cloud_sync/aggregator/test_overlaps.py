"""Issue 25 item 1: an overlapping class in a room is refused on every way in (API, console
form, CSV import, `schedules add --now`) with a message naming the other class, or replaces it
when asked; and the device, the aggregator and the console pick "the class now" by one rule."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from appliance.sync import pick_session
from cloud_sync.aggregator.cli import app as cli
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.console.dashboard import current_occurrence
from cloud_sync.aggregator.db.models import Course, Room, Schedule
from cloud_sync.aggregator.services.schedule import build_schedule
from cloud_sync.aggregator.services.timetable import room_timetable
from cloud_sync.classes import WeeklySlot, class_now, remainder, slots_collide
from cloud_sync.protocol import ClassSession

from .conftest import World
from .console_helpers import csrf_of, login

PW = "correct horse battery"


def _slot(world: World, course: str, room: str, start: str, end: str, **extra: Any) -> Any:
    params = {"replace": "true"} if extra.pop("replace", False) else {}
    return world.client.post("/api/v1/schedules", params=params, headers=world.admin, json={
        "course_id": course, "room_id": room, "weekday": extra.pop("weekday", 0),
        "start_time": start, "end_time": end, **extra})


def test_slots_collide_rule() -> None:
    mon = WeeklySlot(0, time(14), time(15, 30))
    assert slots_collide(mon, WeeklySlot(0, time(14, 30), time(15, 30)))
    assert not slots_collide(mon, WeeklySlot(0, time(15, 30), time(16)))  # touching ends
    assert not slots_collide(mon, WeeklySlot(1, time(14), time(15)))
    term1 = WeeklySlot(0, time(14), time(15), date(2026, 9, 1), date(2026, 12, 18))
    term2 = WeeklySlot(0, time(14), time(15), date(2027, 1, 4), None)
    assert not slots_collide(term1, term2)
    # date ranges that meet only on a Tuesday share no Monday
    assert not slots_collide(WeeklySlot(0, time(14), time(15), None, date(2026, 12, 8)),
                             WeeklySlot(0, time(14), time(15), date(2026, 12, 8), None))
    assert slots_collide(WeeklySlot(0, time(14), time(15), None, date(2026, 12, 7)),
                         WeeklySlot(0, time(14), time(15), date(2026, 12, 7), None))
    one_day = date(2026, 12, 7)
    left = remainder(mon, one_day, one_day)
    assert [(p.effective_from, p.effective_to) for p in left] == [
        (None, date(2026, 12, 6)), (date(2026, 12, 8), None)]
    assert remainder(WeeklySlot(0, time(14), time(15), one_day, one_day), one_day, one_day) == []


def test_api_refuses_overlaps_naming_the_other_class(world: World) -> None:
    r = _slot(world, "MA201", "LAB-301", "10:00", "11:00")
    assert r.status_code == 409, r.text
    assert "Intro CS (CS101)" in r.json()["detail"] and "Mon 09:00-10:30" in r.json()["detail"]
    same_course = _slot(world, "CS101", "LAB-301", "09:30", "10:00")
    assert same_course.status_code == 409 and "Intro CS (CS101)" in same_course.text
    assert _slot(world, "MA201", "LAB-301", "10:30", "11:00").status_code == 201  # touching
    assert _slot(world, "MA201", "LAB-302", "10:00", "11:00").status_code == 201  # other room
    assert _slot(world, "MA201", "LAB-301", "09:00", "10:00", weekday=1).status_code == 201
    ma = next(s for s in world.client.get("/api/v1/schedules", params={"course_id": "MA201",
                                                                        "room_id": "LAB-301"},
                                          headers=world.admin).json()
              if s["start_time"] == "11:00:00")
    moved = world.client.patch(f"/api/v1/schedules/{ma['id']}", json={"start_time": "10:15"},
                               headers=world.admin)
    assert moved.status_code == 409 and "CS101" in moved.text
    # a slot edited over itself is no overlap
    assert world.client.patch(f"/api/v1/schedules/{ma['id']}", json={"end_time": "12:30"},
                              headers=world.admin).status_code == 200


def test_replace_takes_only_the_new_slots_days(world: World) -> None:
    day = (world.monday + timedelta(days=14)).date()
    r = _slot(world, "PH1", "LAB-301", "09:30", "10:00", effective_from=day.isoformat(),
              effective_to=day.isoformat(), replace=True)
    assert r.status_code == 201, r.text
    cs = [s for s in world.client.get("/api/v1/schedules", params={"course_id": "CS101"},
                                      headers=world.admin).json()]
    assert {(s["effective_from"], s["effective_to"]) for s in cs} == {
        (None, (day - timedelta(days=1)).isoformat()),
        ((day + timedelta(days=1)).isoformat(), None)}
    # the weeks before and after still have CS101; that Monday has PH1 only
    for when, course in ((world.at(0, 9, 45), "CS101"), (world.at(14, 9, 45), "PH1"),
                         (world.at(21, 9, 45), "CS101")):
        got = world.client.get("/api/v1/schedule", headers=world.device, params={
            "room_id": "LAB-301", "at": when.isoformat()}).json()
        assert got["current_course_id"] == course, when
    # an open-ended replacement starts today: the past keeps its classes
    r = _slot(world, "PH1", "LAB-301", "11:00", "12:00", replace=True)
    assert r.status_code == 201 and r.json()["effective_from"] is not None
    past = world.client.get("/api/v1/schedule", headers=world.device, params={
        "room_id": "LAB-301", "at": world.at(0, 11, 30).isoformat()}).json()
    assert past["current_course_id"] == "MA201"


def test_csv_import_reports_overlaps(world: World) -> None:
    text = ("course_id,room_id,weekday,start_time,end_time,replace\n"
            "MA201,LAB-301,Mon,10:00,11:00,\n"        # over CS101 09:00-10:30
            "CS101,LAB-301,Mon,09:00,10:30,\n"        # the same slot again: unchanged
            "PH1,LAB-301,Tue,14:00,15:00,\n"
            "MA201,LAB-301,Tue,14:30,15:30,\n"        # over the line before, same file
            "MA201,LAB-301,Tue,16:00,17:00,maybe\n"
            "PH1,LAB-301,Mon,11:30,12:30,yes\n")      # replaces MA201 from today
    r = world.client.post("/api/v1/import/schedules", content=text.encode(),
                          headers={**world.admin, "Content-Type": "text/csv"})
    assert r.status_code == 200, r.text
    report = r.json()
    errors = {e["row"]: e["error"] for e in report["errors"]}
    assert set(errors) == {2, 5, 6}, errors
    assert "Intro CS (CS101)" in errors[2] and "Physics (PH1) Tue 14:00-15:00" in errors[5]
    assert "yes or no" in errors[6]
    assert (report["created"], report["unchanged"]) == (2, 1)


def test_console_form_and_class_now_refuse_overlaps(world: World, sessions: Any) -> None:
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
    c = world.client
    login(c, "office", PW)
    token = csrf_of(c.get("/timetable").text)
    assert 'name="replace"' in c.get("/timetable").text
    form = {"csrf": token, "course_id": "MA201", "room_id": "LAB-301", "weekday": 0,
            "start_time": "10:00", "end_time": "11:00"}
    r = c.post("/timetable/schedules", data=form)
    assert r.status_code == 422 and "Intro CS (CS101)" in r.text  # the form kept (item 5)
    r = c.post("/timetable/schedules", data={**form, "replace": "true"})
    assert r.status_code == 200 and "replacing Intro CS (CS101)" in r.text
    # a class from now over one already running now in the room
    assert c.post("/api/v1/rooms", json={"id": "GYM", "site": "north"},
                  headers=world.admin).status_code == 201
    assert c.post("/timetable/now", data={"csrf": token, "course_id": "PH1",
                                          "room_id": "GYM", "minutes": 30}).status_code == 200
    r = c.post("/timetable/now", data={"csrf": token, "course_id": "MA201",
                                       "room_id": "GYM", "minutes": 30})
    assert r.status_code == 409 and "Physics (PH1)" in r.text


@pytest.fixture
def cli_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli' / 'agg.db'}"
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", url)
    monkeypatch.delenv("AGGREGATOR_CONFIG", raising=False)
    return url


def test_cli_schedules_add_now_refuses_overlap(cli_db: str, tmp_path: Path) -> None:
    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, list(args))
        return result.exit_code, result.output

    rooms = tmp_path / "rooms.csv"
    rooms.write_text("id,name,site,timezone\nLAB-301,Lab,north,UTC\n")
    assert run("import", "rooms", str(rooms))[0] == 0
    code, out = run("schedules", "add", "--room", "LAB-301", "--course", "MUS",
                    "--course-name", "Music", "--now", "--minutes", "60")
    assert code == 0, out
    code, out = run("schedules", "add", "--room", "LAB-301", "--course", "BIO",
                    "--course-name", "Biology", "--now", "--minutes", "30")
    assert code == 1 and "LAB-301 already has Music (MUS)" in out and "replace" in out, out
    code, out = run("schedules", "add", "--room", "LAB-301", "--course", "BIO", "--now",
                    "--replace")
    assert code == 0 and "replaced Music (MUS)" in out, out


def test_one_rule_for_the_class_now(world: World, sessions: Any) -> None:
    """A timetable from before the overlap check (rows written directly): Music 14:00-15:30
    and Biology 14:30-15:30 in LAB-301. At 14:45 the schedule the device pulls, the device's
    pick, ingest's course and the dashboard all say Music (the class that started first)."""
    with sessions() as session:
        session.add_all([Course(id="MUS", name="Music", created_at=world.monday),
                         Course(id="BIO", name="Biology", created_at=world.monday)])
        session.flush()
        session.add_all([
            Schedule(course_id="MUS", room_id="LAB-301", weekday=2, start_time=time(14),
                     end_time=time(15, 30)),
            Schedule(course_id="BIO", room_id="LAB-301", weekday=2, start_time=time(14, 30),
                     end_time=time(15, 30))])
        session.commit()
        at = world.at(2, 14, 45)
        schedule = build_schedule(session, "LAB-301", at)
        assert schedule.current_course_id == "MUS"
        device = pick_session(
            [ClassSession.model_validate(s.model_dump()) for s in schedule.sessions], at, 600)
        assert device is not None and device.course_id == "MUS"
        table = room_timetable(session, session.get(Room, "LAB-301"))  # type: ignore[arg-type]
        assert table.course_at("LAB-301", at, 10) == "MUS"
        occ = current_occurrence(table.occurrences(at.date(), "LAB-301"), at, 10)
        assert occ is not None and occ.course_id == "MUS"
    # the rule itself: running beats early; first started of overlaps; else soonest
    t0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    a = ClassSession(course_id="A", course_name="A", starts_at=t0, ends_at=t0 + timedelta(hours=2))
    b = ClassSession(course_id="B", course_name="B", starts_at=t0 + timedelta(hours=1),
                     ends_at=t0 + timedelta(hours=2))
    assert class_now([b, a], t0 + timedelta(minutes=90)) is a
    assert class_now([b], t0 + timedelta(minutes=55), timedelta(minutes=10)) is b
    assert class_now([b], t0 + timedelta(minutes=45), timedelta(minutes=10)) is None
