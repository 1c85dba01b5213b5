"""The console end to end in Debian's headless Chromium against a real aggregator (uvicorn),
on SQLite and on PostgreSQL: log in, create a room and courses, add students and enrol them
from real photos (../shared/faces), start a class now, register a device, ingest records
through the device API, see them on the dashboard (live) and in the course report, correct
one, download the CSV (the API's bytes); a teacher cannot open another teacher's course.
Screenshots (1280 and 390 px wide) go to test-output/console/<backend>/."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.services.devices import create_admin_token
from tests.conftest import REPO, require
from tests.support.chromium import Chromium, chromium_binary

from .console_helpers import live_aggregator, set_files, shoot, submit

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ADMIN_PW = "office password 1"
TEACHER_PW = "teacher password 1"
OTHER_PW = "other teacher pw 1"


def test_console_end_to_end(db_url: str, tmp_path: Path, faces_dir: Path,
                            model_dir: Path) -> None:
    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    examples = faces_dir / "face_recognition" / "examples"
    photos = [examples / n for n in ("obama.jpg", "obama2.jpg", "two_people.jpg")]
    require(all(p.is_file() for p in photos), f"photos missing in {examples}")
    backend = "postgres" if db_url.startswith("postgresql") else "sqlite"
    out = REPO / "test-output" / "console" / backend
    settings = aggregator_config.load(
        None, database_url=db_url, data_dir=tmp_path / "data", model_dir=model_dir,
        rate_limit_per_min=100000, console_refresh_s=1,
    )
    with live_aggregator(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        with app.state.ctx.sessions() as session:
            accounts.add_user(session, "office", "admin", ADMIN_PW)
            accounts.add_user(session, "ms-lee", "teacher", TEACHER_PW)
            accounts.add_user(session, "mr-kim", "teacher", OTHER_PW)
            _, token = create_admin_token(session, "tests")
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                           timeout=30)

        # 1. log in (the dashboard redirects to the login page first)
        browser.navigate(f"{url}/")
        assert browser.evaluate("location.pathname") == "/login"
        shoot(browser, out, "login")
        submit(browser, "form[action='/login']", {"name": "office", "password": ADMIN_PW})
        assert browser.evaluate("location.pathname") == "/"

        # 2. timetable: a room, two courses with their teachers
        browser.navigate(f"{url}/timetable")
        submit(browser, "form[action='/timetable/rooms']",
                {"room_id": "LAB-1", "name": "Lab one", "timezone": "Europe/Paris"})
        submit(browser, "form[action='/timetable/courses']",
                {"course_id": "CS101", "name": "Intro CS", "teacher": "ms-lee"})
        submit(browser, "form[action='/timetable/courses']",
                {"course_id": "MA201", "name": "Algebra", "teacher": "mr-kim"})
        assert "course MA201 added" in browser.evaluate("document.body.innerText")

        # 3. students, enrolled in CS101; S001 enrolled from real photos with per-photo results
        browser.navigate(f"{url}/students")
        submit(browser, "#add-student", {"student_id": "S001", "name": "Barack Obama",
                                          "course_id": "CS101"})
        browser.navigate(f"{url}/students")
        submit(browser, "#add-student", {"student_id": "S002", "name": "Joe Biden",
                                          "course_id": "CS101"})
        browser.navigate(f"{url}/students/S001")
        assert browser.evaluate("document.querySelector('#upload')") is None  # no consent yet
        browser.events.clear()
        browser.evaluate("document.querySelector('#consent button').click(), true")
        browser.wait_event("Page.loadEventFired", 60)
        assert browser.evaluate("document.querySelector('.consent-state').textContent") == (
            "granted")
        set_files(browser, "#photos", photos)
        browser.evaluate("document.querySelector('#upload').requestSubmit(), true")
        browser.wait_for("document.querySelector('#upload').dataset.done === '3'", 120)
        results = browser.evaluate(
            "[...document.querySelectorAll('#upload .results li')].map(li => li.textContent)")
        assert results[0].startswith("obama.jpg: accepted"), results
        assert results[1].startswith("obama2.jpg: accepted"), results
        assert results[2] == "two_people.jpg: 2 faces", results
        browser.wait_for("document.querySelector('.photo-count')?.textContent === '2'")
        shoot(browser, out, "student")

        # 3b. CSV import from the page: the per-line report names the bad line
        csv_file = tmp_path / "students.csv"
        csv_file.write_text("id,name\nS003,Kamala Harris\nbad id!,Nobody\n")
        browser.navigate(f"{url}/timetable")
        set_files(browser, "#import input[type=file]", [csv_file])
        submit(browser, "#import form", {"kind": "students"})
        report = browser.evaluate("document.querySelector('.import-report').innerText")
        assert "1 of 2 lines imported" in report, report
        assert "Line 3: id “bad id!” may use only letters" in report, report

        # 4. a class from now in two clicks (course, start)
        browser.navigate(f"{url}/timetable")
        submit(browser, "#class-now form", {"course_id": "CS101", "room_id": "LAB-1"})
        assert "CS101 in LAB-1 from" in browser.evaluate("document.body.innerText")
        browser.navigate(f"{url}/timetable")
        shoot(browser, out, "timetable")

        # 5. a device, its key shown once
        browser.navigate(f"{url}/devices")
        submit(browser, "form[action='/devices']", {"room_id": "LAB-1", "device_id": "pi-1"})
        key = browser.evaluate("document.querySelector('#api-key').textContent")
        assert key.startswith("dk_")
        device = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                              timeout=30)

        # 6. the dashboard, then records through the device API: it updates by itself
        browser.navigate(f"{url}/")
        room = "document.querySelector('.room[data-room=\"LAB-1\"]')"
        assert browser.evaluate(f"{room}.querySelector('.expected').textContent") == "2"
        assert browser.evaluate(f"{room}.querySelector('.present').textContent") == "0"
        now = datetime.now(UTC)
        beat = device.post("/api/v1/heartbeat", json={
            "v": 1, "device_id": "pi-1", "room_id": "LAB-1", "software_version": "0.1.0",
            "sent_at": now.isoformat(), "uptime_s": 100, "cpu_temp_c": 51.2,
            "outbox_depth": 3})
        assert beat.status_code < 300, beat.text
        records = [{"key": str(uuid.uuid4()), "student_id": sid, "room_id": "LAB-1",
                    "device_id": "pi-1", "seen_at": now.isoformat(), "confidence": conf,
                    "course_id": "CS101"} for sid, conf in (("S001", 0.93), ("S002", 0.71))]
        sent = device.post("/api/v1/attendance",
                           json={"v": 1, "device_id": "pi-1", "records": records})
        assert sent.status_code == 200 and sent.json()["accepted"] == 2, sent.text
        alert = device.post("/api/v1/events", json={
            "v": 1, "device_id": "pi-1", "room_id": "LAB-1", "kind": "camera_offline",
            "severity": "critical", "message": "camera reopening for 61 s",
            "at": now.isoformat()})
        assert alert.status_code < 300, alert.text
        browser.wait_for(f"{room}.querySelector('.present').textContent === '2'", 30)
        browser.wait_for(f"{room}.querySelector('.alert.critical') !== null", 30)
        assert "camera reopening for 61 s" in browser.evaluate(f"{room}.innerText")
        assert "online" in browser.evaluate(f"{room}.querySelector('.device').className")
        assert "51 °C" in browser.evaluate(f"{room}.innerText")
        assert "outbox 3" in browser.evaluate(f"{room}.innerText")
        shoot(browser, out, "dashboard")

        # 7. the course report; S002 was not Joe Biden: correct it
        today = datetime.now(UTC).astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
        day = today.date().isoformat()
        browser.navigate(f"{url}/courses/CS101?date={day}")
        row = "document.querySelector('tr[data-student=\"{}\"]')"
        assert browser.evaluate(row.format("S001") + ".dataset.status") == "present"
        assert "0.93" in browser.evaluate(row.format("S001") + ".innerText")
        browser.evaluate("window.confirm = () => true")  # "the whole class is struck"?
        submit(browser, "tr[data-student='S002'] form.mark-wrong",
                {"reason": "Joe was at home ill"})
        page = browser.evaluate("location.href + ' ' + document.body.innerText")
        # S002 has consent but no face data: not "missing" but "take by hand" (issue 25)
        assert browser.evaluate(row.format("S002") + ".dataset.status") == "no_face_data", page
        assert "no face data: take by hand" in browser.evaluate(row.format("S002") + ".innerText")
        assert "Joe was at home ill" in browser.evaluate("document.body.innerText")
        shoot(browser, out, "course")

        # 8. the CSV from the page is the API's CSV, with the correction applied
        page_csv = browser.evaluate(
            f"fetch('/courses/CS101/day.csv?date={day}').then(r => r.text())")
        api_csv = api.get(f"/api/v1/attendance/course/CS101?date={day}&format=csv").text
        assert page_csv == api_csv
        lines = page_csv.strip().splitlines()
        assert any(",S001,Barack Obama,present," in line for line in lines), lines
        assert any(",S002,Joe Biden,no_face_data," in line for line in lines), lines

        # 9. audit trail
        browser.navigate(f"{url}/audit")
        text = browser.evaluate("document.body.innerText")
        for action in ("attendance.not_student", "face.enrol", "schedule.class_now",
                       "device.add", "user.login", "consent.grant"):
            assert action in text
        shoot(browser, out, "audit")
        browser.navigate(f"{url}/devices")
        shoot(browser, out, "devices")

        # 10. the teacher of MA201 sees neither CS101 nor its students
        browser.evaluate("document.querySelector('form.logout').requestSubmit(), true")
        browser.wait_event("Page.loadEventFired")
        submit(browser, "form[action='/login']", {"name": "mr-kim", "password": OTHER_PW})
        browser.navigate(f"{url}/courses")
        assert "CS101" not in browser.evaluate("document.querySelector('main').innerText")
        browser.navigate(f"{url}/courses/CS101?date={day}")
        assert browser.responses("/courses/CS101")[-1] == 403
        browser.navigate(f"{url}/students/S001")
        assert browser.responses("/students/S001")[-1] == 404  # as an id that does not exist
        browser.navigate(f"{url}/")
        assert "Intro CS" not in browser.evaluate("document.body.innerText")
        shoot(browser, out, "teacher-dashboard")
        api.close()
        device.close()
