"""Per-session occupancy and attention timelines (admin token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud_sync.aggregator.api.deps import DB, Admin
from cloud_sync.aggregator.services import events
from cloud_sync.protocol import Identifier, SessionId

router = APIRouter(prefix="/api/v1/reports", tags=["reports"])


@router.get(
    "/timeline",
    response_model=events.SessionTimeline,
    summary="A class session's occupancy and attention timelines and unknown-face alerts.",
)
def timeline(
    _who: Admin, session: DB,
    room_id: Annotated[Identifier, Query(description="Room id, e.g. LAB-301.")],
    session_id: Annotated[SessionId, Query(description="<course_id>@<YYYY-MM-DD>.")],
) -> events.SessionTimeline:
    return events.session_timeline(session, room_id, session_id)
