"""POST /api/v1/store-key (issue 18, the device at rest) on SQLite and PostgreSQL: each device
gets its own 32-byte key, the same one every time, only with its own device key; every release
is audited; a deleted (deregistered) device gets none, and its key is gone with it."""

from __future__ import annotations

import base64
from typing import Any

from sqlalchemy import select

from cloud_sync.aggregator.db.models import AuditLog, Device

from .conftest import World


def _key(world: World, headers: dict[str, str]) -> Any:
    return world.client.post("/api/v1/store-key", headers=headers)


def test_each_device_gets_its_own_key_and_a_deleted_one_none(world: World,
                                                             sessions: Any) -> None:
    first = _key(world, world.device)
    assert first.status_code == 200, first.text
    assert first.headers["cache-control"] == "no-store"
    body = first.json()
    key = base64.b64decode(body["key"])
    assert body["device_id"] == world.device_id and body["created"] is True and len(key) == 32
    again = _key(world, world.device).json()
    assert base64.b64decode(again["key"]) == key and again["created"] is False
    other = base64.b64decode(_key(world, world.other).json()["key"])
    assert other != key and len(other) == 32
    # an admin token is not a device; no credentials at all is refused
    assert _key(world, world.admin).status_code == 403
    assert world.client.post("/api/v1/store-key").status_code == 401
    with sessions() as session:
        trail = [tuple(r) for r in session.execute(
            select(AuditLog.actor, AuditLog.action, AuditLog.detail).where(
                AuditLog.subject == f"device:{world.device_id}").order_by(AuditLog.id))]
    assert trail == [(f"device:{world.device_id}", "device.store_key", "created"),
                     (f"device:{world.device_id}", "device.store_key", "released")]
    # deregistered: the key goes with the row, the device key stops working
    assert world.client.delete(f"/api/v1/devices/{world.device_id}",
                               headers=world.admin).status_code == 204
    assert _key(world, world.device).status_code == 401
    with sessions() as session:
        assert session.get(Device, world.device_id) is None
        assert session.scalars(select(Device.store_key)).all() == [other]
