"""The device at rest (issue 18): the store encrypted with the aggregator's key.

- a copy of the data directory (as from an SD card pulled from a running device, and after a
  clean stop) holds no SQLite header and none of the student ids, record keys, names or
  descriptor bytes that are in it; it opens with neither no key nor another key (and with the
  right key it is complete: the noise is not an empty copy). The same steps on an unencrypted
  store find every one of them (the search can fail);
- an unencrypted store from before is converted without losing a row, also after a conversion
  that was interrupted;
- with the real aggregator (subprocess): a device restarted while the aggregator is down stays
  locked (/health says so and why), unlocks when it answers, and its agent drains every record
  exactly once; after the device's key is rotated there (a theft), a restart never unlocks.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from appliance.store import SQLITE_HEADER, Store, StoreKeyError, StoreLockedError
from cloud_sync.protocol import AttendanceRecord, Event, ScheduleResponse
from tests.support.harness import (
    DEVICE,
    ROOM,
    Aggregator,
    appliance_settings,
    make_records,
    norm_key,
    wait_until,
)

SECRET_STUDENT = "STU-4711-QX"
SECRET_NAME = "Philippa Quellmalz"


def _secrets_store(data_dir: Path, key: bytes | None) -> tuple[Store, dict[str, bytes]]:
    """A store holding a record, an event, a roster with a descriptor and state; returns it
    and the byte strings that must not be readable from a copy."""
    store = Store(data_dir, key)
    record = AttendanceRecord(
        key=uuid.uuid4(), student_id=SECRET_STUDENT, course_id="CS101", room_id=ROOM,
        device_id=DEVICE, seen_at=datetime.now(UTC), confidence=0.9, distance=0.3,
        clock_synced=True)
    store.add_record(record)
    store.add_event(Event(device_id=DEVICE, room_id=ROOM, kind="camera_offline",
                          message="camera gone", at=datetime.now(UTC),
                          data={"alert_level": "CRITICAL", "alert_message": "camera gone"}))
    vector = np.random.default_rng(3).normal(size=128).astype("<f4")
    schedule = ScheduleResponse.model_validate({
        "room_id": ROOM, "date": date.today().isoformat(), "timezone": "UTC",
        "generated_at": datetime.now(UTC).isoformat(), "current_course_id": None,
        "sessions": [], "rosters": {"CS101": [{
            "student_id": SECRET_STUDENT, "name": SECRET_NAME,
            "embeddings": [vector.tolist()]}]},
    })
    store.save_schedule(schedule, "etag-1")
    store.set_state("alerts.camera", "raised")
    payload = store.load_schedule()[0].model_dump_json()  # type: ignore[index]
    first = json.dumps(float(vector[0]))
    at = payload.index("[[" + first)
    return store, {
        "student id": SECRET_STUDENT.encode(), "name": SECRET_NAME.encode(),
        "record key": str(record.key).encode(), "event text": b"camera gone",
        "descriptor (as stored: JSON numbers)": payload[at:at + 40].encode(),
    }


def _card_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _readable(files: dict[str, bytes], needles: dict[str, bytes]) -> list[str]:
    found = [f"{what} in {name}" for name, data in files.items()
             for what, needle in needles.items() if needle in data]
    found += [f"SQLite header in {name}" for name, data in files.items()
              if data.startswith(SQLITE_HEADER)]
    return found


def test_a_copied_card_reads_as_noise(tmp_path: Path) -> None:
    key, other = os.urandom(32), os.urandom(32)
    store, needles = _secrets_store(tmp_path / "dev", key)
    assert store.encrypted
    try:
        # pulled from a running device: the WAL is there too
        shutil.copytree(tmp_path / "dev", tmp_path / "card-running")
    finally:
        store.close()
    shutil.copytree(tmp_path / "dev", tmp_path / "card-stopped")
    for card in ("card-running", "card-stopped"):
        files = _card_bytes(tmp_path / card)
        assert files and _readable(files, needles) == [], card
        db = tmp_path / card / "appliance.db"
        conn = sqlite3.connect(str(db))
        with pytest.raises(sqlite3.DatabaseError, match="not a database"):
            conn.execute("SELECT * FROM sqlite_master").fetchall()
        conn.close()
        for wrong in (None, other):
            with pytest.raises(StoreKeyError):
                Store(db, wrong)
        copy = Store(db, key)  # the right key: everything is there
        assert copy.unsent_records(10)[0].student_id == SECRET_STUDENT
        assert copy.load_schedule() is not None and copy.get_state("alerts.camera") == "raised"
        copy.close()

    # the same search on an unencrypted store finds every secret
    plain, needles = _secrets_store(tmp_path / "plain", None)
    plain.close()
    found = _readable(_card_bytes(tmp_path / "plain"), needles)
    assert {f.split(" in ")[0] for f in found} == {*needles, "SQLite header"}


def test_an_unencrypted_store_is_converted_without_losing_a_record(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    store, needles = _secrets_store(data, None)
    records = make_records(300)
    store.add_records(records)
    store.mark_sent([records[0].key])
    store.park(records[1].key, "refused: test")
    before = ({str(r.key) for r in store.unsent_records(1000)}, store.parked(),
              store.load_schedule())
    store.close()
    db = data / "appliance.db"
    # a conversion interrupted before its swap: the plaintext's second name and a half copy
    os.link(db, data / "appliance.db.plaintext")
    (data / "appliance.db.encrypting").write_bytes(os.urandom(4096))
    key = os.urandom(32)
    converted = Store(data, locked="test")
    converted.unlock(key)
    assert converted.encrypted
    after = ({str(r.key) for r in converted.unsent_records(1000)}, converted.parked(),
             converted.load_schedule())
    assert after == before and len(after[0]) == 299  # 301 records - 1 sent - 1 parked
    converted.close()
    assert sorted(p.name for p in data.iterdir()) == ["appliance.db"]
    assert _readable(_card_bytes(data), needles) == []
    # interrupted after the swap: the plaintext copy left over is destroyed at the next open
    (data / "appliance.db.plaintext").write_bytes(SQLITE_HEADER + SECRET_STUDENT.encode())
    Store(data, key).close()
    assert sorted(p.name for p in data.iterdir()) == ["appliance.db"]


def _health(settings: Any, store: Store) -> dict[str, Any]:
    """/health's database component and the status page's store line."""
    from appliance.web.app import create_app
    from appliance.web.view import StatusView
    from tests.appliance.conftest import HostReadings, ScriptedPipeline

    pipeline, host = ScriptedPipeline(), HostReadings()
    with TestClient(create_app(settings, pipeline, store, system=host)) as client:
        database = client.get("/health").json()["components"]["database"]
    view = StatusView(settings, pipeline, store, None, host).build()
    return database | {"status_page": view["sync"]["store"]}


def _store_key_released(agg: Aggregator) -> int:
    return int(agg.scalar("SELECT count(*) FROM audit_log WHERE action = 'device.store_key'"))


def test_restart_unlocks_only_when_the_aggregator_answers(
        aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path) -> None:
    from appliance.sync import SyncAgent
    from appliance.sync.store_key import open_store, unlock_store

    agg, keys = aggregator
    data = tmp_path / "dev"
    settings = appliance_settings(data, aggregator_url=agg.base_url, api_key=keys[DEVICE])
    records = make_records(40)
    # 1. the device runs with the aggregator, records while the upload is off, restarts
    agg.start()
    store = open_store(settings)
    assert store.locked
    assert unlock_store(settings, store, threading.Event())
    store.add_records(records)
    store.close()
    agg.stop()

    # 2. restarted while the aggregator is down: locked, and /health says why
    store = open_store(settings)
    stop = threading.Event()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(unlock_store(settings, store, stop)))
    waiter.start()
    try:
        wait_until(lambda: "does not answer" in (store.lock_reason or ""), 30,
                   "the first failed key request")
        with pytest.raises(StoreLockedError):
            store.outbox_depth()
        health = _health(settings, store)
        assert health["status"] == "unhealthy" and health["locked"] is True
        assert "store locked since" in health["message"] and "does not answer" in \
            health["message"], health
        assert health["status_page"].startswith("locked: "), health
        # 3. the aggregator is back: unlocked, and the agent drains every record once
        agg.start()
        wait_until(lambda: bool(result), 30, "the store key")
    finally:
        stop.set()
        waiter.join(10)
    assert result == [True] and not store.locked and store.outbox_depth() == 40
    health = _health(settings, store)
    assert health["encrypted"] is True and health["status_page"].startswith(
        "unlocked online (the aggregator's key); no offline unlock"), health
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: store.outbox_depth() == 0, 60, "the drain")
    finally:
        agent.stop()
        store.close()
    assert sorted(agg.attendance_keys()) == sorted(norm_key(str(r.key)) for r in records)
    assert _store_key_released(agg) == 2

    # 4. stolen: the device's key is rotated at the aggregator (a device with attendance
    # cannot be deleted), so the card's key is refused and its store stays locked for good
    with httpx.Client(base_url=agg.base_url, timeout=10,
                      headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
        assert admin.post(f"/api/v1/devices/{DEVICE}/rotate-key").status_code == 200
    store = open_store(settings)
    stop = threading.Event()
    waiter = threading.Thread(target=unlock_store, args=(settings, store, stop))
    waiter.start()
    try:
        wait_until(lambda: "refuses this device" in (store.lock_reason or ""), 30,
                   "the refusal")
        assert "refuses this device" in _health(settings, store)["message"]
    finally:
        stop.set()
        waiter.join(10)
    assert store.locked
    store.close()
    assert _store_key_released(agg) == 2
    # the card's copy: nothing readable
    assert _readable(_card_bytes(data), {"record key": str(records[0].key).encode(),
                                         "student id": records[0].student_id.encode()}) == []
