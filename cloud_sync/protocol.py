"""The wire models both sides import: records, batches, acks, rosters, heartbeats, events.

This module is the whole contract between an appliance and the aggregator, over HTTP and MQTT
alike; nothing else is shared. Every message carries ``v`` (the protocol version). Times are
timezone-aware ISO 8601; embeddings are 128 floats.
"""

from __future__ import annotations

import uuid
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
EMBEDDING_DIM = 128
MAX_BATCH = 1000

IDENTIFIER_PATTERN = r"^[A-Za-z0-9._-]+$"
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)]
# MQTT user names of the aggregator's bridge and of Home Assistant (config/mosquitto/acl): a
# device registered under one of them would get their broker rights.
RESERVED_DEVICE_IDS = frozenset({"aggregator", "homeassistant"})


def check_device_id(value: str) -> str:
    """``value`` unless it is a reserved name (compared case-insensitively)."""
    if value.lower() in RESERVED_DEVICE_IDS:
        raise ValueError(
            f"device id {value!r} is reserved (MQTT users of the aggregator and Home Assistant)"
        )
    return value


DeviceId = Annotated[Identifier, AfterValidator(check_device_id)]
Embedding = Annotated[
    list[float], Field(min_length=EMBEDDING_DIM, max_length=EMBEDDING_DIM)
]


class Message(BaseModel):
    """Base of every wire message: strict about unknown fields, versioned."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    v: Literal[1] = Field(default=PROTOCOL_VERSION, description="Protocol version.")


class AttendanceRecord(BaseModel):
    """One student seen by one device in one debounce window."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    key: uuid.UUID = Field(description="Idempotency key, made once on the device.")
    student_id: Identifier
    course_id: Identifier | None = Field(
        default=None, description="Course the device believed was scheduled (None: no class)."
    )
    room_id: Identifier
    device_id: Identifier
    seen_at: AwareDatetime = Field(description="Device wall-clock time of the first sighting.")
    confidence: float = Field(ge=0.0, le=1.0, description="Decision confidence, 0..1.")
    distance: float | None = Field(
        default=None, ge=0.0, le=2.0, description="Best embedding distance of the track."
    )
    clock_synced: bool = Field(
        default=True, description="Whether the device clock was NTP-synchronised at seen_at."
    )
    boot_id: str | None = Field(
        default=None, max_length=64,
        description="Device boot id; lets the aggregator correct an unsynchronised clock.",
    )
    monotonic_s: float | None = Field(
        default=None, ge=0, description="Device monotonic clock (seconds since boot) at seen_at.",
    )


class AttendanceBatch(Message):
    """A batch of records sent by one device (HTTP POST body or MQTT payload)."""

    batch_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Echoed in the ack.")
    device_id: Identifier
    records: list[AttendanceRecord] = Field(max_length=MAX_BATCH)


class RecordRejection(BaseModel):
    key: str = Field(description="The rejected record's key (as sent).")
    reason: str = Field(description="Why it was rejected; the device parks the record.")


class BatchResult(Message):
    """The aggregator's answer to a batch: the HTTP response body and the MQTT ack payload."""

    batch_id: uuid.UUID | None = None
    accepted: int = Field(ge=0, description="Records inserted now.")
    duplicate: int = Field(ge=0, description="Records already held (a re-sent batch).")
    rejected: list[RecordRejection] = Field(default_factory=list)


class Heartbeat(Message):
    device_id: Identifier
    room_id: Identifier
    software_version: str = Field(max_length=64)
    sent_at: AwareDatetime = Field(description="Device wall clock when sent.")
    clock_synced: bool = True
    boot_id: str | None = Field(default=None, max_length=64)
    monotonic_s: float | None = Field(default=None, ge=0)
    uptime_s: float = Field(ge=0, le=1e10)
    cpu_temp_c: float | None = Field(default=None, ge=-100, le=250)
    outbox_depth: int = Field(ge=0, le=2**31 - 1)
    oldest_unsent_age_s: float | None = Field(default=None, ge=0, le=1e10)
    last_frame_at: AwareDatetime | None = None
    fps: float | None = Field(default=None, ge=0, le=10_000)


EventKind = Literal[
    "camera_offline",
    "camera_online",
    "cpu_temperature_high",
    "disk_almost_full",
    "outbox_stale",
    "roster_switched",
    "device_started",
]


class Event(Message):
    key: uuid.UUID = Field(default_factory=uuid.uuid4, description="Idempotency key.")
    device_id: Identifier
    room_id: Identifier
    kind: EventKind
    severity: Literal["info", "warning", "critical"] = "warning"
    message: str = Field(max_length=500)
    at: AwareDatetime
    data: dict[str, Any] = Field(default_factory=dict)


class RosterEntry(BaseModel):
    student_id: Identifier
    name: str = Field(max_length=200)
    embeddings: list[Embedding] = Field(description="One or more 128-d face descriptors.")


class ClassSession(BaseModel):
    """One scheduled class in a room on a given day."""

    course_id: Identifier
    course_name: str
    starts_at: AwareDatetime
    ends_at: AwareDatetime


class ScheduleResponse(Message):
    """`GET /api/v1/schedule?room_id=...&at=...`: the class now and the rest of the room's day."""

    room_id: Identifier
    date: date
    timezone: str
    generated_at: AwareDatetime
    current_course_id: Identifier | None = Field(description="Course scheduled at `at`, if any.")
    sessions: list[ClassSession] = Field(description="Every class in the room that day.")
    rosters: dict[str, list[RosterEntry]] = Field(
        description="Enrolled students (with embeddings) per course_id of `sessions`."
    )


def topic_base(site: str, room: str, device: str) -> str:
    return f"classroom/{site}/{room}/{device}"


def device_topic(site: str, room: str, device: str, leaf: str) -> str:
    """`classroom/<site>/<room>/<device>/<leaf>`, leaf in attendance|ack|heartbeat|events|status."""
    return f"{topic_base(site, room, device)}/{leaf}"


def roster_topic(site: str, room: str) -> str:
    """Retained: a roster/schedule change for the room (payload: {"v":1,"etag": ...})."""
    return f"classroom/{site}/{room}/roster"

