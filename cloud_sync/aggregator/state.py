"""Per-app process state: the caches, the group committer and the known partitions.

``create_app`` makes one :class:`AppState` and closes it on shutdown; the services reach it
through the session factory's ``info`` (:data:`STATE_INFO_KEY`), like ``early_arrival_min`` and
the live feed. A session without it (the CLI, a test's own factory) simply runs uncached: every
lookup goes to the database and each insert commits on its own.

Across processes (several workers or servers on PostgreSQL) the caches stay true because every
admin write that changes what they hold is broadcast (``cloud_sync.aggregator.bus``) and every
process clears them on receipt; while a process's bus is not connected it does not trust its
caches at all (``trusted``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from cloud_sync.aggregator.services.group_commit import GroupCommitter

STATE_INFO_KEY = "app_state"
CACHE_TTL_S = 30.0  # admin writes through the API clear the caches at once, in every process
MAX_ITEMS = 10_000
V = TypeVar("V")


class TTLCache(Generic[V]):
    """key -> value for ``ttl_s`` seconds, at most ``max_items`` (cleared whole when full);
    thread-safe. ``trusted()`` False makes every ``get`` a miss."""

    def __init__(self, ttl_s: float = CACHE_TTL_S, max_items: int = MAX_ITEMS,
                 trusted: Callable[[], bool] = lambda: True) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._trusted = trusted
        self._lock = threading.Lock()
        self._items: dict[str, tuple[V, float]] = {}

    def get(self, key: str) -> V | None:
        if self.ttl_s <= 0 or not self._trusted():
            return None
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[1] < time.monotonic():
                del self._items[key]
                return None
            return item[0]

    def put(self, key: str, value: V) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._items) >= self.max_items:
                self._items.clear()
            self._items[key] = (value, time.monotonic() + self.ttl_s)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class AppState:
    """What one app (one process) keeps between requests for one engine."""

    def __init__(self, engine: Engine, ttl_s: float = CACHE_TTL_S,
                 trusted: Callable[[], bool] = lambda: True) -> None:
        self.engine = engine
        self.device_contexts: TTLCache[Any] = TTLCache(ttl_s, trusted=trusted)  # ingest
        self.rooms: TTLCache[Any] = TTLCache(ttl_s, trusted=trusted)  # timetable.cached_room
        self.partitions: set[date] = set()  # months whose attendance partition exists
        self.partitions_lock = threading.Lock()
        self._committer: GroupCommitter | None = None
        self._lock = threading.Lock()

    def committer(self) -> GroupCommitter:
        from cloud_sync.aggregator.services.group_commit import GroupCommitter, writers_for

        with self._lock:
            if self._committer is None:
                self._committer = GroupCommitter(self.engine, writers_for(self.engine))
            return self._committer

    def invalidate(self) -> None:
        """Forget cached device rooms and timetables (after admin writes; on app start)."""
        self.device_contexts.clear()
        self.rooms.clear()

    def close(self) -> None:
        with self._lock:
            committer, self._committer = self._committer, None
        if committer is not None:
            committer.close()
        self.invalidate()
        with self.partitions_lock:
            self.partitions.clear()


def state_of(session: Session) -> AppState | None:
    found = session.info.get(STATE_INFO_KEY)
    return found if isinstance(found, AppState) else None
