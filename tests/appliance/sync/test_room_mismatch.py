"""A device registered to LAB-301 but configured for LAB-302 (issue 25 item 8), against the
REAL aggregator (`aggregator serve`, temp SQLite): the sync agent says "room mismatch" with both
rooms and what to change (its status, its /health, its status page's JSON, one log warning),
not "key refused, check sync.api_key" with "HTTP 403: HTTP 403"; its records are kept (none
parked) while it is misconfigured; its store key is not wiped (the key was accepted); and once
device.room_id is corrected, what it recorded for the wrong room is parked with the reason
instead of blocking the outbox, and new records flow."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.support.harness import (
    DEVICE,
    OTHER_ROOM,
    ROOM,
    Aggregator,
    appliance_settings,
    fill_store,
    make_records,
    wait_until,
)

pytestmark = pytest.mark.slow


def test_room_mismatch_named_on_the_device(
        aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path, pipeline: object,
        host: object, caplog: pytest.LogCaptureFixture) -> None:
    from appliance.store import Store
    from appliance.sync import SyncAgent
    from appliance.web.app import create_app

    agg, keys = aggregator
    agg.start()
    caplog.set_level(logging.DEBUG)
    store = Store(tmp_path / "dev" / "appliance.db")
    made_there = make_records(5, room=OTHER_ROOM)
    fill_store(store, made_there)
    contacts: list[bool] = []
    wrong = appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                               api_key=keys[DEVICE], room=OTHER_ROOM)
    agent = SyncAgent(wrong, store, on_contact=contacts.append)
    agent.start()
    try:
        wait_until(lambda: agent.stats.failures >= 2, 30, "two refused uploads")
        time.sleep(1.5)  # retries that must not be logged again
        status = agent.status()
        assert status.aggregator_reachable and not status.credentials_refused
        mismatch = status.room_mismatch or ""
        assert f"registered to room {ROOM}" in mismatch
        assert f"configured for {OTHER_ROOM}" in mismatch and "device.room_id" in mismatch
        assert "room mismatch" in (status.last_error or "")
        assert "HTTP 403: HTTP 403" not in (status.last_error or "")
        assert store.outbox_depth() == len(made_there) and store.parked() == []
        assert contacts and all(contacts)  # the key was accepted: the store key stays
        # the status page's JSON and /health say it
        web = create_app(wrong, pipeline, store, agent.status, system=host)  # type: ignore[arg-type]
        with TestClient(web) as client:
            health = client.get("/health").json()["components"]["aggregator"]
            assert health["status"] == "degraded"
            assert "refuses this device's room" in health["message"]
            assert f"registered to room {ROOM}" in health["message"]
            body = client.get("/api/status", headers={
                "Authorization": f"Bearer {keys[DEVICE]}"}).json()
            assert "room mismatch" in body["sync"]["last_error"]
    finally:
        agent.stop()
    lines = [r.getMessage() for r in caplog.records
             if r.name.startswith("appliance.sync") and r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert "room mismatch" in lines[0] and f"configured for {OTHER_ROOM}" in lines[0]
    assert "sync.api_key" not in lines[0]
    # the aggregator recorded the refused contact for the console
    assert agg.scalar("SELECT refused_reason FROM devices WHERE id = ?", DEVICE) == \
        "room_mismatch"
    assert agg.scalar("SELECT refused_room FROM devices WHERE id = ?", DEVICE) == OTHER_ROOM
    # device.room_id corrected: the records made for LAB-302 are parked (kept, with the
    # reason), new ones are accepted
    made_here = make_records(3)
    fill_store(store, made_here)
    agent = SyncAgent(appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                                         api_key=keys[DEVICE]), store)
    agent.start()
    try:
        wait_until(lambda: store.outbox_depth() == 0, 60, "the outbox to drain")
        assert agent.status().room_mismatch is None
    finally:
        agent.stop()
    parked = store.parked()
    assert {key for key, _ in parked} == {str(r.key) for r in made_there}
    assert all("room mismatch" in reason for _, reason in parked)
    assert sorted(agg.attendance_keys()) == sorted(str(r.key) for r in made_here)
    store.close()
