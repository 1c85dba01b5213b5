"""The per-device rate limit (``rate_limit_per_min``), where every process sees the same one.

- ``MemoryRateLimiter``: a token bucket in this process (SQLite: ``serve`` runs one process).
- ``PostgresRateLimiter``: the same token bucket in the UNLOGGED table ``rate_buckets``, taken
  with one atomic ``INSERT ... ON CONFLICT DO UPDATE``: PostgreSQL serialises the updates of
  one device's row, whichever process or server sends them, and its clock is the only one used.
- ``RedisRateLimiter``: the ``limits`` library's moving window (``N per minute``) in Redis, when
  ``redis_url`` is set.

Each answers ``acquire(key)``: 0 when the request may go on, else the seconds to wait.

The two shared stores are not asked on every request: a process takes a device's tokens a few
at a time (a *lease*: ``lease_size(per_min)``, 5 at the default 100 a minute, 1 below 40) and
spends them locally; ``try_acquire(key)`` answers from the lease without I/O, or None when
only the store can tell. Tokens come only out of the shared bucket, so the sustained rate is
exact across any number of processes; a burst may pass the limit by at most
``lease_size - 1`` requests per process that holds a lease of the device, and a lease is only
taken while the bucket holds at least that many tokens (near its limit a device is asked for
one token at a time, as before).
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

    def try_acquire(self, key: str) -> float | None:
        """``acquire`` without I/O, or None when only ``acquire`` can answer (optional:
        api/deps.py calls it when the limiter has it)."""


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

    def try_acquire(self, key: str) -> float | None:
        return self.acquire(key)


LEASE_MAX = 5
LEASE_SHARE = 20  # a lease is at most 1/20 of the bucket


def lease_size(per_min: int) -> int:
    """Tokens a process takes from the shared bucket at once (1: every request asks)."""
    return max(1, min(LEASE_MAX, per_min // LEASE_SHARE))


class _Leases:
    """Per-device tokens this process took from the shared store and has not spent yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left: dict[str, int] = {}

    def spend(self, key: str) -> bool:
        with self._lock:
            left = self._left.get(key, 0)
            if left <= 0:
                return False
            if left == 1:
                del self._left[key]
            else:
                self._left[key] = left - 1
            return True

    def keep(self, key: str, tokens: int) -> None:
        if tokens > 0:
            with self._lock:
                self._left[key] = self._left.get(key, 0) + tokens


_REFILLED = ("least(:cap, b.tokens + extract(epoch FROM clock_timestamp() - b.at) "
             "* :rate)")
_BUCKET_SQL = text(
    "INSERT INTO rate_buckets AS b (key, tokens, at, allowed) "  # noqa: S608 - constants
    "VALUES (:key, :cap - :want, clock_timestamp(), true) "
    "ON CONFLICT (key) DO UPDATE SET "
    f"allowed = {_REFILLED} >= :want, "
    f"tokens = {_REFILLED} - CASE WHEN {_REFILLED} >= :want THEN :want ELSE 0 END, "
    "at = clock_timestamp() "
    "RETURNING allowed, tokens"
)


class PostgresRateLimiter:
    """The token bucket of ``MemoryRateLimiter`` in PostgreSQL (table ``rate_buckets``),
    taken a lease at a time (see the module docstring)."""

    blocking = True

    def __init__(self, engine: Engine, per_min: int) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.capacity = float(per_min)
        self.rate = per_min / 60.0
        self.lease = lease_size(per_min)
        self._leases = _Leases()

    def try_acquire(self, key: str) -> float | None:
        return 0.0 if self._leases.spend(key) else None

    def _take(self, key: str, want: int) -> tuple[bool, float]:
        with self._engine.connect() as conn:
            allowed, tokens = conn.execute(
                _BUCKET_SQL,
                {"key": key[:200], "cap": self.capacity, "rate": self.rate, "want": want},
            ).one()
        return bool(allowed), float(tokens)

    def acquire(self, key: str) -> float:
        if self._leases.spend(key):
            return 0.0
        allowed, tokens = self._take(key, self.lease)
        if allowed:
            self._leases.keep(key, self.lease - 1)
            return 0.0
        if self.lease > 1 and tokens >= 1.0:  # not enough for a lease: one token
            allowed, tokens = self._take(key, 1)
            if allowed:
                return 0.0
        return (1.0 - tokens) / self.rate


class RedisRateLimiter:
    """``per_min`` requests per moving minute per device, in Redis (the ``limits`` library),
    taken a lease at a time (see the module docstring)."""

    blocking = True

    def __init__(self, url: str, prefix: str, per_min: int) -> None:
        from limits import RateLimitItemPerMinute
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        self._item = RateLimitItemPerMinute(per_min)
        self._storage = RedisStorage(url, key_prefix=f"{prefix}:limits",
                                     socket_timeout=2, socket_connect_timeout=2)
        self._limiter = MovingWindowRateLimiter(self._storage)
        self.lease = lease_size(per_min)
        self._leases = _Leases()

    def try_acquire(self, key: str) -> float | None:
        return 0.0 if self._leases.spend(key) else None

    def acquire(self, key: str) -> float:
        from redis.exceptions import RedisError

        if self._leases.spend(key):
            return 0.0
        try:
            for want in dict.fromkeys((self.lease, 1)):  # a lease, else one token
                if self._limiter.hit(self._item, "device", key, cost=want):
                    self._leases.keep(key, want - 1)
                    return 0.0
            stats = self._limiter.get_window_stats(self._item, "device", key)
        except RedisError as err:
            raise LimiterUnavailableError(f"Redis: {type(err).__name__}: {err}") from err
        return max(0.001, stats.reset_time - time.time())
