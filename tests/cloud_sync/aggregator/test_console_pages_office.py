"""Issue 25, in headless Chromium at 1280 and 390 px (screenshots in
test-output/console/pages/, no horizontal scroll; the pattern of test_console_pages.py):

- item 8: a device registered to LAB-301 but configured for RM-14 is shown on the dashboard and
  the Devices page as "registered to LAB-301, configured for RM-14: change config or
  re-register", not "last heartbeat never";
- item 5: a refused "Add room" keeps what was typed, the reason beside the field;
- a class without data filled in by hand: one student marked present, one absent, then the
  rest absent, in place (no reload), on a phone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Enrollment, FaceEmbedding, Student
from cloud_sync.aggregator.services.devices import add_device, create_admin_token
from tests.cloud_sync.aggregator.conftest import last_monday
from tests.conftest import require
from tests.support.chromium import Chromium, chromium_binary

from .console_helpers import live_aggregator, submit
from .test_console_pages import OUT, check_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ADMIN_PW = "office password 1"
SAYS = "registered to LAB-301, configured for RM-14: change config or re-register"


def _login(browser: Chromium, url: str) -> None:
    browser.navigate(f"{url}/login")
    submit(browser, "form[action='/login']", {"name": "office", "password": ADMIN_PW})
    assert browser.evaluate("location.pathname") == "/"


def test_room_mismatch_on_the_dashboard_and_devices_page(tmp_path: Path) -> None:
    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    settings = aggregator_config.load(
        None, database_url=f"sqlite:///{tmp_path / 'agg.db'}", data_dir=tmp_path / "data",
        rate_limit_per_min=100000)
    with live_aggregator(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        ctx = app.state.ctx
        with ctx.sessions() as session:
            _, token = create_admin_token(session, "tests")
            accounts.add_user(session, "office", "admin", ADMIN_PW)
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        assert api.post("/api/v1/rooms", json={"id": "LAB-301", "name": "Science lab",
                                               "site": "north"}).status_code == 201
        with ctx.sessions() as session:
            _, key = add_device(session, "LAB-301", "pi-lab301-entrance")
            add_device(session, "LAB-301", "pi-lab301-back")  # never heard of: "never"
        device = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                              timeout=30)
        r = device.post("/api/v1/heartbeat", json={
            "v": 1, "device_id": "pi-lab301-entrance", "room_id": "RM-14",
            "software_version": "1.4.0", "sent_at": datetime.now(UTC).isoformat(),
            "uptime_s": 30.0, "outbox_depth": 12})
        assert r.status_code == 403 and r.json()["code"] == "room_mismatch"
        _login(browser, url)
        text = browser.evaluate("document.body.innerText")
        assert SAYS in text
        check_page(browser, "admin-dashboard-room-mismatch")
        browser.navigate(f"{url}/devices")
        text = browser.evaluate("document.body.innerText")
        assert "Devices refused (1)" in text and SAYS in text
        check_page(browser, "admin-devices-room-mismatch")


NAMES = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Katherine Johnson",
         "Margaret Hamilton-Featherstonehaugh"]


def test_refused_room_form_and_a_class_filled_in_by_hand(tmp_path: Path) -> None:
    import numpy as np
    from sqlalchemy import update

    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    settings = aggregator_config.load(
        None, database_url=f"sqlite:///{tmp_path / 'agg.db'}", data_dir=tmp_path / "data",
        rate_limit_per_min=100000)
    monday = last_monday()
    day = monday.date().isoformat()
    with live_aggregator(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        ctx = app.state.ctx
        with ctx.sessions() as session:
            _, token = create_admin_token(session, "tests")
            accounts.add_user(session, "office", "admin", ADMIN_PW)
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        assert api.post("/api/v1/rooms", json={"id": "LAB-301", "name": "Science lab",
                                               "site": "north"}).status_code == 201
        assert api.post("/api/v1/courses", json={"id": "CS101", "name": "Introduction to "
                                                 "computer science"}).status_code == 201
        assert api.post("/api/v1/schedules", json={
            "course_id": "CS101", "room_id": "LAB-301", "weekday": 0, "start_time": "09:00",
            "end_time": "10:30"}).status_code == 201
        rng = np.random.default_rng(5)
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
            for i in range(1, len(NAMES) + 1):
                session.add(FaceEmbedding(
                    student_id=f"S{i:03d}", embedder="sface/x", source="test", quality=0.9,
                    vector=rng.normal(size=128).astype("<f4").tobytes(),
                    created_at=monday - timedelta(days=14)))
            session.execute(update(Enrollment).values(created_at=monday - timedelta(days=14)))
            session.execute(update(Student).values(consent_at=monday - timedelta(days=14)))
            session.commit()
        _login(browser, url)

        # item 5: the room form refused, as typed
        browser.navigate(f"{url}/timetable")
        submit(browser, "#add-room", {"room_id": "RM-12", "name": "Room twelve",
                                      "timezone": "Europe/Lodnon"})
        assert browser.evaluate("document.querySelector('#add-room [name=name]').value") == (
            "Room twelve")
        assert "Europe/Lodnon" in browser.evaluate(
            "document.querySelector('#err-room-timezone').textContent")
        browser.evaluate("document.querySelector('#add-room').scrollIntoView(), true")
        check_page(browser, "admin-timetable-room-refused")

        # no device online for last Monday's class: the office fills it in on a phone
        browser.emulate(390, 844, mobile=True)
        browser.navigate(f"{url}/courses/CS101?date={day}")
        text = browser.evaluate("document.body.innerText")
        assert "5 no data" in text and "Mark the 5 without data absent" in text
        check_page(browser, "admin-class-no-data")
        browser.emulate(390, 844, mobile=True)
        browser.evaluate("document.querySelector('[data-student=S001] form.mark-present "
                         "button').click(), true")
        browser.wait_for("document.body.dataset.inplaceDone === '1'")
        browser.evaluate("document.querySelector('[data-student=S002] form.mark-absent "
                         "button').click(), true")
        browser.wait_for("document.body.dataset.inplaceDone === '2'")
        assert "Grace Hopper marked absent" in browser.evaluate(
            "document.querySelector('#inplace-notice').textContent")
        assert browser.evaluate(
            "document.querySelector('[data-student=S002]').dataset.status") == "absent"
        assert "Mark the 3 without data absent" in browser.evaluate("document.body.innerText")
        browser.screenshot(OUT / "admin-class-by-hand-one-absent-390.png", full_page=False)
        check_page(browser, "admin-class-by-hand-one-absent")
        browser.emulate(390, 844, mobile=True)
        browser.evaluate("window.confirm = () => true; document.querySelector("
                         "'form.mark-rest-absent button').click(), true")
        browser.wait_for("document.body.dataset.inplaceDone === '3'")
        statuses = browser.evaluate("[...document.querySelectorAll('tr[data-student]')]"
                                    ".map(r => r.dataset.status)")
        assert statuses == ["present", "absent", "absent", "absent", "absent"], statuses
        assert browser.evaluate("document.querySelector('form.mark-rest-absent')") is None
        check_page(browser, "admin-class-filled-by-hand")
