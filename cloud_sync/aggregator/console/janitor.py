"""Hourly clean-up for the console's data: expired sessions, record descriptors older than
``record_descriptor_days`` and unknown faces older than ``unknown_face_keep_hours`` (biometric
data is not kept longer than its use)."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import ConsoleSession, RecordDescriptor, UnknownFace
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services.common import utcnow

_LOGGER = logging.getLogger(__name__)
INTERVAL_S = 3600.0


def clean(session: Session, settings: AggregatorSettings) -> dict[str, int]:
    now = utcnow()
    begin_write(session)
    sessions = session.execute(
        delete(ConsoleSession).where(ConsoleSession.expires_at < now)).rowcount
    cutoff = now - timedelta(days=settings.record_descriptor_days)
    descriptors = session.execute(
        delete(RecordDescriptor).where(RecordDescriptor.received_at < cutoff)).rowcount
    unknown = session.execute(delete(UnknownFace).where(
        UnknownFace.received_at < now - timedelta(hours=settings.unknown_face_keep_hours)
    )).rowcount
    session.commit()
    return {"sessions": sessions or 0, "descriptors": descriptors or 0, "unknown": unknown or 0}


class Janitor:
    """Runs :func:`clean` at start and every ``interval_s`` in a daemon thread."""

    def __init__(self, sessions: sessionmaker[Session], settings: AggregatorSettings,
                 interval_s: float = INTERVAL_S) -> None:
        self._sessions = sessions
        self._settings = settings
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._sessions() as session:
                    gone = clean(session, self._settings)
            except SQLAlchemyError as err:
                _LOGGER.warning("console clean-up failed: %s", err)
            else:
                if any(gone.values()):
                    _LOGGER.info("console clean-up: %s", gone)
            self._stop.wait(self._interval_s)
