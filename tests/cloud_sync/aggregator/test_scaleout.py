"""Two aggregator apps on one PostgreSQL database behave as one (issue 17): the per-device rate
limit is shared, and an admin write made through one is seen by the other at once (its caches
are cleared through the bus), with the bus and the limit in PostgreSQL or in Redis.

The real multi-process run (two `aggregator serve`, two MQTT bridges, a process killed while
devices drain) is test_scaleout_processes.py; this one runs two apps in one process."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.db.session import make_engine
from tests.cloud_sync.aggregator.conftest import TABLES, World, auth
from tests.conftest import require

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def db_url(pg_url: str | None) -> Iterator[str]:
    """PostgreSQL only (overrides conftest's sqlite/postgres pair): SQLite runs one process,
    and `serve` refuses --workers 2 on it (test_cli.py)."""
    require(pg_url is not None, "PostgreSQL not reachable on 127.0.0.1:5432")
    assert pg_url is not None
    yield pg_url
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["postgresql", "redis"])
def shared(request: pytest.FixtureRequest, settings: Any) -> dict[str, Any]:
    """Settings overrides of the shared store: none (PostgreSQL) or Redis."""
    if request.param == "postgresql":
        return {"database_url": settings.database_url, "data_dir": settings.data_dir}
    require(_redis_up(), f"Redis not reachable at {REDIS_URL}")
    return {"database_url": settings.database_url, "data_dir": settings.data_dir,
            "redis_url": REDIS_URL, "redis_prefix": f"test-{secrets.token_hex(4)}"}


def _bus(shared: dict[str, Any]) -> str:
    return f"{'redis' if 'redis_url' in shared else 'postgresql'} connected"


def _listening(client: TestClient, shared: dict[str, Any], timeout_s: float = 20) -> None:
    """Until the app's bus listens (start() waits 5 s for it; a loaded machine may take
    longer): what is published before then does not reach it."""
    deadline = time.monotonic() + timeout_s
    while client.get("/health").json()["bus"] != _bus(shared):
        assert time.monotonic() < deadline, "the bus did not connect"
        time.sleep(0.05)


def test_key_rotation_through_one_app_is_seen_by_the_other_at_once(
    world: World, shared: dict[str, Any]
) -> None:
    schedule = {"room_id": "LAB-301"}
    params = {"rate_limit_per_min": 100000, **shared}
    with TestClient(create_app(aggregator_config.load(None, **params))) as first, \
            TestClient(create_app(aggregator_config.load(None, **params))) as second:
        # both apps have the device's key cached (auth_cache_s: 30 s)
        for client in (first, second):
            _listening(client, shared)
            assert client.get("/api/v1/schedule", params=schedule,
                              headers=world.device).status_code == 200
        new = first.post(f"/api/v1/devices/{world.device_id}/rotate-key", headers=world.admin)
        assert new.status_code == 200
        # the old key is refused by the other app without waiting out its cache; the
        # notification takes milliseconds (a few requests at most)
        deadline = time.monotonic() + 1.0
        old = second.get("/api/v1/schedule", params=schedule, headers=world.device)
        while old.status_code == 200 and time.monotonic() < deadline:
            old = second.get("/api/v1/schedule", params=schedule, headers=world.device)
        assert old.status_code == 401
        assert second.get("/api/v1/schedule", params=schedule,
                          headers=auth(new.json()["api_key"])).status_code == 200


@pytest.mark.parametrize("limit", [20])
def test_rate_limit_holds_across_two_apps(world: World, shared: dict[str, Any],
                                          limit: int) -> None:
    """One device sends 2 x limit requests alternately to two apps: about ``limit`` pass in
    all (the bucket refills limit/60 per second), not ``limit`` per app."""
    params = {"rate_limit_per_min": limit, **shared}
    with TestClient(create_app(aggregator_config.load(None, **params))) as a, \
            TestClient(create_app(aggregator_config.load(None, **params))) as b:
        _listening(a, shared)
        _listening(b, shared)
        started = time.monotonic()
        codes: dict[str, list[int]] = {"a": [], "b": []}
        for _ in range(limit):
            for name, client in (("a", a), ("b", b)):
                codes[name].append(client.get("/api/v1/schedule",
                                              params={"room_id": "LAB-301"},
                                              headers=world.device).status_code)
        elapsed = time.monotonic() - started
        passed = sum(c == 200 for c in codes["a"] + codes["b"])
        assert set(codes["a"] + codes["b"]) == {200, 429}
        assert 429 in codes["a"] and 429 in codes["b"]
        assert limit <= passed <= limit + int(elapsed * limit / 60) + 1, (passed, elapsed)
        _listening(b, shared, timeout_s=0)


def test_live_feed_client_of_one_app_sees_records_stored_by_the_other(
    world: World, shared: dict[str, Any]
) -> None:
    """/ws/events on app A; a batch stored through app B reaches it (relayed on the bus,
    split to fit PostgreSQL's 8,000-byte NOTIFY payload)."""
    params = {"rate_limit_per_min": 100000, **shared}
    with TestClient(create_app(aggregator_config.load(None, **params))) as a, \
            TestClient(create_app(aggregator_config.load(None, **params))) as b:
        _listening(a, shared)
        _listening(b, shared)
        _relayed(world, a, b)


def _relayed(world: World, a: TestClient, b: TestClient) -> None:
    """A live-feed client of A (a subscriber on its own event loop, as /ws/events makes one;
    the WebSocket itself is test_live_feed.py's) gets B's records."""
    import asyncio
    import json
    import threading

    from tests.cloud_sync.aggregator.conftest import batch, record

    a_live = a.app.state.ctx.live  # type: ignore[attr-defined]
    b_live = b.app.state.ctx.live  # type: ignore[attr-defined]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def subscribe() -> Any:
        return a_live.subscribe()

    sub = asyncio.run_coroutine_threadsafe(subscribe(), loop).result(10)
    try:
        deadline = time.monotonic() + 5
        while not b_live.wanted() and time.monotonic() < deadline:  # A's "listening" notice
            time.sleep(0.01)
        assert b_live.wanted()
        records = [record(world, f"S00{1 + i % 4}", world.at(0, 9, 30, i)) for i in range(60)]
        r = b.post("/api/v1/attendance", json=batch(world, records), headers=world.device)
        assert r.status_code == 200 and r.json()["accepted"] == 60
        seen: set[str] = set()
        parts = 0
        while len(seen) < 60:
            text = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(sub.queue.get(), 10), loop).result(15)
            message = json.loads(text)
            assert message["type"] == "attendance" and message["room_id"] == "LAB-301"
            seen.update(item["key"] for item in message["records"])
            parts += 1
        assert seen == {item["key"] for item in records}
        if a.app.state.ctx.settings.redis_url is None:  # type: ignore[attr-defined]
            assert parts > 1  # 60 records do not fit one NOTIFY payload: split
    finally:
        a_live.unsubscribe(sub)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_one_bridge_of_many_publishes_for_home_assistant(db_url: str) -> None:
    """The Home Assistant publisher (unknown-face triggers fire once, not once per process):
    one of two holds the advisory lock; when it goes, the other takes over."""
    from cloud_sync.aggregator.leader import HA_PUBLISHER_LOCK_ID, Leader

    engines = [make_engine(db_url) for _ in range(2)]
    leaders = [Leader(engine, HA_PUBLISHER_LOCK_ID, "test") for engine in engines]
    try:
        first = [leader.held() for leader in leaders]
        assert first == [True, False]
        assert [leader.held() for leader in leaders] == [True, False]  # stable
        leaders[0].close()  # that process stopped (or died: its connection closes)
        deadline = time.monotonic() + 5  # the server releases the lock as the backend exits
        while not leaders[1].held() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leaders[1].held()
        assert not leaders[0].held()
    finally:
        for leader in leaders:
            leader.close()
        for engine in engines:
            engine.dispose()
