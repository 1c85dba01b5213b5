"""Recorded sessions end to end on real clips (SQLite; the two-worker Redis test is in
test_recordings_redis.py): upload (chunked, and resumed after a dropped connection), a job
that runs the device pipeline over the Hamilton clip and writes Lin-Manuel Miranda's record
once (merged with a device's), the instructor's presence, cancel, a damaged file, a killed
worker, retention."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import Attendance, EventRow, Recording, RecordingJob
from cloud_sync.aggregator.services import jobqueue, recording_job
from cloud_sync.aggregator.services import recordings as svc
from cloud_sync.aggregator.services.common import utcnow
from cloud_sync.aggregator.services.retention import purge
from tests.cloud_sync.aggregator.conftest import World, batch, record
from tests.conftest import require

REPO = Path(__file__).resolve().parents[3]  # tests/cloud_sync/aggregator/ -> the repo
CHUNK = 256 * 1024


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # SQLite only here: the queue logic is the same SQL
    return f"sqlite:///{tmp_path / 'aggregator.db'}"


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> AggregatorSettings:
    return aggregator_config.load(
        None, database_url=db_url, data_dir=tmp_path / "data", rate_limit_per_min=100000,
        recording_transcode=False, recording_chunk_max_bytes=CHUNK,
        recordings_enabled=True)


def _ffmpeg(*args: str) -> None:
    done = subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", *args],
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()


@pytest.fixture(scope="session")
def clips(faces_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The Hamilton clip as it is; short cuts of the walking clip; a damaged file that passes
    the upload check (its first seconds decode) but breaks off later."""
    require(subprocess.run(["which", "ffmpeg"], capture_output=True).returncode == 0,
            "ffmpeg not installed (scripts/ensure-system-deps.sh test installs it)")
    out = tmp_path_factory.mktemp("clips")
    hamilton = faces_dir / "face_recognition" / "examples" / "short_hamilton_clip.mp4"
    walking = faces_dir / "walking" / "strangers_walking_1080p.mp4"
    _ffmpeg("-t", "2", "-i", str(walking), "-vf", "scale=960:-2", "-c:v", "libx264",
            "-preset", "ultrafast", "-an", str(out / "walking.mp4"))
    _ffmpeg("-t", "1.2", "-i", str(walking), "-vf", "scale=640:-2", "-c:v", "libx264",
            "-preset", "ultrafast", "-an", str(out / "walking_short.mkv"))
    _ffmpeg("-t", "4", "-i", str(hamilton), "-c:v", "libx264", "-preset", "ultrafast",
            "-g", "15", "-movflags", "+faststart", "-an", str(out / "full.mp4"))
    data = (out / "full.mp4").read_bytes()
    (out / "damaged.mp4").write_bytes(data[: int(len(data) * 0.75)])
    (out / "not_video.mp4").write_bytes(os.urandom(50_000))
    return {"hamilton": hamilton, "walking": out / "walking.mp4",
            "walking_short": out / "walking_short.mkv", "damaged": out / "damaged.mp4",
            "not_video": out / "not_video.mp4"}


@pytest.fixture
def enrolled(world: World, faces_dir: Path) -> World:
    """World's S001 is Lin-Manuel Miranda and S002 Alex Lacamoire, both in
    CS101 (Mondays 09:00-10:30, LAB-301), enrolled from their photos by the API."""
    examples = faces_dir / "face_recognition" / "examples"
    for sid, name, photo in (("S001", "Lin-Manuel Miranda", "lin-manuel-miranda.png"),
                             ("S002", "Alex Lacamoire", "alex-lacamoire.png")):
        assert world.client.patch(f"/api/v1/students/{sid}", json={"name": name},
                                  headers=world.admin).status_code == 200
        r = world.client.post(f"/api/v1/students/{sid}/faces", headers=world.admin,
                              files={"photo": (photo, (examples / photo).read_bytes(),
                                               "image/png")})
        assert r.status_code == 201, r.text
    return world


