"""The append-only audit log: who viewed, exported, corrected, erased or purged what.

Entries hold identifiers and counts, never contents (no names, no face data). They are only
inserted here and deleted by retention after ``audit_keep_days`` (services/retention.py).
"""

from __future__ import annotations

import getpass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_sync.aggregator.db.models import AuditLog
from cloud_sync.aggregator.services.common import utcnow

MAX_DETAIL = 1000


def cli_actor() -> str:
    """The actor of a CLI command: the operating-system user who ran it."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli:unknown"


def record(session: Session, actor: str, action: str, subject: str, detail: str = "") -> None:
    """Add one entry to the session's transaction (the caller commits with its own change, so
    the change and its entry land together or not at all)."""
    session.add(AuditLog(at=utcnow(), actor=actor[:200], action=action[:64],
                         subject=subject[:200], detail=detail[:MAX_DETAIL]))


def record_now(session: Session, actor: str, action: str, subject: str,
               detail: str = "") -> None:
    """Record and commit at once (for reads: a view or an export)."""
    from cloud_sync.aggregator.db.session import begin_write

    session.rollback()
    begin_write(session)
    record(session, actor, action, subject, detail)
    session.commit()


def entries(session: Session, subject: str | None = None, since: datetime | None = None,
            limit: int = 100, offset: int = 0) -> list[AuditLog]:
    query = select(AuditLog)
    if subject is not None:
        query = query.where(AuditLog.subject == subject)
    if since is not None:
        query = query.where(AuditLog.at >= since)
    return list(session.scalars(
        query.order_by(AuditLog.id.desc()).limit(limit).offset(offset)))
