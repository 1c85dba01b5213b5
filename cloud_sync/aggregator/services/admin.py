"""Admin create/read/update/delete of students, courses, rooms, enrollments, schedules and
devices (the models: :mod:`admin_schemas`; bulk CSV import: :mod:`csv_import`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select
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
from cloud_sync.aggregator.services.admin_schemas import (
    CourseOut,
    DeviceOut,
    EnrollmentIn,
    EnrollmentOut,
    RoomOut,
    ScheduleIn,
    ScheduleOut,
    SchedulePatch,
    StudentOut,
)
from cloud_sync.aggregator.services.common import (
    ConflictError,
    NotFoundError,
    ServiceError,
    utcnow,
)
from cloud_sync.aggregator.services.timetable import zone
from cloud_sync.classes import WeeklySlot, describe, remainder, slots_collide


def _out(model: type[BaseModel], row: Any) -> Any:
    return model.model_validate(row, from_attributes=True)


def require_row(session: Session, model: type, key: str, what: str) -> None:
    if session.get(model, key) is None:
        raise NotFoundError(f"{what} {key!r} does not exist")


def commit_or_conflict(session: Session, commit: bool = True) -> None:
    """Commit (``commit=False``: flush only, the caller adds to the transaction and commits);
    a constraint refusal is a ConflictError (rolled back)."""
    try:
        if commit:
            session.commit()
        else:
            session.flush()
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


def create_row(session: Session, kind: str, data: BaseModel, default_tz: str = "UTC",
               *, commit: bool = True) -> Any:
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
    commit_or_conflict(session, commit)
    return _out(out, row)


def update_row(session: Session, kind: str, key: str, patch: BaseModel) -> Any:
    model, out = SIMPLE[kind]
    begin_write(session)
    row = session.get(model, key)
    if row is None:
        raise NotFoundError(f"{kind[:-1]} {key!r} does not exist")
    changes = patch.model_dump(exclude_unset=True)
    if kind == "devices" and "room_id" in changes:
        require_row(session, Room, changes["room_id"], "room")
    for name, value in changes.items():
        if value is None and name not in {"email"}:
            raise ServiceError(f"{name} cannot be null")
        setattr(row, name, value)
    commit_or_conflict(session)
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
    commit_or_conflict(session)


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
    require_row(session, Student, data.student_id, "student")
    require_row(session, Course, data.course_id, "course")
    if session.get(Enrollment, (data.student_id, data.course_id)) is not None:
        raise ConflictError("already enrolled")
    row = Enrollment(student_id=data.student_id, course_id=data.course_id, created_at=utcnow())
    session.add(row)
    commit_or_conflict(session)
    return _out(EnrollmentOut, row)


def delete_enrollment(session: Session, student_id: str, course_id: str) -> None:
    begin_write(session)
    row = session.get(Enrollment, (student_id, course_id))
    if row is None:
        raise NotFoundError("no such enrollment")
    session.delete(row)
    commit_or_conflict(session)


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


def _slot(row: Schedule | ScheduleIn) -> WeeklySlot:
    return WeeklySlot(row.weekday, row.start_time, row.end_time, row.effective_from,
                      row.effective_to)


def resolve_overlaps(session: Session, data: ScheduleIn, exclude_id: int | None = None,
                     replace: bool = False) -> tuple[ScheduleIn, list[str]]:
    """Refuse a slot that would overlap another class in its room (one rule:
    :func:`cloud_sync.classes.slots_collide`), naming the other class; with ``replace``, take
    the new slot's days from the colliding slots instead (each keeps what lies outside them;
    a new slot without ``effective_from`` starts today, so the past stays as it was).
    Returns the (possibly dated) slot and what was replaced, in words."""
    new = _slot(data)
    clashes = [
        (row, name) for row, name in session.execute(
            select(Schedule, Course.name).join(Course, Course.id == Schedule.course_id)
            .where(Schedule.room_id == data.room_id, Schedule.weekday == data.weekday)
            .order_by(Schedule.start_time, Schedule.id))
        if row.id != exclude_id and slots_collide(new, _slot(row))
    ]
    if not clashes:
        return data, []
    if not replace:
        row, name = clashes[0]
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise ConflictError(
            f"{data.room_id} already has {name} ({row.course_id}) {describe(_slot(row))} "
            f"(schedule {row.id}){more}: choose another time or room, or replace it")
    if data.effective_from is None:
        room = session.get(Room, data.room_id)
        today = utcnow().astimezone(zone(room.timezone if room else "UTC")).date()
        data = data.model_copy(update={"effective_from": today})
        new = _slot(data)
    replaced: list[str] = []
    for row, name in clashes:
        if not slots_collide(new, _slot(row)):
            continue  # only in the past, before the new slot starts
        replaced.append(f"{name} ({row.course_id}) {describe(_slot(row))}")
        parts = remainder(_slot(row), data.effective_from, data.effective_to)
        if not parts:
            session.delete(row)
            continue
        row.effective_from, row.effective_to = parts[0].effective_from, parts[0].effective_to
        for part in parts[1:]:
            session.add(Schedule(course_id=row.course_id, room_id=row.room_id,
                                 weekday=row.weekday, start_time=row.start_time,
                                 end_time=row.end_time, effective_from=part.effective_from,
                                 effective_to=part.effective_to))
    session.flush()
    return data, replaced


def create_schedule(session: Session, data: ScheduleIn, replace: bool = False) -> ScheduleOut:
    """Add a slot; an overlap in the room is refused (409) unless ``replace``."""
    return create_schedule_replacing(session, data, replace)[0]


def create_schedule_replacing(session: Session, data: ScheduleIn, replace: bool = False, *,
                              commit: bool = True) -> tuple[ScheduleOut, list[str]]:
    """:func:`create_schedule`, with what the new slot replaced (in words); ``commit=False``:
    the caller commits (one transaction with its audit entry)."""
    begin_write(session)
    require_row(session, Course, data.course_id, "course")
    require_row(session, Room, data.room_id, "room")
    data, replaced = resolve_overlaps(session, data, None, replace)
    row = Schedule(**data.model_dump())
    session.add(row)
    commit_or_conflict(session, commit)
    return _out(ScheduleOut, row), replaced


def update_schedule(session: Session, schedule_id: int, patch: SchedulePatch,
                    replace: bool = False, *, commit: bool = True) -> ScheduleOut:
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
    require_row(session, Course, checked.course_id, "course")
    require_row(session, Room, checked.room_id, "room")
    checked, _ = resolve_overlaps(session, checked, schedule_id, replace)
    for name, value in checked.model_dump().items():
        setattr(row, name, value)
    commit_or_conflict(session, commit)
    return _out(ScheduleOut, row)


def delete_schedule(session: Session, schedule_id: int) -> None:
    begin_write(session)
    row = session.get(Schedule, schedule_id)
    if row is None:
        raise NotFoundError(f"schedule {schedule_id} does not exist")
    session.delete(row)
    commit_or_conflict(session)
