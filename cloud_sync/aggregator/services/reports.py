"""Attendance reports: a course's day (present / late / absent), percentages per student per
course, and a student's history.

A student is *present* at a class when a record of theirs counts for the course (``course_id``,
decided on the corrected time at ingest) at a time in ``[start - early_arrival, end)``; *late*
when the first such record is more than ``late_after_min`` minutes after the start; *absent*
otherwise. The percentage is (present + late) / classes held, where classes held are the
scheduled occurrences in the date range that have started. Without a ``from``, a course
counts from its schedules' ``effective_from``, else from its creation or first recorded session
(``course_start``); the report says which.

Every report reads attendance through the console's corrections (``attendance_corrections``):
a record marked "not this student" does not count, a student marked present by hand counts
from the time given (see :func:`_sightings`).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from pydantic import BaseModel, Field
from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session

from cloud_sync.aggregator.db.models import (
    Attendance,
    AttendanceCorrection,
    Course,
    Enrollment,
    Schedule,
    Student,
)
from cloud_sync.aggregator.services.common import NotFoundError, ServiceError, utcnow
from cloud_sync.aggregator.services.timetable import Occurrence, course_timetable

MAX_RANGE_DAYS = 400


class StudentStatus(BaseModel):
    student_id: str
    name: str
    status: str = Field(description="present | late | absent")
    first_seen_at: datetime | None = None
    confidence: float | None = Field(
        default=None, description="Confidence of the first sighting (None: absent or by hand)."
    )
    source: str | None = Field(
        default=None, description="device | manual (marked present by hand); None: absent."
    )
    record_key: str | None = Field(
        default=None, description="Key of the first sighting's record (device sightings)."
    )


class SessionReport(BaseModel):
    course_id: str
    room_id: str
    starts_at: datetime
    ends_at: datetime
    present: int
    late: int
    absent: int
    students: list[StudentStatus]


class CourseDayReport(BaseModel):
    course_id: str
    course_name: str
    date: date
    late_after_min: float
    sessions: list[SessionReport]


class Percentage(BaseModel):
    student_id: str
    name: str
    course_id: str
    course_name: str
    held: int = Field(description="Classes held in the range (started).")
    present: int
    late: int
    absent: int
    percentage: float | None = Field(description="(present + late) / held * 100; None if none.")


COUNTED_FROM = Field(description="Which day classes held are counted from, and why (the "
                     "requested `from`, the schedules' effective_from, or the course's "
                     "creation / first recorded session).")


class CourseSummary(BaseModel):
    course_id: str
    course_name: str
    date_from: date
    date_to: date
    counted_from: str = COUNTED_FROM
    late_after_min: float
    students: list[Percentage]


class RecordOut(BaseModel):
    key: str
    course_id: str | None
    room_id: str
    device_id: str
    at: datetime
    seen_at: datetime
    confidence: float
    time_uncertain: bool
    correction: str


class StudentReport(BaseModel):
    student_id: str
    name: str
    date_from: date
    date_to: date
    counted_from: str = COUNTED_FROM
    courses: list[Percentage]
    records: list[RecordOut]


@dataclass(frozen=True)
class Rules:
    late_after_min: float
    early_arrival_min: float


@dataclass(frozen=True, slots=True)
class Sighting:
    """A time a student counts as seen for a course: a device record that no correction
    marked wrong, or a correction that marked the student present by hand."""

    at: datetime
    confidence: float | None
    key: str | None
    manual: bool


def _first(occ: Occurrence, seen: list[Sighting], rules: Rules) -> Sighting | None:
    lo = occ.starts_at - timedelta(minutes=rules.early_arrival_min)
    i = bisect.bisect_left(seen, lo, key=lambda s: s.at)
    if i >= len(seen) or seen[i].at >= occ.ends_at:
        return None
    return seen[i]


def _classify(occ: Occurrence, seen: list[Sighting], rules: Rules) -> tuple[str, Sighting | None]:
    first = _first(occ, seen, rules)
    if first is None:
        return "absent", None
    late = first.at > occ.starts_at + timedelta(minutes=rules.late_after_min)
    return ("late" if late else "present"), first


def _course(session: Session, course_id: str) -> Course:
    course = session.get(Course, course_id)
    if course is None:
        raise NotFoundError(f"course {course_id!r} does not exist")
    return course


def not_wrong() -> object:
    """SQL condition: the attendance row has no "not this student" correction."""
    return ~exists().where(and_(
        AttendanceCorrection.kind == "not_student",
        AttendanceCorrection.attendance_key == Attendance.key,
    ))


def _sightings(
    session: Session, course_id: str, lo: datetime, hi: datetime, student_id: str | None = None
) -> dict[str, list[Sighting]]:
    """Corrected sightings per student, sorted by time: device records minus those marked
    "not this student", plus the students marked present by hand."""
    query = select(Attendance.student_id, Attendance.at, Attendance.confidence,
                   Attendance.key).where(
        Attendance.course_id == course_id, Attendance.at >= lo, Attendance.at < hi, not_wrong()
    )
    manual = select(AttendanceCorrection.student_id, AttendanceCorrection.at).where(
        AttendanceCorrection.kind == "present", AttendanceCorrection.course_id == course_id,
        AttendanceCorrection.at >= lo, AttendanceCorrection.at < hi,
    )
    if student_id is not None:
        query = query.where(Attendance.student_id == student_id)
        manual = manual.where(AttendanceCorrection.student_id == student_id)
    out: dict[str, list[Sighting]] = defaultdict(list)
    for sid, at, confidence, key in session.execute(query):
        out[sid].append(Sighting(at, confidence, str(key), False))
    for sid, at in session.execute(manual):
        out[sid].append(Sighting(at, None, None, True))
    for seen in out.values():
        seen.sort(key=lambda s: (s.at, s.manual))
    return out


def _occurrences(session: Session, course_id: str, start: date, end: date) -> list[Occurrence]:
    table = course_timetable(session, course_id)
    out: list[Occurrence] = []
    day = start
    while day <= end:
        out.extend(table.occurrences(day))
        day += timedelta(days=1)
    return out


def course_day(session: Session, course_id: str, day: date, rules: Rules) -> CourseDayReport:
    course = _course(session, course_id)
    occurrences = _occurrences(session, course_id, day, day)
    students = session.execute(
        select(Student.id, Student.name).join(Enrollment, Enrollment.student_id == Student.id)
        .where(Enrollment.course_id == course_id).order_by(Student.id)
    ).all()
    sessions: list[SessionReport] = []
    if occurrences:
        lo = min(o.starts_at for o in occurrences) - timedelta(minutes=rules.early_arrival_min)
        hi = max(o.ends_at for o in occurrences)
        seen = _sightings(session, course_id, lo, hi)
        for occ in occurrences:
            rows = []
            for sid, name in students:
                status, first = _classify(occ, seen.get(sid, []), rules)
                rows.append(StudentStatus(
                    student_id=sid, name=name, status=status,
                    first_seen_at=first.at if first else None,
                    confidence=first.confidence if first else None,
                    source=None if first is None else ("manual" if first.manual else "device"),
                    record_key=first.key if first else None,
                ))
            sessions.append(SessionReport(
                course_id=course_id, room_id=occ.room_id, starts_at=occ.starts_at,
                ends_at=occ.ends_at, students=rows,
                present=sum(r.status == "present" for r in rows),
                late=sum(r.status == "late" for r in rows),
                absent=sum(r.status == "absent" for r in rows),
            ))
    return CourseDayReport(course_id=course_id, course_name=course.name, date=day,
                           late_after_min=rules.late_after_min, sessions=sessions)


def course_start(session: Session, course: Course) -> tuple[date, str]:
    """The first day a course's classes count from when no ``from`` is given: the schedules'
    ``effective_from`` when every slot has one, else the earliest of those, the day the course
    was created and its first recorded session (never a fixed span back: a course created today
    has held no class last month)."""
    starts = session.scalars(select(Schedule.effective_from)
                             .where(Schedule.course_id == course.id)).all()
    known = [d for d in starts if d is not None]
    if known and len(known) == len(starts):
        return min(known), "the schedules' effective_from"
    candidates = [(course.created_at.date(), "the course's creation")]
    first = session.scalar(select(func.min(Attendance.at)).where(Attendance.course_id == course.id))
    if first is not None:
        candidates.append((first.date(), "the course's first recorded session"))
    day, reason = min(candidates)
    if known and min(known) < day:
        return min(known), "the schedules' effective_from"
    return day, f"{reason} (a schedule slot has no effective_from)"


def resolve_range(
    session: Session, courses: list[Course], date_from: date | None, date_to: date | None
) -> tuple[date, date, str]:
    """(first day, last day, how the first day was chosen)."""
    date_to = date_to or utcnow().date()
    if date_from is not None:
        basis = "the requested range"
    elif courses:
        date_from, basis = min(course_start(session, c) for c in courses)
    else:
        date_from, basis = date_to, "no enrolled course"
    if date_from > date_to:
        if basis != "the requested range":  # a course that starts after `to`
            date_from = date_to
        else:
            raise ServiceError("from is after to")
    if (date_to - date_from).days > MAX_RANGE_DAYS:
        if basis == "the requested range":
            raise ServiceError(f"date range longer than {MAX_RANGE_DAYS} days")
        date_from = date_to - timedelta(days=MAX_RANGE_DAYS)
        basis += f", at most {MAX_RANGE_DAYS} days back"
    return date_from, date_to, basis


def _percentages(
    session: Session, course: Course, students: list[tuple[str, str]], start: date, end: date,
    rules: Rules, only_student: str | None = None,
) -> list[Percentage]:
    now = utcnow()
    held = [o for o in _occurrences(session, course.id, start, end) if o.starts_at <= now]
    seen: dict[str, list[Sighting]] = {}
    if held:
        lo = min(o.starts_at for o in held) - timedelta(minutes=rules.early_arrival_min)
        hi = max(o.ends_at for o in held)
        seen = _sightings(session, course.id, lo, hi, only_student)
    out = []
    for sid, name in students:
        counts = {"present": 0, "late": 0, "absent": 0}
        for occ in held:
            counts[_classify(occ, seen.get(sid, []), rules)[0]] += 1
        attended = counts["present"] + counts["late"]
        out.append(Percentage(
            student_id=sid, name=name, course_id=course.id, course_name=course.name,
            held=len(held), **counts,
            percentage=round(100.0 * attended / len(held), 1) if held else None,
        ))
    return out


def course_summary(
    session: Session, course_id: str, date_from: date | None, date_to: date | None, rules: Rules
) -> CourseSummary:
    course = _course(session, course_id)
    start, end, basis = resolve_range(session, [course], date_from, date_to)
    students = [tuple(r) for r in session.execute(
        select(Student.id, Student.name).join(Enrollment, Enrollment.student_id == Student.id)
        .where(Enrollment.course_id == course_id).order_by(Student.id)
    ).all()]
    return CourseSummary(
        course_id=course_id, course_name=course.name, date_from=start, date_to=end,
        counted_from=f"classes held are counted from {start.isoformat()}: {basis}",
        late_after_min=rules.late_after_min,
        students=_percentages(session, course, students, start, end, rules),  # type: ignore[arg-type]
    )


def student_report(
    session: Session, student_id: str, date_from: date | None, date_to: date | None, rules: Rules,
    limit: int = 1000,
) -> StudentReport:
    student = session.get(Student, student_id)
    if student is None:
        raise NotFoundError(f"student {student_id!r} does not exist")
    courses = session.scalars(
        select(Course).join(Enrollment, Enrollment.course_id == Course.id)
        .where(Enrollment.student_id == student_id).order_by(Course.id)
    ).all()
    start, end, basis = resolve_range(session, list(courses), date_from, date_to)
    percentages: list[Percentage] = []
    for course in courses:
        first = start if date_from is not None else max(start, course_start(session, course)[0])
        percentages.extend(_percentages(
            session, course, [(student.id, student.name)], first, end, rules, student.id
        ))
    lo = datetime.combine(start, datetime.min.time(), tzinfo=utcnow().tzinfo) - timedelta(days=1)
    hi = datetime.combine(end, datetime.min.time(), tzinfo=utcnow().tzinfo) + timedelta(days=2)
    records = session.scalars(
        select(Attendance).where(
            Attendance.student_id == student_id, Attendance.at >= lo, Attendance.at < hi,
            not_wrong(),
        ).order_by(Attendance.at.desc()).limit(limit)
    ).all()
    return StudentReport(
        student_id=student.id, name=student.name, date_from=start, date_to=end,
        counted_from=f"classes held are counted from {start.isoformat()}: {basis}"
        + ("" if date_from is not None else " (each course from its own start)"),
        courses=percentages,
        records=[RecordOut(
            key=str(r.key), course_id=r.course_id, room_id=r.room_id, device_id=r.device_id,
            at=r.at, seen_at=r.seen_at, confidence=r.confidence,
            time_uncertain=r.time_uncertain, correction=r.correction,
        ) for r in records],
    )