def upload(client: TestClient, admin: dict[str, str], path: Path, starts_at: Any,
           instructor: str | None = None, expect: int = 201) -> dict[str, Any]:
    data = path.read_bytes()
    r = client.post("/api/v1/recordings", headers=admin, json={
        "room_id": "LAB-301", "course_id": "CS101", "starts_at": starts_at.isoformat(),
        "filename": path.name, "size_bytes": len(data), "instructor_id": instructor})
    assert r.status_code == 201, r.text
    rec_id = r.json()["id"]
    last = None
    for offset in range(0, len(data), CHUNK):
        last = client.put(f"/api/v1/recordings/{rec_id}/content", headers={
            **admin, "Upload-Offset": str(offset)}, content=data[offset:offset + CHUNK])
        assert last.status_code in (200, 201, 422), last.text
    assert last is not None and last.status_code == expect, last.text
    return {"id": rec_id, **last.json()}


def run_worker(app_client: TestClient, settings: AggregatorSettings, **kw: Any) -> int:
    ctx = app_client.app.state.ctx  # type: ignore[attr-defined]
    return jobqueue.work(settings, ctx.engine, ctx.sessions, burst=True, **kw)


def test_hamilton_job_records_lin_once_merges_and_tracks_the_instructor(
        enrolled: World, settings: AggregatorSettings, clips: dict[str, Path],
        app_client: TestClient) -> None:
    w, c = enrolled, enrolled.client
    start = w.at(0, 9, 5)
    # Lin is also the "instructor" here: the clip's one face the pipeline recognises
    up = upload(c, w.admin, clips["hamilton"], start, instructor="S001")
    assert up["recording"]["state"] == "ready" and up["recording"]["duration_s"] > 9
    job_id = up["job"]["id"]
    assert c.get(f"/api/v1/jobs/{job_id}", headers=w.admin).json()["status"] == "queued"
    # a device in the room covered the same class and saw S003 (the job must not add to that)
    assert c.post("/api/v1/attendance", headers=w.device,
                  json=batch(w, [record(w, "S003", w.at(0, 9, 6))])).status_code == 200

    with_copy = settings.model_copy(update={"recording_transcode": True})
    assert run_worker(app_client, with_copy) == 1
    job = c.get(f"/api/v1/jobs/{job_id}", headers=w.admin).json()
    assert job["status"] == "completed", job
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["error"] is None
    rec = c.get(f"/api/v1/recordings/{up['id']}", headers=w.admin).json()
    result = rec["result"]
    # 29.97 fps analysed at a device camera's 15: every 2nd frame, 138 of the 275
    assert result["analysis"]["every_nth_frame"] == 2
    assert result["analysis"]["frames"] == 138 and result["analysis"]["embedder"] == "sface"
    attendance = result["attendance"]
    assert attendance["students"] == ["S001"] and attendance["accepted"] == 1

    sessions = app_client.app.state.ctx.sessions  # type: ignore[attr-defined]
    with sessions() as session:
        rows = session.scalars(select(Attendance).where(Attendance.student_id == "S001")).all()
        assert len(rows) == 1
        lin = rows[0]
        assert lin.device_id == "rec-LAB-301" and lin.boot_id == f"recording:{up['id']}"
        assert lin.course_id == "CS101" and lin.correction == "none"
        assert start <= lin.at <= start + timedelta(seconds=10)  # filmed time, not now
        occupancy = session.scalar(select(func.count()).select_from(EventRow).where(
            EventRow.device_id == "rec-LAB-301", EventRow.kind == "occupancy"))
        assert occupancy >= 1 and result["events"]["stored"] >= occupancy

    # the course's day report: Lin present once, with the recording as the source
    day = c.get("/api/v1/attendance/course/CS101", headers=w.admin,
                params={"date": start.date().isoformat()}).json()
    status = {s["student_id"]: s for s in day["sessions"][0]["students"]}
    assert status["S001"]["status"] == "present" and status["S003"]["status"] == "present"
    assert day["sessions"][0]["present"] + day["sessions"][0]["late"] == 2

    # the instructor's track: real detections of Lin in the clip, with the gaps between
    inst = c.get(f"/api/v1/recordings/{up['id']}/instructor", headers=w.admin).json()
    assert inst["student_id"] == "S001" and inst["frames"] == 138
    assert 0 < inst["coverage"] < 1 and inst["frames_seen"] == round(inst["coverage"] * 138)
    assert inst["visible"] and all(a <= b for a, b in inst["visible"])
    for gap in inst["gaps"]:
        assert gap["seconds"] >= settings.instructor_gap_s
    per_session = c.get(f"/api/v1/sessions/CS101@{start.date().isoformat()}/instructor",
                        headers=w.admin).json()
    assert [p["recording_id"] for p in per_session] == [up["id"]]

    # the browser copy: H.264 MP4 + poster, served with Range requests
    assert rec["playback"] == "ready"
    video = c.get(f"/api/v1/recordings/{up['id']}/playback.mp4",
                  headers={**w.admin, "Range": "bytes=0-99"})
    assert video.status_code == 206 and len(video.content) == 100
    assert video.content[4:8] == b"ftyp"
    poster = c.get(f"/api/v1/recordings/{up['id']}/poster.jpg", headers=w.admin)
    assert poster.status_code == 200 and poster.content[:2] == b"\xff\xd8"

    # the same records again (a retried job, a second recording of the class): nothing new;
    # and a device record of Lin that arrives later does not make him count twice
    with sessions() as session:
        again = recording_job.write_records(
            session, session.get(Recording, up["id"]),
            [_as_record(lin, "rec-LAB-301")], settings.early_arrival_min)
    assert again["accepted"] == 0 and again["duplicate"] == 1
    assert c.post("/api/v1/attendance", headers=w.device,
                  json=batch(w, [record(w, "S001", w.at(0, 9, 7))])).status_code == 200
    day = c.get("/api/v1/attendance/course/CS101", headers=w.admin,
                params={"date": start.date().isoformat()}).json()
    assert day["sessions"][0]["present"] + day["sessions"][0]["late"] == 2


