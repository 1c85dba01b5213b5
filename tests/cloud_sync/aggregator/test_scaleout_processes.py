"""Two aggregator processes on the real PostgreSQL (issue 17): two `aggregator serve`, each with
its MQTT bridge in one shared subscription on a Mosquitto of our own. One device drains its
outbox over MQTT, another over HTTP to process A; A is SIGKILLed mid-drain and restarted.
Every record arrives exactly once, and the per-device rate limit holds across both."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require
from tests.support.harness import (
    DEVICE,
    OTHER_DEVICE,
    OTHER_ROOM,
    Aggregator,
    Broker,
    appliance_settings,
    fill_store,
    make_records,
    norm_key,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.mqtt, pytest.mark.postgres]
PG_ADMIN = os.environ.get("AGGREGATOR_TEST_PG", "host=127.0.0.1 port=5432 user=postgres")
LIMIT = 120  # requests per minute per device


@pytest.fixture
def pg_database() -> Iterator[str]:
    import psycopg

    try:
        admin = psycopg.connect(f"{PG_ADMIN} dbname=postgres connect_timeout=3",
                                autocommit=True)
    except psycopg.OperationalError:
        require(False, "PostgreSQL not reachable on 127.0.0.1:5432")
        return
    name = f"agg_scaleout_{os.getpid()}_{secrets.token_hex(3)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in PG_ADMIN.split())
    yield (f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host')}:"
           f"{params.get('port', '5432')}/{name}")
    with psycopg.connect(f"{PG_ADMIN} dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _keys(url: str) -> list[str]:
    import psycopg

    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        return [norm_key(str(k)) for (k,) in conn.execute("SELECT key FROM attendance")]


def _start(agg: Aggregator, broker: Broker, name: str) -> None:
    agg.start(mqtt_url=broker.url("aggregator"), extra_env={
        "AGGREGATOR_RATE_LIMIT_PER_MIN": str(LIMIT), "AGGREGATOR_INSTANCE_NAME": name})


def test_two_processes_one_killed_mid_drain_every_record_once_and_one_rate_limit(
    broker: Broker, pg_database: str, tmp_path: Path
) -> None:
    from appliance.store import Store
    from appliance.sync import SyncAgent

    a = Aggregator(tmp_path / "a", db_url=pg_database)
    b = Aggregator(tmp_path / "b", db_url=pg_database)
    keys = a.seed()
    agents: list[Any] = []
    stores: list[Any] = []
    try:
        _start(a, broker, "a")
        _start(b, broker, "b")

        def healthy() -> list[dict[str, Any]] | None:
            found = [httpx.get(f"{x.base_url}/health", headers={  # names: admin only
                "Authorization": f"Bearer {keys['admin']}"}).json() for x in (a, b)]
            return found if all(h["status"] == "ok" for h in found) else None

        health = wait_until(healthy, 30, "both processes healthy (bus and MQTT connected)")
        assert [h["instance"].split(":")[0] for h in health] == ["a", "b"]
        assert all(h["ready"] and h["bus"] == "postgresql connected"
                   and h["mqtt"] == "connected" for h in health), health

        # One device, both processes: about LIMIT requests pass in all, not LIMIT each.
        headers = {"Authorization": f"Bearer {keys[DEVICE]}"}
        codes: dict[str, list[int]] = {"a": [], "b": []}
        started = time.monotonic()
        with httpx.Client(headers=headers, timeout=10) as client:
            for _ in range(LIMIT):
                for name, agg in (("a", a), ("b", b)):
                    codes[name].append(client.get(f"{agg.base_url}/api/v1/schedule",
                                                  params={"room_id": "LAB-301"}).status_code)
        elapsed = time.monotonic() - started
        passed = sum(c == 200 for c in codes["a"] + codes["b"])
        assert 429 in codes["a"] and 429 in codes["b"]
        assert LIMIT <= passed <= LIMIT + int(elapsed * LIMIT / 60) + 1, (passed, elapsed)

        # Two devices drain: DEVICE over MQTT (either bridge), OTHER_DEVICE over HTTP to A.
        mqtt_records = make_records(3000)
        http_records = make_records(2000, device=OTHER_DEVICE, room=OTHER_ROOM)
        for device, records, kwargs in (
            (DEVICE, mqtt_records, {"aggregator_url": b.base_url, "api_key": keys[DEVICE],
                                    "mqtt_url": broker.url(DEVICE)}),
            (OTHER_DEVICE, http_records, {"aggregator_url": a.base_url,
                                          "api_key": keys[OTHER_DEVICE]}),
        ):
            data_dir = tmp_path / device
            store = Store(data_dir / "appliance.db")
            fill_store(store, records)
            settings = appliance_settings(data_dir, device=device,
                                          room=OTHER_ROOM if device == OTHER_DEVICE else
                                          "LAB-301", batch_size=50, ack_timeout_s=3,
                                          **kwargs)
            stores.append(store)
            agents.append(SyncAgent(settings, store))
        for agent in agents:
            agent.start()
        total = len(mqtt_records) + len(http_records)
        wait_until(lambda: len(_keys(pg_database)) >= 800, 60, "the drain to get going")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)  # no shutdown: in-flight work is lost
        a.proc.wait(10)
        a.proc = None
        killed_at = len(_keys(pg_database))
        assert killed_at < total, "drained before the kill"
        time.sleep(1.0)
        _start(a, broker, "a")
        wait_until(lambda: all(s.outbox_depth() == 0 for s in stores), 120,
                   "both outboxes to drain")
        # B's bridge took MQTT batches (all of them while A was down)
        metrics = httpx.get(f"{b.base_url}/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith(
            'aggregator_mqtt_messages_total{kind="attendance",result="ok"}'))
        assert float(line.split()[-1]) > 0
    finally:
        for agent in agents:
            agent.stop()
        for store in stores:
            store.close()
        a.stop()
        b.stop()
    stored = _keys(pg_database)
    doubled = [k for k, n in Counter(stored).items() if n > 1]
    assert not doubled, f"{len(doubled)} records stored twice"
    expected = {norm_key(str(r.key)) for r in mqtt_records + http_records}
    assert set(stored) == expected, f"{len(expected - set(stored))} records lost"
