"""The per-device rate limit (``rate_limit_per_min``), where every process sees the same one.

- ``MemoryRateLimiter``: a token bucket in this process (SQLite: ``serve`` runs one process).
- ``PostgresRateLimiter``: the same token bucket in the UNLOGGED table ``rate_buckets``, one
  atomic ``INSERT ... ON CONFLICT DO UPDATE`` per request: PostgreSQL serialises the updates of
  one device's row, whichever process or server sends them, and its clock is the only one used.
- ``RedisRateLimiter``: the ``limits`` library's moving window (``N per minute``) in Redis, when
  ``redis_url`` is set (no database round trip per request).

Each answers ``acquire(key)``: 0 when the request may go on, else the seconds to wait.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Protocol

from sqlalchemy import Engine, text


class Limiter(Protocol):
    blocking: bool  # True: acquire does I/O (call it in the thread pool)

    def acquire(self, key: str) -> float: ...


class LimiterUnavailableError(Exception):
    """The shared store of the limit does not answer (the request gets a 503)."""


def retry_after(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))


class MemoryRateLimiter:
    """Token bucket per device: ``per_min`` requests a minute, bursts up to ``per_min``."""

    blocking = False

    def __init__(self, per_min: int) -> None:
        self.capacity = float(per_min)
        self.rate = per_min / 60.0
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


_REFILLED = ("least(:cap, b.tokens + extract(epoch FROM clock_timestamp() - b.at) "
             "* :rate)")
_BUCKET_SQL = text(
    "INSERT INTO rate_buckets AS b (key, tokens, at, allowed) "  # noqa: S608 - constants
    "VALUES (:key, :cap - 1, clock_timestamp(), true) "
    "ON CONFLICT (key) DO UPDATE SET "
    f"allowed = {_REFILLED} >= 1, "
    f"tokens = {_REFILLED} - CASE WHEN {_REFILLED} >= 1 THEN 1 ELSE 0 END, "
    "at = clock_timestamp() "
    "RETURNING allowed, tokens"
)


class PostgresRateLimiter:
    """The token bucket of ``MemoryRateLimiter`` in PostgreSQL (table ``rate_buckets``)."""

    blocking = True

    def __init__(self, engine: Engine, per_min: int) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.capacity = float(per_min)
        self.rate = per_min / 60.0

    def acquire(self, key: str) -> float:
        with self._engine.connect() as conn:
            allowed, tokens = conn.execute(
                _BUCKET_SQL, {"key": key[:200], "cap": self.capacity, "rate": self.rate}
            ).one()
        return 0.0 if allowed else (1.0 - float(tokens)) / self.rate


class RedisRateLimiter:
    """``per_min`` requests per moving minute per device, in Redis (the ``limits`` library)."""

    blocking = True

    def __init__(self, url: str, prefix: str, per_min: int) -> None:
        from limits import RateLimitItemPerMinute
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        self._item = RateLimitItemPerMinute(per_min)
        self._storage = RedisStorage(url, key_prefix=f"{prefix}:limits",
                                     socket_timeout=2, socket_connect_timeout=2)
        self._limiter = MovingWindowRateLimiter(self._storage)

    def acquire(self, key: str) -> float:
        from redis.exceptions import RedisError

        try:
            if self._limiter.hit(self._item, "device", key):
                return 0.0
            stats = self._limiter.get_window_stats(self._item, "device", key)
        except RedisError as err:
            raise LimiterUnavailableError(f"Redis: {type(err).__name__}: {err}") from err
        return max(0.001, stats.reset_time - time.time())