def _as_record(row: Attendance, device_id: str) -> Any:
    from cloud_sync.protocol import AttendanceRecord

    return AttendanceRecord(key=row.key, student_id=row.student_id, course_id="CS101",
                            room_id=row.room_id, device_id=device_id, seen_at=row.seen_at,
                            confidence=row.confidence, clock_synced=True)


def test_job_merges_with_a_device_that_saw_the_student_first(
        world: World, settings: AggregatorSettings, app_client: TestClient) -> None:
    """A device recorded Lin in this class before the recording was processed: the job writes
    no second record of him and says so."""
    w, c = world, world.client
    assert c.post("/api/v1/attendance", headers=w.device,
                  json=batch(w, [record(w, "S001", w.at(0, 9, 2))])).status_code == 200
    sessions = app_client.app.state.ctx.sessions  # type: ignore[attr-defined]
    with sessions() as session:
        rec = svc.create_upload(session, settings, svc.NewRecording(
            "LAB-301", "CS101", w.at(0, 9, 5), "x.mp4", 10), "test")
        from cloud_sync.protocol import AttendanceRecord

        found = AttendanceRecord(key=uuid.uuid4(), student_id="S001", course_id="CS101",
                                 room_id="LAB-301", device_id="rec-LAB-301", seen_at=w.at(0, 9, 6),
                                 confidence=0.8, clock_synced=True)
        out = recording_job.write_records(session, rec, [found], settings.early_arrival_min)
    assert out["merged_with_device"] == ["S001"] and out["accepted"] == 0
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Attendance)) == 1


