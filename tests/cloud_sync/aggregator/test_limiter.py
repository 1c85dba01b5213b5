"""The shared rate limit taken a lease at a time (api/limiter.py): most requests cost no round
trip to PostgreSQL or Redis, and two processes still share one limit: the tokens every
process spends come out of the one shared bucket."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event

from cloud_sync.aggregator.api.limiter import (
    MemoryRateLimiter,
    PostgresRateLimiter,
    RedisRateLimiter,
    lease_size,
)
from cloud_sync.aggregator.db.migrate import upgrade_engine
from cloud_sync.aggregator.db.session import make_engine
from tests.cloud_sync.aggregator.test_scaleout import REDIS_URL, _redis_up
from tests.conftest import require


def test_lease_size() -> None:
    assert lease_size(100) == 5  # the default limit
    assert lease_size(100000) == 5
    assert lease_size(60) == 3
    assert lease_size(39) == 1  # a small limit: every request asks the store
    assert lease_size(1) == 1


def test_memory_limiter_answers_without_io() -> None:
    limiter = MemoryRateLimiter(2)
    assert limiter.try_acquire("d") == 0.0 and limiter.try_acquire("d") == 0.0
    assert (limiter.try_acquire("d") or 0) > 0


@pytest.fixture
def engines(pg_url: str | None) -> Iterator[list[Engine]]:
    """Two engines on one migrated PostgreSQL database: two aggregator processes."""
    require(pg_url is not None, "PostgreSQL not reachable on 127.0.0.1:5432")
    assert pg_url is not None
    made = [make_engine(pg_url), make_engine(pg_url)]
    upgrade_engine(made[0])
    yield made
    with made[0].begin() as conn:
        conn.exec_driver_sql("TRUNCATE rate_buckets")
    for engine in made:
        engine.dispose()


def _count_statements(engine: Engine) -> list[int]:
    seen = [0]

    def count(*_args: Any) -> None:
        seen[0] += 1

    event.listen(engine, "before_cursor_execute", count)
    return seen


def _alternate(limiters: list[Any], key: str, rounds: int) -> tuple[int, float]:
    started = time.monotonic()
    passed = 0
    for _ in range(rounds):
        for limiter in limiters:
            passed += limiter.acquire(key) == 0.0
    return passed, time.monotonic() - started


def test_postgres_lease_one_round_trip_per_five_requests_one_limit_for_two_processes(
        engines: list[Engine]) -> None:
    key = f"pi-{secrets.token_hex(3)}"
    a, b = (PostgresRateLimiter(engine, 100) for engine in engines)
    statements = _count_statements(engines[0])
    assert a.try_acquire(key) is None  # nothing leased yet: only the store can tell
    assert [a.acquire(key) for _ in range(10)] == [0.0] * 10
    assert statements[0] == 2  # 10 requests, 2 leases of 5
    assert a.try_acquire(key) is None
    # two processes take turns until the device is over its limit: 100 a minute in all
    # (plus what the bucket refilled meanwhile), not 100 per process
    passed, elapsed = _alternate([a, b], key, 150)
    passed += 10
    assert 100 <= passed <= 100 + int(elapsed * 100 / 60) + 1, (passed, elapsed)
    wait = b.acquire(key)
    assert 0 < wait <= 1.0  # one token refills in 0.6 s
    # near the limit the store is asked for one token at a time: a token that refilled is
    # not lost in a lease that cannot be filled
    time.sleep(wait + 0.05)
    assert a.acquire(key) == 0.0


def test_redis_lease_one_limit_for_two_processes() -> None:
    require(_redis_up(), f"Redis not reachable at {REDIS_URL}")
    prefix = f"test-{secrets.token_hex(4)}"
    a, b = (RedisRateLimiter(REDIS_URL, prefix, 100) for _ in range(2))
    key = "pi-1"
    passed, _ = _alternate([a, b], key, 150)
    assert passed == 100  # a moving window: nothing comes back within the minute
    assert a.acquire(key) > 0 and b.acquire(key) > 0
