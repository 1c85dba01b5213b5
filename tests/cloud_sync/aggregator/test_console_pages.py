"""Every console page in Debian's headless Chromium at 1280 and 390 px (issue 25 item 9): no
page is wider than the viewport (no horizontal scroll), screenshots of each go to
test-output/console/pages/. Then a teacher on a phone (390 px) marks a student present and
then the rest of the class with "mark all present": each row's action is on screen, rows fit
the width, and the page does not reload (it stays where the teacher scrolled)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from sqlalchemy import update

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Enrollment, UnknownFace
from cloud_sync.aggregator.services.devices import add_device, create_admin_token
from cloud_sync.protocol import EMBEDDING_DIM
from tests.cloud_sync.aggregator.conftest import last_monday
from tests.conftest import REPO, require
from tests.support.chromium import Chromium, chromium_binary

from .console_helpers import check_page as fits_both_widths
from .console_helpers import live_aggregator, set_files, submit

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ADMIN_PW = "office password 1"
TEACHER_PW = "teacher password 1"
OUT = REPO / "test-output" / "console" / "pages"
NAMES = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Katherine Johnson",
         "Edsger Dijkstra", "Margaret Hamilton-Featherstonehaugh", "Tim Berners-Lee"]


def check_page(browser: Chromium, name: str) -> None:
    """Screenshots at 1280 and 390 px; at each width the page is no wider than the viewport."""
    fits_both_widths(browser, OUT, name)


def _login(browser: Chromium, url: str, name: str, password: str) -> None:
    browser.navigate(f"{url}/login")
    submit(browser, "form[action='/login']", {"name": name, "password": password})
    assert browser.evaluate("location.pathname") == "/", name


def test_every_page_fits_a_phone_and_a_teacher_marks_in_place(tmp_path: Path) -> None:
    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    settings = aggregator_config.load(
        None, database_url=f"sqlite:///{tmp_path / 'agg.db'}", data_dir=tmp_path / "data",
        rate_limit_per_min=100000, unknown_faces_enabled=True, recordings_enabled=True)
    monday = last_monday()
    day = monday.date().isoformat()
    with live_aggregator(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        ctx = app.state.ctx
        with ctx.sessions() as session:
            _, token = create_admin_token(session, "tests")
            accounts.add_user(session, "office", "admin", ADMIN_PW)
            accounts.add_user(session, "ms-lee", "teacher", TEACHER_PW)
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        assert api.post("/api/v1/rooms", json={"id": "LAB-301", "name": "Science lab",
                                               "site": "north"}).status_code == 201
        assert api.post("/api/v1/courses", json={"id": "CS101", "name": "Introduction to "
                                                 "computer science"}).status_code == 201
        assert api.post("/api/v1/schedules", json={
            "course_id": "CS101", "room_id": "LAB-301", "weekday": 0, "start_time": "09:00",
            "end_time": "10:30"}).status_code == 201
        for i, name in enumerate(NAMES, 1):
            sid = f"S{i:03d}"
            assert api.post("/api/v1/students", json={"id": sid, "name": name}
                            ).status_code == 201
            assert api.post(f"/api/v1/students/{sid}/consent", json={"state": "granted"}
                            ).status_code == 200
            assert api.post("/api/v1/enrollments", json={"student_id": sid,
                                                         "course_id": "CS101"}
                            ).status_code == 201
        with ctx.sessions() as session:
            accounts.assign_courses(session, "ms-lee", ["CS101"])
            _, key = add_device(session, "LAB-301", "pi-301")
            # enrolled before last Monday's class (a class counts from the enrolment)
            session.execute(update(Enrollment).values(created_at=monday - timedelta(days=7)))
            session.commit()
        device = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                              timeout=30)
        seen = (monday.replace(hour=9, minute=2)).isoformat()
        r = device.post("/api/v1/attendance", json={"v": 1, "device_id": "pi-301", "records": [
            {"key": str(uuid.uuid4()), "student_id": "S001", "room_id": "LAB-301",
             "device_id": "pi-301", "seen_at": seen, "confidence": 0.93,
             "course_id": "CS101"}]})
        assert r.status_code == 200, r.text

        crop = cv2.imencode(".jpg", np.full((64, 64, 3), 140, np.uint8))[1].tobytes()
        vector = np.random.default_rng(3).normal(size=EMBEDDING_DIM).astype("<f4")
        with ctx.sessions() as session:
            session.add_all([UnknownFace(
                key=uuid.uuid4(), device_id="pi-301", room_id="LAB-301", at=monday,
                received_at=datetime.now(UTC), crop=crop, embedder="sface/test",
                vector=(vector + 0.001 * i).tobytes()) for i in range(2)])
            session.commit()

        # every page an administrator opens, at both widths
        browser.navigate(f"{url}/login")
        check_page(browser, "login")
        _login(browser, url, "office", ADMIN_PW)
        for name, path in (("dashboard", "/"), ("courses", "/courses"),
                           ("course", f"/courses/CS101?date={day}"),
                           ("summary", "/courses/CS101/summary"), ("students", "/students"),
                           ("student", "/students/S006"), ("timetable", "/timetable"),
                           ("devices", "/devices"), ("unknown", "/unknown"),
                           ("recordings", "/recordings"), ("audit", "/audit"),
                           ("accounts", "/accounts"),
                           ("not-found", "/students/NOPE")):
            browser.navigate(url + path)
            check_page(browser, f"admin-{name}")
        browser.navigate(f"{url}/unknown")
        submit(browser, "form.label-group", {"student": "S002 · Grace Hopper"})
        assert "Are these 2 faces Grace Hopper?" in browser.evaluate("document.body.innerText")
        check_page(browser, "admin-unknown-confirm")
        browser.navigate(f"{url}/students")
        submit(browser, "#add-student", {"student_id": "S001", "name": "Ada Again"})
        assert browser.evaluate("document.querySelector('#err-student_id').textContent") == (
            "S001 already exists (Ada Lovelace)")
        assert browser.evaluate("document.querySelector('[name=name]').value") == "Ada Again"
        check_page(browser, "admin-student-refused")
        csv_file = tmp_path / "schedules.csv"
        csv_file.write_text("course_id,room_id,weekday,start_time,end_time\n"
                            "CS101,LAB-301,Thrusday,09:00,10:00\n")
        browser.navigate(f"{url}/timetable")
        set_files(browser, "#import input[type=file]", [csv_file])
        submit(browser, "#import form", {"kind": "schedules"})
        assert "did you mean Thu?" in browser.evaluate(
            "document.querySelector('#import-report').innerText")
        check_page(browser, "admin-import-report")
        browser.navigate(f"{url}/devices")
        submit(browser, "form[action='/devices']", {"room_id": "LAB-301", "device_id": "pi-302"})
        assert browser.evaluate("document.querySelector('#api-key').textContent").startswith(
            "dk_")
        check_page(browser, "admin-device-key")
        browser.evaluate("document.querySelector('form.logout').requestSubmit(), true")
        browser.wait_event("Page.loadEventFired")

        # the teacher's pages
        _login(browser, url, "ms-lee", TEACHER_PW)
        for name, path in (("dashboard", "/"), ("courses", "/courses"),
                           ("course", f"/courses/CS101?date={day}"),
                           ("summary", "/courses/CS101/summary"), ("students", "/students"),
                           ("student", "/students/S001"), ("recordings", "/recordings")):
            browser.navigate(url + path)
            check_page(browser, f"teacher-{name}")

        # on a phone: every row fits, its action is on screen; marks without a reload
        browser.emulate(390, 844, mobile=True)
        browser.navigate(f"{url}/courses/CS101?date={day}")
        browser.wait_for("document.documentElement.clientWidth === 390")
        rows = browser.evaluate("""[...document.querySelectorAll('tr[data-student]')].map(tr => {
            const b = tr.querySelector('button'), r = tr.getBoundingClientRect();
            const br = b ? b.getBoundingClientRect() : null;
            return {id: tr.dataset.student, right: r.right,
                    button: br && br.width > 0 ? [br.left, br.right] : null}; })""")
        assert len(rows) == len(NAMES)
        for row in rows:
            assert row["right"] <= 390, row
            if row["id"] != "S001":  # S001 was seen: no mark-present button
                assert row["button"] and row["button"][0] >= 0 and row["button"][1] <= 390, row
        browser.evaluate("window.stillHere = 'yes'; window.scrollTo(0, 400); true")
        scrolled = browser.evaluate("window.scrollY")
        browser.evaluate("document.querySelector('tr[data-student=\"S004\"] "
                         "form.mark-present button').click(), true")
        browser.wait_for("document.querySelector('tr[data-student=\"S004\"]')"
                         ".dataset.status === 'present'")
        assert browser.evaluate("window.stillHere") == "yes"  # no reload
        assert browser.evaluate("window.scrollY") == scrolled
        assert "Katherine Johnson marked present" in browser.evaluate(
            "document.querySelector('#inplace-notice').textContent")
        browser.screenshot(OUT / "teacher-phone-marked-one-390.png", full_page=False)
        browser.evaluate("window.confirm = () => true; document.querySelector("
                         "'form.mark-all button').click(), true")
        browser.wait_for("[...document.querySelectorAll('tr[data-student]')].every("
                         "tr => ['present', 'late'].includes(tr.dataset.status))")
        assert browser.evaluate("window.stillHere") == "yes"
        assert "5 students marked present" in browser.evaluate(
            "document.querySelector('#inplace-notice').textContent")
        assert browser.evaluate("document.querySelector('form.mark-all')") is None
        check_page(browser, "teacher-phone-all-marked")
        report = api.get(f"/api/v1/attendance/course/CS101?date={day}").json()
        students = report["sessions"][0]["students"]
        assert [s["source"] for s in students] == ["device"] + ["manual"] * 6
        api.close()
        device.close()