def test_upload_checks_refuse_bad_files_and_offsets(
        world: World, clips: dict[str, Path], settings: AggregatorSettings) -> None:
    w, c = world, world.client
    settings.recordings_enabled = False  # the default: no recording is taken
    off = c.post("/api/v1/recordings", headers=w.admin, json={
        "room_id": "LAB-301", "course_id": "CS101", "starts_at": w.at(0, 9).isoformat(),
        "filename": "a.mp4", "size_bytes": 100})
    assert off.status_code == 403 and "recordings_enabled" in off.json()["detail"]
    settings.recordings_enabled = True
    bad = upload(c, w.admin, clips["not_video"], w.at(0, 9), expect=422)
    assert "recording rejected: not a readable video" in bad["detail"]
    rec = c.get(f"/api/v1/recordings/{bad['id']}", headers=w.admin).json()
    assert rec["state"] == "rejected" and rec["jobs"] == [] and "readable" in rec["error"]
    assert not svc.folder(settings, bad["id"]).exists()  # nothing kept of a refused file
    # metadata and sizes are checked before a byte is sent
    base = {"room_id": "LAB-301", "course_id": "CS101", "starts_at": w.at(0, 9).isoformat(),
            "filename": "a.mp4", "size_bytes": 100}
    for change, code in (({"filename": "a.avi"}, 422), ({"room_id": "NOPE"}, 404),
                         ({"course_id": "NOPE"}, 404), ({"instructor_id": "NOPE"}, 404),
                         ({"size_bytes": settings.recording_max_bytes + 1}, 413),
                         ({"starts_at": "2026-11-16T09:30:00"}, 422)):
        r = c.post("/api/v1/recordings", headers=w.admin, json={**base, **change})
        assert r.status_code == code, (change, r.text)
    r = c.post("/api/v1/recordings", headers=w.admin, json=base)
    rid = r.json()["id"]
    wrong = c.put(f"/api/v1/recordings/{rid}/content", content=b"x" * 10,
                  headers={**w.admin, "Upload-Offset": "5"})
    assert wrong.status_code == 409 and wrong.headers["Upload-Offset"] == "0"
    assert wrong.json()["received_bytes"] == 0
    big = c.put(f"/api/v1/recordings/{rid}/content", content=b"x" * (CHUNK + 1),
                headers={**w.admin, "Upload-Offset": "0"})
    assert big.status_code == 413
    past = c.put(f"/api/v1/recordings/{rid}/content", content=b"x" * 101,
                 headers={**w.admin, "Upload-Offset": "0"})
    assert past.status_code == 413 and "announced size" in past.json()["detail"]
    anon = c.put(f"/api/v1/recordings/{rid}/content", content=b"x",
                 headers={"Upload-Offset": "0"})
    assert anon.status_code == 401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_server(settings: AggregatorSettings) -> Iterator[str]:
    """The app under uvicorn on a free port (a dropped connection needs a real socket)."""
    import uvicorn

    from cloud_sync.aggregator.app import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_upload_resumes_after_a_dropped_connection(
        world: World, clips: dict[str, Path], live_server: str,
        settings: AggregatorSettings) -> None:
    import httpx

    w = world
    data = clips["walking_short"].read_bytes()
    base = f"http://{live_server}"
    r = httpx.post(f"{base}/api/v1/recordings", headers=w.admin, json={
        "room_id": "LAB-301", "course_id": "CS101", "starts_at": w.at(0, 9).isoformat(),
        "filename": "lesson.mkv", "size_bytes": len(data)})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    # the connection drops after 100 kB of a 256 kB chunk
    host, port = live_server.split(":")
    sent = 100_000
    with socket.create_connection((host, int(port))) as sock:
        head = (f"PUT /api/v1/recordings/{rid}/content HTTP/1.1\r\nHost: {live_server}\r\n"
                f"Authorization: {w.admin['Authorization']}\r\nUpload-Offset: 0\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {CHUNK}\r\n\r\n")
        sock.sendall(head.encode() + data[:sent])
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while True:
        got = httpx.get(f"{base}/api/v1/recordings/{rid}", headers=w.admin).json()
        if got["received_bytes"] == sent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got["received_bytes"] == sent and got["state"] == "uploading"
    # resume from where the server says, in chunks
    offset = got["received_bytes"]
    while offset < len(data):
        r = httpx.put(f"{base}/api/v1/recordings/{rid}/content",
                      headers={**w.admin, "Upload-Offset": str(offset)},
                      content=data[offset:offset + CHUNK])
        assert r.status_code in (200, 201), r.text
        offset = int(r.headers["Upload-Offset"])
    assert r.status_code == 201 and r.json()["job"]["status"] == "queued"
    assert r.json()["recording"]["state"] == "ready"
    assert r.json()["recording"]["duration_s"] == pytest.approx(1.2, abs=0.1)
    path = next(svc.folder(settings, rid).glob("original.*"))
    assert path.read_bytes() == data  # byte for byte what was sent


