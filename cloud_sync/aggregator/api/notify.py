"""Tell devices over MQTT that their room's roster/schedule changed (if the bridge runs)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud_sync.aggregator.api.context import AppContext
from cloud_sync.aggregator.db.models import Room
from cloud_sync.aggregator.services.common import ServiceError
from cloud_sync.aggregator.services.schedule import build_schedule, etag_of
from cloud_sync.protocol import EMBEDDER_IDS

_LOGGER = logging.getLogger(__name__)


def notify_rosters(ctx: AppContext, room_ids: set[str] | None = None) -> int:
    """Publish the current ETag of ``room_ids`` (None: every room) through the MQTT bridge.
    Runs as a background task after admin writes; returns how many rooms were notified.
    The ETag is that of the default embedder's schedule (devices of another embedder see a
    different ETag than theirs and simply pull)."""
    bridge = ctx.mqtt_bridge
    if bridge is None:
        return 0
    return publish_notices(ctx.sessions, bridge.notify_roster_changed,
                           EMBEDDER_IDS[ctx.settings.embedders[0]], room_ids)


def publish_notices(sessions: sessionmaker[Session], publish: Callable[[str, str, str], None],
                    embedder: str, room_ids: set[str] | None = None) -> int:
    """``publish(site, room_id, etag)`` for each room (the ETag of ``embedder``'s schedule);
    returns how many were published."""
    sent = 0
    with sessions() as session:
        query = select(Room)
        if room_ids is not None:
            query = query.where(Room.id.in_(room_ids))
        for room in session.scalars(query).all():
            try:
                etag = etag_of(build_schedule(session, room.id, embedder=embedder))
                publish(room.site, room.id, etag)
            except (ServiceError, OSError, RuntimeError, ValueError) as err:
                _LOGGER.warning("roster notification for %s failed: %s", room.id, err)
                continue
            sent += 1
    return sent
