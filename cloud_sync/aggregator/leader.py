"""One process of many does a job (the Home Assistant publishing of the MQTT bridges): a
PostgreSQL session-level advisory lock held on a connection of its own.

``held()`` takes the lock if it is free and says whether this process holds it. The lock goes
with the connection: a process that dies or loses its database link releases it, and another
takes it on its next ``held()``. On SQLite (one process) there is nobody to share with: always
held.
"""

from __future__ import annotations

import contextlib
import logging

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

_LOGGER = logging.getLogger(__name__)
HA_PUBLISHER_LOCK_ID = 4_242_004


class Leader:
    def __init__(self, engine: Engine, lock_id: int, what: str) -> None:
        self._engine = engine
        self._lock_id = lock_id
        self._what = what
        self._conn: Connection | None = None
        self._held = False

    def held(self) -> bool:
        if self._engine.dialect.name != "postgresql":
            return True
        try:
            if self._conn is None:
                self._conn = self._engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT")
            if self._held:
                self._conn.execute(text("SELECT 1"))  # still ours while the link lives
            else:
                self._held = bool(self._conn.scalar(
                    text("SELECT pg_try_advisory_lock(:id)"), {"id": self._lock_id}))
                if self._held:
                    _LOGGER.info("this process now does the %s", self._what)
        except SQLAlchemyError as err:
            _LOGGER.warning("%s: database link lost (%s)", self._what, err)
            self.close()
        return self._held

    def close(self) -> None:
        self._held = False
        if self._conn is not None:
            # invalidate: the server connection itself closes (and the lock with it); a plain
            # close() would return it to the pool, still holding the lock
            with contextlib.suppress(SQLAlchemyError):
                self._conn.invalidate()
                self._conn.close()
            self._conn = None
