"""The admin API's request and answer models (students, courses, rooms, enrollments,
schedules, devices), shared by the API, the console, the CLI and the CSV import."""

from __future__ import annotations

import difflib
import re
from datetime import date, datetime, time
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from cloud_sync.aggregator.services.common import ServiceError
from cloud_sync.aggregator.services.timetable import valid_zone
from cloud_sync.protocol import DeviceId, Identifier

Name = Annotated[str, Field(min_length=1, max_length=200)]
WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(
            isinstance(v, str) and "\x00" in v for v in data.values()
        ):
            raise ValueError("text must not contain NUL characters")
        return data


def _drop_null_defaults(schema: dict[str, Any]) -> None:
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None and "anyOf" not in prop:
            del prop["default"]


class Patch(Strict):
    """A partial update: a field left out is unchanged; a field that cannot be empty is not
    nullable either (null there is a 422, as the schema says)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True,
                              json_schema_extra=_drop_null_defaults)


class StudentIn(Strict):
    id: Identifier = Field(description="Student id, e.g. S001.")
    name: Name
    email: str | None = Field(default=None, max_length=254)


class StudentPatch(Patch):
    name: Name = None  # type: ignore[assignment]
    email: str | None = Field(default=None, max_length=254)


class StudentOut(BaseModel):
    id: str
    name: str
    email: str | None
    created_at: datetime
    consent: str | None = Field(default=None, description="Consent to face recognition: "
                                "granted, withdrawn, or null (never recorded).")
    consent_at: datetime | None = None


class CourseIn(Strict):
    id: Identifier
    name: Name


class CoursePatch(Patch):
    name: Name = None  # type: ignore[assignment]


class CourseOut(BaseModel):
    id: str
    name: str
    created_at: datetime


def _check_zone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return valid_zone(value)
    except ServiceError as err:
        raise ValueError(err.message) from err


class RoomIn(Strict):
    id: Identifier
    name: Name | None = Field(default=None, description="Defaults to the id.")
    site: Identifier = Field(default="main", description="Site (MQTT topics).")
    timezone: str | None = Field(default=None, description="IANA zone; default from settings.")

    _zone = field_validator("timezone")(_check_zone)


class RoomPatch(Patch):
    name: Name = None  # type: ignore[assignment]
    site: Identifier = None  # type: ignore[assignment]
    timezone: str = None  # type: ignore[assignment]

    _zone = field_validator("timezone")(_check_zone)


class RoomOut(BaseModel):
    id: str
    name: str
    site: str
    timezone: str
    created_at: datetime


class EnrollmentIn(Strict):
    student_id: Identifier
    course_id: Identifier


class EnrollmentOut(BaseModel):
    student_id: str
    course_id: str
    created_at: datetime


def _weekday(value: Any) -> Any:
    """``Mon``, ``monday``, ``0``...``6`` (0 = Monday); a typo is refused in words, with the
    nearest day when there is one ("“Mnday” is not a weekday: Mon?")."""
    if isinstance(value, str):
        text = value.strip().lower()
        names = {f"{d}{tail}": d for d in WEEKDAYS for tail in ("", _DAY_TAILS[d])}
        if len(text) >= 3 and text[:3] in WEEKDAYS and f"{text[:3]}{_DAY_TAILS[text[:3]]}"\
                .startswith(text):  # mon, tues, thurs, wednesday
            return WEEKDAYS[text[:3]]
        if not text.isdigit():
            near = difflib.get_close_matches(text, list(names), n=1, cutoff=0.6)
            hint = f" (did you mean {names[near[0]].title()}?)" if near else ""
            raise ValueError(f"“{value.strip()}” is not a weekday{hint}: write Mon, Tue, Wed, "
                             "Thu, Fri, Sat, Sun, or 0-6 (0 = Monday)")
    return value


_DAY_TAILS = {"mon": "day", "tue": "sday", "wed": "nesday", "thu": "rsday", "fri": "day",
              "sat": "urday", "sun": "day"}


LOCAL_TIME_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$"


def _local_time(value: Any) -> Any:
    """A wall-clock time of the room's zone: ``HH:MM`` or ``HH:MM:SS``, never with an offset
    (a fixed offset would be wrong half the year in a zone with summer time)."""
    if isinstance(value, time) and value.tzinfo is None:
        return value
    if isinstance(value, str) and re.fullmatch(LOCAL_TIME_PATTERN, value.strip()):
        return value.strip()
    raise ValueError(f"“{value}” is not a time of day: write HH:MM, 24 h (e.g. 09:00 or 14:30),"
                     " in the room's local time without an offset (schedules follow the room's"
                     " zone, summer time included)")


LocalTime = Annotated[
    time, BeforeValidator(_local_time),
    WithJsonSchema({"type": "string", "pattern": LOCAL_TIME_PATTERN, "example": "09:00",
                    "description": "Room-local time HH:MM[:SS], no offset."}),
]


class ScheduleIn(Strict):
    course_id: Identifier
    room_id: Identifier
    weekday: int = Field(ge=0, le=6, description="0 = Monday ... 6 = Sunday (or 'Mon'...).")
    start_time: LocalTime = Field(description="Local start time (room time zone), HH:MM.")
    end_time: LocalTime = Field(description="Local end time, after start_time.")
    effective_from: date | None = None
    effective_to: date | None = None

    _wd = field_validator("weekday", mode="before")(_weekday)

    @model_validator(mode="after")
    def _order(self) -> ScheduleIn:
        if self.end_time <= self.start_time:
            raise ValueError("end_time must be after start_time")
        if self.effective_from and self.effective_to and self.effective_to < self.effective_from:
            raise ValueError("effective_to is before effective_from")
        return self


class SchedulePatch(Patch):
    course_id: Identifier = None  # type: ignore[assignment]
    room_id: Identifier = None  # type: ignore[assignment]
    weekday: int = Field(default=None, ge=0, le=6)  # type: ignore[assignment]
    start_time: LocalTime = None  # type: ignore[assignment]
    end_time: LocalTime = None  # type: ignore[assignment]
    effective_from: date | None = None
    effective_to: date | None = None

    _wd = field_validator("weekday", mode="before")(_weekday)


class ScheduleOut(BaseModel):
    id: int
    course_id: str
    room_id: str
    weekday: int
    start_time: LocalTime
    end_time: LocalTime
    effective_from: date | None
    effective_to: date | None


class DeviceIn(Strict):
    room_id: Identifier
    id: DeviceId | None = Field(
        default=None, description="Default: generated from the room. Not `aggregator` nor "
        "`homeassistant` (reserved: MQTT users of the bridge and of Home Assistant), and not "
        "starting with `rec-` (the rooms' devices of recorded sessions).")


class DevicePatch(Strict):
    room_id: Identifier


class DeviceOut(BaseModel):
    id: str
    room_id: str
    created_at: datetime
    last_heartbeat_at: datetime | None
    software_version: str | None
    clock_offset_s: float | None
    refused_at: datetime | None = Field(
        None, description="The last contact refused although the device's key was valid.")
    refused_reason: str | None = Field(
        None, description="Why: `room_mismatch` (the device spoke for `refused_room`, not "
        "`room_id`; docs/OPERATIONS.md troubleshooting).")
    refused_room: str | None = Field(None, description="The room the device said it was in.")


class DeviceCreated(DeviceOut):
    api_key: str = Field(description="Shown once; only its hash is stored.")
