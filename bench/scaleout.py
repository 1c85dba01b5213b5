"""Aggregator scale-out (JSON): HTTP ingest on PostgreSQL with 1 and with 2 processes
(``aggregator serve --workers N``), side by side in one run.

    python -m bench scaleout

On a temporary PostgreSQL database on 127.0.0.1:5432 (skipped, with the reason in the JSON,
when the server is not reachable), seeded like ``bench aggregator`` (100 rooms, one device
each, 5,000 students). For each worker count: ``aggregator serve --workers N`` in a subprocess
(the shared rate limit in PostgreSQL, the bus on LISTEN/NOTIFY: what several processes
really run), then ``wrk`` with DEVICES connections POSTs batches of BATCH records, each from
the next device, back to back (closed loop) for WARMUP_S uncounted, then DURATION_S counted
seconds; then the same with 1-record batches. Reported per phase (bench/loadgen.py): records/s,
requests/s, latency P50/P95/P99, the CPU per request of the aggregator processes and of the
PostgreSQL backends of the bench database, the processes' run-queue wait, CPU pressure and the
load average. ``what_it_shows`` says what the 1-to-2 comparison can and cannot show on a
2-core machine; ``bench cost`` has the CPU per request against a bare endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psutil

from bench.aggregator import (
    REPO,
    _free_port,
    _postgres,
    _records,
    _seed,
    _settle,
    stop_process,
)
from bench.loadgen import KEY, WRK_MISSING, Target, key_prefix, measure, wrk_available

DEVICES = 50
BATCH = 50
SMALL_BATCH = 1  # a request the size of a heartbeat or an event: the cost per request
WARMUP_S = 3.0
DURATION_S = 12.0
SMALL_DURATION_S = 8.0


class Workers:
    """`aggregator serve --workers N` on a free loopback port; ready when every worker
    answered /health."""

    def __init__(self, url: str, workers: int) -> None:
        self.port = _free_port()
        env = {**os.environ, "AGGREGATOR_DATABASE_URL": url, "AGGREGATOR_LOG_LEVEL": "WARNING",
               "AGGREGATOR_RATE_LIMIT_PER_MIN": "100000"}
        for name in ("AGGREGATOR_CONFIG", "AGGREGATOR_MQTT_URL", "AGGREGATOR_REDIS_URL"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloud_sync.aggregator.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", str(workers)], cwd=REPO, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        seen: set[str] = set()
        deadline = time.monotonic() + 120
        while len(seen) < workers and time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.base}/health", timeout=2)
                if r.status_code == 200:
                    seen.add(r.json()["instance"])
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if len(seen) < workers:
            self.stop()
            raise RuntimeError(f"aggregator --workers {workers} did not start")

    def processes(self) -> list[psutil.Process]:
        parent = psutil.Process(self.proc.pid)
        return [parent, *parent.children(recursive=True)]

    def stop(self) -> None:
        stop_process(self.proc, 20)


def _postgres_cpu(database: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend serving ``database`` (its process title names
    the database: other users of the server are not counted)."""
    out: dict[int, float] = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info.get("cmdline") or [])
        if title.startswith("postgres:") and f" {database} " in f"{title} ":
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            out[proc.pid] = times.user + times.system
    return out


def _pg_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """Backends that started during the load count whole (connections open lazily)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _targets(keys: dict[str, str], batch: int) -> Target:
    """Each device's batch of ``batch`` records (fresh keys on every request)."""
    start = datetime.now(UTC) - timedelta(minutes=30)
    target = Target("/api/v1/attendance")
    for device, key in list(keys.items())[:DEVICES]:
        room = f"LAB-{device.split('-')[1]}"
        records = _records(device, room, batch, start)
        for record in records:
            record["key"] = KEY
        target.bodies.append((
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            json.dumps({"v": 1, "device_id": device, "records": records})))
    return target


def _phase(server: Workers, database: str, keys: dict[str, str], batch: int,
           warmup_s: float, duration_s: float) -> dict[str, Any]:
    pids = [p.pid for p in server.processes()]
    pg0 = _postgres_cpu(database)
    out = measure(server.base, _targets(keys, batch), pids, DEVICES, warmup_s, duration_s,
                  key_prefix())
    out["database_cpu_ms_per_request"] = round(
        _pg_delta(pg0, _postgres_cpu(database)) * 1000 / max(1, out["requests"]), 3)
    out.update(batch_size=batch, records_per_s=round(out["requests_per_s"] * batch))
    return out


def _measure(url: str, keys: dict[str, str], workers: int) -> dict[str, Any]:
    database = url.rsplit("/", 1)[-1]
    server = Workers(url, workers)
    try:
        return {"workers": workers,
                "batches": _phase(server, database, keys, BATCH, WARMUP_S, DURATION_S),
                "small_requests": _phase(server, database, keys, SMALL_BATCH, 1.0,
                                         SMALL_DURATION_S)}
    finally:
        server.stop()


WHAT_IT_SHOWS = (
    "Whether processes of one server answer as one and what each request costs (CPU per "
    "request of the aggregator processes and of PostgreSQL, from /proc): that holds on any "
    "machine. What it cannot show on this 2-core machine is the throughput a second process "
    "adds: wrk, PostgreSQL, both workers and other people's jobs share the same two cores, "
    "so a second worker only takes CPU time from the first (see server_runq_wait and "
    "cpu_pressure_some_share beside each figure); the ratio of 2 to 1 workers is "
    "meaningful only where the server has a free core per worker and the database and the "
    "load generator run elsewhere. Latencies are those of a saturated closed loop (DEVICES "
    "connections posting back to back): queueing, not service times.")


def run() -> dict[str, Any]:
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "devices": DEVICES,
                               "batch_size": BATCH, "counted_s": DURATION_S,
                               "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
                               "what_it_shows": WHAT_IT_SHOWS}
    if not wrk_available():
        results["skipped"] = WRK_MISSING
        return results
    pg = _postgres()
    if pg is None:
        results["postgresql"] = {"skipped": "no PostgreSQL server on 127.0.0.1:5432"}
        return results
    url, drop = pg
    try:
        seeded = _seed(url)
        _settle(seeded["engine"])
        seeded["engine"].dispose()
        one = _measure(url, seeded["keys"], 1)
        two = _measure(url, seeded["keys"], 2)
    finally:
        drop()
    b1, b2 = one["batches"], two["batches"]
    results["postgresql"] = {
        "workers_1": one, "workers_2": two,
        "ratio_2_to_1_records_per_s": round(b2["records_per_s"] / b1["records_per_s"], 2)
        if b1["records_per_s"] else None,
        "ratio_2_to_1_p95": round(b2["latency_ms"]["p95_ms"] / b1["latency_ms"]["p95_ms"], 2)
        if b1["latency_ms"]["p95_ms"] else None,
    }
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
