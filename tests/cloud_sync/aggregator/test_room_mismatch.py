"""A device registered to one room but configured for another (issue 25 item 8): its key is
valid, so the aggregator answers 403 with ``code`` ``room_mismatch`` naming both rooms (not a
bare 403 the device reads as "key refused"), keeps its records out of the parking lot (the
whole batch refused, nothing stored), and records the refused contact on the device's row so
the console says "registered to LAB-301, configured for LAB-302: change config or re-register"
instead of "last heartbeat never". SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Attendance, Device, EventRow
from cloud_sync.aggregator.db.models import Heartbeat as HeartbeatRow

from .conftest import World, batch, record
from .console_helpers import login

PW = "correct horse battery"
SAYS = "registered to LAB-301, configured for LAB-302: change config or re-register"


def _beat(world: World, room: str) -> Any:
    body = {"v": 1, "device_id": world.device_id, "room_id": room, "software_version": "1.0",
            "sent_at": datetime.now(UTC).isoformat(), "uptime_s": 10.0, "outbox_depth": 4}
    return world.client.post("/api/v1/heartbeat", json=body, headers=world.device)


def _is_mismatch(r: Any) -> None:
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["code"] == "room_mismatch"
    assert (body["registered_room"], body["configured_room"]) == ("LAB-301", "LAB-302")
    assert body["device_id"] == "pi-301"
    assert "registered to room 'LAB-301' but configured for 'LAB-302'" in body["detail"]


def test_room_mismatch_named_on_every_device_route(world: World, sessions: Any) -> None:
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
    c = world.client
    _is_mismatch(_beat(world, "LAB-302"))  # twice: the second from the cached device context
    _is_mismatch(_beat(world, "LAB-302"))
    _is_mismatch(c.get("/api/v1/schedule", params={"room_id": "LAB-302"},
                       headers=world.device))
    _is_mismatch(c.get("/api/v1/schedule/days", params={"room_id": "LAB-302"},
                       headers=world.device))
    recs = [record(world, s, world.at(0, 9, 5), room_id="LAB-302") for s in ("S001", "S002")]
    _is_mismatch(c.post("/api/v1/attendance", json=batch(world, recs), headers=world.device))
    event = {"v": 1, "device_id": world.device_id, "room_id": "LAB-302",
             "kind": "device_started", "severity": "info", "message": "hi",
             "at": datetime.now(UTC).isoformat()}
    _is_mismatch(c.post("/api/v1/events", json=event, headers=world.device))
    # a mixed batch keeps the per-record answer: the other room's record is rejected alone
    mixed = [record(world, "S003", world.at(0, 9, 5)),
             record(world, "S004", world.at(0, 9, 5), room_id="LAB-302")]
    r = c.post("/api/v1/attendance", json=batch(world, mixed), headers=world.device)
    assert r.status_code == 200 and r.json()["accepted"] == 1
    with sessions() as session:
        device = session.get(Device, world.device_id)
        assert device is not None
        assert (device.refused_reason, device.refused_room) == ("room_mismatch", "LAB-302")
        assert device.refused_at is not None and device.last_heartbeat_at is None
        assert session.scalar(select(func.count()).select_from(HeartbeatRow)) == 0
        assert session.scalar(select(func.count()).select_from(EventRow)) == 0
        assert session.scalar(select(func.count()).select_from(Attendance)) == 1
    # the console names the cause where it said "never"
    login(c, "office", PW)
    page = c.get("/devices").text
    assert SAYS in page and "Devices refused (1)" in page
    dashboard = c.get("/").text
    ours = dashboard.split("<strong>pi-301</strong>", 1)[1].split("</li>", 1)[0]
    assert SAYS in ours and "never" not in ours
    api = c.get(f"/api/v1/devices/{world.device_id}", headers=world.admin).json()
    assert (api["refused_reason"], api["refused_room"]) == ("room_mismatch", "LAB-302")
    # the other device was never refused: "never" as before
    theirs = dashboard.split("<strong>pi-302</strong>", 1)[1].split("</li>", 1)[0]
    assert "last heartbeat never" in theirs and "configured for" not in theirs
    # fixed (config corrected): its next heartbeat is accepted and the warning goes
    assert _beat(world, "LAB-301").status_code == 200
    page = c.get("/devices").text
    assert SAYS not in page and "Devices refused" not in page
    assert SAYS not in c.get("/").text


def test_moved_device_no_longer_shown_as_mismatched(world: World, sessions: Any) -> None:
    """Re-registered (moved to the room it is configured for) before its next contact: the
    console does not show "registered to LAB-302, configured for LAB-302"."""
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
    _is_mismatch(_beat(world, "LAB-302"))
    c = world.client
    r = c.patch(f"/api/v1/devices/{world.device_id}", json={"room_id": "LAB-302"},
                headers=world.admin)
    assert r.status_code == 200, r.text
    login(c, "office", PW)
    page = c.get("/devices").text
    assert "configured for" not in page and "Devices refused" not in page
    assert _beat(world, "LAB-302").status_code == 200
