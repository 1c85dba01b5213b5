"""Edge-first for real (issue 26), end to end with real processes.

The aggregator (`aggregator serve`) and the device (`python -m appliance run`: the camera a
video of a real person from the face data set, looped; its board key a file in
rpi-otp-private-key's format) with a roster of today's class and tomorrow's:

1. online: the device unlocks with the aggregator's key, caches today and the next school days
   and seals the store key with its board key on the card;
2. the aggregator stops; the device is killed (SIGKILL) and started again without it: /health
   says "unlocked OFFLINE with the board key ... days left", and the student walking past is
   recorded for today's class;
3. killed again and started "tomorrow" (libfaketime moves the wall clock of the process a day
   on; Debian's `faketime` package): still offline, it recognises the student for tomorrow's
   class from the cached roster;
4. the aggregator returns (also a day on): every record of the outbox arrives exactly once,
   with its time and class; the device confirms its key and says "unlocked online";
5. the other side: a copy of the card started without the board key, and one started past the
   window (8 days on) stay locked and read as noise (no SQLite header, no key, no student id
   or name in any file); rotating the device's key makes the running device delete its wrapped
   key at its next contact.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from appliance.store import SQLITE_HEADER, Store
from appliance.wrapped_key import WRAPPED_FILE
from tests.conftest import REPO, require
from tests.support.harness import (
    DEVICE,
    ROOM,
    ROOM_TZ,
    Aggregator,
    appliance_overrides,
    device_store_key,
    free_port,
    norm_key,
    wait_until,
    write_appliance_toml,
)

LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"),
                   Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"))
STUDENT, NAME = "S900", "Lin-Manuel Miranda"


def _faketime(days: float) -> dict[str, str]:
    """The environment that moves a process's wall clock ``days`` on (monotonic untouched)."""
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"+{days * 86400:.0f}s",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1",
            # time.sleep on libfaketime 0.9.10 without a faked monotonic clock: see there
            "PYTHONPATH": str(REPO / "tests" / "support" / "faketime")}


def _enrol_the_student(agg: Aggregator, faces_dir: Path, model_dir: Path) -> None:
    """The student, with consent and the descriptor of their photo (the device's own enrolment
    code, sface), in CS101 (now, the seed's class) and in MA201, held tomorrow at the same
    hours in the same room."""
    import numpy as np

    from appliance.vision.embedding import create_embedder
    from appliance.vision.enroll import embed_photo, enrollment_detector, load_image
    from cloud_sync.aggregator.db.models import (
        Course,
        Enrollment,
        FaceEmbedding,
        Schedule,
        Student,
    )
    from cloud_sync.aggregator.db.session import make_engine, make_session_factory
    from cloud_sync.protocol import EMBEDDER_IDS

    photo = faces_dir / "face_recognition" / "examples" / "lin-manuel-miranda.png"
    result = embed_photo(load_image(photo), enrollment_detector(model_dir),
                         create_embedder("sface", model_dir))
    assert result.embedding is not None, result.reason
    now = datetime.now(UTC)
    local = now.astimezone(ZoneInfo(ROOM_TZ))
    tomorrow = (local + timedelta(days=1)).weekday()
    engine = make_engine(agg.db_url)
    try:
        with make_session_factory(engine)() as session:
            session.add(Student(id=STUDENT, name=NAME, created_at=now, consent="granted",
                                consent_at=now, consent_by="tests"))
            session.add(Course(id="MA201", name="Algebra", created_at=now))
            session.flush()
            session.add(FaceEmbedding(
                student_id=STUDENT, vector=np.asarray(result.embedding, "<f4").tobytes(),
                embedder=EMBEDDER_IDS["sface"], source="test", quality=0.9, created_at=now))
            for course in ("CS101", "MA201"):
                session.add(Enrollment(student_id=STUDENT, course_id=course, created_at=now))
            session.add(Schedule(
                course_id="MA201", room_id=ROOM, weekday=tomorrow,
                start_time=(local - timedelta(hours=1)).time().replace(microsecond=0),
                end_time=(local + timedelta(hours=1)).time().replace(microsecond=0)))
            session.commit()
    finally:
        engine.dispose()