def test_cancel_a_running_job_and_retry_it(
        world: World, settings: AggregatorSettings, clips: dict[str, Path],
        app_client: TestClient) -> None:
    w, c = world, world.client
    queued = upload(c, w.admin, clips["walking_short"], w.at(0, 9, 30))
    # the longest clip: its analysis outlasts the wait for it, even on a loaded machine
    running = upload(c, w.admin, clips["hamilton"], w.at(0, 9, 10))
    # a queued job is cancelled at once
    r = c.post(f"/api/v1/jobs/{queued['job']['id']}/cancel", headers=w.admin)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    again = c.post(f"/api/v1/jobs/{queued['job']['id']}/cancel", headers=w.admin)
    assert again.status_code == 409
    # a running job stops within seconds of the request
    job_id = running["job"]["id"]
    worker = threading.Thread(target=run_worker, args=(app_client, settings), daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = c.get(f"/api/v1/jobs/{job_id}", headers=w.admin).json()
        if job["status"] != "queued":  # running (any phase: cancel works in each), or over
            break
        time.sleep(0.1)
    assert job["status"] == "running", job
    asked = time.monotonic()
    assert c.post(f"/api/v1/jobs/{job_id}/cancel", headers=w.admin).status_code == 200
    worker.join(60)
    assert not worker.is_alive()
    assert time.monotonic() - asked < 15
    job = c.get(f"/api/v1/jobs/{job_id}", headers=w.admin).json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    assert c.get(f"/api/v1/recordings/{running['id']}", headers=w.admin).json()["result"] \
        is None
    # retry puts it back in the queue (test_killed_worker... runs a retried job to the end)
    assert c.post(f"/api/v1/jobs/{job_id}/retry", headers=w.admin).json()["status"] == "queued"
    assert c.post(f"/api/v1/jobs/{job_id}/retry", headers=w.admin).status_code == 409
    # delete: the job goes with its recording and files
    assert c.delete(f"/api/v1/jobs/{job_id}", headers=w.admin).status_code == 204
    assert c.get(f"/api/v1/recordings/{running['id']}", headers=w.admin).status_code == 404
    assert c.get(f"/api/v1/jobs/{job_id}", headers=w.admin).status_code == 404
    assert not svc.folder(settings, running["id"]).exists()


def test_damaged_recording_fails_with_a_clear_error(
        world: World, settings: AggregatorSettings, clips: dict[str, Path],
        app_client: TestClient) -> None:
    w, c = world, world.client
    up = upload(c, w.admin, clips["damaged"], w.at(0, 9, 5))  # its first seconds decode
    assert up["recording"]["state"] == "ready"
    assert run_worker(app_client, settings) == 1
    job = c.get(f"/api/v1/jobs/{up['job']['id']}", headers=w.admin).json()
    assert job["status"] == "failed"
    assert job["error"].startswith("the video cannot be processed:")
    assert "damaged or truncated" in job["error"]


def test_killed_worker_leaves_the_job_retryable(
        world: World, settings: AggregatorSettings, clips: dict[str, Path],
        app_client: TestClient, tmp_path: Path) -> None:
    """SIGKILL an `aggregator worker` in the middle of a job: the job is not left running
    forever; once its lease is over it is failed with the reason, and a retry completes it."""
    w, c = world, world.client
    up = upload(c, w.admin, clips["walking"], w.at(0, 9, 5))
    job_id = up["job"]["id"]
    env = {**os.environ, "AGGREGATOR_DATABASE_URL": settings.database_url.get_secret_value(),
           "AGGREGATOR_DATA_DIR": str(settings.data_dir),
           "AGGREGATOR_RECORDING_TRANSCODE": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "cloud_sync.aggregator.cli", "worker"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            job = c.get(f"/api/v1/jobs/{job_id}", headers=w.admin).json()
            if job["status"] == "running":
                break
            time.sleep(0.05)
        assert job["status"] == "running", job
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its descriptor child
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    sessions = app_client.app.state.ctx.sessions  # type: ignore[attr-defined]
    with sessions() as session:
        assert svc.fail_stale(session, settings.job_lease_s) == 0  # within its lease
        later = utcnow() + timedelta(seconds=settings.job_lease_s + 1)
        assert svc.fail_stale(session, settings.job_lease_s, now=later) == 1
    job = c.get(f"/api/v1/jobs/{job_id}", headers=w.admin).json()
    assert job["status"] == "failed" and "stopped reporting" in job["error"]
    assert "retry" in job["error"]
    assert c.post(f"/api/v1/jobs/{job_id}/retry", headers=w.admin).status_code == 200
    assert run_worker(app_client, settings) == 1
    job = c.get(f"/api/v1/jobs/{job_id}", headers=w.admin).json()
    assert job["status"] == "completed" and job["attempts"] == 2


def test_retention_deletes_files_and_keeps_results(
        world: World, settings: AggregatorSettings, clips: dict[str, Path],
        app_client: TestClient) -> None:
    w, c = world, world.client
    up = upload(c, w.admin, clips["walking_short"], w.at(0, 9, 5))
    # an existing recording's copy not made yet is a 409 with the reason (an unknown id: 404)
    for media in ("playback.mp4", "poster.jpg"):
        early = c.get(f"/api/v1/recordings/{up['id']}/{media}", headers=w.admin)
        assert early.status_code == 409 and "not processed yet" in early.json()["detail"]
        assert c.get(f"/api/v1/recordings/{'0' * 32}/{media}",
                     headers=w.admin).status_code == 404
    sessions = app_client.app.state.ctx.sessions  # type: ignore[attr-defined]
    with sessions() as session:
        row = session.get(Recording, up["id"])
        row.result = {"attendance": {"accepted": 3}}
        session.commit()
        assert purge(session, settings)["recording_files"] == 0  # not old yet
        later = utcnow() + timedelta(days=settings.recording_keep_days, seconds=1)
        counts = purge(session, settings, now=later)
    assert counts["recording_files"] == 1
    assert not svc.folder(settings, up["id"]).exists()
    rec = c.get(f"/api/v1/recordings/{up['id']}", headers=w.admin).json()
    assert rec["file_deleted_at"] is not None and rec["result"] == {"attendance": {"accepted": 3}}
    gone = c.get(f"/api/v1/recordings/{up['id']}/poster.jpg", headers=w.admin)
    assert gone.status_code == 410 and "retention" in gone.json()["detail"]
    job = c.get(f"/api/v1/jobs/{up['job']['id']}", headers=w.admin).json()
    assert job["status"] == "cancelled" and "retention" in job["error"]
    assert c.post(f"/api/v1/jobs/{up['job']['id']}/retry", headers=w.admin).status_code == 409
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(RecordingJob)) == 1


def test_worker_cli_refuses_a_bad_option(settings: AggregatorSettings) -> None:
    from typer.testing import CliRunner

    from cloud_sync.aggregator.cli import app as cli

    env = {"AGGREGATOR_DATABASE_URL": settings.database_url.get_secret_value(),
           "AGGREGATOR_REDIS_URL": "redis://127.0.0.1:1/0"}
    bad = CliRunner().invoke(cli, ["worker", "--bursty"], env=env)
    assert bad.exit_code == 2 and "--bursty" in bad.output
    nameless = CliRunner().invoke(cli, ["worker", "--name", " "], env=env)
    assert nameless.exit_code == 2 and "--name" in nameless.output
    down = CliRunner().invoke(cli, ["worker", "--burst"], env=env)
    assert down.exit_code == 1 and "Redis unreachable" in down.output


def test_pages_say_when_no_worker_is_alive(
        world: World, settings: AggregatorSettings, clips: dict[str, Path],
        app_client: TestClient, sessions: Any) -> None:
    """Issue 25 item 11: a queued job with no worker alive says so (it stayed "queued" with
    no hint under `make run`); a worker's row makes the notice go; an old one brings it back;
    a worker that stops removes its row."""
    from cloud_sync.aggregator.console import accounts
    from cloud_sync.aggregator.db.models import JobWorker

    from .console_helpers import login

    w, c = world, world.client
    up = upload(c, w.admin, clips["walking_short"], w.at(0, 9, 5))
    with sessions() as session:
        accounts.add_user(session, "office", "admin", "correct horse battery")
    login(c, "office", "correct horse battery")
    notice = "No recording worker is running"
    assert notice in c.get("/recordings").text
    assert notice in c.get(f"/recordings/{up['id']}/job").text
    with sessions() as session:
        jobqueue.beat(session, "w1", utcnow())
    assert notice not in c.get("/recordings").text
    assert notice not in c.get(f"/recordings/{up['id']}").text
    with sessions() as session:
        session.get(JobWorker, "w1").seen_at = utcnow() - timedelta(minutes=5)
        session.commit()
    assert notice in c.get(f"/recordings/{up['id']}/job").text
    assert run_worker(app_client, settings, name="w2") == 1
    with sessions() as session:
        assert [r.name for r in session.query(JobWorker)] == ["w1"]  # w2 removed its own
    assert notice not in c.get(f"/recordings/{up['id']}/job").text  # nothing queued now
