"""The placement check reaches the console: a device's heartbeat carries it (optional), the
aggregator keeps it with the heartbeat, and the Devices page lists the rooms whose camera sees
faces too small to recognise; heartbeats without it (older devices) are stored as before."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Heartbeat

from .conftest import World
from .console_helpers import login

PW = "correct horse battery"
HINT = ("most faces are 35 px: move the camera closer to where people walk, or raise the "
        "resolution (1280x720); faces need 50 px or more to be recognised reliably")


def _beat(world: World, placement: dict[str, Any] | None) -> Any:
    body: dict[str, Any] = {
        "v": 1, "device_id": world.device_id, "room_id": "LAB-301", "software_version": "1.0",
        "sent_at": datetime.now(UTC).isoformat(), "uptime_s": 10.0, "outbox_depth": 0}
    if placement is not None:
        body["placement"] = placement
    return world.client.post("/api/v1/heartbeat", json=body, headers=world.device)


def test_badly_placed_camera_shown_on_the_devices_page(world: World, sessions: Any) -> None:
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
    assert _beat(world, None).status_code == 200  # a device from before: no placement
    login(world.client, "office", PW)
    page = world.client.get("/devices").text
    assert "Cameras to move" not in page
    placement = {"status": "too_small", "faces": 23, "recognised": 2, "median_px": 35.0,
                 "hint": HINT, "course_id": "CS101", "current_class": False,
                 "bands": [{"size": "32-39", "faces": 18, "recognised": 0},
                           {"size": "50-59", "faces": 5, "recognised": 2}]}
    assert _beat(world, placement).status_code == 200
    with sessions() as session:
        stored = session.scalars(select(Heartbeat.placement).order_by(Heartbeat.id)).all()
    assert stored[0] is None and '"too_small"' in stored[1]
    page = world.client.get("/devices").text
    assert "Cameras to move (1)" in page and "LAB-301" in page
    assert "most faces are 35 px: move the camera closer" in page
    assert "too small · 35 px" in page
    # malformed placement: rejected with a reason, nothing stored
    bad = {**placement, "status": "fine", "bands": [{"size": "x", "faces": -1}]}
    r = _beat(world, bad)
    assert r.status_code == 422
    nul = {**placement, "hint": "a\u0000b"}
    assert _beat(world, nul).status_code in (400, 422)
    with sessions() as session:
        assert len(session.scalars(select(Heartbeat.id)).all()) == 2
