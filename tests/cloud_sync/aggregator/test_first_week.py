"""Issue 25 "Done when": a realistic first week at a school, walked in Debian's headless
Chromium against the real aggregator (uvicorn), on SQLite and on PostgreSQL, as the office and
a teacher would.

The office prepares the term from CSV files with mistakes in them (results at the top of the
page in plain words; a student id twice in one file is refused; a class overlapping another in
its room is refused naming the other class, from the CSV, the form and the API), registers the
rooms' devices and enrols photos. Then a week of classes happens, the devices sending what they
saw through the real device API; the science lab's device is offline for Wednesday's class; a
student joins on Wednesday noon; on Friday a visitor is taken for a student who was away. The
office and the teacher read the reports on day one and after the week, and the numbers are
checked exactly: held, present, late, absent, no data, percentages, the classes listed to fill
in by hand; a student without consent or without a photo is "no face data: take by hand", never
missing; during today's class a student not seen so far is "not seen yet". The teacher, on a
phone (390 px), takes a student by hand, and marks Friday's visitor "not this student": the
student is struck for the whole class, the face reaches the device's roster only once
confirmed, and undo restores the attendance and the roster. Every page visited is
screenshotted at 1280 and 390 px into test-output/console/first-week/<backend>/, and none is
wider than the viewport.

Time: the week is last week (``last_monday``), so every class of it is over. What the office
did "the Friday before" (enrolments, consents, photos) and the newcomer's enrolment "on
Wednesday" are done now through the console and the API, then their timestamps are moved back
in the database: the one thing the real interfaces cannot do is act in the past. Nothing else
is written to the database directly. A device is online for a past class when it recorded
someone of the course in it (heartbeats, which the aggregator stamps with its own clock,
cannot be sent for last week). The school's time zone is one where it is now day time, so that
"a class from now" fits in today.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pytest
from sqlalchemy import update

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Enrollment, FaceEmbedding, Student
from cloud_sync.aggregator.services.devices import create_admin_token
from cloud_sync.protocol import EMBEDDER_IDS
from tests.cloud_sync.aggregator.conftest import last_monday
from tests.conftest import REPO, require
from tests.support.chromium import Chromium, chromium_binary

from .console_helpers import check_page, set_files, submit
from .console_helpers import live_aggregator as serve

pytestmark = [pytest.mark.browser, pytest.mark.slow(seconds=22)]  # each backend, load ~4.5
SHOTS = REPO / "test-output" / "console" / "first-week"  # /sqlite, /postgres
OFFICE_PW = "office password 1"
TEACHER_PW = "teacher password 1"
SFACE = EMBEDDER_IDS["sface"]
DASH = "\u2013"  # the pages' en dash (no percentage; a time range)
# a zone where it is day time now (local 08:00-20:00): one of these always is
ZONES = ("Europe/Paris", "America/New_York", "Asia/Tokyo", "America/Los_Angeles")
PHOTOS = {"S001": "obama/obama.jpg", "S002": "biden/biden.jpg",
          "S003": "kit_harington/john1.jpeg", "S004": "rose_leslie/img1.jpg",
          "S007": "alex_lacamoire/img1.jpg"}


def _school_zone() -> ZoneInfo:
    now = datetime.now(UTC)
    for name in ZONES:
        if 8 <= now.astimezone(ZoneInfo(name)).hour < 20:
            return ZoneInfo(name)
    raise AssertionError("no zone in day time")  # the four cover every hour


def _text(browser: Chromium, selector: str = "body") -> str:
    return str(browser.evaluate(f"document.querySelector({selector!r}).innerText"))


def _login(browser: Chromium, url: str, name: str, password: str) -> None:
    browser.navigate(f"{url}/login")
    submit(browser, "form[action='/login']", {"name": name, "password": password})
    assert browser.evaluate("location.pathname") == "/", name


def _logout(browser: Chromium) -> None:
    browser.events.clear()
    browser.evaluate("document.querySelector('form.logout').requestSubmit(), true")
    browser.wait_event("Page.loadEventFired")


def _import(browser: Chromium, url: str, path: Path, kind: str) -> str:
    """Import a CSV file from the timetable page; the report's text (it comes first)."""
    browser.navigate(f"{url}/timetable")
    set_files(browser, "#import input[type=file]", [path])
    submit(browser, "#import form", {"kind": kind})
    # the results are at the top: before every other section of the page
    assert browser.evaluate("document.querySelector('main section, section') === "
                            "document.querySelector('#import-report')")
    report = _text(browser, "#import-report")
    assert f"Import of {path.name}:" in report, report
    return report


