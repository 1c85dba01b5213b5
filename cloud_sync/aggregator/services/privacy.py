"""Consent, erasure and subject access (GDPR Art. 7, 15, 17; docs/PRIVACY.md).

- Consent: a student's face data is enrolled and sent to devices only while their consent is
  ``granted``. Withdrawing it deletes every descriptor of the student (every embedder's, and
  kept photos); the roster ETag changes, so devices drop the student at their next pull.
- Erasure: the face data goes as on withdrawal, and the student's records are deleted or
  pseudonymised by ``erasure_policy``.
- Export: everything held about one student, as JSON or CSV.

Deleted face data is also scrubbed from the database files: SQLite runs with
``secure_delete`` (deleted content is zeroed) and its WAL is checkpointed and truncated after
an erasure (in short attempts that never hold the write lock for long, for up to
``SCRUB_WAIT_S``); PostgreSQL rewrites the face table (``VACUUM FULL``) so no dead tuple keeps
a descriptor in the table's files, once every transaction older than the erasure has ended
(the scrub waits up to ``SCRUB_WAIT_S`` for them).
"""

from __future__ import annotations

import csv
import io
import logging
import secrets
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import Connection, Engine, String, cast, delete, func, select, text, update
from sqlalchemy.orm import Session

from cloud_sync.aggregator.db.models import (
    Attendance,
    AttendanceKey,
    AuditLog,
    Enrollment,
    EventRow,
    FaceEmbedding,
    FaceNegative,
    RecordDescriptor,
    Student,
)
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import audit
from cloud_sync.aggregator.services.common import (
    ConflictError,
    NotFoundError,
    csv_cell,
    utcnow,
)

_LOGGER = logging.getLogger(__name__)
ConsentState = Literal["granted", "withdrawn"]
ErasurePolicy = Literal["delete", "pseudonymise"]
# every table that holds descriptors of a student
FACE_TABLES = ("face_embeddings", "face_negatives", "record_descriptors")
# How long a scrub waits for transactions older than the erasure to end (see _older_snapshots_gone)
SCRUB_WAIT_S = 30.0
# SQLite: one attempt of the WAL checkpoint waits this long for readers and writers (it holds
# the write lock meanwhile), then the scrub lets go for SCRUB_RETRY_S and tries again.
SCRUB_ATTEMPT_MS = 50
SCRUB_RETRY_S = 0.2
_SCRUBBING = threading.Lock()


class ConsentOut(BaseModel):
    student_id: str
    state: ConsentState | None = Field(description="None: never recorded (no face data).")
    at: datetime | None
    by: str | None
    descriptors_deleted: int = 0


class ErasureOut(BaseModel):
    student_id: str
    policy: ErasurePolicy
    descriptors_deleted: int
    photos_deleted: int
    attendance_deleted: int
    attendance_pseudonymised: int
    events_scrubbed: int
    pseudonym: str | None = Field(description="The id the records now carry (pseudonymise).")


def subject(student_id: str) -> str:
    return f"student:{student_id}"


def _student(session: Session, student_id: str) -> Student:
    row = session.get(Student, student_id)
    if row is None:
        raise NotFoundError(f"student {student_id!r} does not exist")
    return row


def require_consent(session: Session, student_id: str) -> None:
    """ConflictError unless the student's consent to face recognition is granted."""
    state = _student(session, student_id).consent
    if state != "granted":
        raise ConflictError(
            f"student {student_id!r} has no consent to face recognition recorded "
            f"({state or 'never recorded'}): record it first (aggregator students consent "
            f"{student_id} grant, or POST /api/v1/students/{student_id}/consent)")


def consent_of(session: Session, student_id: str) -> ConsentOut:
    row = _student(session, student_id)
    return ConsentOut(student_id=row.id, state=row.consent,  # type: ignore[arg-type]
                      at=row.consent_at, by=row.consent_by)


