"""Unknown faces, end to end: the REAL pipeline replays a real clip with a roster that does not
hold the people in it, so its tracks end unknown (replayed once, module fixture); the device's
reporter sends their crops and descriptors to a live aggregator; the console groups them,
serves the crops, labels the largest group as a student (enrolling its descriptors) and
dismisses the rest. Off by default on both sides: an aggregator that does not accept them
stops the reporter."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from appliance.config import load as load_appliance
from appliance.recognition import Roster
from appliance.store import Store
from appliance.unknown_faces import UnknownFaceReporter
from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import FaceEmbedding, Room, Student, UnknownFace
from cloud_sync.aggregator.services import privacy
from cloud_sync.aggregator.services.devices import add_device
from cloud_sync.protocol import RosterEntry
from tests.conftest import REPO, require
from tests.support.chromium import Chromium, chromium_binary

from .console_helpers import csrf_of, live_aggregator, login, shoot, submit

PW = "correct horse battery"


def _setup(sessions: object) -> str:
    with sessions() as session:  # type: ignore[operator]
        session.add(Room(id="LAB-1", name="Lab", site="main", timezone="UTC",
                         created_at=datetime.now(UTC)))
        session.add(Student(id="S009", name="Walk-in", created_at=datetime.now(UTC)))
        session.commit()
        _, key = add_device(session, "LAB-1", "pi-1")
        privacy.set_consent(session, "S009", "granted", "test")
        accounts.add_user(session, "office", "admin", PW)
    return key


def _device_settings(tmp_path: Path, model_dir: Path, url: str, key: str) -> object:
    return load_appliance(None, paths={"data_dir": tmp_path / "dev", "model_dir": model_dir},
                          device={"device_id": "pi-1", "room_id": "LAB-1"},
                          sync={"aggregator_url": url, "api_key": key},
                          unknown_faces={"enabled": True, "queue_size": 1000},
                          # a short clip: decide "unknown" after 2 samples, not 6
                          decision={"max_samples": 2})


Unknown = tuple[np.ndarray, np.ndarray, datetime]


@pytest.fixture(scope="module")
def replayed_unknowns(faces_dir: Path, model_dir: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> list[Unknown]:
    """What the REAL pipeline hands its unknown sink when it replays the Hamilton clip with a
    roster of someone who is not in it (every track there ends "unknown"); replayed once for
    both database backends."""
    from appliance.capture.opencv import VideoFileSource
    from appliance.pipeline import Pipeline
    from appliance.recognition import FileRosterProvider
    from appliance.vision.embedding import create_embedder, embedder_id
    from appliance.vision.enroll import embed_photo, enrollment_detector, load_image

    examples = faces_dir / "face_recognition" / "examples"
    tmp = tmp_path_factory.mktemp("replay")
    device = _device_settings(tmp, model_dir, "http://unused", "dk_unused")
    name = device.recognition.embedder  # type: ignore[attr-defined]
    result = embed_photo(load_image(examples / "obama.jpg"), enrollment_detector(model_dir),
                         create_embedder(name, model_dir))
    assert result.embedding is not None
    roster_path = tmp / "roster.json"
    Roster.from_entries([RosterEntry(student_id="S001", name="Obama",
                                     embeddings=[result.embedding.tolist()])],
                        embedder_id(name)).save(roster_path)
    seen: list[Unknown] = []
    pipeline = Pipeline(device, Store(tmp / "dev"),  # type: ignore[arg-type]
                        FileRosterProvider(roster_path),
                        source=VideoFileSource(examples / "short_hamilton_clip.mp4"),
                        every_frame=True, paced=False,
                        unknown_sink=lambda *item: seen.append(item))  # type: ignore[arg-type]
    pipeline.start()
    try:
        assert pipeline.wait_finished(180)
    finally:
        pipeline.stop()
    assert pipeline.status().unknown_count == len(seen) >= 1
    return seen


def test_unknown_faces_from_a_real_replay(db_url: str, tmp_path: Path, model_dir: Path,
                                          replayed_unknowns: list[Unknown]) -> None:
    settings = aggregator_config.load(None, database_url=db_url, data_dir=tmp_path / "agg",
                                      unknown_faces_enabled=True, rate_limit_per_min=100000,
                                      unknown_group_distance=0.5)
    with live_aggregator(settings) as (url, app):
        key = _setup(app.state.ctx.sessions)
        device = _device_settings(tmp_path, model_dir, url, key)
        reporter = UnknownFaceReporter(device)  # type: ignore[arg-type]
        reporter.start()
        for crop, descriptor, at in replayed_unknowns:
            assert crop.ndim == 3 and descriptor.shape == (128,)
            reporter.offer(crop, descriptor, at)
        deadline = time.monotonic() + 60
        while reporter._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.1)
        reporter.stop()
        assert reporter.sent == len(replayed_unknowns) and reporter.dropped == 0
        assert not reporter.refused
        sessions = app.state.ctx.sessions
        with sessions() as session:
            stored = session.scalar(select(func.count()).select_from(UnknownFace))
        assert stored == reporter.sent

        with httpx.Client(base_url=url, timeout=30, follow_redirects=True) as c:
            assert login(c, "office", PW).status_code == 200
            page = c.get("/unknown")
            assert page.status_code == 200
            ids = [int(x) for x in __import__("re").findall(r'/unknown/(\d+)\.jpg', page.text)]
            assert ids
            crop = c.get(f"/unknown/{ids[0]}.jpg")
            assert crop.headers["content-type"] == "image/jpeg" and crop.content[:2] == b"\xff\xd8"
            binary = chromium_binary()
            require(binary is not None, "chromium not installed")
            with Chromium(binary or "", 1280, 900) as browser:
                browser.navigate(f"{url}/unknown")
                submit(browser, "form[action='/login']", {"name": "office", "password": PW})
                browser.wait_for("document.querySelectorAll('.crops img').length > 0")
                assert browser.evaluate(
                    "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
                shoot(browser, REPO / "test-output" / "console" / "unknown", "unknown")
            # the page's first group (largest): label it as S009
            first = page.text.split('class="card unknown-group"')[1]
            group = [int(x) for x in __import__("re").findall(
                r'name="face_ids" value="(\d+)"', first.split("/unknown/dismiss")[0])]
            token = csrf_of(page.text)
            r = c.post("/unknown/label", data={"csrf": token, "student": "",
                                               "face_ids": group})
            assert r.status_code == 400  # no default student: nothing picked, nothing done
            r = c.post("/unknown/label", data={"csrf": token, "student": "S009 · Walk-in",
                                               "face_ids": group})
            assert r.status_code == 200 and "Yes, enrol as" in r.text  # a confirmation
            with sessions() as session:
                assert session.scalar(select(func.count()).where(
                    FaceEmbedding.student_id == "S009")) == 0
            r = c.post("/unknown/label", data={"csrf": token, "student_id": "S009",
                                               "confirm": "yes", "face_ids": group})
            assert r.status_code == 200 and f"{len(group)} faces enrolled as" in r.text
            with sessions() as session:
                vectors = session.scalars(select(FaceEmbedding.vector).where(
                    FaceEmbedding.student_id == "S009")).all()
                left = session.scalars(select(UnknownFace.id)).all()
            assert len(vectors) == len(group)
            assert all(np.frombuffer(v, "<f4").shape == (128,) for v in vectors)
            if left:
                r = c.post("/unknown/dismiss", data={"csrf": token, "face_ids": left})
                assert r.status_code == 200
            with sessions() as session:
                assert session.scalar(select(func.count()).select_from(UnknownFace)) == 0


def test_reporter_stops_when_the_aggregator_refuses(settings: AggregatorSettings,
                                                    tmp_path: Path, model_dir: Path) -> None:
    assert settings.unknown_faces_enabled is False  # the default
    with TestClient(create_app(settings)) as client:
        key = _setup(client.app.state.ctx.sessions)  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {key}"
        device = _device_settings(tmp_path, model_dir, "http://testserver", key)
        reporter = UnknownFaceReporter(device, client=client)  # type: ignore[arg-type]
        crop = np.full((80, 80, 3), 128, np.uint8)
        reporter.start()
        reporter.offer(crop, np.zeros(128), datetime.now(UTC))
        deadline = time.monotonic() + 30
        while not reporter.refused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reporter.refused and reporter.sent == 0
        reporter.offer(crop, np.zeros(128), datetime.now(UTC))  # ignored from now on
        assert reporter._queue.qsize() == 0
        reporter.stop()
