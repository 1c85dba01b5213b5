"""The wire models both sides import: records, batches, acks, rosters, heartbeats, events.

This module is the whole contract between an appliance and the aggregator, over HTTP and MQTT
alike: no other code of one side is needed to talk to the other (what else both programs
import is in docs/ARCHITECTURE.md, "What the two programs share"). Every message carries
``v`` (the protocol version). Times are timezone-aware ISO 8601; embeddings are 128 floats.
"""

from __future__ import annotations

import uuid
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

PROTOCOL_VERSION = 1
EMBEDDING_DIM = 128
# The descriptor spaces, `name/model_version` per embedder name (appliance.vision.embedding).
EMBEDDER_IDS = {"sface": "sface/sface-2021dec-int8bq", "dlib": "dlib/dlib-resnet-v1"}
# ... of the descriptors made before the embedder was recorded (all dlib's)
LEGACY_EMBEDDER = EMBEDDER_IDS["dlib"]
MAX_BATCH = 1000

IDENTIFIER_CHARS = r"[A-Za-z0-9._-]+"
IDENTIFIER_PATTERN = rf"^{IDENTIFIER_CHARS}$"
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)]
# MQTT user names of the aggregator's bridge and of Home Assistant (config/mosquitto/acl): a
# device registered under one of them would get their broker rights.
RESERVED_DEVICE_IDS = frozenset({"aggregator", "homeassistant"})
# The aggregator's own per-room devices of recorded sessions (rec-<room>): their records and
# events are replaced by recording jobs, and the console does not list them as devices.
RESERVED_DEVICE_PREFIX = "rec-"