def delete_face_data(session: Session, student_id: str) -> tuple[int, int]:
    """Delete every descriptor of the student (all embedders) and kept photos; (rows, photos).
    Runs inside the caller's transaction."""
    paths = [p for p in session.scalars(
        select(FaceEmbedding.photo_path).where(FaceEmbedding.student_id == student_id)) if p]
    # Counted first: SQLite's rowcount leaves out the rows its cascade (photo_of) deleted.
    rows = session.scalar(select(func.count()).select_from(FaceEmbedding)
                          .where(FaceEmbedding.student_id == student_id)) or 0
    session.execute(delete(FaceEmbedding).where(FaceEmbedding.student_id == student_id))
    # Negative examples (faces marked "not this student") and the descriptors devices sent
    # with the student's records (console corrections) are face data about the student too.
    session.execute(delete(FaceNegative).where(FaceNegative.student_id == student_id))
    session.execute(delete(RecordDescriptor).where(RecordDescriptor.key.in_(
        select(Attendance.key).where(Attendance.student_id == student_id))))
    photos = 0
    for path in paths:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            continue
        photos += 1
    return int(rows), photos


def apply_consent(session: Session, student_id: str, state: ConsentState, actor: str,
                  note: str = "") -> int:
    """:func:`set_consent` inside the caller's transaction (no commit): for a form that writes
    the student and the consent together. Returns the descriptors deleted (a withdrawal)."""
    row = _student(session, student_id)
    removed = 0
    if state == "withdrawn":
        removed, _ = delete_face_data(session, student_id)
    row.consent, row.consent_at, row.consent_by = state, utcnow(), actor[:200]
    detail = f"state={state}" + (f" descriptors_deleted={removed}" if removed else "")
    audit.record(session, actor, f"consent.{'grant' if state == 'granted' else 'withdraw'}",
                 subject(student_id), detail + (f" note={note}" if note else ""))
    return removed


def set_consent(session: Session, student_id: str, state: ConsentState, actor: str,
                note: str = "") -> ConsentOut:
    """Record granted or withdrawn (now, by ``actor``). Withdrawal deletes the student's face
    data at once. Commits; the caller scrubs (:func:`scrub`) and notifies devices."""
    begin_write(session)
    removed = apply_consent(session, student_id, state, actor, note)
    session.commit()
    _LOGGER.info("consent of %s: %s (%d descriptor(s) deleted)", student_id, state, removed)
    out = consent_of(session, student_id)
    out.descriptors_deleted = removed
    return out


def _scrub_attention(session: Session, student_id: str, pseudonym: str | None) -> int:
    """Per-student attention in events (data.students) loses or renames the student."""
    needle = f'"{student_id}"'
    changed = 0
    for row in session.scalars(select(EventRow).where(
            EventRow.kind == "attention", cast(EventRow.data, String).contains(needle))):
        data = dict(row.data or {})
        students = dict(data.get("students") or {})
        if student_id not in students:
            continue
        value = students.pop(student_id)
        if pseudonym is not None:
            students[pseudonym] = value
        data["students"] = students
        row.data = data
        changed += 1
    return changed


def erase(session: Session, student_id: str, policy: ErasurePolicy, actor: str) -> ErasureOut:
    """Erase a student: face data deleted; records deleted (``delete``) or moved to a random
    pseudonym that nothing links back to the student (``pseudonymise``); the student row goes.
    Commits; the caller scrubs (:func:`scrub`) and notifies devices."""
    begin_write(session)
    _student(session, student_id)
    descriptors, photos = delete_face_data(session, student_id)
    deleted = moved = 0
    pseudonym: str | None = None
    if policy == "delete":
        if session.get_bind().dialect.name == "postgresql":
            session.execute(delete(AttendanceKey).where(AttendanceKey.key.in_(
                select(Attendance.key).where(Attendance.student_id == student_id))))
        deleted = session.execute(
            delete(Attendance).where(Attendance.student_id == student_id)).rowcount or 0
    else:
        pseudonym = f"erased-{secrets.token_hex(8)}"
        session.add(Student(id=pseudonym, name="(erased)", created_at=utcnow()))
        session.flush()
        moved = session.execute(update(Attendance).where(Attendance.student_id == student_id)
                                .values(student_id=pseudonym)).rowcount or 0
    events = _scrub_attention(session, student_id, pseudonym)
    session.execute(delete(Enrollment).where(Enrollment.student_id == student_id))
    session.execute(delete(Student).where(Student.id == student_id))
    audit.record(session, actor, "student.erase", subject(student_id),
                 f"policy={policy} descriptors={descriptors} photos={photos} "
                 f"attendance_deleted={deleted} attendance_pseudonymised={moved} "
                 f"events_scrubbed={events}")
    session.commit()
    _LOGGER.info("erased %s (%s)", student_id, policy)
    return ErasureOut(student_id=student_id, policy=policy, descriptors_deleted=descriptors,
                      photos_deleted=photos, attendance_deleted=int(deleted),
                      attendance_pseudonymised=int(moved), events_scrubbed=events,
                      pseudonym=pseudonym)


