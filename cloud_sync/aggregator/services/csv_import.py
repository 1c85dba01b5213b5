"""Bulk import of students, courses, rooms, enrollments and schedules from CSV: every bad
row is reported with its line and reason, the good rows are imported."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_sync.aggregator.db.models import Course, Enrollment, Room, Schedule, Student
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services.admin import commit_or_conflict, require_row
from cloud_sync.aggregator.services.admin_schemas import (
    CourseIn,
    EnrollmentIn,
    RoomIn,
    ScheduleIn,
    StudentIn,
)
from cloud_sync.aggregator.services.common import ServiceError, utcnow

_LOGGER = logging.getLogger(__name__)

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


def validation_message(err: ValidationError) -> str:
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
                report.errors.append(RowError(row=line, error=validation_message(err)))
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
    commit_or_conflict(session)
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
    require_row(session, Student, item.student_id, "student")
    require_row(session, Course, item.course_id, "course")
    if session.get(Enrollment, (item.student_id, item.course_id)) is not None:
        return "unchanged"
    session.add(Enrollment(student_id=item.student_id, course_id=item.course_id,
                           created_at=utcnow()))
    session.flush()
    return "created"


def _apply_schedule(session: Session, item: ScheduleIn, _tz: str) -> str:
    require_row(session, Course, item.course_id, "course")
    require_row(session, Room, item.room_id, "room")
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
