"""Home Assistant MQTT discovery: one HA device per room, so a school running Home Assistant
sees its rooms with no extra code.

Per room (HA device ``attendance_<site>_<room>``):

- ``sensor`` *present count*: distinct students recorded in the class running now;
- ``sensor`` *last sync* (timestamp): the last batch or heartbeat the aggregator got from the
  room's devices;
- ``sensor`` *class now*: the course scheduled in the room now (empty between classes);
- ``sensor`` *occupancy* (people, with capacity, free seats and occupied share as attributes):
  the latest ``occupancy`` event of the room's devices during the running class;
- ``binary_sensor`` *online* per appliance (connectivity): reads the device's own retained
  status topic (``online`` / ``offline`` from its MQTT Last Will), so it is exact and immediate;
- two *device triggers* (``device_automation``), ``unknown_face`` with subtype ``warning`` (an
  unknown face during a class) and ``critical`` (several): fired by a message on
  ``classroom/<site>/<room>/alert`` whose payload is the severity.

The room sensors carry ``availability``: the room's devices' status topics, available while
any of them is online. The HA device's ``configuration_url`` is the status page of the room's
first device (``ha_device_url`` with ``{device_id}``).

Configs are published retained under ``<prefix>/<component>/<node>/<object>/config``; the room's
state is one retained JSON document on ``classroom/<site>/<room>/state``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cloud_sync.protocol import device_topic

MANUFACTURER = "classroom-attendance"


def room_state_topic(site: str, room_id: str) -> str:
    return f"classroom/{site}/{room_id}/state"


def room_alert_topic(site: str, room_id: str) -> str:
    """Unknown-face alerts of a room (not retained; payload ``warning`` or ``critical``)."""
    return f"classroom/{site}/{room_id}/alert"


ALERT_SUBTYPES = ("warning", "critical")


def _oid(text: str) -> str:
    """HA node/object ids allow [a-zA-Z0-9_-] only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


@dataclass(frozen=True)
class RoomInfo:
    site: str
    room_id: str
    name: str
    device_ids: tuple[str, ...]
    configuration_url: str | None = None


def room_state_payload(present_count: int, last_sync: datetime | None,
                       class_now: str | None = None,
                       occupancy: dict[str, Any] | None = None) -> bytes:
    return json.dumps({
        "present_count": present_count,
        "last_sync": last_sync.isoformat() if last_sync else None,
        "class_now": class_now or "",
        "occupancy": occupancy,
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
    if room.configuration_url:
        ha_device["configuration_url"] = room.configuration_url
    state = room_state_topic(room.site, room.room_id)
    available: dict[str, object] = {}
    if room.device_ids:
        available = {
            "availability": [
                {"topic": device_topic(room.site, room.room_id, d, "status"),
                 "payload_available": "online", "payload_not_available": "offline"}
                for d in room.device_ids
            ],
            "availability_mode": "any",
        }
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
            **available,
        }),
        (f"{prefix}/sensor/{node}/last_sync/config", {
            "name": "Last sync",
            "unique_id": f"{node}_last_sync",
            "state_topic": state,
            "value_template": "{{ value_json.last_sync }}",
            "device_class": "timestamp",
            "device": ha_device,
        }),
        (f"{prefix}/sensor/{node}/class_now/config", {
            "name": "Class now",
            "unique_id": f"{node}_class_now",
            "state_topic": state,
            "value_template": "{{ value_json.class_now }}",
            "icon": "mdi:school",
            "device": ha_device,
            **available,
        }),
        (f"{prefix}/sensor/{node}/occupancy/config", {
            "name": "Occupancy",
            "unique_id": f"{node}_occupancy",
            "state_topic": state,
            "value_template": "{{ value_json.occupancy.count if value_json.occupancy "
                              "else 0 }}",
            "json_attributes_topic": state,
            "json_attributes_template": "{{ (value_json.occupancy or {}) | tojson }}",
            "unit_of_measurement": "people",
            "state_class": "measurement",
            "icon": "mdi:seat",
            "device": ha_device,
            **available,
        }),
    ]
    for subtype in ALERT_SUBTYPES:
        out.append((f"{prefix}/device_automation/{node}/unknown_face_{subtype}/config", {
            "automation_type": "trigger",
            "topic": room_alert_topic(room.site, room.room_id),
            "type": "unknown_face",
            "subtype": subtype,
            "payload": subtype,
            "device": ha_device,
        }))
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
