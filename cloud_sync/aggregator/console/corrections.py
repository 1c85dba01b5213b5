"""Attendance corrections: mark a student present by hand, absent by hand (a class without
data filled in from the register), or a recognition "not this student".

All are rows of ``attendance_corrections`` (never deleted: the audit trail) that the reports
read through.

"Not this student" applies to the whole class meeting: every record of that student for the
course in it stops counting (records the device still sends for the class too), so the row no
longer says present or late. The descriptors the device sent with those records are kept as
*pending* negative examples of the student (``face_negatives``): they reach no device until the
course's teacher (or an admin) confirms them on the correction's page, which lists what they
would turn away (the struck records, and the student's other recent sightings the devices would
no longer give them). Confirmed, rosters carry them (``RosterEntry.negatives``) and the device's
matcher refuses a face closer to a negative than to the student's own descriptors.

Every correction can be undone: the row is stamped ``undone_at`` (it then counts for nothing:
the attendance is as it was) and its negatives are deleted, so the roster (and its ETag)
changes back and devices pull it at their next sync. Each step has an audit line.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from cloud_sync.aggregator.console.accounts import ConsolePrincipal, audit
from cloud_sync.aggregator.db.models import (
    Attendance,
    AttendanceCorrection,
    Enrollment,
    FaceEmbedding,
    FaceNegative,
    RecordDescriptor,
    Student,
)
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import reports
from cloud_sync.aggregator.services.common import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServiceError,
    utcnow,
)
from cloud_sync.aggregator.services.reports import Rules, class_at

_LOGGER = logging.getLogger(__name__)
MAX_REASON = 500
KIND_WORDS = {"present": "marked present", "absent": "marked absent",
              "not_student": "not this student"}


def _reason(text: str) -> str:
    text = text.strip()
    if not text:
        raise ServiceError("say why (a reason is kept with the correction)")
    if len(text) > MAX_REASON:
        raise ServiceError(f"the reason is longer than {MAX_REASON} characters")
    return text


def mark_present(session: Session, who: ConsolePrincipal, course_id: str, student_id: str,
                 at: datetime, reason: str) -> AttendanceCorrection:
    """The student counts as seen in ``course_id`` at ``at`` (e.g. the session's start)."""
    rows = mark_all_present(session, who, course_id, [student_id], at, reason)
    return rows[0]


def mark_all_present(session: Session, who: ConsolePrincipal, course_id: str,
                     student_ids: list[str], at: datetime, reason: str
                     ) -> list[AttendanceCorrection]:
    """Each of ``student_ids`` counts as seen in ``course_id`` at ``at``: one transaction (all
    or none), one correction row and one audit line per student."""
    if not who.can_see_course(course_id):
        raise ForbiddenError("you do not teach this course")
    reason = _reason(reason)
    if not student_ids:
        raise ServiceError("nobody to mark present")
    begin_write(session)
    rows = []
    for student_id in dict.fromkeys(student_ids):
        if session.get(Enrollment, (student_id, course_id)) is None:
            raise NotFoundError(f"student {student_id!r} is not enrolled in {course_id!r}")
        row = AttendanceCorrection(kind="present", student_id=student_id, course_id=course_id,
                                   at=at, reason=reason, by_user=who.name, created_at=utcnow())
        session.add(row)
        rows.append(row)
        audit(session, who.name, "attendance.mark_present", f"student:{student_id}",
              f"course {course_id} at {at.isoformat()}: {reason}")
    session.commit()
    _LOGGER.info("%s marked %d present in %s at %s", who.name, len(rows), course_id, at)
    return rows


def mark_absent(session: Session, who: ConsolePrincipal, course_id: str,
                student_ids: list[str], starts_at: datetime, reason: str, rules: Rules
                ) -> list[AttendanceCorrection]:
    """Each of ``student_ids`` was absent from the class of ``course_id`` starting at
    ``starts_at``, which has no data for them (``no_data``: no device of the room online;
    ``no_face_data``): the office fills it in by hand from the register. One transaction (all
    or none), one correction row and one audit line per student. Refused (409) for a class not
    over yet, a student seen or marked present (undo that first), or already absent."""
    if not who.can_see_course(course_id):
        raise ForbiddenError("you do not teach this course")
    reason = _reason(reason)
    if not student_ids:
        raise ServiceError("nobody to mark absent")
    begin_write(session)  # read the class and write the marks in one transaction
    report = reports.course_day(session, course_id, starts_at.astimezone(UTC).date(), rules)
    found = next((s for s in report.sessions if s.starts_at == starts_at), None)
    if found is None:
        raise NotFoundError(f"no class of {course_id} starts at {starts_at.isoformat()}")
    if not found.ended:
        raise ConflictError("the class is not over yet: a student not seen so far is "
                            "\"not seen yet\", not absent")
    status = {st.student_id: st for st in found.students}
    rows = []
    for student_id in dict.fromkeys(student_ids):
        st = status.get(student_id)
        if st is None:
            raise NotFoundError(f"student {student_id!r} is not in this class of {course_id!r}")
        if st.status in ("present", "late"):
            raise ConflictError(f"{st.name} counts as {st.status} in this class "
                                f"({'marked by hand' if st.source == 'manual' else 'seen'}): "
                                "undo that correction, or use “not this student”, first")
        if st.status == "absent":
            raise ConflictError(f"{st.name} is already absent from this class")
        row = AttendanceCorrection(kind="absent", student_id=student_id, course_id=course_id,
                                   at=starts_at, reason=reason, by_user=who.name,
                                   created_at=utcnow())
        session.add(row)
        rows.append(row)
        audit(session, who.name, "attendance.mark_absent", f"student:{student_id}",
              f"course {course_id} class of {starts_at.isoformat()} ({st.status}): {reason}")
    session.commit()
    _LOGGER.info("%s marked %d absent in %s at %s", who.name, len(rows), course_id, starts_at)
    return rows


def _active_strike(session: Session, student_id: str, course_id: str | None,
                   record_key: uuid.UUID, span: tuple[datetime, datetime] | None
                   ) -> AttendanceCorrection | None:
    """The "not this student" correction (not undone) that already strikes this record or
    this class meeting of the student."""
    query = select(AttendanceCorrection).where(
        AttendanceCorrection.kind == "not_student", AttendanceCorrection.undone_at.is_(None),
        AttendanceCorrection.student_id == student_id,
    )
    for row in session.scalars(query):
        if row.attendance_key == record_key:
            return row
        if (span is not None and row.span_from is not None and row.span_to is not None
                and row.course_id == course_id
                and row.span_from < span[1] and span[0] < row.span_to):
            return row
    return None


def mark_wrong(session: Session, who: ConsolePrincipal, key: str, reason: str,
               rules: Rules) -> AttendanceCorrection:
    """The record ``key`` was not this student: that student's attendance for the whole class
    meeting of the record is struck (every record of theirs for the course in it), and the
    descriptors the device sent with those records are held as pending negative examples
    (devices get them only once confirmed, :func:`confirm_negatives`)."""
    try:
        record_key = uuid.UUID(key)
    except ValueError as err:
        raise ServiceError("not a record key") from err
    reason = _reason(reason)
    begin_write(session)
    record = session.scalars(select(Attendance).where(Attendance.key == record_key)).first()
    if record is None:
        raise NotFoundError("no such attendance record")
    if not who.can_see_course(record.course_id or ""):
        raise ForbiddenError("you do not teach this course")
    occ = (class_at(session, record.course_id, record.at, rules)
           if record.course_id is not None else None)
    span = None
    if occ is not None:
        span = (occ.starts_at - timedelta(minutes=rules.early_arrival_min), occ.ends_at)
    if _active_strike(session, record.student_id, record.course_id, record_key,
                      span) is not None:
        raise ConflictError("this class is already marked \"not this student\" for "
                            f"{record.student_id}: undo that correction first")
    row = AttendanceCorrection(kind="not_student", student_id=record.student_id,
                               course_id=record.course_id, attendance_key=record_key,
                               at=occ.starts_at if occ else record.at, reason=reason,
                               by_user=who.name, created_at=utcnow(),
                               span_from=span[0] if span else None,
                               span_to=span[1] if span else None)
    session.add(row)
    session.flush()  # the row's id, for its negatives
    struck = struck_records(session, row)
    held = 0
    for key_ in [r.key for r in struck]:
        descriptor = session.get(RecordDescriptor, key_)
        if descriptor is None:
            continue
        session.add(FaceNegative(student_id=record.student_id, vector=descriptor.vector,
                                 embedder=descriptor.embedder, source=f"record:{key_}",
                                 created_at=utcnow(), state="pending", correction_id=row.id))
        held += 1
    where = (f"class {occ.starts_at.isoformat()}-{occ.ends_at.isoformat()}" if occ
             else f"record {record_key} (outside every class)")
    audit(session, who.name, "attendance.not_student", f"student:{record.student_id}",
          f"course {record.course_id} {where}: {len(struck)} record(s) struck, {held} "
          f"descriptor(s) held for confirmation (correction {row.id}): {reason}")
    session.commit()
    _LOGGER.info("%s struck %s from %s (%d records, correction %d)", who.name,
                 record.student_id, record.course_id, len(struck), row.id)
    return row


def struck_records(session: Session, row: AttendanceCorrection) -> list[Attendance]:
    """The attendance records a "not this student" correction strikes (undone or not), by
    time: its record, and every record of the student for the course in its class meeting."""
    if row.span_from is None or row.span_to is None:
        query = select(Attendance).where(Attendance.key == row.attendance_key)
    else:
        query = select(Attendance).where(
            Attendance.student_id == row.student_id, Attendance.course_id == row.course_id,
            Attendance.at >= row.span_from, Attendance.at < row.span_to)
    found = {r.key: r for r in session.scalars(query)}
    if row.attendance_key is not None and row.attendance_key not in found:
        extra = session.scalars(select(Attendance).where(
            Attendance.key == row.attendance_key)).first()
        if extra is not None:
            found[extra.key] = extra
    return sorted(found.values(), key=lambda r: r.at)


def _correction(session: Session, who: ConsolePrincipal, correction_id: int,
                course_id: str | None) -> AttendanceCorrection:
    row = session.get(AttendanceCorrection, correction_id)
    if (row is None or not who.can_see_course(row.course_id or "")
            or (course_id is not None and row.course_id != course_id)):
        # a correction of another teacher's course is answered as one that does not exist
        raise NotFoundError(f"no correction {correction_id}")
    return row


def confirm_negatives(session: Session, who: ConsolePrincipal, correction_id: int,
                      course_id: str | None = None) -> int:
    """The course's teacher (or an admin) confirms the pending negatives of a "not this
    student" correction: from now on rosters carry them. Returns how many."""
    begin_write(session)
    row = _correction(session, who, correction_id, course_id)
    if row.kind != "not_student":
        raise ConflictError("only a \"not this student\" correction has negatives")
    if row.undone_at is not None:
        raise ConflictError("this correction was undone")
    pending = list(session.scalars(select(FaceNegative).where(
        FaceNegative.correction_id == row.id, FaceNegative.state == "pending")))
    if not pending:
        raise ConflictError("nothing waits for confirmation in this correction")
    now = utcnow()
    session.execute(update(FaceNegative).where(FaceNegative.id.in_([n.id for n in pending]))
                    .values(state="confirmed", confirmed_by=who.name, confirmed_at=now))
    audit(session, who.name, "attendance.negative_confirm", f"student:{row.student_id}",
          f"course {row.course_id} correction {row.id}: {len(pending)} negative example(s) "
          f"now in the rosters{' (admin approval)' if who.is_admin else ''}")
    session.commit()
    _LOGGER.info("%s confirmed %d negatives of correction %d", who.name, len(pending), row.id)
    return len(pending)


@dataclass
class Undone:
    row: AttendanceCorrection
    negatives_removed: int  # all of the correction's negatives, pending or confirmed
    roster_changed: bool  # a confirmed one was removed: the roster (and ETag) changed


def undo(session: Session, who: ConsolePrincipal, correction_id: int,
         course_id: str | None = None) -> Undone:
    """Undo a correction: it counts for nothing from now on (the attendance is as before it)
    and its negative examples are deleted (a confirmed one leaves the rosters)."""
    begin_write(session)
    row = _correction(session, who, correction_id, course_id)
    if row.undone_at is not None:
        raise ConflictError(f"this correction was already undone by {row.undone_by}")
    negatives = list(session.scalars(select(FaceNegative).where(
        FaceNegative.correction_id == row.id)))
    confirmed = sum(n.state == "confirmed" for n in negatives)
    # a correction from before issue 25 had no correction_id: its negative is the record's
    if row.kind == "not_student" and row.attendance_key is not None:
        legacy = list(session.scalars(select(FaceNegative).where(
            FaceNegative.correction_id.is_(None), FaceNegative.student_id == row.student_id,
            FaceNegative.source == f"record:{row.attendance_key}")))
        negatives += legacy
        confirmed += sum(n.state == "confirmed" for n in legacy)
    if negatives:
        session.execute(delete(FaceNegative).where(
            FaceNegative.id.in_([n.id for n in negatives])))
    row.undone_at = utcnow()
    row.undone_by = who.name
    what = KIND_WORDS.get(row.kind, row.kind)
    audit(session, who.name, "attendance.undo", f"student:{row.student_id}",
          f"course {row.course_id} correction {row.id} ({what}, by {row.by_user}) undone: "
          f"attendance restored, {len(negatives)} negative example(s) deleted"
          f" ({confirmed} were in the rosters)")
    session.commit()
    _LOGGER.info("%s undid correction %d", who.name, row.id)
    return Undone(row, len(negatives), confirmed > 0)


@dataclass
class Sight:
    """An attendance record as the review page says it."""

    at: datetime
    confidence: float
    device_id: str
    room_id: str
    course_id: str | None
    has_descriptor: bool


@dataclass
class Review:
    """What a "not this student" correction struck and what its negatives would turn away."""

    row: AttendanceCorrection
    name: str
    struck: list[Sight]
    pending: int
    confirmed: int
    confirmed_by: str | None
    # the student's other recent sightings (still theirs) that devices would no longer give
    # them once the negatives are in the roster, and how many such sightings were checked
    would_reject: list[Sight] = field(default_factory=list)
    checked: int = 0
    unchecked: str | None = None  # why the check could not be made, in plain words
    elsewhere: int = 0  # of those, in courses the viewer does not teach (not listed)


CHECK_LIMIT = 500  # the student's newest sightings with a descriptor checked per recogniser


def review(session: Session, who: ConsolePrincipal, correction_id: int,
           course_id: str | None = None) -> Review:
    row = _correction(session, who, correction_id, course_id)
    name = session.scalar(select(Student.name).where(Student.id == row.student_id)) or ""
    records = struck_records(session, row) if row.kind == "not_student" else []
    keys = {r.key for r in records}
    with_descriptor = set(session.scalars(select(RecordDescriptor.key).where(
        RecordDescriptor.key.in_(keys)))) if keys else set()
    struck = [Sight(r.at, r.confidence, r.device_id, r.room_id, r.course_id,
                    r.key in with_descriptor) for r in records]
    negatives = list(session.scalars(select(FaceNegative).where(
        FaceNegative.correction_id == row.id).order_by(FaceNegative.id)))
    out = Review(row=row, name=name, struck=struck,
                 pending=sum(n.state == "pending" for n in negatives),
                 confirmed=sum(n.state == "confirmed" for n in negatives),
                 confirmed_by=next((n.confirmed_by for n in negatives if n.confirmed_by), None))
    if negatives:
        _would_reject(session, out, negatives, keys)
        # a teacher sees the sightings of their own courses; the others are only counted
        out.elsewhere = sum(not who.can_see_course(x.course_id or "") for x in out.would_reject)
        out.would_reject = [x for x in out.would_reject if who.can_see_course(x.course_id or "")]
    return out


def _would_reject(session: Session, out: Review, negatives: list[FaceNegative],
                  struck: set[uuid.UUID]) -> None:
    """The student's own recent sightings (not struck) that a device would turn into
    "unknown" with these negatives in the roster: the device's matcher and metric, the
    student's enrolled descriptors, each sighting's descriptor as the device sent it."""
    from appliance.recognition import Matcher, Roster
    from appliance.vision.embedding import spec
    from cloud_sync.protocol import RosterEntry

    student_id = out.row.student_id
    by_embedder: dict[str, list[list[float]]] = {}
    for n in negatives:
        by_embedder.setdefault(n.embedder, []).append(
            np.frombuffer(n.vector, dtype="<f4").astype(float).tolist())
    rejected: list[Sight] = []
    for embedder, vectors in by_embedder.items():
        own = [np.frombuffer(v, dtype="<f4").astype(float).tolist() for v in session.scalars(
            select(FaceEmbedding.vector).where(FaceEmbedding.student_id == student_id,
                                               FaceEmbedding.embedder == embedder))]
        if not own:
            out.unchecked = (f"{out.name or student_id} has no enrolled face for this "
                             "recogniser, so no device recognises them with it anyway")
            continue
        try:
            metric = spec(embedder.split("/")[0]).metric
        except (KeyError, ValueError):
            out.unchecked = f"unknown recogniser {embedder!r}"
            continue
        rows = session.execute(
            select(Attendance, RecordDescriptor.vector)
            .join(RecordDescriptor, RecordDescriptor.key == Attendance.key)
            .where(Attendance.student_id == student_id, RecordDescriptor.embedder == embedder)
            .order_by(Attendance.at.desc()).limit(CHECK_LIMIT + len(struck))
        ).all()
        rows = [(a, v) for a, v in rows if a.key not in struck][:CHECK_LIMIT]
        out.checked += len(rows)
        if not rows:
            continue
        entry = RosterEntry.model_construct(student_id=student_id, name=out.name,
                                            embeddings=own, negatives=vectors)
        matcher = Matcher(Roster.from_entries([entry], embedder), threshold=float("inf"),
                          margin=0.0, metric=metric)
        queries = np.stack([np.frombuffer(v, dtype="<f4") for _, v in rows])
        for (a, _), match in zip(rows, matcher.match(queries), strict=True):
            if match.student_id is None:
                rejected.append(Sight(a.at, a.confidence, a.device_id, a.room_id, a.course_id,
                                      True))
    out.would_reject = sorted(rejected, key=lambda s: s.at, reverse=True)


def active_strikes(session: Session, course_id: str, lo: datetime, hi: datetime
                   ) -> list[AttendanceCorrection]:
    """The "not this student" corrections (not undone) of a course with a class in
    ``[lo, hi)``: the course page shows them on the struck rows, with an undo."""
    return list(session.scalars(select(AttendanceCorrection).where(
        AttendanceCorrection.kind == "not_student", AttendanceCorrection.undone_at.is_(None),
        AttendanceCorrection.course_id == course_id, AttendanceCorrection.at >= lo,
        AttendanceCorrection.at < hi)))


def pending_counts(session: Session, correction_ids: list[int]) -> dict[int, int]:
    """Per correction: how many of its negatives wait for confirmation."""
    if not correction_ids:
        return {}
    out: dict[int, int] = {}
    for cid in session.scalars(select(FaceNegative.correction_id).where(
            FaceNegative.correction_id.in_(correction_ids), FaceNegative.state == "pending")):
        if cid is not None:
            out[cid] = out.get(cid, 0) + 1
    return out


def history(session: Session, course_id: str, limit: int = 100) -> list[AttendanceCorrection]:
    return list(session.scalars(
        select(AttendanceCorrection).where(AttendanceCorrection.course_id == course_id)
        .order_by(AttendanceCorrection.id.desc()).limit(limit)
    ))
