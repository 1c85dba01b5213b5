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
from cloud_sync.aggregator.services.admin import (
    commit_or_conflict,
    require_row,
    resolve_overlaps,
)
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


FIELD_WORDS = {"id": "id", "name": "name", "student_id": "student id",
               "course_id": "course id", "room_id": "room id", "weekday": "weekday",
               "start_time": "start time", "end_time": "end time", "timezone": "time zone",
               "effective_from": "first day", "effective_to": "last day", "site": "site",
               "email": "email", "consent": "consent"}


def _plain(item: Any) -> str:
    """One pydantic error in words an office can act on (never "String should match
    pattern ..."): what is wrong with the value and what is expected."""
    kind = item["type"]
    value = item.get("input")
    shown = f" “{value}”" if isinstance(value, str | int | float) and value != "" else ""
    ctx = item.get("ctx") or {}
    if kind == "missing" or (kind == "string_too_short" and not value):
        return "is empty"
    if kind == "string_pattern_mismatch":
        return (f"{shown.strip()} may use only letters, digits, “.”, “_” and “-” "
                "(no spaces)").strip()
    if kind == "string_too_long":
        return f"is longer than {ctx.get('max_length')} characters"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{shown.strip()} is not a whole number".strip()
    if kind in ("greater_than_equal", "less_than_equal"):
        return f"{shown.strip()} is out of range".strip()
    if kind in ("date_parsing", "date_from_datetime_parsing", "date_type"):
        return f"{shown.strip()} is not a date: write YYYY-MM-DD, e.g. 2026-09-01".strip()
    if kind == "extra_forbidden":
        return "is not a column of this file"
    message = str(item["msg"])
    return message.removeprefix("Value error, ")


def plain_errors(err: ValidationError) -> dict[str, str]:
    """Per field (``row`` for the row as a whole), the plain reason its value was refused."""
    out: dict[str, str] = {}
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "row"
        out.setdefault(field, _plain(item))
    return out


def validation_message(err: ValidationError) -> str:
    parts = []
    for field, message in plain_errors(err).items():
        parts.append(message if field == "row" else f"{FIELD_WORDS.get(field, field)} {message}")
    return "; ".join(parts)


def import_csv(session: Session, kind: str, text: str, default_tz: str = "UTC",
               actor: str = "csv-import") -> ImportReport:
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
    parsed: list[tuple[int, BaseModel, bool]] = []
    consents: dict[int, str] = {}  # students' optional consent column, by line
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
            replace = (str(raw.get("replace") or "").strip().lower()
                       if kind == "schedules" else "")
            if replace not in REPLACE_WORDS:
                report.errors.append(RowError(row=line, error=(
                    f"replace: {replace!r} is not yes or no")))
                continue
            consent = (str(raw.get("consent") or "").strip().lower()
                       if kind == "students" else "")
            if consent not in CONSENT_WORDS:
                report.errors.append(RowError(row=line, error=(
                    f"consent “{consent}” is not granted (or yes), withdrawn, or empty")))
                continue
            if CONSENT_WORDS[consent]:
                consents[line] = CONSENT_WORDS[consent]
            try:
                parsed.append((line, schema.model_validate(values), REPLACE_WORDS[replace]))
            except ValidationError as err:
                report.errors.append(RowError(row=line, error=validation_message(err)))
    except csv.Error as err:
        raise ServiceError(f"malformed CSV at line {reader.line_num}: {err}") from err
    parsed = _without_duplicates(kind, parsed, report)
    begin_write(session)
    apply = _APPLY[kind]
    for line, item, replace in parsed:
        try:
            with session.begin_nested():
                outcome = (_apply_schedule(session, item, replace)  # type: ignore[arg-type]
                           if kind == "schedules" else apply(session, item, default_tz))
                if line in consents and _consent(session, item, consents[line], actor):
                    outcome = "updated" if outcome == "unchanged" else outcome
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


# students' optional ``consent`` column: the signed forms of a whole class in one file
CONSENT_WORDS = {"": None, "granted": "granted", "yes": "granted", "withdrawn": "withdrawn"}


def _consent(session: Session, item: Any, state: str, actor: str) -> bool:
    """Record the line's consent state if it changes anything (a withdrawal deletes the
    student's face data, as everywhere). True when it changed."""
    from cloud_sync.aggregator.services import privacy

    student = session.get(Student, item.id)
    if student is None or student.consent == state:
        return False
    privacy.apply_consent(session, item.id, state, actor, "CSV import")  # type: ignore[arg-type]
    return True


DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
KEYS = {"students": ("id",), "courses": ("id",), "rooms": ("id",),
        "enrollments": ("student_id", "course_id"),
        "schedules": ("course_id", "room_id", "weekday", "start_time")}


def _without_duplicates(kind: str, parsed: list[tuple[int, BaseModel, bool]],
                        report: ImportReport) -> list[tuple[int, BaseModel, bool]]:
    """Lines of one file with the same key (a student id twice, one class twice) but other
    values are all refused, each naming the others: which one is right is the office's call,
    and importing one of them would silently overwrite the other. A line repeated exactly
    is imported once (the repeat counts as unchanged)."""
    fields = KEYS[kind]
    lines: dict[tuple[object, ...], list[tuple[int, BaseModel]]] = {}
    for line, item, _replace in parsed:
        lines.setdefault(tuple(getattr(item, f) for f in fields), []).append((line, item))
    kept = []
    for line, item, replace in parsed:
        key = tuple(getattr(item, f) for f in fields)
        same_key = lines[key]
        if all(other == item for _, other in same_key):
            kept.append((line, item, replace))  # alone, or an exact repeat (unchanged the 2nd time)
            continue
        others = [n for n, _ in same_key if n != line]
        if kind == "schedules":
            what = f"the class {key[0]} in {key[1]} on {DAY_NAMES[key[2]]} at {key[3]:%H:%M}"
        else:
            what = " and ".join(f"{FIELD_WORDS.get(f, f)} “{v}”"
                                for f, v in zip(fields, key, strict=True))
        lines_word = "line" if len(others) == 1 else "lines"
        report.errors.append(RowError(row=line, error=(
            f"{what} is also on {lines_word} {', '.join(map(str, others))} of this file: "
            "none of them is imported (keep one and import again)")))
    return kept


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


def _apply_schedule(session: Session, item: ScheduleIn, replace: bool = False) -> str:
    """A new slot (an identical one is "unchanged"); one that overlaps another class in the
    room is refused with the other class's name unless the row says ``replace``."""
    require_row(session, Course, item.course_id, "course")
    require_row(session, Room, item.room_id, "room")
    values = item.model_dump()
    same = session.scalars(select(Schedule.id).where(and_(
        *[getattr(Schedule, k) == v if v is not None else getattr(Schedule, k).is_(None)
          for k, v in values.items()]
    ))).first()
    if same is not None:
        return "unchanged"
    item, _ = resolve_overlaps(session, item, None, replace)
    session.add(Schedule(**item.model_dump()))
    session.flush()
    return "created"


_APPLY: dict[str, Callable[[Session, Any, str], str]] = {
    "students": _upsert(Student, ("name", "email")),
    "courses": _upsert(Course, ("name",)),
    "rooms": _upsert(Room, ("name", "site", "timezone")),
    "enrollments": _apply_enrollment,
    "schedules": lambda session, item, _tz: _apply_schedule(session, item),
}
REPLACE_WORDS = {"": False, "no": False, "false": False, "0": False,
                 "yes": True, "true": True, "1": True, "replace": True}
