"""`GET /api/v1/schedule`: a room's day (sessions) and the rosters of its courses;
`GET /api/v1/schedule/days`: today and the next school days (what a device caches, so that it
recognises the next class after a night or a weekend offline).

Rosters hold only the students enrolled in the day's courses whose consent to face recognition
is granted and who have at least one face embedding (a student without one cannot be
recognised). The ETag is the sha256 of the response
without ``generated_at``, so it changes exactly when the content does.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_sync.aggregator.db.models import Enrollment, FaceEmbedding, FaceNegative, Student
from cloud_sync.aggregator.services.common import NotFoundError, utcnow
from cloud_sync.aggregator.services.timetable import cached_room, zone
from cloud_sync.classes import class_now
from cloud_sync.protocol import (
    LEGACY_EMBEDDER,
    ClassSession,
    RosterEntry,
    ScheduleDay,
    ScheduleResponse,
    ScheduleWindow,
)


def rosters(session: Session, course_ids: list[str],
            embedder: str = LEGACY_EMBEDDER) -> dict[str, list[RosterEntry]]:
    """Enrolled students with their embeddings made by ``embedder`` (``name/model_version``),
    per course (sorted by student id)."""
    out: dict[str, list[RosterEntry]] = {c: [] for c in course_ids}
    if not course_ids:
        return out
    rows = session.execute(
        select(Enrollment.course_id, Student.id, Student.name, FaceEmbedding.vector)
        .join(Student, Student.id == Enrollment.student_id)
        .join(FaceEmbedding, FaceEmbedding.student_id == Student.id)
        .where(Enrollment.course_id.in_(course_ids), FaceEmbedding.embedder == embedder,
               Student.consent == "granted")
        .order_by(Enrollment.course_id, Student.id, FaceEmbedding.id)
    ).all()
    grouped: dict[tuple[str, str, str], list[list[float]]] = defaultdict(list)
    for course_id, student_id, name, vector in rows:
        grouped[(course_id, student_id, name)].append(
            np.frombuffer(vector, dtype="<f4").astype(float).tolist()
        )
    negatives = _negatives(session, {sid for _, sid, _ in grouped}, embedder)
    for (course_id, student_id, name), vectors in grouped.items():
        # Trusted rows (validated when stored): skip re-validating 128 floats per embedding.
        out[course_id].append(
            RosterEntry.model_construct(student_id=student_id, name=name, embeddings=vectors,
                                        negatives=negatives.get(student_id, []))
        )
    return out


MAX_NEGATIVES = 100  # per student, the newest (RosterEntry.negatives' bound)


def _negatives(session: Session, student_ids: set[str],
               embedder: str) -> dict[str, list[list[float]]]:
    """Descriptors of ``embedder`` marked "not this student" (console corrections) and
    confirmed by the course's teacher or an admin (a pending one never reaches a device),
    newest first."""
    out: dict[str, list[list[float]]] = defaultdict(list)
    if not student_ids:
        return out
    for student_id, vector in session.execute(
        select(FaceNegative.student_id, FaceNegative.vector)
        .where(FaceNegative.student_id.in_(student_ids), FaceNegative.embedder == embedder,
               FaceNegative.state == "confirmed")
        .order_by(FaceNegative.id.desc())
    ):
        if len(out[student_id]) < MAX_NEGATIVES:
            out[student_id].append(np.frombuffer(vector, dtype="<f4").astype(float).tolist())
    return out


def build_schedule(session: Session, room_id: str, at: datetime | None = None,
                   embedder: str = LEGACY_EMBEDDER) -> ScheduleResponse:
    room = cached_room(session, room_id)
    if room is None:
        raise NotFoundError(f"room {room_id!r} does not exist")
    at = at or utcnow()
    tz = zone(room.timezone)
    day = at.astimezone(tz).date()
    occurrences = room.timetable.occurrences(day, room_id)
    sessions = [
        ClassSession.model_construct(
            course_id=o.course_id, course_name=o.course_name, starts_at=o.starts_at,
            ends_at=o.ends_at,
        )
        for o in occurrences
    ]
    running = class_now(occurrences, at)
    current = running.course_id if running is not None else None
    course_ids = list(dict.fromkeys(o.course_id for o in occurrences))
    return ScheduleResponse.model_construct(
        v=1, room_id=room_id, date=day, timezone=room.timezone, generated_at=utcnow(),
        current_course_id=current, sessions=sessions,
        rosters=rosters(session, course_ids, embedder), embedder=embedder,
    )


SCAN_DAYS = 31  # school days are looked for this far ahead


def build_window(session: Session, room_id: str, at: datetime | None = None, days: int = 2,
                 embedder: str = LEGACY_EMBEDDER) -> ScheduleWindow:
    """Today (in the room's zone) and the next ``days`` school days: days with at least one
    class in the room, looked for within :data:`SCAN_DAYS`; each course's roster once."""
    room = cached_room(session, room_id)
    if room is None:
        raise NotFoundError(f"room {room_id!r} does not exist")
    at = at or utcnow()
    today = at.astimezone(zone(room.timezone)).date()
    found: list[ScheduleDay] = []
    for ahead in range(SCAN_DAYS + 1):
        if ahead and len(found) > days:
            break
        day = today + timedelta(days=ahead)
        occurrences = room.timetable.occurrences(day, room_id)
        if ahead and not occurrences:
            continue  # not a school day in this room
        found.append(ScheduleDay.model_construct(date=day, sessions=[
            ClassSession.model_construct(course_id=o.course_id, course_name=o.course_name,
                                         starts_at=o.starts_at, ends_at=o.ends_at)
            for o in occurrences]))
    course_ids = list(dict.fromkeys(s.course_id for d in found for s in d.sessions))
    return ScheduleWindow.model_construct(
        v=1, room_id=room_id, timezone=room.timezone, generated_at=utcnow(),
        embedder=embedder, days=found, rosters=rosters(session, course_ids, embedder))


def render(schedule: ScheduleResponse | ScheduleWindow) -> tuple[bytes, str]:
    """(JSON body, strong ETag) with one serialisation: the ETag hashes the content without
    ``generated_at``, which is then put first in the body."""
    core = schedule.model_dump_json(exclude={"generated_at"})
    etag = '"' + hashlib.sha256(core.encode()).hexdigest() + '"'
    stamp = schedule.generated_at.isoformat().replace("+00:00", "Z")
    return ('{"generated_at":"' + stamp + '",' + core[1:]).encode(), etag


def etag_of(schedule: ScheduleResponse) -> str:
    """Strong ETag: a quoted sha256 of the content (``generated_at`` excluded)."""
    body = schedule.model_dump_json(exclude={"generated_at"})
    return '"' + hashlib.sha256(body.encode()).hexdigest() + '"'
