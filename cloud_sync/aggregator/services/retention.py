"""The aggregator's retention purge: every kind of stored data has a configured lifetime.

One pass (on start and hourly from the app, or ``aggregator students purge``) deletes what is
older than its lifetime and writes one audit entry with the counts (never the contents):

- attendance records: ``attendance_keep_days`` (by class time ``at``);
- device events: ``events_keep_days`` (``services/events.prune_events``);
- dead letters: ``dead_letter_max_age_days`` (the bridge also prunes by age and count when
  it records one; this purge applies the age when none arrives);
- heartbeats: ``heartbeat_keep_days``, except the newest of each device boot (synchronised
  and not), which clock correction of a late record of that boot needs, until
  ``attendance_keep_days`` (a record older than that would be purged anyway);
- the console's data: face descriptors devices sent with records (``record_descriptor_days``),
  unknown-face crops and descriptors (``unknown_face_keep_hours``), expired console sessions;
  after biometric data went, the database files are scrubbed (SQLite: WAL truncated, deleted
  rows are zeroed by ``secure_delete``; PostgreSQL: ``VACUUM`` of those tables);
- the audit log itself: ``audit_keep_days``;
- recording files (original and browser copy): ``recording_keep_days`` after the upload
  (``services/recordings.purge_files``); the recording row and the attendance, events and
  instructor results derived from it are kept; an upload that received no byte for
  ``recording_upload_expire_hours`` is abandoned (file deleted, recording rejected).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, or_, select, text
from sqlalchemy.orm import Session

from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import (
    Attendance,
    AttendanceKey,
    AuditLog,
    ConsoleSession,
    DeadLetter,
    Heartbeat,
    RecordDescriptor,
    UnknownFace,
)
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import audit, privacy, recordings
from cloud_sync.aggregator.services.common import utcnow
from cloud_sync.aggregator.services.events import prune_events

_LOGGER = logging.getLogger(__name__)
BIOMETRIC = ("record_descriptors", "unknown_faces")  # scrubbed after a purge deleted some


def _delete(session: Session, statement: Any) -> int:
    begin_write(session)
    deleted = session.execute(statement).rowcount or 0
    session.commit()
    return int(deleted)


def _older(session: Session, keep: timedelta, now: datetime, model: type, column: str) -> int:
    cutoff = now - keep
    if model is Attendance and session.get_bind().dialect.name == "postgresql":
        begin_write(session)
        session.execute(delete(AttendanceKey).where(AttendanceKey.key.in_(
            select(Attendance.key).where(Attendance.at < cutoff))))
    return _delete(session, delete(model).where(getattr(model, column) < cutoff))


def _heartbeats(session: Session, settings: AggregatorSettings, now: datetime) -> int:
    """Heartbeats older than ``heartbeat_keep_days``; the newest of each (device, boot,
    synchronised or not) stays until ``attendance_keep_days``: records of that boot sent
    weeks later are placed in time by it (services/ingest.py, clock correction)."""
    newest = select(func.max(Heartbeat.id)).group_by(
        Heartbeat.device_id, Heartbeat.boot_id, Heartbeat.clock_synced).scalar_subquery()
    return _delete(session, delete(Heartbeat).where(
        Heartbeat.received_at < now - timedelta(days=settings.heartbeat_keep_days),
        or_(Heartbeat.received_at < now - timedelta(days=settings.attendance_keep_days),
            Heartbeat.id.not_in(newest)),
    ))


def scrub_biometric(engine: Engine) -> None:
    """After expired descriptors and crops were deleted: no copy left in the WAL (SQLite;
    ``secure_delete`` zeroes the rows in the main file), dead tuples freed for reuse
    (PostgreSQL ``VACUUM``; a withdrawal or erasure rewrites with ``VACUUM FULL``)."""
    if engine.dialect.name == "sqlite":  # in short attempts: never holds writers for long
        if not privacy.truncate_sqlite_wal(engine):
            _LOGGER.warning("retention: a reader kept the WAL busy; expired face data may stay "
                            "in it until the next scrub or checkpoint")
    elif engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in BIOMETRIC:
                conn.execute(text(f"VACUUM {table}"))


def purge(session: Session, settings: AggregatorSettings,
          now: datetime | None = None) -> dict[str, int]:
    """Delete what outlived its retention; returns the counts per kind (also audited)."""
    now = now or utcnow()
    days = timedelta(days=1)
    counts = {
        "attendance": _older(session, settings.attendance_keep_days * days, now, Attendance,
                             "at"),
        "events": prune_events(session, settings.events_keep_days, now),
        "dead_letters": _older(session, settings.dead_letter_max_age_days * days, now,
                               DeadLetter, "received_at"),
        "heartbeats": _heartbeats(session, settings, now),
        "record_descriptors": _older(session, settings.record_descriptor_days * days, now,
                                     RecordDescriptor, "received_at"),
        "unknown_faces": _older(session, timedelta(hours=settings.unknown_face_keep_hours),
                                now, UnknownFace, "received_at"),
        "console_sessions": _older(session, timedelta(0), now, ConsoleSession, "expires_at"),
        "audit": _older(session, settings.audit_keep_days * days, now, AuditLog, "at"),
        "recording_files": recordings.purge_files(session, settings, now),
        "abandoned_uploads": recordings.expire_uploads(session, settings, now),
    }
    if counts["record_descriptors"] or counts["unknown_faces"]:
        scrub_biometric(session.get_bind())  # type: ignore[arg-type]
    if any(counts.values()):
        begin_write(session)
        audit.record(session, "system", "retention.purge", "retention",
                     " ".join(f"{k}={v}" for k, v in counts.items()))
        session.commit()
        _LOGGER.info("retention purge: %s", counts)
    return counts
