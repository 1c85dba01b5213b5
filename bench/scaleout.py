"""Aggregator scale-out (JSON): HTTP ingest on PostgreSQL with 1 and with 2 processes
(``aggregator serve --workers N``), side by side in one run.

    python -m bench scaleout

On a temporary PostgreSQL database on 127.0.0.1:5432 (skipped, with the reason in the JSON,
when the server is not reachable), seeded like ``bench aggregator`` (100 rooms, one device
each, 5,000 students). For each worker count: ``aggregator serve --workers N`` in a subprocess
(the shared rate limit in PostgreSQL, the bus on LISTEN/NOTIFY: what several processes
really run), then DEVICES devices (one HTTP/1.1 connection each) POST batches of BATCH
records back to back (closed loop) for WARMUP_S uncounted, then DURATION_S counted seconds.
Reported: accepted records/s, requests/s, request latency (P50/P95/P99), errors, and the CPU
seconds the aggregator processes and the PostgreSQL server spent per 1,000 records (psutil),
from which docs/OPERATIONS.md sizes a deployment. ``ratio_2_to_1`` is measured in the same
run. The load generator runs on the same 2 cores as the servers and the database: the ratio
is what this machine gives, not what a separate load generator would see.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psutil

from bench.aggregator import REPO, _free_port, _postgres, _records, _seed, _settle, _stats_ms

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
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


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


async def _load(base: str, keys: dict[str, str], batch: int, warmup_s: float,
                duration_s: float) -> dict[str, Any]:
    """Every device posts batches of ``batch`` back to back; only requests started in the
    counted window are counted."""
    start = datetime.now(UTC) - timedelta(minutes=30)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    accepted = 0
    t_begin = time.perf_counter()
    count_from = t_begin + warmup_s
    count_to = count_from + duration_s

    async def device(name: str, key: str) -> None:
        nonlocal accepted
        room = f"LAB-{name.split('-')[1]}"
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(headers=headers, timeout=60) as client:
            while time.perf_counter() < count_to:
                body = {"v": 1, "device_id": name, "records": _records(name, room, batch, start)}
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{base}/api/v1/attendance", json=body)
                except httpx.HTTPError as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                t1 = time.perf_counter()
                if count_from <= t0 < count_to:
                    latencies.append((t1 - t0) * 1000)
                    if r.status_code == 200:
                        accepted += r.json()["accepted"]
                    else:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    await asyncio.gather(*(device(n, k) for n, k in list(keys.items())[:DEVICES]))
    return {"accepted_records": accepted, "requests": len(latencies),
            "latency": _stats_ms(latencies) if latencies else None, "errors": errors}


def _phase(server: Workers, database: str, keys: dict[str, str], batch: int,
           warmup_s: float, duration_s: float) -> dict[str, Any]:
    procs = server.processes()
    cpu_agg0, pg0 = _cpu_s(procs), _postgres_cpu(database)
    load0 = os.getloadavg()[0]
    wall0 = time.perf_counter()
    out = asyncio.run(_load(server.base, keys, batch, warmup_s, duration_s))
    wall = time.perf_counter() - wall0
    cpu_agg = _cpu_s(procs) - cpu_agg0
    cpu_pg = _pg_delta(pg0, _postgres_cpu(database))
    # CPU over the whole phase (warm-up too): the counted figures scaled to it
    scale = duration_s / wall
    out.update(
        batch_size=batch,
        records_per_s=round(out["accepted_records"] / duration_s),
        requests_per_s=round(out["requests"] / duration_s, 1),
        aggregator_cpu_ms_per_request=round(cpu_agg * scale * 1000 / max(1, out["requests"]),
                                            2),
        postgres_cpu_ms_per_request=round(cpu_pg * scale * 1000 / max(1, out["requests"]), 2),
        load_avg_1m_before_after=[round(load0, 2), round(os.getloadavg()[0], 2)],
    )
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


def run() -> dict[str, Any]:
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "devices": DEVICES,
                               "batch_size": BATCH, "counted_s": DURATION_S,
                               "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
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
        "ratio_2_to_1_p95": round(b2["latency"]["p95_ms"] / b1["latency"]["p95_ms"], 2)
        if b1["latency"] and b2["latency"] else None,
    }
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
