"""Attendance corrections: mark a student present by hand, or a recognition "not this student".

Both are rows of ``attendance_corrections`` (never updated: the audit trail) that the reports
read through. A wrong recognition whose record came with the device's descriptor also leaves
that descriptor as a negative example of the student (``face_negatives``); rosters carry the
negatives to the devices (``RosterEntry.negatives``), whose matcher then refuses a face closer
to a negative than to the student's own descriptors.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_sync.aggregator.console.accounts import ConsolePrincipal, audit
from cloud_sync.aggregator.db.models import (
    Attendance,
    AttendanceCorrection,
    Enrollment,
    FaceNegative,
    RecordDescriptor,
)
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services.common import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServiceError,
    utcnow,
)

_LOGGER = logging.getLogger(__name__)
MAX_REASON = 500


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


def mark_wrong(session: Session, who: ConsolePrincipal, key: str, reason: str
               ) -> AttendanceCorrection:
    """The record ``key`` was not this student: it stops counting, and its descriptor (if the
    device sent one) becomes a negative example of the student."""
    try:
        record_key = uuid.UUID(key)
    except ValueError as err:
        raise ServiceError("not a record key") from err
    reason = _reason(reason)
    begin_write(session)
    record = session.scalars(select(Attendance).where(Attendance.key == record_key)).first()
    if record is None:
        raise NotFoundError("no such attendance record")
    if not who.can_see_course(record.course_id):
        raise ForbiddenError("you do not teach this course")
    if session.scalars(select(AttendanceCorrection.id).where(
        AttendanceCorrection.kind == "not_student",
        AttendanceCorrection.attendance_key == record_key,
    )).first() is not None:
        raise ConflictError("this record is already marked wrong")
    row = AttendanceCorrection(kind="not_student", student_id=record.student_id,
                               course_id=record.course_id, attendance_key=record_key,
                               at=record.at, reason=reason, by_user=who.name,
                               created_at=utcnow())
    session.add(row)
    descriptor = session.get(RecordDescriptor, record_key)
    if descriptor is not None:
        session.add(FaceNegative(student_id=record.student_id, vector=descriptor.vector,
                                 embedder=descriptor.embedder,
                                 source=f"record:{record_key}", created_at=utcnow()))
    kept = "descriptor kept as negative" if descriptor else "no descriptor"
    audit(session, who.name, "attendance.not_student", f"student:{record.student_id}",
          f"course {record.course_id} record {record_key} ({kept}): {reason}")
    session.commit()
    _LOGGER.info("%s marked record %s wrong for %s", who.name, record_key, record.student_id)
    return row


def history(session: Session, course_id: str, limit: int = 100) -> list[AttendanceCorrection]:
    return list(session.scalars(
        select(AttendanceCorrection).where(AttendanceCorrection.course_id == course_id)
        .order_by(AttendanceCorrection.id.desc()).limit(limit)
    ))
