"""The recordings pages in Debian's headless Chromium against a real aggregator (uvicorn, SQLite):
a teacher uploads a recording through the page (console.js sends it in chunks), the job runs,
and the recording's page shows the video (the browser copy plays: the element has its
duration), the job, the class's attendance, the timelines and the instructor section;
another course's teacher cannot open it. Screenshots (1280 and 390 px) go to
test-output/console/recordings/."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Enrollment
from cloud_sync.aggregator.services import jobqueue
from cloud_sync.aggregator.services.devices import create_admin_token
from tests.cloud_sync.aggregator.conftest import last_monday
from tests.cloud_sync.aggregator.test_recordings import clips  # noqa: F401 (fixture)
from tests.conftest import REPO, require
from tests.support.chromium import Chromium, chromium_binary

from .console_helpers import live_aggregator, login, set_files, shoot

pytestmark = [pytest.mark.browser, pytest.mark.slow]
PW = "teacher password 1"


def test_teacher_uploads_a_recording_and_sees_its_results(
        tmp_path: Path, clips: dict[str, Path]) -> None:  # noqa: F811
    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    out = REPO / "test-output" / "console" / "recordings"
    settings = aggregator_config.load(
        None, database_url=f"sqlite:///{tmp_path / 'agg.db'}", data_dir=tmp_path / "data",
        rate_limit_per_min=100000, recording_chunk_max_bytes=128 * 1024,
        recordings_enabled=True)
    monday = last_monday()
    with live_aggregator(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        ctx = app.state.ctx
        with ctx.sessions() as session:
            _, token = create_admin_token(session, "tests")
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        assert api.post("/api/v1/rooms", json={"id": "LAB-301", "site": "north"}
                        ).status_code == 201
        for course in ("CS101", "MA201"):
            assert api.post("/api/v1/courses", json={"id": course, "name": f"Course {course}"}
                            ).status_code == 201
        assert api.post("/api/v1/schedules", json={
            "course_id": "CS101", "room_id": "LAB-301", "weekday": 0, "start_time": "09:00",
            "end_time": "10:30"}).status_code == 201
        for sid, name in (("S001", "Ada Example"), ("T001", "Ms Lee")):
            assert api.post("/api/v1/students", json={"id": sid, "name": name}
                            ).status_code == 201
            assert api.post("/api/v1/enrollments", json={"student_id": sid,
                                                         "course_id": "CS101"}).status_code == 201
        with ctx.sessions() as session:  # enrolled before last Monday's class (the term's)
            session.execute(update(Enrollment).values(created_at=monday - timedelta(days=28)))
            session.commit()
            accounts.add_user(session, "ms-lee", "teacher", PW, courses=["CS101"])
            accounts.add_user(session, "mr-kim", "teacher", PW, courses=["MA201"])

        browser.navigate(f"{url}/login?next=/recordings")
        browser.evaluate(f"""(() => {{
            const f = document.querySelector("form[action='/login']");
            f.querySelector("[name=name]").value = "ms-lee";
            f.querySelector("[name=password]").value = {PW!r};
            f.requestSubmit(); return true; }})()""")
        browser.wait_for("location.pathname === '/recordings'", 30)
        shoot(browser, out, "recordings-empty")
        browser.evaluate(f"""(() => {{
            const f = document.querySelector("#recording-upload");
            f.querySelector("[name=course_id]").value = "CS101";
            f.querySelector("[name=room_id]").value = "LAB-301";
            f.querySelector("[name=date]").value = "{monday.date().isoformat()}";
            f.querySelector("[name=start]").value = "09:05:00";
            f.querySelector("[name=instructor_id]").value = "T001";
            return true; }})()""")
        set_files(browser, "#recording-upload input[type=file]", [clips["walking"]])
        browser.evaluate("document.querySelector('#recording-upload').requestSubmit()")
        browser.wait_for("/^\\/recordings\\/[0-9a-f]{32}$/.test(location.pathname)", 60)
        rec_id = browser.evaluate("location.pathname").rsplit("/", 1)[1]
        puts = browser.responses(f"/recordings/{rec_id}/content")
        size = clips["walking"].stat().st_size
        assert len(puts) == -(-size // (128 * 1024)) and set(puts) <= {200, 201}, puts
        rec = api.get(f"/api/v1/recordings/{rec_id}").json()
        assert rec["state"] == "ready" and rec["uploaded_by"] == "user:ms-lee"
        assert rec["instructor_id"] == "T001"
        assert rec["starts_at"].startswith(f"{monday.date().isoformat()}T09:05:00")
        browser.wait_for("document.querySelector('#job-box').textContent.includes('queued')")
        shoot(browser, out, "recording-queued")

        assert jobqueue.work(ctx.settings, ctx.engine, ctx.sessions, burst=True) == 1
        browser.navigate(f"{url}/recordings/{rec_id}")
        assert "completed" in browser.evaluate("document.querySelector('#job-box').textContent")
        duration = browser.wait_for(
            "(() => { const v = document.querySelector('video');"
            " return v && v.readyState >= 1 ? v.duration : null; })()", 30)
        assert abs(duration - 2.0) < 0.3  # the browser copy loads and has the clip's length
        rows = browser.evaluate("[...document.querySelectorAll('#recording-attendance tr"
                                "[data-student]')].map(r => r.dataset.student)")
        assert rows == ["S001", "T001"]  # nobody in this clip is enrolled: both missing
        assert "of the recording in view" in browser.evaluate(
            "document.querySelector('#instructor').textContent")
        shoot(browser, out, "recording-done")
        browser.navigate(f"{url}/recordings")
        assert rec_id in browser.evaluate("document.querySelector('#recording-list').innerHTML")
        shoot(browser, out, "recordings-list")

        other = httpx.Client(base_url=url, timeout=30)
        assert login(other, "mr-kim", PW).status_code == 303
        assert other.get(f"/recordings/{rec_id}").status_code == 404  # as a missing one
        assert rec_id not in other.get("/recordings").text