class Device:
    """`python -m appliance run` on one data directory; its output in a log file."""

    def __init__(self, config: Path, log: Path, port: int) -> None:
        self.config, self.log, self.port = config, log, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env_extra: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(PYTHONUNBUFFERED="1", **(env_extra or {}))
        with self.log.open("ab") as out:
            out.write(f"\n=== start {env_extra or ''} ===\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """kill -9: no clean stop, no final save."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def health(self) -> dict[str, Any] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the device exited: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None

    def database(self) -> dict[str, Any]:
        health = self.health() or {}
        return health.get("components", {}).get("database", {})

    def unlock(self) -> dict[str, Any]:
        return self.database().get("unlock") or {}

    def output(self) -> str:
        """What the device printed since its last start."""
        return self.log.read_text(errors="replace").rsplit("\n=== start ", 1)[-1]


def _card_noise(card: Path, key: bytes) -> None:
    for path in card.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not data.startswith(SQLITE_HEADER), path
            for needle in (key, key.hex().encode(), STUDENT.encode(), NAME.encode()):
                assert needle not in data, (path.name, needle[:12])


@pytest.mark.slow(seconds=150)
def test_a_device_restarted_without_its_aggregator_keeps_taking_attendance(
        aggregator: tuple[Aggregator, dict[str, str]], faces_dir: Path, model_dir: Path,
        tmp_path: Path) -> None:
    require(LIBFAKETIME.is_file(), f"{LIBFAKETIME} missing: apt-get install faketime")
    agg, keys = aggregator
    _enrol_the_student(agg, faces_dir, model_dir)
    clip = faces_dir / "face_recognition" / "examples" / "short_hamilton_clip.mp4"
    board = tmp_path / "otp.key"
    board.write_text(secrets.token_hex(32) + "\n")  # as `rpi-otp-private-key` prints it
    data = tmp_path / "card" / "data"

    def config(path: Path, data_dir: Path, board_key: Path | None, port: int) -> Path:
        overrides = appliance_overrides(data_dir, aggregator_url=agg.base_url,
                                        api_key=keys[DEVICE], heartbeat_s=5,
                                        roster_refresh_s=30)
        overrides["paths"]["model_dir"] = str(model_dir)
        overrides["camera"] = {"source": str(clip), "loop_file": True}
        overrides["web"] = {"enabled": True, "port": port}
        # no key file: the firmware mailbox, which this machine (not a Pi) does not have
        overrides["store"] = {"board_key": "otp",
                              "board_key_file": str(board_key) if board_key else None}
        write_appliance_toml(path, overrides)
        return path

    port = free_port()
    device = Device(config(tmp_path / "appliance.toml", data, board, port),
                    tmp_path / "device.log", port)
    try:
        # 1. online
        agg.start()
        store_key = device_store_key(agg, keys[DEVICE])  # the test reads the outbox with it
        device.start()
        wait_until(lambda: device.unlock().get("mode") == "online"
                   and (data / WRAPPED_FILE).exists(), 90, "the online unlock")
        wait_until(lambda: "schedule of" in device.output(), 30, "the rosters cached")
        sealed = json.loads((data / WRAPPED_FILE).read_text())
        assert sealed["kind"] == "board-key"
        agg.stop()

        # 2. killed, restarted without the aggregator: unlocked offline, records today's class
        device.kill()
        restarted = datetime.now(UTC)
        device.start()
        wait_until(lambda: device.unlock().get("mode") == "offline", 90,
                   "the offline unlock")
        unlock = device.unlock()
        assert unlock["unlocked_by"] == "board-key" and 6.9 < unlock["days_left"] <= 7, unlock
        assert "unlocked OFFLINE with the board key" in device.database()["message"]
        wait_until(lambda: f"present: {STUDENT}" in device.output(), 90,
                   "the student recorded offline")
        device.kill()
        killed = datetime.now(UTC)

        # 3. the next day, still offline: tomorrow's class from the cached roster
        tomorrow_env = _faketime(1)
        device.start(tomorrow_env)
        wait_until(lambda: device.unlock().get("mode") == "offline", 90,
                   "tomorrow's offline unlock")
        assert 5.9 < device.unlock()["days_left"] < 6.1, device.unlock()
        wait_until(lambda: f"present: {STUDENT}" in device.output(), 90,
                   "the student recorded tomorrow")
        database = device.database()  # degraded: today's records wait for a day now
        assert "unlocked OFFLINE with the board key" in database["message"], database
        assert "roster switched to MA201" in device.output()

        # 4. the aggregator returns (a day on, as the device): everything arrives once
        agg.start(extra_env=tomorrow_env)
        wait_until(lambda: device.unlock().get("mode") == "online", 60,
                   "the key confirmed by the aggregator")
        assert "restarted offline: unlocked with the board key" in \
            device.unlock()["message"]

        def drained() -> bool:
            depth = device.database().get("outbox_depth")
            return depth == 0 and len(agg.attendance_keys()) >= 3
        wait_until(drained, 60, "the outbox drained")
        # 5b. the device's key rotated (a theft): the next contact deletes the wrapped key
        card_copy = tmp_path / "copy" / "data"
        shutil.copytree(data, card_copy)
        with httpx.Client(base_url=agg.base_url, timeout=10,
                          headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
            assert admin.post(f"/api/v1/devices/{DEVICE}/rotate-key").status_code == 200
        wait_until(lambda: not (data / WRAPPED_FILE).exists(), 60,
                   "the wrapped key deleted at the first refused contact")
        assert "the aggregator refuses this device" in device.unlock()["message"]
        device.stop()
        agg.stop()
    finally:
        device.stop()

    # every record of the outbox arrived once, at the time it was made, for its class
    outbox = Store(data / "appliance.db", store_key)
    try:
        records = outbox.records_since(datetime.now(UTC) - timedelta(days=1))
    finally:
        outbox.close()
    keys_sent = sorted(norm_key(str(r.key)) for r in records)
    assert keys_sent == sorted(agg.attendance_keys()), "not every record arrived exactly once"
    rows = {norm_key(str(r[0])): r[1:] for r in _attendance(agg)}
    offline_today = [r for r in records if restarted <= r.seen_at <= killed]
    tomorrow = [r for r in records if r.seen_at > killed + timedelta(hours=12)]
    assert offline_today and tomorrow, [(r.seen_at, r.course_id) for r in records]
    for record in records:
        at, _course, uncertain = rows[norm_key(str(record.key))]
        assert abs((_utc(at) - record.seen_at).total_seconds()) < 0.01, record
        assert not uncertain and record.clock_synced
        assert record.student_id == STUDENT
    assert {r.course_id for r in offline_today} == {"CS101"}
    assert {r.course_id for r in tomorrow} == {"MA201"}
    assert {rows[norm_key(str(r.key))][1] for r in tomorrow} == {"MA201"}
    # (tomorrow's records were made by a clock a day on: within the run, a day later)
    for r in tomorrow:
        assert timedelta(hours=23) < r.seen_at - restarted < timedelta(days=1, hours=1)

    # 5a. copies of the card: without the board key, and past the window, locked and noise
    _card_noise(card_copy, store_key)
    for name, board_key, env in (("no board key", None, None),
                                 ("past the window", board, _faketime(8))):
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(card_copy, copy / "data")
        port = free_port()
        other = Device(config(copy / "appliance.toml", copy / "data", board_key, port),
                       copy / "device.log", port)
        other.start(env)
        try:
            wait_until(lambda d=other: "offline unlock:" in d.database().get("message", ""),
                       90, f"the copy's first key request ({name})")
            database = other.database()
            assert database["locked"] is True and database["unlock"]["mode"] == "locked"
            reason = database["message"]
            assert ("no offline unlock (no board key" in reason if board_key is None
                    else "window ended" in reason), reason
        finally:
            other.stop()
        # past the window the device deleted it; without the board key it is only noise
        assert (copy / "data" / WRAPPED_FILE).exists() == (board_key is None)
        _card_noise(copy / "data", store_key)


def _attendance(agg: Aggregator) -> list[tuple[Any, ...]]:
    import sqlite3

    conn = sqlite3.connect(str(agg.db_path), timeout=30)
    try:
        return conn.execute("SELECT key, at, course_id, time_uncertain FROM attendance"
                            ).fetchall()
    finally:
        conn.close()


def _utc(value: Any) -> datetime:
    at = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)

