"""Issue 23, the second security pass, as the attacker tried it: each test does what the attack
did and fails without its fix. Most run against the real server (`aggregator serve`, one per
module, SQLite; started with unknown faces and recordings on, as attacked), the console
authorisation ones in process (TestClient, SQLite)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from sqlalchemy import select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Enrollment
from tests.support.harness import DEVICE, ROOM, Aggregator

from .conftest import World
from .console_helpers import csrf_of, login

PW = "correct horse battery"
# A 34-byte lossless WebP declaring 16383x16383 pixels: 800 MB of BGR once decoded (made with
# Pillow from an all-black image of that size; the attack's file).
BOMB = bytes.fromhex("524946461a000000574542505650384c0e0000002ffebfff0f071011fd0f4444ff03")


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # in-process tests here: SQLite (authorisation, not SQL)
    return f"sqlite:///{tmp_path / 'aggregator.db'}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Aggregator, dict]]:
    """The real server as attacked: unknown faces and recordings on, INFO logs, console users
    `office` (admin) and `lee` (teacher of CS101)."""
    from cloud_sync.aggregator.db.session import make_engine, make_session_factory

    agg = Aggregator(tmp_path_factory.mktemp("attacks"))
    keys = agg.seed()
    engine = make_engine(agg.db_url)
    with make_session_factory(engine)() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
    engine.dispose()
    agg.start(extra_env={"AGGREGATOR_UNKNOWN_FACES_ENABLED": "true",
                         "AGGREGATOR_RECORDINGS_ENABLED": "true",
                         "AGGREGATOR_LOG_LEVEL": "INFO"})
    yield agg, keys
    agg.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def unknown_face(crop: bytes) -> dict[str, Any]:
    return {"key": str(uuid.uuid4()), "device_id": DEVICE, "room_id": ROOM,
            "at": datetime.now(UTC).isoformat(), "descriptor": [0.05] * 128,
            "embedder": "sface/sface-2021dec-int8bq",
            "crop_jpeg": base64.b64encode(crop).decode()}


# --- 1. a teacher enrolling a student they cannot see -------------------------------------------

def test_teacher_cannot_enrol_nor_tell_which_student_ids_exist(world: World,
                                                               sessions: Any) -> None:
    """The attack: lee (CS101) posted /students/S005/enrol with course_id=CS101 and got 303;
    S005's descriptors then went to the CS101 room's device. The office enrols (PRIVACY.md)."""
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
    c = world.client
    assert login(c, "lee", PW).status_code == 200
    token = csrf_of(c.get("/courses").text)
    hidden = c.post("/students/S005/enrol", data={"csrf": token, "course_id": "CS101"},
                    follow_redirects=False)
    unknown = c.post("/students/NOSUCH/enrol", data={"csrf": token, "course_id": "CS101"},
                     follow_redirects=False)
    own = c.post("/students/S001/enrol", data={"csrf": token, "course_id": "CS101"},
                 follow_redirects=False)
    assert hidden.status_code == unknown.status_code == own.status_code == 403
    assert hidden.text == unknown.text == own.text
    with sessions() as session:
        assert session.get(Enrollment, ("S005", "CS101")) is None
        assert session.scalars(select(Enrollment.course_id).where(
            Enrollment.student_id == "S005")).all() == ["PH1"]
    # reading: a student in none of lee's courses and an id that does not exist look the same
    for path in ("/students/{}", "/students/{}/attendance.csv"):
        seen = c.get(path.format("S005"))
        missing = c.get(path.format("NOSUCH"))
        assert seen.status_code == missing.status_code == 404
        assert seen.text.replace("S005", "X") == missing.text.replace("NOSUCH", "X")
    assert c.get("/students/S001").status_code == 200
    assert 'action="/students/S001/enrol"' not in c.get("/students/S001").text
    # the office still enrols
    c.post("/logout", data={"csrf": token})
    assert login(c, "office", PW).status_code == 200
    token = csrf_of(c.get("/courses").text)
    r = c.post("/students/S005/enrol", data={"csrf": token, "course_id": "CS101"},
               follow_redirects=False)
    assert r.status_code == 303
    with sessions() as session:
        assert session.get(Enrollment, ("S005", "CS101")) is not None


# --- 2. image bombs -------------------------------------------------------------------------------

def test_image_bombs_are_refused_before_any_pixel_is_decoded(
        served: tuple[Aggregator, dict]) -> None:
    """Four 34-byte WebP bombs at once on /api/v1/unknown-faces (device key), one as an admin
    photo, one through the console's photo upload: each refused as too large, and
    the server's peak memory does not move (it reached 6 GB before)."""
    agg, keys = served
    assert agg.proc is not None
    before = peak_rss_mb(agg.proc.pid)
    with httpx.Client(base_url=agg.base_url, timeout=60) as client:
        def post_bomb(_: int) -> httpx.Response:
            return client.post("/api/v1/unknown-faces", json=unknown_face(BOMB),
                               headers=bearer(keys[DEVICE]))

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post_bomb, range(4)))
        grown = peak_rss_mb(agg.proc.pid) - before
        assert grown < 100, f"the server's peak memory grew by {grown:.0f} MiB"
        for r in answers:
            assert r.status_code == 400, r.text
            assert "larger than 40000000 pixels" in r.json()["detail"]
        r = client.post("/api/v1/students/S001/faces", headers=bearer(keys["admin"]),
                        files={"photo": ("bomb.webp", BOMB, "image/webp")})
        assert r.status_code == 400 and "larger than" in r.json()["detail"], r.text
        assert login(client, "office", PW).status_code == 303
        token = csrf_of(client.get("/students/S001").text)
        r = client.post("/students/S001/photos", headers={"Accept": "application/json",
                                                          "X-CSRF-Token": token},
                        files={"photos": ("bomb.webp", BOMB, "image/webp")})
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert not result["ok"] and "larger than" in result["reason"]
        # a format nobody uploads a face in is refused by its header too (TIFF, OpenEXR, ...)
        ok, tiff = cv2.imencode(".tiff", np.zeros((8, 8, 3), np.uint8))
        r = client.post("/api/v1/unknown-faces", json=unknown_face(tiff.tobytes()),
                        headers=bearer(keys[DEVICE]))
        assert r.status_code == 400 and "accepted format" in r.json()["detail"]
        # a real small crop still goes in
        ok, jpeg = cv2.imencode(".jpg", np.full((96, 80, 3), 128, np.uint8))
        assert ok
        r = client.post("/api/v1/unknown-faces", json=unknown_face(jpeg.tobytes()),
                        headers=bearer(keys[DEVICE]))
        assert r.status_code == 200 and r.json()["stored"], r.text
    grown = peak_rss_mb(agg.proc.pid) - before
    assert grown < 100, f"the server's peak memory grew by {grown:.0f} MiB"


def test_opencv_decoder_limit_is_set_before_cv2_loads(tmp_path: Path) -> None:
    """The fence behind the header check: in a fresh aggregator process OpenCV itself refuses
    to decode the bomb (OPENCV_IO_MAX_IMAGE_PIXELS is read once, when cv2 loads)."""
    import subprocess
    import sys

    code = ("import cloud_sync.aggregator.cli, cv2, numpy as np, resource\n"
            f"data = bytes.fromhex({BOMB.hex()!r})\n"
            "try:\n"
            "    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)\n"
            "except cv2.error:\n"
            "    out = None\n"
            "print(out is None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    refused, peak_mb = done.stdout.split()
    assert refused == "True" and int(peak_mb) < 600, done.stdout

