"""Consent withdrawal and deregistration reach the device (issue 18), with real photos, the
real aggregator (subprocess), a real Mosquitto and the device's real Store and SyncAgent:

- withdrawn -> the student is gone from the aggregator's database files and, after ONE sync
  (pushed by the retained roster notice; the poll is an hour here), from the device's roster and
  its database files; the device's matcher then no longer recognises the student's face;
- a device whose key is refused (deregistered) wipes its cached rosters.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from cloud_sync.protocol import EMBEDDER_IDS
from tests.support.harness import (
    DEVICE,
    VENV_BIN,
    Aggregator,
    Broker,
    appliance_settings,
    start_pushed_agent,
    wait_until,
)

EXAMPLES = ("face_recognition", "examples")


def _descriptor(faces_dir: Path, model_dir: Path, name: str) -> np.ndarray:
    from appliance.vision.embedding import create_embedder
    from appliance.vision.enroll import embed_photo, enrollment_detector

    image = cv2.imread(str(faces_dir.joinpath(*EXAMPLES, name)))
    result = embed_photo(image, enrollment_detector(model_dir),
                         create_embedder("sface", model_dir), 40)
    assert result.embedding is not None, name
    return np.asarray(result.embedding, dtype="<f4")


def _enrol_real_faces(agg: Aggregator, faces: dict[str, np.ndarray]) -> None:
    """Replace the seeded random descriptors of these students with real ones (SFace, the
    devices' default embedder)."""
    conn = sqlite3.connect(str(agg.db_path))
    try:
        with conn:
            for sid, vec in faces.items():
                conn.execute("DELETE FROM face_embeddings WHERE student_id = ?", (sid,))
                conn.execute(
                    "INSERT INTO face_embeddings (student_id, vector, embedder, source, quality, "
                    "created_at) VALUES (?, ?, ?, 'test photo', 0.9, ?)",
                    (sid, vec.tobytes(), EMBEDDER_IDS["sface"],
                     datetime.now(UTC).isoformat(" ")[:26]))
    finally:
        conn.close()


def _files(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


def _roster_text(store_db: Path, student: str) -> bytes:
    """A slice of the student's descriptor as the device stores it (JSON text)."""
    conn = sqlite3.connect(str(store_db))
    try:
        payload = conn.execute("SELECT payload FROM schedules").fetchone()[0]
    finally:
        conn.close()
    entry = next(e for e in json.loads(payload)["rosters"]["CS101"] if e["student_id"] == student)
    start = payload.index('"student_id":"' + student + '"')
    first = json.dumps(entry["embeddings"][0][0])
    at = payload.index("[[" + first, start)
    return payload[at:at + 60].encode()


@pytest.mark.mqtt
def test_withdrawn_consent_leaves_the_device_after_one_sync(
        broker: Broker, aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path,
        faces_dir: Path, model_dir: Path) -> None:
    from appliance.recognition import Matcher

    agg, keys = aggregator
    obama = _descriptor(faces_dir, model_dir, "obama.jpg")
    _enrol_real_faces(agg, {"S001": obama, "S002": _descriptor(faces_dir, model_dir,
                                                              "biden.jpg")})
    probe = _descriptor(faces_dir, model_dir, "obama2.jpg")  # another photo of S001
    agg.start(mqtt_url=broker.url("aggregator"))
    store, settings, agent = start_pushed_agent(agg, broker, keys, tmp_path / "dev")
    try:
        _, _, roster = agent.roster_provider.current(datetime.now(UTC))
        assert "S001" in roster.student_ids
        match = Matcher.for_embedder(roster, settings.recognition).match(probe[None, :])[0]
        assert match.student_id == "S001", match
        stored = _roster_text(store.path, "S001")
        assert stored in _files(store.path)
        assert obama.tobytes() in _files(agg.db_path)
        time.sleep(0.5)

        with httpx.Client(base_url=agg.base_url, timeout=10,
                          headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
            answer = admin.post("/api/v1/students/S001/consent", json={"state": "withdrawn"})
            assert answer.status_code == 200, answer.text
        started = time.monotonic()

        def dropped() -> bool:
            cached = store.load_schedule()
            return cached is not None and "S001" not in {
                e.student_id for e in cached[0].rosters.get("CS101", [])}

        wait_until(dropped, 20, "the roster without S001 (pushed: the poll is 1 h)")
        assert time.monotonic() - started < 20
        assert agent.stats.schedule_updates == 2  # one sync
        _, _, roster = agent.roster_provider.current(datetime.now(UTC))
        assert "S001" not in roster.student_ids and "S002" in roster.student_ids
        match = Matcher.for_embedder(roster, settings.recognition).match(probe[None, :])[0]
        assert match.student_id is None, match  # Obama is a stranger now
        assert stored not in _files(store.path), "S001's descriptor is still in the device DB"
        wait_until(lambda: obama.tobytes() not in _files(agg.db_path), 10,
                   "S001's descriptor to leave the aggregator's database files")

        # The same from the CLI (a process of its own): it publishes the notice itself.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
        env.update({"AGGREGATOR_DATABASE_URL": agg.db_url,
                    "AGGREGATOR_MQTT_URL": broker.url("aggregator")})
        done = subprocess.run([str(VENV_BIN / "aggregator"), "students", "consent", "S002",
                               "withdraw"], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "roster notice published" in done.stderr
        wait_until(lambda: "S002" not in {e.student_id for e in store.load_schedule()[0]
                                          .rosters.get("CS101", [])}, 20,
                   "the roster without S002 (notice published by the CLI)")
        assert agent.stats.schedule_updates == 3
    finally:
        agent.stop()
        store.close()


def test_deregistered_device_wipes_its_rosters(
        aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path) -> None:
    from appliance.store import Store
    from appliance.sync import SyncAgent

    agg, keys = aggregator
    agg.start()
    store = Store(tmp_path / "dev" / "appliance.db")
    settings = appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                                  api_key=keys[DEVICE], roster_refresh_s=10)
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: agent.stats.schedule_updates >= 1, 30, "the first schedule pull")
        assert store.load_schedule() is not None
        with httpx.Client(base_url=agg.base_url, timeout=10,
                          headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
            assert admin.delete(f"/api/v1/devices/{DEVICE}").status_code == 204
        agent.request_roster_refresh()
        wait_until(lambda: store.load_schedule() is None, 20, "the rosters to be wiped")
        _, _, roster = agent.roster_provider.current(datetime.now(UTC))
        assert roster.student_ids == []
    finally:
        agent.stop()
        store.close()
