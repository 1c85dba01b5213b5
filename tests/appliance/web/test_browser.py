"""End to end in a real headless Chromium: the REAL Pipeline replays a real video, the status
page (behind its login) shows the recognised student live; screenshots go to test-output/web/.

Roster: lin-manuel-miranda.png and alex-lacamoire.png from the face_recognition examples,
embedded with A1's enrolment helper; video: short_hamilton_clip.mp4 (the same data set).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.config import load
from appliance.store import Store
from appliance.web.auth import hash_password, store_password_hash
from appliance.web.server import WebServer
from cloud_sync.protocol import RosterEntry
from tests.appliance.conftest import free_port
from tests.conftest import REPO, require
from tests.support.chromium import CdpError, Chromium, chromium_binary

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PASSWORD = "teacher's long password"
STUDENTS = {"lin-manuel-miranda": "Lin-Manuel Miranda", "alex-lacamoire": "Alex Lacamoire"}
OUT = REPO / "test-output" / "web"
RECOGNISE_TIMEOUT_S = 150


def build_roster(examples: Path, model_dir: Path, path: Path) -> None:
    from appliance.recognition import Roster
    from appliance.vision.embedding import create_embedder, embedder_id
    from appliance.vision.enroll import embed_photo, enrollment_detector, load_image

    detector = enrollment_detector(model_dir)
    embedder = create_embedder("sface", model_dir)  # the devices' default embedder
    entries = []
    for student_id, name in STUDENTS.items():
        result = embed_photo(load_image(examples / f"{student_id}.png"), detector, embedder)
        assert result.ok, f"{student_id}: {result.reason}"
        entries.append(RosterEntry(student_id=student_id, name=name,
                                   embeddings=[result.embedding.tolist()]))
    Roster.from_entries(entries, embedder_id("sface")).save(path)


def test_status_page_in_chromium(tmp_path: Path, faces_dir: Path, model_dir: Path) -> None:
    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    examples = faces_dir / "face_recognition" / "examples"
    clip = examples / "short_hamilton_clip.mp4"
    require(clip.is_file(), f"{clip} missing")
    from appliance.capture.opencv import VideoFileSource
    from appliance.pipeline import Pipeline
    from appliance.recognition import FileRosterProvider

    data_dir = tmp_path / "data"
    roster_file = tmp_path / "roster.json"
    build_roster(examples, model_dir, roster_file)
    settings = load(
        None,
        device={"device_id": "pi-lab-301", "room_id": "LAB-301"},
        paths={"data_dir": data_dir, "model_dir": model_dir},
        camera={"source": str(clip), "loop_file": True},
        recognition={"roster_file": roster_file},
        web={"port": free_port(), "refresh_s": 0.5},
    )
    store = Store(data_dir)
    provider = FileRosterProvider(roster_file, course_id="HAM-101",
                                  course_name="Hamilton rehearsal")
    pipeline = Pipeline(settings, store, provider, source=VideoFileSource(clip), loop=True)
    server = WebServer(settings, pipeline, store)
    pipeline.start()
    server.start()
    try:
        with Chromium(binary, 1280, 900) as browser:
            # 0. no password provisioned yet: no default one, the page says how to set one
            browser.navigate(f"{server.url}/")
            assert browser.evaluate("location.pathname") == "/login"
            text = browser.evaluate("document.body.textContent")
            assert "No password is set" in text and "appliance web set-password" in text
            assert not browser.evaluate("!!document.getElementById('password')")
            browser.screenshot(OUT / "login-no-password.png")
            store_password_hash(data_dir, hash_password(PASSWORD))  # what set-password writes

            # 1. not logged in: the page sends us to the login form
            browser.navigate(f"{server.url}/")
            assert browser.evaluate("location.pathname") == "/login"
            assert "Lin-Manuel" not in browser.evaluate("document.body.innerText")

            # 2. a wrong password is refused (HTTP 401, error shown, no session)
            browser.type_into("#password", "not the password")
            browser.press_enter()
            browser.wait_event("Page.loadEventFired")
            assert browser.evaluate("location.pathname") == "/login"
            assert "Wrong password" in browser.evaluate("document.body.innerText")
            assert 401 in browser.responses("/login")
            browser.screenshot(OUT / "login-refused.png")
            browser.navigate(f"{server.url}/")
            assert browser.evaluate("location.pathname") == "/login"

            # 3. the right password opens the page
            browser.type_into("#password", PASSWORD)
            browser.press_enter()
            browser.wait_event("Page.loadEventFired")
            assert browser.evaluate("location.pathname") == "/"
            assert "Hamilton rehearsal" in browser.evaluate("document.body.innerText")

            # 4. live data from the replayed video: the name appears without a reload
            try:
                browser.wait_for(
                    "document.getElementById('present').innerText.includes('Lin-Manuel Miranda')",
                    timeout=RECOGNISE_TIMEOUT_S)
            except CdpError as err:
                browser.screenshot(OUT / "status-failed.png")
                raise AssertionError(
                    f"{err}\npipeline: {pipeline.status()}\n"
                    f"page: {browser.evaluate('document.body.innerText')}") from err
            browser.wait_for("document.getElementById('live').dataset.v === 'ok'")
            frames = int(browser.evaluate(
                "document.querySelector('[data-k=\"camera.frames\"]').textContent"))
            browser.wait_for(
                f"parseInt(document.querySelector('[data-k=\"camera.frames\"]')"
                f".textContent) > {frames}", timeout=30)
            browser.wait_for("document.getElementById('preview').naturalWidth > 0", timeout=30)
            state = browser.evaluate(
                "document.querySelector('[data-k=\"camera.state\"]').textContent")
            assert state == "ok"
            text = browser.evaluate("document.body.innerText")
            assert "pi-lab-301" in text and "detect" in text
            assert "CAMERA PLACEMENT" in text.upper()  # the placement check's card (issue 22)
            assert browser.evaluate("document.getElementById('placement-hint').textContent")
            shot = browser.screenshot(OUT / "status-desktop.png")
            assert shot.stat().st_size > 20_000

            # 5. on a phone
            browser.emulate(390, 844, mobile=True, scale=2)
            browser.navigate(f"{server.url}/")
            browser.wait_for("document.getElementById('preview').naturalWidth > 0", timeout=30)
            width = browser.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"page overflows a phone screen: {width}px"
            browser.screenshot(OUT / "status-phone.png")

            # the API the page polls says the same
            api = json.loads(browser.evaluate(
                "fetch('/api/status').then(r => r.text())"))
            assert "lin-manuel-miranda" in [p["student_id"] for p in api["present"]]
    finally:
        server.stop()
        pipeline.stop()
        store.close()
    # and the attendance record was written to the outbox by the real pipeline
    reopened = Store(data_dir)
    try:
        assert "lin-manuel-miranda" in {r.student_id for r in reopened.unsent_records(100)}
    finally:
        reopened.close()


def test_page_without_a_camera_in_chromium(settings, pipeline, store) -> None:
    """No camera: a placeholder that says why (never a broken-image icon); the match column
    and its legend; the box legend; the set-password command not cut off at 1280 px; no
    overflow on a phone. Screenshots: test-output/web/*-no-camera-*.png."""
    from datetime import UTC, datetime

    from tests.appliance.conftest import Present

    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    now = datetime.now(UTC)
    pipeline.set(camera_source="0", camera_state="failed", frames=0, fps=0.0,
                 last_frame_at=None, stage_ms={}, camera_error="cannot open camera 0",
                 present=[Present("s-1", "Ada Lovelace", now, 0.91),
                          Present("s-2", "Alan Turing", now, 0.3)])
    pipeline.jpeg = None  # /preview.jpg answers 204
    server = WebServer(settings, pipeline, store)
    server.start()
    visible_broken = ("[...document.images].filter(i => !i.hidden && i.offsetParent !== null"
                      " && i.naturalWidth === 0).length")
    try:
        with Chromium(binary, 1280, 900) as browser:
            for width in (1280, 390):
                if width == 390:
                    browser.emulate(390, 844, mobile=True, scale=2)
                browser.navigate(f"{server.url}/login")
                fits = browser.evaluate(
                    "(() => { const p = document.querySelector('#no-password pre');"
                    " return p.scrollWidth <= p.clientWidth && p.innerText.includes("
                    "'web set-password --data-dir'); })()")
                assert fits, f"set-password command cut off at {width} px"
                browser.screenshot(OUT / f"login-no-password-{width}.png")
            browser.emulate(1280, 900, mobile=False)
            store_password_hash(settings.paths.data_dir, hash_password(PASSWORD))
            browser.navigate(f"{server.url}/login")
            browser.type_into("#password", PASSWORD)
            browser.press_enter()
            browser.wait_event("Page.loadEventFired")
            assert browser.evaluate("location.pathname") == "/"
            browser.wait_for("document.getElementById('live').dataset.v === 'ok'")
            time.sleep(1.5)  # a few preview attempts (204) have come and gone
            assert browser.evaluate("document.getElementById('preview').hidden") is True
            assert browser.evaluate(visible_broken) == 0
            why = browser.evaluate("document.getElementById('preview-empty').innerText")
            assert "No camera picture" in why and "cannot open camera 0" in why
            assert "camera.source" in why
            legend = browser.evaluate("document.getElementById('box-legend').innerText")
            assert "recognised" in legend and "being identified" in legend and "unknown" in legend
            rows = browser.evaluate(
                "[...document.querySelectorAll('#present tr')].map(r => r.innerText)")
            assert any("Ada Lovelace" in r and "clear" in r for r in rows), rows
            assert any("Alan Turing" in r and "borderline" in r for r in rows), rows
            legend = browser.evaluate("document.getElementById('match-legend').innerText")
            assert "0.5 is exactly at the recognition limit" in legend
            # SFace's bands from its calibration (cloud_sync/calibration.py), not 0.75 / 0.5
            assert "clear (confidence 0.50 or more)" in legend and "good (0.34 or more)" in legend
            assert "SFace's measured risk" in legend
            browser.screenshot(OUT / "status-no-camera-1280.png")
            browser.emulate(390, 844, mobile=True, scale=2)
            browser.navigate(f"{server.url}/")
            browser.wait_for("document.getElementById('live').dataset.v === 'ok'")
            assert browser.evaluate("document.documentElement.scrollWidth") <= 390
            assert browser.evaluate(visible_broken) == 0
            browser.screenshot(OUT / "status-no-camera-390.png")
            # the camera comes (back): the picture replaces the placeholder, live
            import cv2
            import numpy as np

            frame = np.full((360, 640, 3), 90, np.uint8)
            pipeline.jpeg = cv2.imencode(".jpg", frame)[1].tobytes()
            pipeline.set(camera_state="ok", frames=10, fps=7.0, camera_error=None)
            browser.wait_for("document.getElementById('preview').naturalWidth > 0 && "
                             "!document.getElementById('preview').hidden", timeout=20)
            assert browser.evaluate("document.getElementById('preview-empty').hidden") is True
    finally:
        server.stop()
