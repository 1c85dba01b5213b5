"""The aggregator's retention purge: every kind of stored data has a configured lifetime.

One pass (on start and hourly from the app) deletes what is older than its lifetime and writes
one audit entry with the counts (never the contents):

- attendance records: ``attendance_keep_days`` (by class time ``at``);
- device events: ``events_keep_days`` (``services/events.prune_events``);
- dead letters: ``dead_letter_max_age_days`` (the bridge also prunes by age and count when
  it records one; this purge applies the age when none arrives);
- the audit log itself: ``audit_keep_days``;
- recording files (original and browser copy): ``recording_keep_days`` after the upload
  (``services/recordings.purge_files``); the recording row and the attendance, events and
  instructor results derived from it are kept.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import Attendance, AttendanceKey, AuditLog, DeadLetter
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import audit, recordings
from cloud_sync.aggregator.services.common import utcnow
from cloud_sync.aggregator.services.events import prune_events

_LOGGER = logging.getLogger(__name__)


def _older(session: Session, keep_days: float, now: datetime, model: type, column: str) -> int:
    cutoff = now - timedelta(days=keep_days)
    begin_write(session)
    if model is Attendance and session.get_bind().dialect.name == "postgresql":
        session.execute(delete(AttendanceKey).where(AttendanceKey.key.in_(
            select(Attendance.key).where(Attendance.at < cutoff))))
    deleted = session.execute(
        delete(model).where(getattr(model, column) < cutoff)).rowcount or 0
    session.commit()
    return int(deleted)


def purge(session: Session, settings: AggregatorSettings,
          now: datetime | None = None) -> dict[str, int]:
    """Delete what outlived its retention; returns the counts per kind (also audited)."""
    now = now or utcnow()
    counts = {
        "attendance": _older(session, settings.attendance_keep_days, now, Attendance, "at"),
        "events": prune_events(session, settings.events_keep_days, now),
        "dead_letters": _older(session, settings.dead_letter_max_age_days, now, DeadLetter,
                               "received_at"),
        "audit": _older(session, settings.audit_keep_days, now, AuditLog, "at"),
        "recording_files": recordings.purge_files(session, settings, now),
    }
    if any(counts.values()):
        begin_write(session)
        audit.record(session, "system", "retention.purge", "retention",
                     " ".join(f"{k}={v}" for k, v in counts.items()))
        session.commit()
        _LOGGER.info("retention purge: %s", counts)
    return counts