def scrub(engine: Engine) -> None:
    """Make deleted face data unreadable in the database files (see the module docstring).
    Run after the transaction that deleted it committed."""
    if engine.dialect.name == "sqlite":
        if not truncate_sqlite_wal(engine):
            _LOGGER.warning(
                "privacy: a reader kept the WAL busy for %.0f s; deleted face data may stay "
                "in it until the next scrub (the next withdrawal or erasure) or checkpoint",
                SCRUB_WAIT_S)
        return
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if not _older_snapshots_gone(conn):
                _LOGGER.warning(
                    "privacy: a transaction older than the erasure is still open (see "
                    "pg_stat_activity); deleted face data it may still see stays in the files "
                    "until the next scrub (the next withdrawal or erasure)")
            for table in FACE_TABLES:
                conn.execute(text(f"VACUUM FULL {table}"))


class Scrubber:
    """Runs :func:`scrub` on a thread of its own after a request deleted face data.

    Not in the request (a background task): FastAPI runs background tasks before it closes
    the request's session, and a session that read after its commit is a reader of the old
    WAL (SQLite) or an older snapshot (PostgreSQL), so every scrub waited ``SCRUB_WAIT_S`` for
    its own request; meanwhile the request kept its database connection and its worker
    thread, and the client's keep-alive connection waited too. A burst of withdrawals (a
    consent CSV, a fuzzer) exhausted the connection pool and the next login got 503.
    Requests coalesce: a scrub started after the last deletion covers every earlier one."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._wanted = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.runs = 0  # scrubs done (for /metrics-like checks and tests)

    def request(self) -> None:
        """Scrub soon (returns at once). Call after the deleting transaction committed."""
        with self._lock:
            self._idle.clear()
            self._wanted.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="privacy-scrub",
                                                daemon=True)
                self._thread.start()

    def wait(self, timeout_s: float) -> bool:
        """Block until no scrub is wanted or running; False if ``timeout_s`` passed first."""
        return self._idle.wait(timeout_s)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                scrub(self._engine)
            except Exception:  # the next request tries again; the thread stays
                _LOGGER.exception("privacy: scrubbing the database files failed")
            self.runs += 1
            with self._lock:
                if not self._wanted.is_set():
                    self._idle.set()


def truncate_sqlite_wal(engine: Engine, timeout_s: float = SCRUB_WAIT_S) -> bool:
    """Checkpoint the WAL and truncate it to zero bytes; True once done. The checkpoint holds
    the database's write lock while it waits for readers of the old WAL, and a reader that
    wants to write next (a request that read, then writes) would wait for that lock: with the
    connection's busy_timeout (10 s) both waited until the checkpoint gave up. So each attempt
    waits at most SCRUB_ATTEMPT_MS, and between attempts nothing is held. The PRAGMAs go
    through the raw (autocommit) connection: through SQLAlchemy they ran inside a BEGIN, and
    concurrent scrubs were each other's readers. One scrub at a time per process."""
    deadline = time.monotonic() + timeout_s
    with _SCRUBBING:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            saved = cur.execute("PRAGMA busy_timeout").fetchone()
            cur.execute(f"PRAGMA busy_timeout={SCRUB_ATTEMPT_MS}")
            try:
                while True:
                    row = cur.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    if row is not None and row[0] == 0:  # (busy, WAL frames, checkpointed)
                        return True
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(SCRUB_RETRY_S)
            finally:
                cur.execute(f"PRAGMA busy_timeout={int(saved[0]) if saved else 10000}")
                cur.close()
        finally:
            raw.close()


def _older_snapshots_gone(conn: Connection, timeout_s: float = SCRUB_WAIT_S) -> bool:
    """Wait (bounded) until no session's snapshot predates this moment. ``VACUUM FULL`` copies
    a deleted row that a transaction started before the delete may still see ("recently
    dead"), and any open snapshot (a report, another process's pool, autovacuum's launcher)
    counts; the deleting transaction has committed, so every snapshot taken from now on is
    safe."""
    now = conn.scalar(text("SELECT txid_current()"))
    deadline = time.monotonic() + timeout_s
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
        "AND backend_xmin IS NOT NULL AND age(backend_xmin) >= age(CAST(:now AS text)::xid)")
    while conn.scalar(query, {"now": str(int(now) % 2**32)}):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


