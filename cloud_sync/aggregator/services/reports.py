"""Attendance reports: a course's day (present / late / absent / not seen yet / no data / no
face data), percentages per student per course, and a student's history.

A class counts for a student only from their enrolment (a class that ended before the
enrolment was made is not theirs), only when the student could be recognised at it (consent
granted and a face descriptor stored before it ended; else ``no_face_data``: "take by hand")
and only when a device of the room was online for it (heartbeats covering at least
``online_share`` of the class, or any device record of the course in it; else ``no_data``).
A class that has not ended yet is not held: a student not seen so far is ``not_seen_yet``.
``no_data`` and ``no_face_data`` are left out of percentages and listed
(:attr:`CourseSummary.unfilled`) so the office can fill them in by hand.

A student is *present* at a class when a record of theirs counts for the course (``course_id``,
decided on the corrected time at ingest) at a time in ``[start - early_arrival, end)``; *late*
when the first such record is more than ``late_after_min`` minutes after the start; *absent*
otherwise. The percentage is (present + late) / classes held, where classes held are the
scheduled occurrences in the date range that have started. Without a ``from``, a course
counts from its schedules' ``effective_from``, else from its creation or first recorded session
(``course_start``); the report says which.

Every report reads attendance through the console's corrections (``attendance_corrections``):
a record marked "not this student" does not count, nor does any other record of that student
for the course in the same class meeting (the whole class is struck); a student marked present
by hand counts from the time given (see :func:`_sightings`); a student marked absent by hand
for a class without data (``no_data`` / ``no_face_data``: the office fills it in from the
paper register) is ``absent`` there and counts in the percentages (a sighting still wins); an
undone correction counts for nothing.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from pydantic import BaseModel, Field
from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session

from cloud_sync.aggregator.db.models import (
    Attendance,
    AttendanceCorrection,
    Course,
    Device,
    Enrollment,
    FaceEmbedding,
    Heartbeat,
    Schedule,
    Student,
)
from cloud_sync.aggregator.services.common import NotFoundError, ServiceError, utcnow
from cloud_sync.aggregator.services.timetable import Occurrence, course_timetable

MAX_RANGE_DAYS = 400


STATUSES = ("present", "late", "absent", "not_seen_yet", "no_data", "no_face_data")
SEEN = ("present", "late")
UNCOUNTED = ("no_data", "no_face_data")  # not in percentages: for the office to fill by hand


class StudentStatus(BaseModel):
    student_id: str
    name: str
    status: str = Field(description="present | late (seen or marked by hand) | absent (not "
                        "seen, the room's device online) | not_seen_yet (the class has not "
                        "ended) | no_data (no device of the room online for the class) | "
                        "no_face_data (no consent or no face descriptor: take by hand)")
    first_seen_at: datetime | None = None
    confidence: float | None = Field(
        default=None, description="Confidence of the first sighting (None: absent or by hand)."
    )
    source: str | None = Field(
        default=None, description="device | manual (marked present, or absent, by hand); "
        "None: not seen.",
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
    not_seen_yet: int = 0
    no_data: int = 0
    no_face_data: int = 0
    ended: bool = Field(default=True, description="The class is over (else not held yet).")
    device_online: bool = Field(
        default=True, description="A device of the room was online for the class (so far).")
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
    held: int = Field(description="Classes over in the range that count for the student "
                      "(present + late + absent): from the enrolment, with data.")
    present: int
    late: int
    absent: int
    no_data: int = Field(default=0, description="Classes over, from the enrolment, without "
                         "data for the student (no device online, or no face data): not in "
                         "the percentage, to fill in by hand.")
    percentage: float | None = Field(description="(present + late) / held * 100; None if none.")


COUNTED_FROM = Field(description="Which day classes held are counted from, and why (the "
                     "requested `from`, the schedules' effective_from, or the course's "
                     "creation / first recorded session).")


class UnfilledClass(BaseModel):
    """A class over without data for some students: the office fills it in by hand."""

    starts_at: datetime
    ends_at: datetime
    room_id: str
    reason: str = Field(description="no_data (no device of the room online) | no_face_data")
    student_ids: list[str]


class CourseSummary(BaseModel):
    course_id: str
    course_name: str
    date_from: date
    date_to: date
    counted_from: str = COUNTED_FROM
    late_after_min: float
    students: list[Percentage]
    unfilled: list[UnfilledClass] = Field(
        default_factory=list, description="Classes over in the range with students of status "
        "no_data or no_face_data, oldest first: what to fill in by hand.")


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
    offline_after_s: float = 180.0  # a heartbeat vouches for this long after it
    online_share: float = 0.5  # of a class the room's devices must cover to give it data


@dataclass(frozen=True, slots=True)
class Member:
    """An enrolled student as the reports see them: since when they count, and since when they
    could be recognised (None: not now)."""

    student_id: str
    name: str
    enrolled_at: datetime
    recognisable_at: datetime | None


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


def _status(occ: Occurrence, member: Member, seen: list[Sighting], rules: Rules, now: datetime,
            online: bool, absent_by_hand: bool = False) -> tuple[str, Sighting | None]:
    """One student at one class (the order matters: a sighting wins over everything, then a
    mark "absent" by hand)."""
    status, first = _classify(occ, seen, rules)
    if first is not None:
        return status, first
    if absent_by_hand:
        return "absent", None
    if member.recognisable_at is None or member.recognisable_at >= occ.ends_at:
        return "no_face_data", None
    if now < occ.ends_at:
        return "not_seen_yet", None
    if not online:
        return "no_data", None
    return "absent", None


def members(session: Session, course_id: str,
            student_id: str | None = None) -> list[Member]:
    """The students of a course with their enrolment time and when they became recognisable
    (consent granted and a first face descriptor)."""
    first_face = (select(FaceEmbedding.student_id, func.min(FaceEmbedding.created_at)
                         .label("first")).group_by(FaceEmbedding.student_id).subquery())
    query = (select(Student.id, Student.name, Student.consent, Student.consent_at,
                    Enrollment.created_at, first_face.c.first)
             .join(Enrollment, Enrollment.student_id == Student.id)
             .outerjoin(first_face, first_face.c.student_id == Student.id)
             .where(Enrollment.course_id == course_id).order_by(Student.id))
    if student_id is not None:
        query = query.where(Student.id == student_id)
    out = []
    for sid, name, consent, consent_at, enrolled, face in session.execute(query):
        recognisable = None
        if consent == "granted" and face is not None:
            face = face if face.tzinfo else face.replace(tzinfo=UTC)
            recognisable = max(face, consent_at) if consent_at is not None else face
        out.append(Member(sid, name, enrolled, recognisable))
    return out


def online_classes(session: Session, course_id: str, occurrences: list[Occurrence],
                   rules: Rules) -> dict[tuple[str, datetime], bool]:
    """Per class (room, start): whether a device of the room was online for it: its
    heartbeats (each vouching for ``offline_after_s`` after it) cover at least
    ``online_share`` of the class (of the part so far, for a class in progress), or a device
    recorded anyone of the course in it."""
    out: dict[tuple[str, datetime], bool] = {}
    if not occurrences:
        return out
    now = utcnow()
    vouch = timedelta(seconds=rules.offline_after_s)
    early = timedelta(minutes=rules.early_arrival_min)
    lo = min(o.starts_at for o in occurrences)
    hi = max(o.ends_at for o in occurrences)
    rooms = {o.room_id for o in occurrences}
    beats: dict[str, list[datetime]] = defaultdict(list)
    for room_id, at in session.execute(
        select(Device.room_id, Heartbeat.received_at)
        .join(Device, Device.id == Heartbeat.device_id)
        .where(Device.room_id.in_(rooms), Heartbeat.received_at >= lo - vouch,
               Heartbeat.received_at < hi)
        .order_by(Heartbeat.received_at)
    ):
        beats[room_id].append(at)
    records = session.scalars(
        select(Attendance.at).where(Attendance.course_id == course_id,
                                    Attendance.at >= lo - early, Attendance.at < hi)
    ).all()
    records = sorted(records)
    for occ in occurrences:
        start, end = occ.starts_at, min(occ.ends_at, max(now, occ.starts_at))
        i = bisect.bisect_left(records, occ.starts_at - early)
        if i < len(records) and records[i] < occ.ends_at:
            out[(occ.room_id, occ.starts_at)] = True
            continue
        covered = timedelta(0)
        reach = start
        for at in beats.get(occ.room_id, []):
            a, b = max(at, reach), min(at + vouch, end)
            if b > a:
                covered += b - a
                reach = b
        length = end - start
        out[(occ.room_id, occ.starts_at)] = (
            length > timedelta(0) and covered >= length * rules.online_share)
    return out


def _course(session: Session, course_id: str) -> Course:
    course = session.get(Course, course_id)
    if course is None:
        raise NotFoundError(f"course {course_id!r} does not exist")
    return course


def not_wrong(spans: bool = True) -> object:
    """SQL condition: no "not this student" correction (not undone) strikes the attendance row:
    none names its key and (``spans``) none covers its student, course and time (the whole
    class). :func:`_sightings` leaves the spans out and applies them itself (:func:`_struck`):
    a probe per row costs several times the key's on a term's records."""
    by_key = ~exists().where(and_(
        AttendanceCorrection.attendance_key == Attendance.key,
        AttendanceCorrection.kind == "not_student",
        AttendanceCorrection.undone_at.is_(None),
    ))
    if not spans:
        return by_key
    return and_(by_key, ~exists().where(and_(
        AttendanceCorrection.student_id == Attendance.student_id,
        AttendanceCorrection.kind == "not_student",
        AttendanceCorrection.undone_at.is_(None),
        AttendanceCorrection.course_id == Attendance.course_id,
        AttendanceCorrection.span_from <= Attendance.at,
        AttendanceCorrection.span_to > Attendance.at,
    )))


def _struck(session: Session, course_id: str, lo: datetime, hi: datetime,
            student_id: str | None = None) -> dict[str, list[tuple[datetime, datetime]]]:
    """Per student: the class meetings of ``course_id`` struck "not this student" (not undone)
    that overlap ``[lo, hi)``."""
    query = select(AttendanceCorrection.student_id, AttendanceCorrection.span_from,
                   AttendanceCorrection.span_to).where(
        AttendanceCorrection.kind == "not_student", AttendanceCorrection.undone_at.is_(None),
        AttendanceCorrection.course_id == course_id, AttendanceCorrection.span_from < hi,
        AttendanceCorrection.span_to > lo,
    )
    if student_id is not None:
        query = query.where(AttendanceCorrection.student_id == student_id)
    out: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for sid, span_from, span_to in session.execute(query):
        out[sid].append((span_from, span_to))
    return out


def _sightings(
    session: Session, course_id: str, lo: datetime, hi: datetime, student_id: str | None = None
) -> dict[str, list[Sighting]]:
    """Corrected sightings per student, sorted by time: device records minus those marked
    "not this student" (the record, and the student's whole class meeting), plus the students
    marked present by hand (corrections undone count for nothing)."""
    query = select(Attendance.student_id, Attendance.at, Attendance.confidence,
                   Attendance.key).where(
        Attendance.course_id == course_id, Attendance.at >= lo, Attendance.at < hi,
        not_wrong(spans=False),
    )
    manual = select(AttendanceCorrection.student_id, AttendanceCorrection.at).where(
        AttendanceCorrection.kind == "present", AttendanceCorrection.course_id == course_id,
        AttendanceCorrection.at >= lo, AttendanceCorrection.at < hi,
        AttendanceCorrection.undone_at.is_(None),
    )
    if student_id is not None:
        query = query.where(Attendance.student_id == student_id)
        manual = manual.where(AttendanceCorrection.student_id == student_id)
    struck = _struck(session, course_id, lo, hi, student_id)
    out: dict[str, list[Sighting]] = defaultdict(list)
    for sid, at, confidence, key in session.execute(query):
        spans = struck.get(sid)
        if spans and any(a <= at < b for a, b in spans):
            continue
        out[sid].append(Sighting(at, confidence, str(key), False))
    for sid, at in session.execute(manual):
        out[sid].append(Sighting(at, None, None, True))
    for seen in out.values():
        seen.sort(key=lambda s: (s.at, s.manual))
    return out


def absences(session: Session, course_id: str, lo: datetime, hi: datetime,
             student_id: str | None = None) -> set[tuple[str, datetime]]:
    """(student, class start) of the students marked absent by hand (not undone) for classes
    of ``course_id`` starting in ``[lo, hi)``."""
    query = select(AttendanceCorrection.student_id, AttendanceCorrection.at).where(
        AttendanceCorrection.kind == "absent", AttendanceCorrection.course_id == course_id,
        AttendanceCorrection.at >= lo, AttendanceCorrection.at < hi,
        AttendanceCorrection.undone_at.is_(None),
    )
    if student_id is not None:
        query = query.where(AttendanceCorrection.student_id == student_id)
    return {(sid, at) for sid, at in session.execute(query)}


def _occurrences(session: Session, course_id: str, start: date, end: date) -> list[Occurrence]:
    table = course_timetable(session, course_id)
    out: list[Occurrence] = []
    day = start
    while day <= end:
        out.extend(table.occurrences(day))
        day += timedelta(days=1)
    return out


def class_at(session: Session, course_id: str, at: datetime, rules: Rules) -> Occurrence | None:
    """The class meeting of ``course_id`` a sighting at ``at`` counts for: the one whose
    ``[start - early_arrival, end)`` holds it (None: outside every class)."""
    early = timedelta(minutes=rules.early_arrival_min)
    day = at.astimezone(UTC).date()
    for occ in _occurrences(session, course_id, day - timedelta(days=1), day + timedelta(days=1)):
        if occ.starts_at - early <= at < occ.ends_at:
            return occ
    return None


def course_day(session: Session, course_id: str, day: date, rules: Rules) -> CourseDayReport:
    course = _course(session, course_id)
    occurrences = _occurrences(session, course_id, day, day)
    people = members(session, course_id)
    now = utcnow()
    sessions: list[SessionReport] = []
    if occurrences:
        lo = min(o.starts_at for o in occurrences) - timedelta(minutes=rules.early_arrival_min)
        hi = max(o.ends_at for o in occurrences)
        seen = _sightings(session, course_id, lo, hi)
        marked = absences(session, course_id, lo, hi)
        online = online_classes(session, course_id, occurrences, rules)
        for occ in occurrences:
            up = online[(occ.room_id, occ.starts_at)]
            rows = []
            for member in people:
                if member.enrolled_at >= occ.ends_at:
                    continue  # enrolled after this class: not theirs
                by_hand = (member.student_id, occ.starts_at) in marked
                status, first = _status(occ, member, seen.get(member.student_id, []), rules,
                                        now, up, by_hand)
                rows.append(StudentStatus(
                    student_id=member.student_id, name=member.name, status=status,
                    first_seen_at=first.at if first else None,
                    confidence=first.confidence if first else None,
                    source=(("manual" if by_hand and status == "absent" else None)
                            if first is None else ("manual" if first.manual else "device")),
                    record_key=first.key if first else None,
                ))
            counts = {k: sum(r.status == k for r in rows) for k in STATUSES}
            sessions.append(SessionReport(
                course_id=course_id, room_id=occ.room_id, starts_at=occ.starts_at,
                ends_at=occ.ends_at, students=rows, ended=occ.ends_at <= now,
                device_online=up, **counts,
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
    session: Session, course: Course, people: list[Member], start: date, end: date,
    rules: Rules, only_student: str | None = None,
    unfilled: list[UnfilledClass] | None = None,
) -> list[Percentage]:
    """Per student: the classes over in the range from their enrolment, by status; classes
    without data for some student are appended to ``unfilled`` when given."""
    now = utcnow()
    held = [o for o in _occurrences(session, course.id, start, end) if o.ends_at <= now]
    seen: dict[str, list[Sighting]] = {}
    online: dict[tuple[str, datetime], bool] = {}
    marked: set[tuple[str, datetime]] = set()
    if held:
        lo = min(o.starts_at for o in held) - timedelta(minutes=rules.early_arrival_min)
        hi = max(o.ends_at for o in held)
        seen = _sightings(session, course.id, lo, hi, only_student)
        marked = absences(session, course.id, lo, hi, only_student)
        online = online_classes(session, course.id, held, rules)
    counts = {m.student_id: dict.fromkeys(STATUSES, 0) for m in people}
    for occ in held:
        missing: dict[str, list[str]] = defaultdict(list)
        for member in people:
            if member.enrolled_at >= occ.ends_at:
                continue
            status, _ = _status(occ, member, seen.get(member.student_id, []), rules, now,
                                online[(occ.room_id, occ.starts_at)],
                                (member.student_id, occ.starts_at) in marked)
            counts[member.student_id][status] += 1
            if status in UNCOUNTED:
                missing[status].append(member.student_id)
        if unfilled is not None:
            for reason, ids in sorted(missing.items()):
                unfilled.append(UnfilledClass(starts_at=occ.starts_at, ends_at=occ.ends_at,
                                              room_id=occ.room_id, reason=reason,
                                              student_ids=ids))
    out = []
    for member in people:
        c = counts[member.student_id]
        attended = c["present"] + c["late"]
        counted = attended + c["absent"]
        out.append(Percentage(
            student_id=member.student_id, name=member.name, course_id=course.id,
            course_name=course.name, held=counted, present=c["present"], late=c["late"],
            absent=c["absent"], no_data=c["no_data"] + c["no_face_data"],
            percentage=round(100.0 * attended / counted, 1) if counted else None,
        ))
    return out


def course_summary(
    session: Session, course_id: str, date_from: date | None, date_to: date | None, rules: Rules
) -> CourseSummary:
    course = _course(session, course_id)
    start, end, basis = resolve_range(session, [course], date_from, date_to)
    unfilled: list[UnfilledClass] = []
    students = _percentages(session, course, members(session, course_id), start, end, rules,
                            unfilled=unfilled)
    return CourseSummary(
        course_id=course_id, course_name=course.name, date_from=start, date_to=end,
        counted_from=f"classes held are counted from {start.isoformat()}: {basis} "
        "(for each student from their enrolment)",
        late_after_min=rules.late_after_min, students=students, unfilled=unfilled,
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
            session, course, members(session, course.id, student.id), first, end, rules,
            student.id))
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
