"""Issue 25 item 3 in Debian's headless Chromium, on SQLite and PostgreSQL: a teacher on a
phone (390 px) marks a recognition "not this student": the student's row no longer says present
for the whole class; the face waits on the correction's page (which says what it would turn
away) and reaches the device's roster only once confirmed; Undo on the class page restores the
attendance and the roster (its ETag back to what it was). Every page at 1280 and 390 px without
horizontal scroll; screenshots in test-output/console/corrections/<backend>/."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import update

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Enrollment, FaceEmbedding, Student
from cloud_sync.aggregator.services.devices import add_device, create_admin_token
from cloud_sync.protocol import EMBEDDER_IDS
from tests.cloud_sync.aggregator.conftest import last_monday
from tests.conftest import REPO, require
from tests.support.chromium import Chromium, chromium_binary

from . import console_helpers as helpers
from .console_helpers import live_aggregator, submit

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TEACHER_PW = "teacher password 1"
SFACE = EMBEDDER_IDS["sface"]


def check_page(browser: Chromium, out: Path, name: str) -> None:
    """Both widths checked (console_helpers.check_page); the teacher stays on a phone."""
    helpers.check_page(browser, out, name, then=helpers.PHONE)


def _unit(v: np.ndarray) -> list[float]:
    return [float(x) for x in v / np.linalg.norm(v)]


def _click(browser: Chromium, selector: str) -> None:
    """A real click on a button on screen (confirm dialogs answered yes); waits for the page."""
    browser.events.clear()
    browser.evaluate(f"window.confirm = () => true; document.querySelector({selector!r})"
                     ".click(), true")
    browser.wait_event("Page.loadEventFired", 60)


def _on_screen(browser: Chromium, selector: str) -> None:
    box = browser.evaluate(f"(() => {{ const b = document.querySelector({selector!r})"
                           ".getBoundingClientRect(); return [b.left, b.right, b.width]; })()")
    assert box[2] > 0 and box[0] >= 0 and box[1] <= 390, (selector, box)


def test_teacher_strikes_confirms_and_undoes_on_a_phone(db_url: str, tmp_path: Path) -> None:
    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    backend = "postgres" if db_url.startswith("postgresql") else "sqlite"
    out = REPO / "test-output" / "console" / "corrections" / backend
    settings = aggregator_config.load(None, database_url=db_url, data_dir=tmp_path / "data",
                                      rate_limit_per_min=100000)
    monday = last_monday()
    day = monday.date().isoformat()
    rng = np.random.default_rng(5)
    own = {sid: rng.normal(size=128) for sid in ("S001", "S002", "S003")}
    lookalike = rng.normal(size=128)
    with live_aggregator(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        ctx = app.state.ctx
        with ctx.sessions() as session:
            _, token = create_admin_token(session, "tests")
            accounts.add_user(session, "ms-lee", "teacher", TEACHER_PW)
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        assert api.post("/api/v1/rooms", json={"id": "LAB-301", "name": "Science lab",
                                               "site": "north"}).status_code == 201
        assert api.post("/api/v1/courses", json={"id": "CS101", "name": "Intro CS"}
                        ).status_code == 201
        assert api.post("/api/v1/schedules", json={
            "course_id": "CS101", "room_id": "LAB-301", "weekday": 0, "start_time": "09:00",
            "end_time": "10:30"}).status_code == 201
        for sid, name in (("S001", "Ada Lovelace"), ("S002", "Grace Hopper"),
                          ("S003", "Margaret Hamilton-Featherstonehaugh")):
            assert api.post("/api/v1/students", json={"id": sid, "name": name}
                            ).status_code == 201
            assert api.post(f"/api/v1/students/{sid}/consent", json={"state": "granted"}
                            ).status_code == 200
            assert api.post("/api/v1/enrollments", json={"student_id": sid,
                                                         "course_id": "CS101"}
                            ).status_code == 201
        term = monday - timedelta(days=28)
        with ctx.sessions() as session:
            accounts.assign_courses(session, "ms-lee", ["CS101"])
            _, key = add_device(session, "LAB-301", "pi-301")
            session.execute(update(Enrollment).values(created_at=term))
            session.execute(update(Student).values(consent_at=term))
            session.add_all([FaceEmbedding(
                student_id=sid, vector=np.asarray(_unit(v), "<f4").tobytes(), embedder=SFACE,
                source="test", quality=0.9, created_at=term) for sid, v in own.items()])
            session.commit()
        device = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                              timeout=30)

        def send(sid: str, at: Any, vector: np.ndarray | None) -> str:
            rec: dict[str, Any] = {
                "key": str(uuid.uuid4()), "student_id": sid, "room_id": "LAB-301",
                "device_id": "pi-301", "seen_at": at.isoformat(), "confidence": 0.74,
                "course_id": "CS101"}
            if vector is not None:
                rec.update(descriptor=_unit(vector), descriptor_embedder=SFACE)
            r = device.post("/api/v1/attendance",
                            json={"v": 1, "device_id": "pi-301", "records": [rec]})
            assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
            return str(rec["key"])

        send("S001", monday + timedelta(hours=9, minutes=3), lookalike)
        send("S001", monday + timedelta(hours=9, minutes=31), lookalike)
        send("S002", monday + timedelta(hours=9, minutes=4), own["S002"])
        # a week before, S001 was seen as someone like the look-alike: the page warns
        send("S001", monday - timedelta(days=7) + timedelta(hours=9, minutes=5),
             lookalike + rng.normal(scale=0.05, size=128))

        def roster() -> tuple[list[Any], str]:
            r = device.get("/api/v1/schedule", params={
                "room_id": "LAB-301", "at": (monday + timedelta(hours=9, minutes=30)).isoformat(),
                "embedder": "sface"})
            assert r.status_code == 200, r.text
            entry = next(e for e in r.json()["rosters"]["CS101"] if e["student_id"] == "S001")
            return entry["negatives"], r.headers["etag"]

        negatives, etag_before = roster()
        assert negatives == []

        # the teacher, on a phone: the row says present; "not this student" with a reason
        browser.navigate(f"{url}/login")
        submit(browser, "form[action='/login']", {"name": "ms-lee", "password": TEACHER_PW})
        browser.emulate(390, 844, mobile=True)
        browser.navigate(f"{url}/courses/CS101?date={day}")
        browser.wait_for("document.documentElement.clientWidth === 390")
        row = "tr[data-student='S001']"
        assert browser.evaluate(f"document.querySelector(\"{row}\").dataset.status") == "present"
        browser.evaluate(f"document.querySelector(\"{row} details\").open = true")
        _on_screen(browser, f"{row} form.mark-wrong button")
        browser.evaluate(f"document.querySelector(\"{row} form.mark-wrong [name=reason]\")"
                         ".value = 'her cousin, Ada was away'")
        _click(browser, f"{row} form.mark-wrong button")
        text = browser.evaluate("document.body.innerText")
        assert "Ada Lovelace struck for the whole class" in text, text
        assert browser.evaluate(f"document.querySelector(\"{row}\").dataset.status") == "absent"
        assert "confirm the face: 2 waiting" in browser.evaluate(
            f"document.querySelector(\"{row}\").innerText")
        _on_screen(browser, f"{row} form.undo button")
        # and in the course's corrections list (it scrolled sideways, Undo off to the right)
        _on_screen(browser, "table.corrections form.undo button")
        # "mark all present" is for those not seen: not for the student just struck
        assert browser.evaluate("document.querySelector('form.mark-all button').textContent"
                                ) == "Mark all 1 present"
        check_page(browser, out, "course-struck")
        assert roster() == ([], etag_before)  # nothing reaches the device yet

        # the correction's page: what it struck, what the face would turn away; confirm
        browser.events.clear()
        browser.evaluate(f"document.querySelector(\"{row} a.review\").click(), true")
        browser.wait_event("Page.loadEventFired", 60)
        page = browser.evaluate("document.querySelector('main').innerText")
        assert "2 faces waiting for your confirmation" in page, page
        assert "2 sightings no longer counted" in page, page
        assert "1 other sighting of Ada Lovelace, still counted" in page, page
        check_page(browser, out, "correction-pending")
        _on_screen(browser, "#confirm button")
        _click(browser, "#confirm button")
        assert "Confirmed by ms-lee" in browser.evaluate("document.body.innerText")
        check_page(browser, out, "correction-confirmed")
        negatives, etag_confirmed = roster()
        assert len(negatives) == 2 and etag_confirmed != etag_before

        # undo from the class page: attendance and roster as they were
        browser.navigate(f"{url}/courses/CS101?date={day}")
        browser.wait_for("document.documentElement.clientWidth === 390")
        _on_screen(browser, f"{row} form.undo button")
        _click(browser, f"{row} form.undo button")
        text = browser.evaluate("document.body.innerText")
        assert "undone: “not Ada Lovelace” in this class; attendance restored" in text, text
        assert browser.evaluate(f"document.querySelector(\"{row}\").dataset.status") == "present"
        assert browser.evaluate(f"document.querySelector(\"{row} form.undo\")") is None
        check_page(browser, out, "course-undone")
        negatives, etag_undone = roster()
        assert negatives == [] and etag_undone == etag_before != etag_confirmed
        api.close()
        device.close()