# ---- subject access ----------------------------------------------------------------------

def export(session: Session, student_id: str) -> dict[str, Any]:
    """Everything held about the student (GDPR Art. 15), JSON-ready."""
    row = _student(session, student_id)
    faces = session.scalars(select(FaceEmbedding).where(FaceEmbedding.student_id == student_id)
                            .order_by(FaceEmbedding.id)).all()
    attendance = session.scalars(select(Attendance).where(Attendance.student_id == student_id)
                                 .order_by(Attendance.at)).all()
    needle = f'"{student_id}"'
    attention = session.execute(select(EventRow.at, EventRow.room_id, EventRow.data).where(
        EventRow.kind == "attention", cast(EventRow.data, String).contains(needle))
        .order_by(EventRow.at)).all()
    log = session.scalars(select(AuditLog).where(AuditLog.subject == subject(student_id))
                          .order_by(AuditLog.id)).all()
    return {
        "student": {"id": row.id, "name": row.name, "email": row.email,
                    "created_at": row.created_at.isoformat()},
        "consent": {"state": row.consent, "at": row.consent_at and row.consent_at.isoformat(),
                    "by": row.consent_by},
        "enrollments": list(session.scalars(select(Enrollment.course_id).where(
            Enrollment.student_id == student_id).order_by(Enrollment.course_id))),
        "face_descriptors": [{
            "id": f.id, "embedder": f.embedder, "source": f.source, "quality": f.quality,
            "created_at": f.created_at.isoformat(), "photo_kept": f.photo_path is not None,
            "descriptor": np.frombuffer(f.vector, dtype="<f4").astype(float).tolist(),
        } for f in faces],
        "attendance": [{
            "key": str(a.key), "at": a.at.isoformat(), "seen_at": a.seen_at.isoformat(),
            "course_id": a.course_id, "room_id": a.room_id, "device_id": a.device_id,
            "confidence": a.confidence, "distance": a.distance, "correction": a.correction,
        } for a in attendance],
        "attention": [{"at": at.isoformat(), "room_id": room,
                       "facing_front": (data or {}).get("students", {}).get(student_id)}
                      for at, room, data in attention],
        "audit": [{"at": e.at.isoformat(), "actor": e.actor, "action": e.action,
                   "detail": e.detail} for e in log],
    }


CSV_COLUMNS = ("section", "at", "key", "course_id", "room_id", "device_id", "detail")


def export_csv(data: dict[str, Any]) -> str:
    """The export as one CSV table (one row per item, ``section`` says which kind)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")

    def writerow(row: Any) -> None:  # every cell through csv_cell (no live formula)
        writer.writerow([csv_cell(v) for v in row])

    writerow(CSV_COLUMNS)
    student, consent = data["student"], data["consent"]
    writerow(("student", student["created_at"], student["id"], "", "", "",
                     f"name={student['name']}; email={student['email'] or ''}"))
    writerow(("consent", consent["at"] or "", consent["state"] or "never recorded", "",
                     "", "", f"by={consent['by'] or ''}"))
    for course in data["enrollments"]:
        writerow(("enrollment", "", "", course, "", "", ""))
    for face in data["face_descriptors"]:
        writerow(("face_descriptor", face["created_at"], face["id"], "", "", "",
                         f"embedder={face['embedder']}; source={face['source']}; descriptor="
                         + " ".join(f"{v:.6g}" for v in face["descriptor"])))
    for rec in data["attendance"]:
        writerow(("attendance", rec["at"], rec["key"], rec["course_id"] or "",
                         rec["room_id"], rec["device_id"],
                         f"confidence={rec['confidence']:.3f}; correction={rec['correction']}"))
    for item in data["attention"]:
        writerow(("attention", item["at"], "", "", item["room_id"], "",
                         f"facing_front={item['facing_front']}"))
    for entry in data["audit"]:
        writerow(("audit", entry["at"], "", "", "", "",
                         f"{entry['actor']} {entry['action']} {entry['detail']}"))
    return out.getvalue()