def _phone(browser: Chromium) -> None:
    browser.emulate(390, 844, mobile=True)
    browser.wait_for("document.documentElement.clientWidth === 390")


def _on_screen(browser: Chromium, selector: str) -> None:
    """The element is visible within the phone's 390 px width."""
    box = browser.evaluate(f"(() => {{ const b = document.querySelector({selector!r})"
                           ".getBoundingClientRect(); return [b.left, b.right, b.width]; })()")
    assert box[2] > 0 and box[0] >= 0 and box[1] <= 390, (selector, box)


def _click(browser: Chromium, selector: str) -> None:
    """A click on a button or link (confirmation dialogs answered yes); waits for the page."""
    browser.events.clear()
    browser.evaluate(f"window.confirm = () => true; document.querySelector({selector!r})"
                     ".click(), true")
    browser.wait_event("Page.loadEventFired", 60)


def _percentages_fit_a_phone(browser: Chromium) -> None:
    """At 390 px the percentages table shows every column, the % included, without scrolling
    it sideways."""
    _phone(browser)
    wide, room = browser.evaluate("""(() => { const t = document.querySelector(
        'table.percentages'); return [t.scrollWidth, t.parentElement.clientWidth]; })()""")
    assert wide <= room, f"the percentages table is {wide} px wide in {room} px"
    browser.emulate(1280, 900, mobile=False)


def _rows(browser: Chromium, section: int = 0) -> dict[str, tuple[str, str]]:
    """The roster of the n-th class on a course page: student -> (status, status words)."""
    found = browser.evaluate(f"""[...document.querySelectorAll('section.session')[{section}]
        .querySelectorAll('tr[data-student]')].map(tr => [tr.dataset.student,
        tr.dataset.status, tr.querySelector('td.status').innerText])""")
    return {sid: (status, words) for sid, status, words in found}


def _summary_table(browser: Chromium) -> dict[str, list[str]]:
    """The summary page's table: student id -> [held, present, late, absent, no data, %]."""
    found = browser.evaluate("""[...document.querySelectorAll('table tbody tr')].map(tr =>
        [tr.querySelector('td a').getAttribute('href').split('/').pop(),
         ...[...tr.cells].slice(1).map(td => td.innerText.trim())])""")
    return {row[0]: row[1:] for row in found}


