"""Backlog drain: how long a device takes to empty a large outbox into the REAL aggregator.

For each transport (HTTP, and MQTT through a Mosquitto of our own), a fresh aggregator
(`aggregator serve`, SQLite with synchronous=FULL, its default) and a device store holding
``N`` unsent records; the sync agent (default batch size) drains it; we time from the agent's
start to an empty outbox and check that the aggregator holds every record exactly once.

    python -m bench sync        (env BENCH_SYNC_RECORDS, default 20000)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.harness import (
    DEVICE,
    MOSQUITTO,
    OTHER_DEVICE,
    Aggregator,
    Broker,
    appliance_settings,
    make_records,
    wait_until,
)


def _drain(transport: str, n: int, workdir: Path) -> dict[str, Any]:
    from appliance.store import Store
    from appliance.sync import SyncAgent

    agg = Aggregator(workdir / "aggregator")
    keys = agg.seed()
    broker = None
    if transport == "mqtt":
        broker = Broker(workdir / "broker", ["aggregator", DEVICE, OTHER_DEVICE])
        broker.start()
    agent = None
    store = Store(workdir / "dev" / "appliance.db")
    try:
        agg.start(mqtt_url=broker.url("aggregator") if broker else None,
                  sqlite_synchronous="FULL")
        records = make_records(n)
        t_fill = time.perf_counter()
        store.add_records(records)
        fill_s = time.perf_counter() - t_fill
        settings = appliance_settings(
            workdir / "dev", aggregator_url=agg.base_url, api_key=keys[DEVICE],
            mqtt_url=broker.url(DEVICE) if broker else None,
            batch_size=200, heartbeat_s=60, ack_timeout_s=20, backoff_max_s=5,
        )
        agent = SyncAgent(settings, store)
        t0 = time.perf_counter()
        agent.start()
        wait_until(lambda: store.outbox_depth() == 0, 1800, "the backlog to drain", 0.02)
        seconds = time.perf_counter() - t0
        stats = agent.stats
    finally:
        if agent is not None:
            agent.stop()
        store.close()
        agg.stop()
        if broker is not None:
            broker.stop()
    counts = Counter(agg.attendance_keys())
    expected = {str(r.key) for r in records}
    return {
        "records": n,
        "batch_size": 200,
        "seconds": round(seconds, 2),
        "records_per_s": round(n / seconds, 1),
        "batches": stats.batches,
        "accepted": stats.accepted,
        "duplicate": stats.duplicate,
        "upload_failures": stats.failures,
        "exactly_once": set(counts) == expected and max(counts.values()) == 1,
        "outbox_fill_seconds": round(fill_s, 2),
        # tests.support.harness.Aggregator.start raises the per-device rate limit: with the
        # default 100 requests/min an HTTP drain is capped at 100 batches (20,000 records) a
        # minute at batch size 200.
        "aggregator_rate_limit_per_min": 100000,
        "agent_backoff_max_s": 5,
    }


def run() -> dict[str, Any]:
    n = int(os.environ.get("BENCH_SYNC_RECORDS", "20000"))
    out: dict[str, Any] = {}
    transports = ["http"] + (["mqtt"] if MOSQUITTO.exists() else [])
    for transport in transports:
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-sync-{transport}-"))
        try:
            out[transport] = _drain(transport, n, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
