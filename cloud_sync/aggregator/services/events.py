"""Stored device events: retention, and the per-session occupancy and attention timelines."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cloud_sync.aggregator import metrics
from cloud_sync.aggregator.db.models import EventRow
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services.common import utcnow

_LOGGER = logging.getLogger(__name__)
MAX_TIMELINE_POINTS = 20_000


def prune_events(session: Session, keep_days: int, now: datetime | None = None) -> int:
    """Delete events older than ``keep_days`` (by event time). Commits; returns how many."""
    cutoff = (now or utcnow()) - timedelta(days=keep_days)
    begin_write(session)
    deleted = session.execute(delete(EventRow).where(EventRow.at < cutoff)).rowcount or 0
    session.commit()
    if deleted:
        metrics.EVENTS_PRUNED.inc(deleted)
        _LOGGER.info("deleted %d event(s) older than %d days", deleted, keep_days)
    return int(deleted)


class OccupancyPoint(BaseModel):
    at: datetime
    device_id: str
    count: int
    faces: int
    turned_away: int
    capacity: int | None
    free: int | None
    occupied_share: float | None


class AttentionPoint(BaseModel):
    at: datetime
    device_id: str
    faces: int
    facing_front: int
    share: float | None
    students: dict[str, bool] | None = None


class UnknownFaceAlert(BaseModel):
    at: datetime
    device_id: str
    severity: str
    message: str
    unknown_faces: int | None = None


class SessionTimeline(BaseModel):
    room_id: str
    session_id: str = Field(description="<course_id>@<YYYY-MM-DD>")
    occupancy: list[OccupancyPoint]
    attention: list[AttentionPoint]
    unknown_face_alerts: list[UnknownFaceAlert]
    truncated: bool = Field(description="More than 20,000 points: the latest are left out.")


def session_timeline(session: Session, room_id: str, session_id: str) -> SessionTimeline:
    rows = session.execute(
        select(EventRow.at, EventRow.device_id, EventRow.kind, EventRow.severity,
               EventRow.message, EventRow.data)
        .where(EventRow.room_id == room_id, EventRow.session_id == session_id,
               EventRow.kind.in_(("occupancy", "attention", "unknown_face")))
        .order_by(EventRow.at)
        .limit(MAX_TIMELINE_POINTS + 1)
    ).all()
    truncated = len(rows) > MAX_TIMELINE_POINTS
    occupancy: list[OccupancyPoint] = []
    attention: list[AttentionPoint] = []
    alerts: list[UnknownFaceAlert] = []
    for at, device_id, kind, severity, message, data in rows[:MAX_TIMELINE_POINTS]:
        d: dict[str, Any] = data or {}
        if kind == "occupancy":
            occupancy.append(OccupancyPoint(
                at=at, device_id=device_id, count=d.get("count", 0), faces=d.get("faces", 0),
                turned_away=d.get("turned_away", 0), capacity=d.get("capacity"),
                free=d.get("free"), occupied_share=d.get("occupied_share")))
        elif kind == "attention":
            attention.append(AttentionPoint(
                at=at, device_id=device_id, faces=d.get("faces", 0),
                facing_front=d.get("facing_front", 0), share=d.get("share"),
                students=d.get("students")))
        else:
            alerts.append(UnknownFaceAlert(
                at=at, device_id=device_id, severity=severity, message=message,
                unknown_faces=(d.get("details") or {}).get("unknown_faces")))
    return SessionTimeline(room_id=room_id, session_id=session_id, occupancy=occupancy,
                           attention=attention, unknown_face_alerts=alerts, truncated=truncated)


def latest_occupancy(session: Session, room_id: str, session_id: str | None,
                     ) -> dict[str, Any] | None:
    """The payload of the room's latest occupancy event of that class session, if any."""
    if session_id is None:
        return None
    data = session.scalar(
        select(EventRow.data)
        .where(EventRow.room_id == room_id, EventRow.session_id == session_id,
               EventRow.kind == "occupancy")
        .order_by(EventRow.at.desc()).limit(1))
    return dict(data) if data else None


def new_alerts(session: Session, since: datetime, limit: int = 1000,
               ) -> list[tuple[str, str, datetime]]:
    """(room_id, severity, received_at) of unknown-face alerts received after ``since``
    (event time within a day before it: the at index bounds the scan)."""
    rows = session.execute(
        select(EventRow.room_id, EventRow.severity, EventRow.received_at)
        .where(EventRow.kind == "unknown_face", EventRow.received_at > since,
               EventRow.at > since - timedelta(days=1))
        .order_by(EventRow.received_at).limit(limit)).all()
    return [(r, s, t) for r, s, t in rows]