def _numbers(summary: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {p["student_id"]: (p["held"], p["present"], p["late"], p["absent"], p["no_data"],
                              p["percentage"]) for p in summary["students"]}


def test_first_week_at_a_school(db_url: str, tmp_path: Path, faces_dir: Path,
                                model_dir: Path) -> None:
    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    photos = faces_dir / "face_recognition" / "examples" / "knn_examples" / "train"
    require(all((photos / p).is_file() for p in PHOTOS.values()), f"photos missing in {photos}")
    zone = _school_zone()
    out = SHOTS / ("postgres" if db_url.startswith("postgresql") else "sqlite")
    monday: date = last_monday().date()  # day one of the term, last week
    friday_before = datetime.combine(monday - timedelta(days=3), time(16), tzinfo=zone)
    days = {name: monday + timedelta(days=i) for i, name in enumerate(
        ("mon", "tue", "wed", "thu", "fri"))}

    def at(day: str, hh: int, mm: int = 0) -> datetime:
        return datetime.combine(days[day], time(hh, mm), tzinfo=zone)

    settings = aggregator_config.load(
        None, database_url=db_url, data_dir=tmp_path / "data",
        model_dir=model_dir, rate_limit_per_min=100000, timezone=zone.key)
    with serve(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        ctx = app.state.ctx
        with ctx.sessions() as session:
            accounts.add_user(session, "office", "admin", OFFICE_PW)
            accounts.add_user(session, "ms-lee", "teacher", TEACHER_PW)
            _, token = create_admin_token(session, "office script")
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                           timeout=60)
        browser.navigate(f"{url}/")
        check_page(browser, out, "login")
        _login(browser, url, "office", OFFICE_PW)
        check_page(browser, out, "office-dashboard-empty")

        # ---- the Friday before: the term from the office's CSV files, mistakes and all ----
        files = tmp_path / "csv"
        files.mkdir()
        (files / "rooms.csv").write_text(
            "id,name,site,timezone\n"
            f"LAB-301,Science lab,north,{zone.key}\n"
            f"RM-12,Room 12,north,{zone.key}\n"
            f"HALL,Assembly hall,north,{zone.key}\n"
            f"LAB 302,Second lab,north,{zone.key}\n")
        report = _import(browser, url, files / "rooms.csv", "rooms")
        assert "3 of 4 lines imported" in report and "3 rooms added" in report, report
        assert "Line 5: id “LAB 302” may use only letters, digits" in report, report
        check_page(browser, out, "office-import-rooms")

        (files / "courses.csv").write_text(
            "id,name\nBIO1,Biology\nMATH2,Mathematics\nHIST1,History\nART1,\n")
        report = _import(browser, url, files / "courses.csv", "courses")
        assert "3 of 4 lines imported" in report and "Line 5: name is empty" in report, report

        students = ("id,name,consent\n"
                    "S001,Ada Lovelace,granted\nS002,Grace Hopper,granted\n"
                    "S003,Alan Turing,granted\nS004,Katherine Johnson,granted\n"
                    "S005,Edsger Dijkstra,granted\nS006,Margaret Hamilton,\n"
                    "S007,Tim Berners-Lee,granted\n")
        (files / "students.csv").write_text(students + "S007,Tim Berners Lee,granted\n")
        report = _import(browser, url, files / "students.csv", "students")
        assert "6 of 8 lines imported" in report and "6 students added" in report, report
        assert "2 lines not imported" in report, report
        assert ("Line 8: id “S007” is also on line 9 of this file: none of them is imported"
                in report), report
        assert "Line 9: id “S007” is also on line 8" in report, report
        check_page(browser, out, "office-import-students-duplicate")
        (files / "students-fixed.csv").write_text(students)  # the office keeps one S007
        report = _import(browser, url, files / "students-fixed.csv", "students")
        assert "7 of 7 lines imported" in report, report
        assert "1 student added · 0 changed · 6 already there" in report, report

        enrolments = "".join(f"{s},BIO1\n" for s in ("S001", "S002", "S003", "S004", "S005",
                                                      "S006", "S007"))
        enrolments += "".join(f"{s},MATH2\n" for s in ("S001", "S002", "S003", "S004"))
        enrolments += "".join(f"{s},HIST1\n" for s in ("S001", "S002", "S005", "S006"))
        (files / "enrolments.csv").write_text(
            "student_id,course_id\n" + enrolments + "S008,BIO1\nS001,BIO1\n")
        report = _import(browser, url, files / "enrolments.csv", "enrollments")
        assert "16 of 17 lines imported" in report, report
        assert "15 enrolments added · 0 changed · 1 already there" in report, report
        assert "Line 17: student 'S008' does not exist" in report, report

        first = monday.isoformat()
        (files / "schedules.csv").write_text(
            "course_id,room_id,weekday,start_time,end_time,effective_from\n"
            f"BIO1,LAB-301,Mon,09:00,10:30,{first}\n"
            f"BIO1,LAB-301,Wed,09:00,10:30,{first}\n"
            f"BIO1,LAB-301,Fri,13:00,14:30,{first}\n"
            f"MATH2,RM-12,Mon,11:00,12:00,{first}\n"
            f"MATH2,RM-12,Thrusday,11:00,12:00,{first}\n"
            f"MATH2,LAB-301,Wed,10:00,11:00,{first}\n")
        report = _import(browser, url, files / "schedules.csv", "schedules")
        assert "4 of 6 lines imported" in report, report
        assert "Line 6: weekday “Thrusday” is not a weekday (did you mean Thu?)" in report
        assert ("Line 7: LAB-301 already has Biology (BIO1) Wed 09:00-10:30 from "
                f"{first}") in report, report
        check_page(browser, out, "office-import-schedules")

        # the Thursday class through the form; History over Biology is refused there too
        browser.navigate(f"{url}/timetable")
        submit(browser, "form[action='/timetable/schedules']", {
            "course_id": "MATH2", "room_id": "RM-12", "weekday": "3", "start_time": "11:00",
            "end_time": "12:00", "effective_from": first})
        assert "added" in _text(browser), _text(browser)
        browser.navigate(f"{url}/timetable")
        submit(browser, "form[action='/timetable/schedules']", {
            "course_id": "HIST1", "room_id": "LAB-301", "weekday": "0", "start_time": "10:00",
            "end_time": "11:00", "effective_from": first})
        refused = _text(browser)
        assert "LAB-301 already has Biology (BIO1) Mon 09:00-10:30" in refused, refused
        check_page(browser, out, "office-overlap-refused")
        r = api.post("/api/v1/schedules", json={
            "course_id": "HIST1", "room_id": "LAB-301", "weekday": 4, "start_time": "14:00",
            "end_time": "15:00"})
        assert r.status_code == 409, r.text
        assert "Biology (BIO1) Fri 13:00-14:30" in r.json()["detail"], r.text
        slots = api.get("/api/v1/schedules").json()
        assert sorted((s["course_id"], s["weekday"], s["start_time"][:5]) for s in slots) == [
            ("BIO1", 0, "09:00"), ("BIO1", 2, "09:00"), ("BIO1", 4, "13:00"),
            ("MATH2", 0, "11:00"), ("MATH2", 3, "11:00")]
        browser.navigate(f"{url}/timetable")
        submit(browser, "form[action='/timetable/teachers']",
               {"teacher": "ms-lee", "course_id": "BIO1"})
        browser.navigate(f"{url}/timetable")
        submit(browser, "form[action='/timetable/teachers']",
               {"teacher": "ms-lee", "course_id": "HIST1"})
        check_page(browser, out, "office-timetable")

        # a device a room, each key shown once
        keys = {}
        for room, device in (("LAB-301", "pi-lab"), ("RM-12", "pi-12"), ("HALL", "pi-hall")):
            browser.navigate(f"{url}/devices")
            submit(browser, "form[action='/devices']", {"room_id": room, "device_id": device})
            keys[device] = browser.evaluate("document.querySelector('#api-key').textContent")
            assert keys[device].startswith("dk_")
        check_page(browser, out, "office-device-key")
        devices = {d: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"},
                                   timeout=30) for d, k in keys.items()}
        rooms = {"pi-lab": "LAB-301", "pi-12": "RM-12", "pi-hall": "HALL"}

        # photos for five students; S005 has consent but no photo, S006 no consent
        for sid, photo in PHOTOS.items():
            path = photos / photo
            r = api.post(f"/api/v1/students/{sid}/faces",
                         files={"photo": (path.name, path.read_bytes(), "image/jpeg")})
            assert r.status_code == 201, (sid, r.text)
        r = api.post("/api/v1/students/S006/faces", files={
            "photo": ("x.jpg", (photos / PHOTOS["S001"]).read_bytes(), "image/jpeg")})
        assert r.status_code == 409, r.text  # no consent: no photo either
        browser.navigate(f"{url}/students/S006")
        assert "No face data" in _text(browser), _text(browser)
        check_page(browser, out, "office-student-no-consent")
        # all of it happened the Friday before the week (see the module's docstring)
        with ctx.sessions() as session:
            session.execute(update(Enrollment).values(created_at=friday_before))
            session.execute(update(Student).where(Student.consent_at.is_not(None))
                            .values(consent_at=friday_before))
            session.execute(update(FaceEmbedding).values(created_at=friday_before))
            session.commit()

        def seen(device: str, *sightings: tuple[str, datetime]) -> None:
            r = devices[device].post("/api/v1/attendance", json={
                "v": 1, "device_id": device, "records": [{
                    "key": str(uuid.uuid4()), "student_id": sid, "room_id": rooms[device],
                    "device_id": device, "seen_at": when.astimezone(UTC).isoformat(),
                    "confidence": 0.91} for sid, when in sightings]})
            assert r.status_code == 200 and r.json()["accepted"] == len(sightings), r.text

        # ---- day one (Monday) ----
        seen("pi-lab", ("S003", at("mon", 8, 57)), ("S001", at("mon", 9, 2)),
             ("S007", at("mon", 9, 5)), ("S002", at("mon", 9, 20)),
             ("S001", at("mon", 9, 40)))  # a second sighting changes nothing
        seen("pi-12", ("S001", at("mon", 11, 1)), ("S002", at("mon", 11, 3)))
        mon = days["mon"].isoformat()
        browser.navigate(f"{url}/courses/BIO1?date={mon}")
        assert _rows(browser) == {
            "S001": ("present", "present"), "S002": ("late", "late"),
            "S003": ("present", "present"), "S004": ("absent", "absent"),
            "S005": ("no_face_data", "no face data: take by hand"),
            "S006": ("no_face_data", "no face data: take by hand"),
            "S007": ("present", "present")}
        counts = _text(browser, "section.session p")
        assert counts == ("3 present · 1 late · 1 absent · 2 no face data: take by hand"), counts
        assert "missing" not in _text(browser).lower()
        check_page(browser, out, "office-bio1-day-one")
        browser.navigate(f"{url}/courses/BIO1/summary?from={mon}&to={mon}")
        table = _summary_table(browser)
        assert table == {
            "S001": ["1", "1", "0", "0", "0", "100.0"], "S002": ["1", "0", "1", "0", "0", "100.0"],
            "S003": ["1", "1", "0", "0", "0", "100.0"], "S004": ["1", "0", "0", "1", "0", "0.0"],
            "S005": ["0", "0", "0", "0", "1", DASH], "S006": ["0", "0", "0", "0", "1", DASH],
            "S007": ["1", "1", "0", "0", "0", "100.0"]}, table
        unfilled = browser.evaluate("[...document.querySelectorAll('#unfilled li')]"
                                    ".map(li => [li.dataset.reason, li.innerText])")
        assert unfilled == [["no_face_data", f"{mon} 09:00{DASH}10:30 · room LAB-301 · no face "
                             "data: 2 students (Edsger Dijkstra, Margaret Hamilton)"]], unfilled
        check_page(browser, out, "office-bio1-summary-day-one")
        browser.navigate(f"{url}/courses/MATH2/summary?from={mon}&to={mon}")
        assert _summary_table(browser) == {
            "S001": ["1", "1", "0", "0", "0", "100.0"], "S002": ["1", "1", "0", "0", "0", "100.0"],
            "S003": ["1", "0", "0", "1", "0", "0.0"], "S004": ["1", "0", "0", "1", "0", "0.0"]}
        assert browser.evaluate("document.querySelector('#unfilled')") is None

        # ---- Wednesday noon: a new student joins Biology (the add-student form, consent
        # signed, a photo); her Monday and Wednesday classes are not hers
        browser.navigate(f"{url}/students")
        browser.events.clear()
        browser.evaluate("""(() => { const f = document.querySelector('#add-student');
            f.querySelector('[name=student_id]').value = 'S008';
            f.querySelector('[name=name]').value = 'Barbara Liskov';
            f.querySelector('[name=course_id]').value = 'BIO1';
            f.querySelector('[name=consent]').checked = true;
            f.requestSubmit(); return true; })()""")
        browser.wait_event("Page.loadEventFired", 60)
        assert browser.evaluate("location.pathname") == "/students/S008", _text(browser)
        newcomer = faces_dir / "face_recognition" / "examples" / "lin-manuel-miranda.png"
        r = api.post("/api/v1/students/S008/faces",
                     files={"photo": (newcomer.name, newcomer.read_bytes(), "image/png")})
        assert r.status_code == 201, r.text
        joined = at("wed", 12)
        with ctx.sessions() as session:  # done on Wednesday at noon (see the docstring)
            session.execute(update(Enrollment).where(Enrollment.student_id == "S008")
                            .values(created_at=joined))
            session.execute(update(Student).where(Student.id == "S008")
                            .values(consent_at=joined))
            session.execute(update(FaceEmbedding).where(FaceEmbedding.student_id == "S008")
                            .values(created_at=joined))
            session.commit()

        # ---- the rest of the week: the lab's device is offline for Wednesday's class ----
        seen("pi-12", ("S001", at("thu", 10, 58)), ("S002", at("thu", 11, 1)),
             ("S003", at("thu", 11, 2)), ("S004", at("thu", 11, 9)))
        seen("pi-lab", ("S001", at("fri", 13, 1)), ("S002", at("fri", 13, 2)),
             ("S003", at("fri", 13, 4)), ("S004", at("fri", 13, 25)),
             ("S008", at("fri", 13, 3)))
        # Tim was away on Friday; a visitor was taken for him, twice in the class
        lookalike = np.random.default_rng(25).normal(size=128)
        lookalike = [float(x) for x in lookalike / np.linalg.norm(lookalike)]
        r = devices["pi-lab"].post("/api/v1/attendance", json={
            "v": 1, "device_id": "pi-lab", "records": [{
                "key": str(uuid.uuid4()), "student_id": "S007", "room_id": "LAB-301",
                "device_id": "pi-lab", "seen_at": at("fri", 13, mm).astimezone(UTC).isoformat(),
                "confidence": 0.62, "descriptor": lookalike, "descriptor_embedder": SFACE}
                for mm in (10, 41)]})
        assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
        wed = days["wed"].isoformat()
        browser.navigate(f"{url}/courses/BIO1?date={wed}")
        assert {s: v[0] for s, v in _rows(browser).items()} == {
            "S001": "no_data", "S002": "no_data", "S003": "no_data", "S004": "no_data",
            "S005": "no_face_data", "S006": "no_face_data", "S007": "no_data"}
        assert _text(browser, "section.session p") == (
            "0 present · 0 late · 0 absent · 5 no data · 2 no face data: take by hand")
        assert "No device of room LAB-301 was online for this class" in _text(browser)
        check_page(browser, out, "office-bio1-device-offline")
        fri = days["fri"].isoformat()
        week = api.get("/api/v1/attendance/course/BIO1", params={"from": mon, "to": fri}).json()
        expected = {  # held, present, late, absent, no data, %
            "S001": (2, 2, 0, 0, 1, 100.0), "S002": (2, 1, 1, 0, 1, 100.0),
            "S003": (2, 2, 0, 0, 1, 100.0), "S004": (2, 0, 1, 1, 1, 50.0),
            "S005": (0, 0, 0, 0, 3, None), "S006": (0, 0, 0, 0, 3, None),
            "S007": (2, 2, 0, 0, 1, 100.0),  # the visitor on Friday: see the teacher
            "S008": (1, 1, 0, 0, 0, 100.0)}  # from Wednesday noon: Friday only
        assert _numbers(week) == expected
        assert [(u["starts_at"][:10], u["reason"], u["student_ids"]) for u in week["unfilled"]
                ] == [(mon, "no_face_data", ["S005", "S006"]),
                      (wed, "no_data", ["S001", "S002", "S003", "S004", "S007"]),
                      (wed, "no_face_data", ["S005", "S006"]),
                      (fri, "no_face_data", ["S005", "S006"])]
        browser.navigate(f"{url}/courses/BIO1/summary?from={mon}&to={fri}")
        assert _summary_table(browser) == {
            sid: [str(v) for v in nums[:5]] + [DASH if nums[5] is None else str(nums[5])]
            for sid, nums in expected.items()}
        assert "no device online: 5 students" in _text(browser, "#unfilled")
        check_page(browser, out, "office-bio1-summary-week")
        _percentages_fit_a_phone(browser)
        math = api.get("/api/v1/attendance/course/MATH2", params={"from": mon, "to": fri}).json()
        assert _numbers(math) == {
            "S001": (2, 2, 0, 0, 0, 100.0), "S002": (2, 2, 0, 0, 0, 100.0),
            "S003": (2, 1, 0, 1, 0, 50.0), "S004": (2, 1, 0, 1, 0, 50.0)}
        assert math["unfilled"] == []
        browser.navigate(f"{url}/students/S006?from={mon}&to={fri}")
        courses = browser.evaluate("""[...document.querySelectorAll('table tbody tr')].map(
            tr => [...tr.cells].map(td => td.innerText.trim()))""")
        assert courses[:2] == [["Biology", "0", "0", "0", "0", "3", DASH],
                               ["History", "0", "0", "0", "0", "0", DASH]], courses
        check_page(browser, out, "office-student-no-consent-week")
        _percentages_fit_a_phone(browser)
        browser.navigate(f"{url}/students/S004?from={mon}&to={fri}")
        check_page(browser, out, "office-student")

        # ---- today: History in the hall from now; the hall's device is online ----
        browser.navigate(f"{url}/timetable")
        submit(browser, "#class-now form", {"course_id": "HIST1", "room_id": "HALL",
                                            "minutes": "45"})
        assert "HIST1 in HALL from" in _text(browser), _text(browser)
        now = datetime.now(UTC)
        beat = devices["pi-hall"].post("/api/v1/heartbeat", json={
            "v": 1, "device_id": "pi-hall", "room_id": "HALL", "software_version": "0.1.0",
            "sent_at": now.isoformat(), "uptime_s": 600, "outbox_depth": 0})
        assert beat.status_code < 300, beat.text
        seen("pi-hall", ("S001", now))
        browser.navigate(f"{url}/")
        hall = "document.querySelector('.room[data-room=\"HALL\"]')"
        assert browser.evaluate(f"{hall}.querySelector('.present').textContent") == "1"
        assert browser.evaluate(f"{hall}.querySelector('.expected').textContent") == "4"
        assert browser.evaluate(f"{hall}.querySelector('li.device.online') !== null")
        check_page(browser, out, "office-dashboard-class-now")
        today = now.astimezone(zone).date().isoformat()
        _logout(browser)

        # ---- the teacher, on a phone ----
        browser.emulate(390, 844, mobile=True)
        _login(browser, url, "ms-lee", TEACHER_PW)
        browser.navigate(f"{url}/courses/HIST1?date={today}")
        browser.wait_for("document.documentElement.clientWidth === 390")
        assert {s: v[1] for s, v in _rows(browser).items()} == {
            "S001": "present", "S002": "not seen yet",
            "S005": "no face data: take by hand", "S006": "no face data: take by hand"}
        assert "Class in progress: not held yet." in _text(browser)
        check_page(browser, out, "teacher-hist1-now")
        browser.emulate(390, 844, mobile=True)
        # Monday's Biology: Margaret (no consent) was there, the teacher takes her by hand
        browser.navigate(f"{url}/courses/BIO1?date={mon}")
        browser.wait_for("document.documentElement.clientWidth === 390")
        button = browser.evaluate("""(() => { const b = document.querySelector(
            'tr[data-student="S006"] form.mark-present button').getBoundingClientRect();
            return [b.left, b.right, b.width]; })()""")
        assert button[2] > 0 and button[0] >= 0 and button[1] <= 390, button
        browser.evaluate("document.querySelector('tr[data-student=\"S006\"] "
                         "form.mark-present button').click(), true")
        browser.wait_for("document.querySelector('tr[data-student=\"S006\"]')"
                         ".dataset.status === 'present'")
        assert "Margaret Hamilton marked present" in _text(browser, "#inplace-notice")
        browser.screenshot(out / "teacher-phone-marked-390.png", full_page=False)
        browser.navigate(f"{url}/courses/BIO1?date={mon}")
        assert _rows(browser)["S006"] == ("present", "present")
        assert _text(browser, "section.session p") == (
            "4 present · 1 late · 1 absent · 1 no face data: take by hand")
        check_page(browser, out, "teacher-bio1-day-one-after")
        browser.navigate(f"{url}/courses/BIO1/summary?from={mon}&to={fri}")
        assert _summary_table(browser)["S006"] == ["1", "1", "0", "0", "2", "100.0"]
        assert ("no face data: 1 student (Edsger Dijkstra)"
                in _text(browser, "#unfilled li")), _text(browser, "#unfilled")
        check_page(browser, out, "teacher-bio1-summary-week")

        # Friday's Biology: "not this student" for Tim strikes him for the whole class; the
        # visitor's face reaches the lab's device only once the teacher confirms it; undo
        def roster() -> tuple[list[Any], str]:
            r = devices["pi-lab"].get("/api/v1/schedule", params={
                "room_id": "LAB-301", "at": at("fri", 13, 30).isoformat(), "embedder": "sface"})
            assert r.status_code == 200, r.text
            tim = next(e for e in r.json()["rosters"]["BIO1"] if e["student_id"] == "S007")
            return tim["negatives"], r.headers["etag"]

        def tim() -> tuple[Any, ...]:  # Tim's week in Biology
            return _numbers(api.get("/api/v1/attendance/course/BIO1", params={
                "from": mon, "to": fri}).json())["S007"]

        negatives, etag_before = roster()
        assert negatives == []
        row = "tr[data-student='S007']"
        _phone(browser)
        browser.navigate(f"{url}/courses/BIO1?date={fri}")
        assert _rows(browser)["S007"] == ("present", "present")
        browser.evaluate(f"document.querySelector(\"{row} details\").open = true")
        _on_screen(browser, f"{row} form.mark-wrong button")
        browser.evaluate(f"document.querySelector(\"{row} form.mark-wrong [name=reason]\")"
                         ".value = 'Tim was on a trip: a visitor'")
        _click(browser, f"{row} form.mark-wrong button")
        assert "Tim Berners-Lee struck for the whole class" in _text(browser)
        assert _rows(browser)["S007"] == ("absent", "absent")
        assert "confirm the face: 2 waiting" in _text(browser, row)
        assert _text(browser, "section.session p") == (
            "4 present · 1 late · 1 absent · 2 no face data: take by hand")
        assert tim() == (2, 1, 0, 1, 1, 50.0)
        assert roster() == ([], etag_before)  # nothing reaches the device yet
        check_page(browser, out, "teacher-struck")
        _phone(browser)
        _click(browser, f"{row} a.review")
        assert "2 faces waiting for your confirmation" in _text(browser, "main")
        check_page(browser, out, "teacher-correction-pending")
        _phone(browser)
        _on_screen(browser, "#confirm button")
        _click(browser, "#confirm button")
        assert "Confirmed by ms-lee" in _text(browser)
        negatives, etag_confirmed = roster()
        assert len(negatives) == 2 and etag_confirmed != etag_before
        check_page(browser, out, "teacher-correction-confirmed")
        _phone(browser)
        browser.navigate(f"{url}/courses/BIO1?date={fri}")
        _on_screen(browser, f"{row} form.undo button")
        _click(browser, f"{row} form.undo button")
        assert "attendance restored" in _text(browser), _text(browser)
        assert _rows(browser)["S007"] == ("present", "present")
        assert browser.evaluate(f"document.querySelector(\"{row} form.undo\")") is None
        assert tim() == (2, 2, 0, 0, 1, 100.0)
        negatives, etag_undone = roster()
        assert negatives == [] and etag_undone == etag_before
        check_page(browser, out, "teacher-undone")

        for name, path in (("dashboard", "/"), ("courses", "/courses"),
                           ("students", "/students")):
            browser.navigate(url + path)
            check_page(browser, out, f"teacher-{name}")
        week = api.get("/api/v1/attendance/course/BIO1", params={"from": mon, "to": fri}).json()
        assert _numbers(week)["S006"] == (1, 1, 0, 0, 2, 100.0)
        first_unfilled = week["unfilled"][0]
        assert (first_unfilled["starts_at"][:10], first_unfilled["reason"],
                first_unfilled["student_ids"]) == (mon, "no_face_data", ["S005"])
        api.close()
        for client in devices.values():
            client.close()
