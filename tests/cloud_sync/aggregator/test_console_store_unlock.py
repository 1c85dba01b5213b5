"""A device that restarted on an offline unlock (issue 26 item 4) reaches the console: its
heartbeat says how its store was opened, the aggregator keeps that with the heartbeat, and the
Devices page lists the devices running on an offline unlock (and only those)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Heartbeat

from .conftest import World
from .console_helpers import login

PW = "correct horse battery"


def _beat(world: World, unlock: dict[str, Any] | None) -> Any:
    body: dict[str, Any] = {
        "v": 1, "device_id": world.device_id, "room_id": "LAB-301", "software_version": "1.0",
        "sent_at": datetime.now(UTC).isoformat(), "uptime_s": 10.0, "outbox_depth": 0}
    if unlock is not None:
        body["store_unlock"] = unlock
    return world.client.post("/api/v1/heartbeat", json=body, headers=world.device)


def test_devices_on_an_offline_unlock_are_listed(world: World, sessions: Any) -> None:
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
    login(world.client, "office", PW)
    now = datetime.now(UTC).replace(microsecond=0)
    online = {"mode": "online", "unlocked_by": "aggregator", "unlocked_at": now.isoformat(),
              "confirmed_at": now.isoformat(), "wrapped": "board-key",
              "wrapped_until": (now + timedelta(days=7)).isoformat()}
    assert _beat(world, None).status_code == 200  # a device from before issue 26
    assert _beat(world, online).status_code == 200
    page = world.client.get("/devices").text
    assert "Running on an offline unlock" not in page and "offline unlock</span>" not in page
    restarted = {**online, "mode": "offline", "unlocked_by": "board-key",
                 "unlocked_at": "2026-12-08T07:58:00+00:00", "confirmed_at": None,
                 "wrapped_until": "2026-12-14T16:00:00+00:00"}
    assert _beat(world, restarted).status_code == 200
    with sessions() as session:
        stored = session.scalars(select(Heartbeat.store_unlock).order_by(Heartbeat.id)).all()
    assert stored[0] is None and '"aggregator"' in stored[1] and '"board-key"' in stored[2]
    page = world.client.get("/devices").text
    assert "Running on an offline unlock (1)" in page and "offline unlock</span>" in page
    assert ("unlocked offline with its board key (OTP) at 2026-12-08 07:58 UTC; not confirmed "
            "by the aggregator yet; next offline unlock possible until 2026-12-14 16:00 UTC"
            ) in page
    # malformed: rejected with a reason, nothing stored
    assert _beat(world, {**restarted, "unlocked_by": "a-password"}).status_code == 422
    assert _beat(world, {**restarted, "extra": 1}).status_code == 422
    with sessions() as session:
        assert len(session.scalars(select(Heartbeat.id)).all()) == 3
