"""Admin create/read/update/delete of students, courses, rooms, enrollments, schedules, devices
and CSV bulk import of the first five (per-row errors, good rows imported)."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable
from datetime import date, datetime, time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_sync.aggregator.db.models import (
    Course,
    Device,
    Enrollment,
    Room,
    Schedule,
    Student,
)
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services.common import (
    ConflictError,
    NotFoundError,
    ServiceError,
    utcnow,
)
from cloud_sync.aggregator.services.timetable import valid_zone
from cloud_sync.protocol import DeviceId, Identifier

_LOGGER = logging.getLogger(__name__)
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
    if isinstance(value, str):
        text = value.strip().lower()
        if text[:3] in WEEKDAYS and (len(text) == 3 or text.endswith("day")):
            return WEEKDAYS[text[:3]]
    return value


LOCAL_TIME_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$"


def _local_time(value: Any) -> Any:
    """A wall-clock time of the room's zone: ``HH:MM`` or ``HH:MM:SS``, never with an offset
    (a fixed offset would be wrong half the year in a zone with summer time)."""
    if isinstance(value, time) and value.tzinfo is None:
        return value
    if isinstance(value, str) and re.fullmatch(LOCAL_TIME_PATTERN, value.strip()):
        return value.strip()
    raise ValueError("a local time HH:MM or HH:MM:SS of the room's time zone, without an "
                     "offset (schedules follow the room's zone, summer time included)")


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
        "`homeassistant` (reserved: MQTT users of the bridge and of Home Assistant).")


class DevicePatch(Strict):
    room_id: Identifier


class DeviceOut(BaseModel):
    id: str
    room_id: str
    created_at: datetime
    last_heartbeat_at: datetime | None
    software_version: str | None
    clock_offset_s: float | None


class DeviceCreated(DeviceOut):
    api_key: str = Field(description="Shown once; only its hash is stored.")


def _out(model: type[BaseModel], row: Any) -> Any:
    return model.model_validate(row, from_attributes=True)


def _require(session: Session, model: type, key: str, what: str) -> None:
    if session.get(model, key) is None:
        raise NotFoundError(f"{what} {key!r} does not exist")


def _commit(session: Session) -> None:
    try:
        session.commit()
    except IntegrityError as err:
        session.rollback()
        raise ConflictError(f"conflicts with existing data: {err.orig}") from err


# ---- students / courses / rooms (string primary key) --------------------------------------

SIMPLE: dict[str, tuple[type, type[BaseModel]]] = {
    "students": (Student, StudentOut),
    "courses": (Course, CourseOut),
    "rooms": (Room, RoomOut),
    "devices": (Device, DeviceOut),
}


def list_rows(session: Session, kind: str, limit: int, offset: int) -> list[Any]:
    model, out = SIMPLE[kind]
    rows = session.scalars(select(model).order_by(model.id).limit(limit).offset(offset)).all()
    return [_out(out, r) for r in rows]


def get_row(session: Session, kind: str, key: str) -> Any:
    model, out = SIMPLE[kind]
    row = session.get(model, key)
    if row is None:
        raise NotFoundError(f"{kind[:-1]} {key!r} does not exist")
    return _out(out, row)


def create_row(session: Session, kind: str, data: BaseModel, default_tz: str = "UTC") -> Any:
    model, out = SIMPLE[kind]
    begin_write(session)
    values = data.model_dump()
    if session.get(model, values["id"]) is not None:
        raise ConflictError(f"{kind[:-1]} {values['id']!r} already exists")
    if kind == "rooms":
        values["name"] = values["name"] or values["id"]
        values["timezone"] = values["timezone"] or default_tz
    row = model(**values, created_at=utcnow())
    session.add(row)
    _commit(session)
    return _out(out, row)


def update_row(session: Session, kind: str, key: str, patch: BaseModel) -> Any:
    model, out = SIMPLE[kind]
    begin_write(session)
    row = session.get(model, key)
    if row is None:
        raise NotFoundError(f"{kind[:-1]} {key!r} does not exist")
    changes = patch.model_dump(exclude_unset=True)
    if kind == "devices" and "room_id" in changes:
        _require(session, Room, changes["room_id"], "room")
    for name, value in changes.items():
        if value is None and name not in {"email"}:
            raise ServiceError(f"{name} cannot be null")
        setattr(row, name, value)
    _commit(session)
    return _out(out, row)


def delete_row(session: Session, kind: str, key: str) -> None:
    model, _ = SIMPLE[kind]
    begin_write(session)
    row = session.get(model, key)
    if row is None:
        raise NotFoundError(f"{kind[:-1]} {key!r} does not exist")
    session.delete(row)
    try:
        session.flush()
    except IntegrityError as err:
        session.rollback()
        raise ConflictError(
            f"{kind[:-1]} {key!r} is still referenced (attendance, devices, ...)"
        ) from err
    _commit(session)


# ---- enrollments ---------------------------------------------------------------------------

def list_enrollments(
    session: Session, course_id: str | None, student_id: str | None, limit: int, offset: int
) -> list[EnrollmentOut]:
    query = select(Enrollment).order_by(Enrollment.course_id, Enrollment.student_id)
    if course_id:
        query = query.where(Enrollment.course_id == course_id)
    if student_id:
        query = query.where(Enrollment.student_id == student_id)
    return [_out(EnrollmentOut, r) for r in session.scalars(query.limit(limit).offset(offset))]


def create_enrollment(session: Session, data: EnrollmentIn) -> EnrollmentOut:
    begin_write(session)
    _require(session, Student, data.student_id, "student")
    _require(session, Course, data.course_id, "course")
    if session.get(Enrollment, (data.student_id, data.course_id)) is not None:
        raise ConflictError("already enrolled")
    row = Enrollment(student_id=data.student_id, course_id=data.course_id, created_at=utcnow())
    session.add(row)
    _commit(session)
    return _out(EnrollmentOut, row)


def delete_enrollment(session: Session, student_id: str, course_id: str) -> None:
    begin_write(session)
    row = session.get(Enrollment, (student_id, course_id))
    if row is None:
        raise NotFoundError("no such enrollment")
    session.delete(row)
    _commit(session)


# ---- schedules -----------------------------------------------------------------------------

def list_schedules(
    session: Session, room_id: str | None, course_id: str | None, limit: int, offset: int
) -> list[ScheduleOut]:
    query = select(Schedule).order_by(Schedule.id)
    if room_id:
        query = query.where(Schedule.room_id == room_id)
    if course_id:
        query = query.where(Schedule.course_id == course_id)
    return [_out(ScheduleOut, r) for r in session.scalars(query.limit(limit).offset(offset))]


def get_schedule(session: Session, schedule_id: int) -> ScheduleOut:
    row = session.get(Schedule, schedule_id)
    if row is None:
        raise NotFoundError(f"schedule {schedule_id} does not exist")
    return _out(ScheduleOut, row)


def create_schedule(session: Session, data: ScheduleIn) -> ScheduleOut:
    begin_write(session)
    _require(session, Course, data.course_id, "course")
    _require(session, Room, data.room_id, "room")
    row = Schedule(**data.model_dump())
    session.add(row)
    _commit(session)
    return _out(ScheduleOut, row)


def update_schedule(session: Session, schedule_id: int, patch: SchedulePatch) -> ScheduleOut:
    begin_write(session)
    row = session.get(Schedule, schedule_id)
    if row is None:
        raise NotFoundError(f"schedule {schedule_id} does not exist")
    merged = _out(ScheduleOut, row).model_dump() | patch.model_dump(exclude_unset=True)
    merged.pop("id")
    try:
        checked = ScheduleIn.model_validate(merged)
    except ValidationError as err:
        raise ServiceError(str(err.errors()[0]["msg"])) from err
    _require(session, Course, checked.course_id, "course")
    _require(session, Room, checked.room_id, "room")
    for name, value in checked.model_dump().items():
        setattr(row, name, value)
    _commit(session)
    return _out(ScheduleOut, row)


def delete_schedule(session: Session, schedule_id: int) -> None:
    begin_write(session)
    row = session.get(Schedule, schedule_id)
    if row is None:
        raise NotFoundError(f"schedule {schedule_id} does not exist")
    session.delete(row)
    _commit(session)


# ---- CSV import ----------------------------------------------------------------------------

ImportKind = Literal["students", "courses", "rooms", "enrollments", "schedules"]


class RowError(BaseModel):
    row: int = Field(description="Line number in the file (the header is line 1).")
    error: str


class ImportReport(BaseModel):
    kind: str
    rows: int = Field(description="Data rows read.")
    created: int
    updated: int
    unchanged: int
    errors: list[RowError]


REQUIRED = {
    "students": {"id", "name"},
    "courses": {"id", "name"},
    "rooms": {"id"},
    "enrollments": {"student_id", "course_id"},
    "schedules": {"course_id", "room_id", "weekday", "start_time", "end_time"},
}
SCHEMAS: dict[str, type[BaseModel]] = {
    "students": StudentIn, "courses": CourseIn, "rooms": RoomIn,
    "enrollments": EnrollmentIn, "schedules": ScheduleIn,
}


def _validation_message(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "row"
        parts.append(f"{field}: {item['msg']}")
    return "; ".join(parts)


def import_csv(session: Session, kind: str, text: str, default_tz: str = "UTC") -> ImportReport:
    """Import ``text`` (CSV with a header row); every bad row is reported, the others kept."""
    if kind not in REQUIRED:
        raise ServiceError(f"unknown import kind {kind!r}")
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    try:
        fieldnames = reader.fieldnames or []
    except csv.Error as err:  # e.g. a header field over csv.field_size_limit() (128 KiB)
        raise ServiceError(f"malformed CSV header: {err}") from err
    header = {h.strip() for h in fieldnames if h}
    missing = REQUIRED[kind] - header
    if missing:
        raise ServiceError(f"CSV header lacks column(s): {', '.join(sorted(missing))}")
    schema = SCHEMAS[kind]
    allowed = set(schema.model_fields)
    report = ImportReport(kind=kind, rows=0, created=0, updated=0, unchanged=0, errors=[])
    parsed: list[tuple[int, BaseModel]] = []
    try:
        for raw in reader:
            report.rows += 1
            line = reader.line_num
            values = {
                k.strip(): (v.strip() if isinstance(v, str) else v)
                for k, v in raw.items() if k is not None and k.strip() in allowed
            }
            if None in raw:
                report.errors.append(RowError(row=line, error="more fields than header columns"))
                continue
            values = {k: v for k, v in values.items() if v not in ("", None)}
            try:
                parsed.append((line, schema.model_validate(values)))
            except ValidationError as err:
                report.errors.append(RowError(row=line, error=_validation_message(err)))
    except csv.Error as err:
        raise ServiceError(f"malformed CSV at line {reader.line_num}: {err}") from err
    begin_write(session)
    apply = _APPLY[kind]
    for line, item in parsed:
        try:
            with session.begin_nested():
                outcome = apply(session, item, default_tz)
        except (ServiceError, IntegrityError) as err:
            message = err.message if isinstance(err, ServiceError) else "conflicts with data"
            report.errors.append(RowError(row=line, error=message))
            continue
        setattr(report, outcome, getattr(report, outcome) + 1)
    _commit(session)
    report.errors.sort(key=lambda e: e.row)
    _LOGGER.info("import %s: %d rows, %d created, %d updated, %d errors", kind, report.rows,
                 report.created, report.updated, len(report.errors))
    return report


def _upsert(model: type, fields: tuple[str, ...]) -> Callable[[Session, Any, str], str]:
    def apply(session: Session, item: Any, default_tz: str) -> str:
        values = item.model_dump()
        if model is Room:
            values["name"] = values["name"] or values["id"]
        row = session.get(model, values["id"])
        if row is None:
            if model is Room:
                values["timezone"] = values["timezone"] or default_tz
            session.add(model(**values, created_at=utcnow()))
            session.flush()
            return "created"
        changed = False
        for name in fields:
            value = values.get(name)
            if value is not None and getattr(row, name) != value:
                setattr(row, name, value)
                changed = True
        session.flush()
        return "updated" if changed else "unchanged"

    return apply


def _apply_enrollment(session: Session, item: EnrollmentIn, _tz: str) -> str:
    _require(session, Student, item.student_id, "student")
    _require(session, Course, item.course_id, "course")
    if session.get(Enrollment, (item.student_id, item.course_id)) is not None:
        return "unchanged"
    session.add(Enrollment(student_id=item.student_id, course_id=item.course_id,
                           created_at=utcnow()))
    session.flush()
    return "created"


def _apply_schedule(session: Session, item: ScheduleIn, _tz: str) -> str:
    _require(session, Course, item.course_id, "course")
    _require(session, Room, item.room_id, "room")
    values = item.model_dump()
    same = session.scalars(select(Schedule.id).where(and_(
        *[getattr(Schedule, k) == v if v is not None else getattr(Schedule, k).is_(None)
          for k, v in values.items()]
    ))).first()
    if same is not None:
        return "unchanged"
    session.add(Schedule(**values))
    session.flush()
    return "created"


_APPLY: dict[str, Callable[[Session, Any, str], str]] = {
    "students": _upsert(Student, ("name", "email")),
    "courses": _upsert(Course, ("name",)),
    "rooms": _upsert(Room, ("name", "site", "timezone")),
    "enrollments": _apply_enrollment,
    "schedules": _apply_schedule,
}
