"""Per-app state shared by the routers: settings, sessions, credential cache, rate limiter."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.watch import WriteWatch
from cloud_sync.aggregator.services.faces import FaceEncoder
from cloud_sync.aggregator.services.live import LiveFeed
from cloud_sync.aggregator.services.reports import Rules


@dataclass(frozen=True, slots=True)
class DevicePrincipal:
    device_id: str
    room_id: str
    site: str


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    token_id: int
    name: str


Principal = DevicePrincipal | AdminPrincipal


class CredentialCache:
    """digest -> principal for ``ttl_s`` seconds (0 disables); cleared on key changes."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._items: dict[str, tuple[Principal, float]] = {}

    def get(self, digest: str) -> Principal | None:
        if self.ttl_s <= 0:
            return None
        with self._lock:
            item = self._items.get(digest)
            if item is None:
                return None
            if item[1] < time.monotonic():
                del self._items[digest]
                return None
            return item[0]

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[digest] = (principal, time.monotonic() + self.ttl_s)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class RateLimiter:
    """Token bucket per device: ``per_min`` requests a minute, bursts up to ``per_min``."""

    def __init__(self, per_min: int) -> None:
        self.capacity = float(per_min)
        self.rate = per_min / 60.0
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, key: str, now: float | None = None) -> float:
        """0 if allowed now, else the seconds to wait before retrying."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait_s: float) -> str:
        return str(max(1, math.ceil(wait_s)))


@dataclass
class AppContext:
    settings: AggregatorSettings
    engine: Engine
    sessions: sessionmaker[Session]
    credentials: CredentialCache
    limiter: RateLimiter
    encoder: FaceEncoder
    rules: Rules
    mqtt_bridge: Any = None
    mqtt_state: str = "disabled"
    write_watch: WriteWatch | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    live: LiveFeed = field(default_factory=LiveFeed)  # /ws/events

    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session
