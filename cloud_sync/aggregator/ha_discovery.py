"""Home Assistant MQTT discovery: one HA device per room, so a school running Home Assistant
sees its rooms with no extra code.

Per room (HA device ``attendance_<site>_<room>``):

- ``sensor`` *present count*: distinct students recorded in the class running now;
- ``sensor`` *last sync* (timestamp): the last batch or heartbeat the aggregator got from the
  room's devices;
- ``binary_sensor`` *online* per appliance (connectivity): reads the device's own retained
  status topic (``online`` / ``offline`` from its MQTT Last Will), so it is exact and immediate.

Configs are published retained under ``<prefix>/<component>/<node>/<object>/config``; the room's
state is one retained JSON document on ``classroom/<site>/<room>/state``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime

from cloud_sync.protocol import device_topic

MANUFACTURER = "classroom-attendance"


def room_state_topic(site: str, room_id: str) -> str:
    return f"classroom/{site}/{room_id}/state"


def _oid(text: str) -> str:
    """HA node/object ids allow [a-zA-Z0-9_-] only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


@dataclass(frozen=True)
class RoomInfo:
    site: str
    room_id: str
    name: str
    device_ids: tuple[str, ...]


def room_state_payload(present_count: int, last_sync: datetime | None) -> bytes:
    return json.dumps({
        "present_count": present_count,
        "last_sync": last_sync.isoformat() if last_sync else None,
    }).encode()


def discovery_messages(prefix: str, room: RoomInfo) -> list[tuple[str, bytes]]:
    """(topic, retained payload) of every discovery config of one room."""
    node = _oid(f"attendance_{room.site}_{room.room_id}")
    ha_device = {
        "identifiers": [node],
        "name": f"Classroom {room.name}",
        "manufacturer": MANUFACTURER,
        "model": "attendance room",
        "suggested_area": room.name,
    }
    state = room_state_topic(room.site, room.room_id)
    out: list[tuple[str, dict[str, object]]] = [
        (f"{prefix}/sensor/{node}/present/config", {
            "name": "Present",
            "unique_id": f"{node}_present",
            "state_topic": state,
            "value_template": "{{ value_json.present_count }}",
            "unit_of_measurement": "students",
            "state_class": "measurement",
            "icon": "mdi:account-group",
            "device": ha_device,
        }),
        (f"{prefix}/sensor/{node}/last_sync/config", {
            "name": "Last sync",
            "unique_id": f"{node}_last_sync",
            "state_topic": state,
            "value_template": "{{ value_json.last_sync }}",
            "device_class": "timestamp",
            "device": ha_device,
        }),
    ]
    for device_id in room.device_ids:
        obj = _oid(device_id)
        out.append((f"{prefix}/binary_sensor/{node}/{obj}_online/config", {
            "name": f"{device_id} online",
            "unique_id": f"{node}_{obj}_online",
            "state_topic": device_topic(room.site, room.room_id, device_id, "status"),
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "device": ha_device,
        }))
    return [(topic, json.dumps(payload).encode()) for topic, payload in out]


def removal_messages(prefix: str, site: str, room_id: str, device_id: str) -> list[str]:
    """Topics to clear (empty retained payload) when a device leaves a room."""
    node = _oid(f"attendance_{site}_{room_id}")
    return [f"{prefix}/binary_sensor/{node}/{_oid(device_id)}_online/config"]