def check_device_id(value: str) -> str:
    """``value`` unless it is a reserved name or starts with the recordings' prefix (compared
    case-insensitively)."""
    if value.lower() in RESERVED_DEVICE_IDS:
        raise ValueError(
            f"device id {value!r} is reserved (MQTT users of the aggregator and Home Assistant)"
        )
    if value.lower().startswith(RESERVED_DEVICE_PREFIX):
        raise ValueError(f"device id {value!r}: ids starting with {RESERVED_DEVICE_PREFIX!r} "
                         "are reserved (the aggregator's devices of recorded sessions)")
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
        default=True, description="Whether seen_at came from a trusted clock (NTP, the "
        "aggregator's time, the same boot's persisted time or a real-time clock); false: the "
        "aggregator places the record by the heartbeats of its boot.",
    )
    boot_id: str | None = Field(
        default=None, max_length=64,
        description="Device boot id; lets the aggregator correct an unsynchronised clock.",
    )
    monotonic_s: float | None = Field(
        default=None, ge=0, description="Device monotonic clock (seconds since boot) at seen_at.",
    )
    descriptor: Embedding | None = Field(
        default=None,
        description="The track's face descriptor the match was made on (optional). The "
        "aggregator keeps it for a while so that a teacher's \"not this student\" correction "
        "can turn it into a negative example of that student.",
    )
    descriptor_embedder: str | None = Field(
        default=None, max_length=100,
        description="`name/model_version` of the embedder that made `descriptor` "
        "(None: dlib, as before embedders were recorded).",
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


UpdateState = Literal["idle", "waiting", "downloading", "installing", "trial", "confirmed",
                      "reverted", "refused", "failed"]
UPDATE_STATES: tuple[str, ...] = UpdateState.__args__  # type: ignore[attr-defined]
# an update that ended: the rollout counts it (confirmed) or halts on it (reverted, refused)
UPDATE_FINAL_STATES = ("confirmed", "reverted", "refused", "failed")
ReleaseVersion = Annotated[str, Field(min_length=1, max_length=64,
                                      pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")]


class UpdateReport(Message):
    """What a device's updater is doing about a release (docs/OPERATIONS.md 6.10): sent by the
    updater at every change (``POST /api/v1/releases/report``) and in every heartbeat."""

    state: UpdateState = Field(description="idle, waiting (for the window), downloading, "
                               "installing, trial (switched, waiting to be healthy), confirmed, "
                               "reverted (unhealthy: went back), refused (signature, hash, "
                               "disk: nothing switched), failed (will retry).")
    version: ReleaseVersion | None = Field(default=None, description="The release concerned.")
    running: ReleaseVersion | None = Field(default=None, description="The release running now.")
    reason: str | None = Field(default=None, max_length=500, description="Why (reverted, "
                               "refused, failed, waiting).")
    at: AwareDatetime = Field(description="Device wall clock of the change.")
    done_bytes: int | None = Field(default=None, ge=0, le=2**40)
    total_bytes: int | None = Field(default=None, ge=0, le=2**40)


class ReleaseOffer(Message):
    """The release the aggregator means for this device (the heartbeat reply's ``release``
    and ``GET /api/v1/releases/assigned``)."""

    version: ReleaseVersion
    manifest_url: str = Field(max_length=300, description="Relative to the aggregator URL.")
    signature_url: str = Field(max_length=300)
    files_url: str = Field(max_length=300, description="Prefix; append a file's sha256.")
    allowed_now: bool = Field(description="Download and install now (outside class time, or "
                              "the rollout says install during class).")
    window_reason: str | None = Field(default=None, max_length=200,
                                      description="Why not now (e.g. the class in session).")
    max_bytes_per_s: int | None = Field(default=None, ge=10_000, le=1_000_000_000,
                                        description="Download bandwidth bound of the rollout.")


class HeartbeatReply(BaseModel):
    """The answer to ``POST /api/v1/heartbeat``."""

    stored: bool
    duplicate: bool = False
    release: ReleaseOffer | None = Field(default=None, description="A release meant for this "
                                         "device that it does not run yet (None: stay).")


PlacementStatus = Literal["no_data", "ok", "marginal", "too_small", "too_large",
                          "low_recognition"]


class PlacementBand(BaseModel):
    """Faces of one size band (largest width per person, frame pixels, e.g. ``"40-49"``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    size: str = Field(min_length=1, max_length=16)
    faces: int = Field(ge=0, le=2**31 - 1)
    recognised: int = Field(ge=0, le=2**31 - 1)


class PlacementReport(BaseModel):
    """The device's placement check (appliance/placement.py): how big the faces the camera saw
    in the current (or last) class were, how many were recognised, the verdict and a hint."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    status: PlacementStatus
    faces: int = Field(ge=0, le=2**31 - 1)
    recognised: int = Field(ge=0, le=2**31 - 1)
    median_px: float | None = Field(default=None, ge=0, le=100_000)
    hint: str = Field(max_length=300)
    course_id: Identifier | None = None
    current_class: bool = True
    bands: list[PlacementBand] = Field(default_factory=list, max_length=16)


class StoreUnlockReport(BaseModel):
    """How the device's encrypted store was opened this run (issue 26: offline unlock)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    mode: Literal["locked", "online", "offline", "unencrypted"] = Field(
        description="online: the aggregator's key (or confirmed by it); offline: opened with "
        "the key kept on the card, not confirmed yet.")
    unlocked_by: Literal["aggregator", "board-key", "card-key"] | None = Field(
        default=None, description="What opened the store at this start: board-key/card-key = "
        "an offline unlock (the device restarted while the aggregator could not be reached).")
    unlocked_at: AwareDatetime | None = None
    confirmed_at: AwareDatetime | None = Field(
        default=None, description="When the aggregator's key was found to be the one in use.")
    wrapped: Literal["board-key", "card-key"] | None = Field(
        default=None, description="The key kept on the card for the next offline unlock.")
    wrapped_until: AwareDatetime | None = Field(
        default=None, description="The end of that key's window.")


class Heartbeat(Message):
    device_id: Identifier
    room_id: Identifier
    software_version: str = Field(max_length=64)
    sent_at: AwareDatetime = Field(description="Device wall clock when sent.")
    clock_synced: bool = Field(default=True, description="Whether sent_at is a trusted time.")
    boot_id: str | None = Field(default=None, max_length=64)
    monotonic_s: float | None = Field(default=None, ge=0)
    clock_source: Literal["ntp", "aggregator", "anchor", "rtc", "none"] | None = Field(
        default=None, description="What made the device's clock trusted (none: untrusted).")
    uptime_s: float = Field(ge=0, le=1e10)
    cpu_temp_c: float | None = Field(default=None, ge=-100, le=250)
    outbox_depth: int = Field(ge=0, le=2**31 - 1)
    oldest_unsent_age_s: float | None = Field(default=None, ge=0, le=1e10)
    last_frame_at: AwareDatetime | None = None
    fps: float | None = Field(default=None, ge=0, le=10_000)
    update: UpdateReport | None = Field(default=None, description="The updater's state.")
    placement: PlacementReport | None = Field(
        default=None, description="Face sizes seen and recognised: is the camera well placed "
        "(optional; devices before issue 22 send none).")
    store_unlock: StoreUnlockReport | None = Field(
        default=None, description="How the encrypted store was opened (optional; devices "
        "before issue 26 and unencrypted ones send none).")


EVENT_SCHEMA_VERSION = 2
EVENT_SCHEMA_VERSIONS = (1, 2)  # what this side reads; v1: device alerts before the schema

AlertKind = Literal[
    "camera_offline",
    "camera_online",
    "cpu_temperature_high",
    "disk_almost_full",
    "outbox_stale",
    "unknown_face",
]
EventKind = Literal[AlertKind, "occupancy", "attention", "roster_switched", "device_started"]
EVENT_KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]
ALERT_KINDS: tuple[str, ...] = AlertKind.__args__  # type: ignore[attr-defined]
Severity = Literal["info", "warning", "critical"]
SessionId = Annotated[str, Field(min_length=1, max_length=100,
                                 pattern=rf"^{IDENTIFIER_CHARS}@\d{{4}}-\d{{2}}-\d{{2}}$")]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AlertPayload(_Payload):
    """``data`` of every alert kind: the ``alert.triggered`` shape (level, message, the events
    it groups) plus the readings that raised it."""

    alert_level: Literal["INFO", "WARNING", "CRITICAL"] = Field(
        description="INFO (a recovery), WARNING, CRITICAL.")
    alert_message: str = Field(max_length=500, description="One line for a person.")
    associated_events: list[uuid.UUID] = Field(
        default_factory=list, max_length=100,
        description="Keys of earlier events this alert belongs to (e.g. the offline event a "
                    "camera_online closes).")
    details: dict[str, Any] = Field(default_factory=dict, description="The readings.")


class OccupancyPayload(_Payload):
    """``data`` of an ``occupancy`` event: people in the room, smoothed, against capacity."""

    count: int = Field(ge=0, le=10_000, description="People now (smoothed over window_s).")
    faces: int = Field(ge=0, le=10_000, description="Faces seen in the latest count.")
    turned_away: int = Field(ge=0, le=10_000,
                             description="Live tracks whose face was not seen in that count.")
    capacity: int | None = Field(default=None, ge=1, le=10_000,
                                 description="Seats in the room (None: not configured).")
    free: int | None = Field(default=None, ge=0, le=10_000, description="capacity - count.")
    occupied_share: float | None = Field(default=None, ge=0.0, le=100.0,
                                         description="count / capacity (can exceed 1).")
    window_s: float = Field(ge=0, le=3600, description="Smoothing window (median).")


class AttentionPayload(_Payload):
    """``data`` of an ``attention`` event: the class's share of faces facing the front."""

    faces: int = Field(ge=0, le=10_000, description="Faces whose pose was estimated.")
    facing_front: int = Field(ge=0, le=10_000)
    share: float | None = Field(ge=0.0, le=1.0,
                                description="Mean facing-front share over window_s (None: "
                                            "no face).")
    window_s: float = Field(ge=0, le=3600)
    students: dict[str, bool] | None = Field(
        default=None, max_length=1000,
        description="Per named student: facing the front (only with "
                    "events.attention_per_student = true; personal data about minors).")


PAYLOADS: dict[str, type[_Payload]] = {
    **dict.fromkeys(ALERT_KINDS, AlertPayload),
    "occupancy": OccupancyPayload,
    "attention": AttentionPayload,
}


class UnsupportedVersionError(ValueError):
    """A message whose schema version this side does not read (dead-lettered, not a crash)."""


def event_version(raw: bytes | str) -> int | None:
    """The ``v`` of an event document without validating the rest (None: no readable v)."""
    import json

    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    v = doc.get("v", 1) if isinstance(doc, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def parse_event(raw: bytes | str) -> Event:
    """Validate an event from JSON: :class:`UnsupportedVersionError` for a version this side
    does not read (with the reason), pydantic's ValidationError for anything else wrong."""
    try:
        return Event.model_validate_json(raw)  # one parse when valid (v is then 1 or 2)
    except ValidationError:
        v = event_version(raw)
        if v is not None and v not in EVENT_SCHEMA_VERSIONS:
            raise UnsupportedVersionError(
                f"event schema version {v} is not supported (this side reads "
                f"{', '.join(map(str, EVENT_SCHEMA_VERSIONS))})") from None
        raise


class Event(BaseModel):
    """One versioned event, the same over MQTT and HTTP.

    The schema's fields: event id = ``key``, type = ``kind``, time = ``at``, device =
    ``device_id``, room = ``room_id``, session = ``session_id`` (``<course_id>@<date>``, None
    outside a class), payload = ``data`` (validated against the kind's payload model from v2
    on), schema version = ``v``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    v: Literal[1, 2] = Field(default=EVENT_SCHEMA_VERSION, description="Event schema version.")
    key: uuid.UUID = Field(default_factory=uuid.uuid4, description="Idempotency key.")
    device_id: Identifier
    room_id: Identifier
    kind: EventKind
    severity: Severity = "warning"
    message: str = Field(max_length=500)
    at: AwareDatetime
    session_id: SessionId | None = Field(
        default=None, description="The class session: <course_id>@<YYYY-MM-DD> (v2).")
    data: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _payload_matches_kind(self) -> Event:
        if self.v == 1:
            if self.session_id is not None:
                raise ValueError("session_id needs event schema version 2")
            return self
        model = PAYLOADS.get(self.kind)
        if model is not None:
            try:
                model.model_validate(self.data)
            except ValidationError as err:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'data'}: {e['msg']}"
                    for e in err.errors(include_url=False)[:5])
                raise ValueError(f"data is not a {self.kind} payload ({problems})") from None
        return self


def make_session_id(course_id: str | None, day: date) -> str | None:
    """The session id of a class: ``<course_id>@<YYYY-MM-DD>`` (None without a class)."""
    return None if course_id is None else f"{course_id}@{day.isoformat()}"


class UnknownFaceReport(Message):
    """`POST /api/v1/unknown-faces`: one unrecognised track's small crop and descriptor (sent
    only when the device's ``unknown_faces.enabled`` and the aggregator's
    ``unknown_faces_enabled`` are both on)."""

    key: uuid.UUID = Field(default_factory=uuid.uuid4, description="Idempotency key.")
    device_id: Identifier
    room_id: Identifier
    at: AwareDatetime = Field(description="When the track was first seen.")
    descriptor: Embedding
    embedder: str = Field(default=LEGACY_EMBEDDER, max_length=100,
                          description="`name/model_version` that made `descriptor`.")
    crop_jpeg: str = Field(max_length=200_000, description="Base64 JPEG of the face, small.")


class RosterEntry(BaseModel):
    student_id: Identifier
    name: str = Field(max_length=200)
    embeddings: list[Embedding] = Field(description="One or more 128-d face descriptors.")
    negatives: list[Embedding] = Field(
        default_factory=list, max_length=100,
        description="Descriptors that are NOT this student (recognitions a teacher marked "
        "wrong): a face closer to one of them than to the student is not given to the student.",
    )


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
    embedder: str = Field(
        default=LEGACY_EMBEDDER, max_length=100,
        description="`name/model_version` of the embedder that made the rosters' descriptors "
        "(the `embedder` query parameter); a device refuses rosters of another embedder.",
    )


MAX_SCHEDULE_DAYS = 15  # today and up to 14 next school days


class ScheduleDay(BaseModel):
    """One day of a room's :class:`ScheduleWindow`."""

    model_config = ConfigDict(extra="forbid")
    date: date
    sessions: list[ClassSession] = Field(description="Every class in the room that day.")


class ScheduleWindow(Message):
    """`GET /api/v1/schedule/days?room_id=...&days=N`: today and the room's next N school days
    (days with a class, within 31 days), with the roster of every course in them once."""

    room_id: Identifier
    timezone: str
    generated_at: AwareDatetime
    embedder: str = Field(default=LEGACY_EMBEDDER, max_length=100,
                          description="`name/model_version` of the rosters' descriptors.")
    days: list[ScheduleDay] = Field(min_length=1, max_length=MAX_SCHEDULE_DAYS,
                                    description="Today first, then the next school days.")
    rosters: dict[str, list[RosterEntry]] = Field(
        description="Enrolled students (with embeddings) per course_id of the days' sessions."
    )

    def per_day(self) -> list[ScheduleResponse]:
        """One :class:`ScheduleResponse` per day, each with its courses' rosters (what the
        device caches and reads by day)."""
        out = []
        for i, day in enumerate(self.days):
            courses = {s.course_id for s in day.sessions}
            current = None
            if i == 0:
                current = next((s.course_id for s in day.sessions
                                if s.starts_at <= self.generated_at < s.ends_at), None)
            out.append(ScheduleResponse(
                room_id=self.room_id, date=day.date, timezone=self.timezone,
                generated_at=self.generated_at, current_course_id=current,
                sessions=day.sessions, embedder=self.embedder,
                rosters={c: self.rosters.get(c, []) for c in sorted(courses)}))
        return out


def topic_base(site: str, room: str, device: str) -> str:
    return f"classroom/{site}/{room}/{device}"


def device_topic(site: str, room: str, device: str, leaf: str) -> str:
    """`classroom/<site>/<room>/<device>/<leaf>`, leaf in attendance|ack|heartbeat|events|status."""
    return f"{topic_base(site, room, device)}/{leaf}"


def roster_topic(site: str, room: str) -> str:
    """Retained: a roster/schedule change for the room (payload: {"v":1,"etag": ...})."""
    return f"classroom/{site}/{room}/roster"

