"""Aggregator benchmarks (JSON): batch ingest, HTTP latency under 100 devices, roster reads.

    python -m bench aggregator

Backends: a temporary SQLite file, and a temporary PostgreSQL database on 127.0.0.1:5432
(skipped, with the reason in the JSON, when the server is not reachable). Everything is bounded
(record counts and durations are constants below) and runs on loopback only.

- ingest: ``ingest_batch`` (the code path of HTTP and MQTT) with batches of 1,000 records, in
  process; records/s over INGEST_BATCHES batches. Target >= 10,000 records/s.
- http_devices: ``aggregator serve`` (uvicorn) in a subprocess on a free localhost port; 100
  devices (one httpx.AsyncClient each; after every device's first, uncounted request) each POST
  HTTP_BATCHES batches of 10 records, one a
  second (60/min: under the default rate limit of 100/min), starts spread over the first
  second. Latency per request; target P95 < 50 ms. A "burst" figure (every device posting at
  the same instant, once) is reported too, for information.
- roster: 5,000 students with one embedding each, a 50-student course; GET /api/v1/schedule of
  the room (device key, no If-None-Match) ROSTER_READS times over HTTP; target P95 < 10 ms.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from sqlalchemy import insert

from cloud_sync.aggregator.db.migrate import upgrade_engine
from cloud_sync.aggregator.db.models import (
    Course,
    Enrollment,
    FaceEmbedding,
    Room,
    Schedule,
    Student,
)
from cloud_sync.aggregator.db.session import make_engine, make_session_factory
from cloud_sync.aggregator.services.devices import add_device, create_admin_token
from cloud_sync.aggregator.services.ingest import ingest_batch
from cloud_sync.aggregator.state import STATE_INFO_KEY, AppState
from cloud_sync.protocol import AttendanceBatch, AttendanceRecord

REPO = Path(__file__).resolve().parents[1]
STUDENTS = 5000
CLASS_SIZE = 50
INGEST_BATCHES = 20
INGEST_BATCH_SIZE = 1000
DEVICES = 100
HTTP_BATCHES = 10
HTTP_BATCH_SIZE = 10
ROSTER_READS = 200
PG_DSN = os.environ.get("AGGREGATOR_BENCH_PG", "host=127.0.0.1 port=5432 user=postgres")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[index], 2)


def _stats_ms(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": _pct(values, 50), "p95_ms": _pct(values, 95),
            "p99_ms": _pct(values, 99), "max_ms": round(max(values), 2),
            "mean_ms": round(statistics.fmean(values), 2)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seed(url: str) -> dict[str, Any]:
    """5,000 students with one embedding each; CS101 (50 students) in LAB-1 all day, every day;
    100 rooms with one device each; an admin token."""
    engine = make_engine(url)
    upgrade_engine(engine)
    # the app's state (caches, group committer, known partitions), as create_app gives it
    sessions = make_session_factory(engine, info={STATE_INFO_KEY: AppState(engine)})
    now = datetime.now(UTC)
    rng = np.random.default_rng(7)
    with sessions.begin() as session:
        session.execute(insert(Room), [
            {"id": f"LAB-{i}", "name": f"Lab {i}", "site": "bench", "timezone": "UTC",
             "created_at": now} for i in range(1, DEVICES + 1)])
        session.execute(insert(Course), [{"id": "CS101", "name": "Bench", "created_at": now}])
        session.execute(insert(Student), [
            # consent granted: rosters leave out students without it (privacy)
            {"id": f"S{i:05d}", "name": f"Student {i}", "created_at": now,
             "consent": "granted", "consent_at": now, "consent_by": "bench"}
            for i in range(STUDENTS)])
        session.execute(insert(FaceEmbedding), [
            {"student_id": f"S{i:05d}", "source": "bench", "quality": 0.9, "created_at": now,
             "vector": rng.normal(size=128).astype("<f4").tobytes()}  # dlib rows (legacy default)
            for i in range(STUDENTS)])
        session.execute(insert(Enrollment), [
            {"student_id": f"S{i:05d}", "course_id": "CS101", "created_at": now}
            for i in range(CLASS_SIZE)])
        session.execute(insert(Schedule), [
            {"course_id": "CS101", "room_id": f"LAB-{r}", "weekday": d,
             "start_time": dtime(0, 0), "end_time": dtime(23, 59)}
            for r in range(1, DEVICES + 1) for d in range(7)])
    keys: dict[str, str] = {}
    with sessions() as session:
        for i in range(1, DEVICES + 1):
            _, key = add_device(session, f"LAB-{i}", f"pi-{i}")
            keys[f"pi-{i}"] = key
        _, token = create_admin_token(session, "bench")
    return {"engine": engine, "sessions": sessions, "keys": keys, "admin": token}


def _records(device: str, room: str, count: int, start: datetime) -> list[dict[str, Any]]:
    return [{"key": str(uuid.uuid4()), "student_id": f"S{i % STUDENTS:05d}", "room_id": room,
             "device_id": device, "seen_at": (start + timedelta(milliseconds=i)).isoformat(),
             "confidence": 0.9} for i in range(count)]


def bench_ingest(seeded: dict[str, Any]) -> dict[str, Any]:
    sessions = seeded["sessions"]
    start = datetime.now(UTC) - timedelta(hours=1)
    batches = [
        AttendanceBatch(device_id="pi-1", records=[
            AttendanceRecord.model_validate(r)
            for r in _records("pi-1", "LAB-1", INGEST_BATCH_SIZE, start + timedelta(minutes=b))])
        for b in range(INGEST_BATCHES)
    ]
    # warm-up (caches, partitions) on one batch, not counted
    warm = AttendanceBatch(device_id="pi-1", records=[
        AttendanceRecord.model_validate(r) for r in _records("pi-1", "LAB-1", 100, start)])
    with sessions() as session:
        ingest_batch(session, "pi-1", warm)
    accepted = 0
    t0 = time.perf_counter()
    for batch in batches:
        with sessions() as session:
            accepted += ingest_batch(session, "pi-1", batch).accepted
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    duplicates = 0
    for batch in batches[:5]:
        with sessions() as session:
            duplicates += ingest_batch(session, "pi-1", batch).duplicate
    dup_elapsed = time.perf_counter() - t1
    return {
        "records": accepted, "batch_size": INGEST_BATCH_SIZE, "seconds": round(elapsed, 3),
        "records_per_s": round(accepted / elapsed),
        "resend_records_per_s": round(duplicates / dup_elapsed),
        "target_records_per_s": 10000, "ok": accepted / elapsed >= 10000,
    }


class Server:
    """`aggregator serve` in a subprocess on a free loopback port."""

    def __init__(self, url: str, rate_limit: int) -> None:
        self.port = _free_port()
        env = {**os.environ, "AGGREGATOR_DATABASE_URL": url, "AGGREGATOR_LOG_LEVEL": "WARNING",
               "AGGREGATOR_RATE_LIMIT_PER_MIN": str(rate_limit)}
        env.pop("AGGREGATOR_CONFIG", None)
        env.pop("AGGREGATOR_MQTT_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloud_sync.aggregator.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port)], cwd=REPO, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("aggregator did not start")

    def stop(self) -> None:
        stop_process(self.proc, 10)


def stop_process(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def _devices(base: str, keys: dict[str, str]) -> dict[str, Any]:
    latencies: list[float] = []
    burst: list[float] = []
    errors: dict[str, int] = {}
    start = datetime.now(UTC) - timedelta(minutes=30)

    async def one(client: httpx.AsyncClient, device: str, room: str, into: list[float]) -> None:
        body = {"v": 1, "device_id": device,
                "records": _records(device, room, HTTP_BATCH_SIZE, start)}
        t0 = time.perf_counter()
        r = await client.post(f"{base}/api/v1/attendance", json=body)
        into.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200 or r.json()["accepted"] != HTTP_BATCH_SIZE:
            errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    warmed = asyncio.Event()
    ready = asyncio.Event()
    done_warming = 0

    async def device_loop(index: int, device: str, key: str) -> None:
        nonlocal done_warming
        room = f"LAB-{device.split('-')[1]}"
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(headers=headers, timeout=30) as client:
            await one(client, device, room, [])  # connect + credential lookup: not counted
            done_warming += 1
            if done_warming == len(keys):
                warmed.set()
            await warmed.wait()  # no measured request overlaps another device's warm-up
            await asyncio.sleep(index / DEVICES)
            for _ in range(HTTP_BATCHES):
                tick = time.perf_counter()
                await one(client, device, room, latencies)
                await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - tick)))
            await ready.wait()
            await one(client, device, room, burst)

    tasks = [asyncio.create_task(device_loop(i, d, k)) for i, (d, k) in enumerate(keys.items())]
    await warmed.wait()
    await asyncio.sleep(HTTP_BATCHES + 1.5)
    ready.set()
    await asyncio.gather(*tasks)
    return {"devices": len(keys), "batch_size": HTTP_BATCH_SIZE,
            "requests_per_device": HTTP_BATCHES, "rate_per_device": "1 batch/s",
            "steady": _stats_ms(latencies), "burst_all_at_once": _stats_ms(burst),
            "errors": errors, "target_p95_ms": 50,
            "ok": _pct(latencies, 95) < 50 and not errors}


def _server_p95_bucket(base: str, route: str) -> float | None:
    """Upper bound (ms) of the histogram bucket holding the server-side 95th percentile."""
    buckets: list[tuple[float, float]] = []
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("aggregator_http_request_seconds_bucket") and f'route="{route}"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(le * 1000 for le, count in sorted(buckets) if count >= 0.95 * total)


# the bench's random 128-d rows are labelled dlib's (the column's legacy default)
ROSTER_QUERY = {"room_id": "LAB-1", "embedder": "dlib"}


def bench_roster(base: str, key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    times: list[float] = []
    size = 0
    with httpx.Client(headers=headers, timeout=30) as client:
        for _ in range(10):
            client.get(f"{base}/api/v1/schedule", params=ROSTER_QUERY)
        for _ in range(ROSTER_READS):
            t0 = time.perf_counter()
            r = client.get(f"{base}/api/v1/schedule", params=ROSTER_QUERY)
            times.append((time.perf_counter() - t0) * 1000)
            size = len(r.content)
            assert r.status_code == 200
        roster = r.json()["rosters"]["CS101"]
        etag = r.headers["etag"]
        t0 = time.perf_counter()
        not_modified = client.get(f"{base}/api/v1/schedule", params=ROSTER_QUERY,
                                  headers={"If-None-Match": etag})
        t304 = (time.perf_counter() - t0) * 1000
    return {"students_in_db": STUDENTS, "class_size": len(roster), "response_bytes": size,
            **_stats_ms(times), "not_modified_ms": round(t304, 2),
            "not_modified_status": not_modified.status_code,
            "target_p95_ms": 10, "ok": _pct(times, 95) < 10 and len(roster) == CLASS_SIZE}


def _settle(engine: Any) -> None:
    """VACUUM ANALYZE + CHECKPOINT after the bulk loads, as a live database would have been:
    otherwise autovacuum/autoanalyze of the fresh tables, or a checkpoint flushing the load's
    pages, runs during the next measurement."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("VACUUM ANALYZE")
            conn.exec_driver_sql("CHECKPOINT")
        else:
            conn.exec_driver_sql("ANALYZE")


def _backend(url: str) -> dict[str, Any]:
    seeded = _seed(url)
    _settle(seeded["engine"])
    out: dict[str, Any] = {"ingest": bench_ingest(seeded)}
    _settle(seeded["engine"])
    seeded["sessions"].kw["info"][STATE_INFO_KEY].close()
    seeded["engine"].dispose()
    roster_key = seeded["keys"]["pi-1"]
    gc.collect()  # the ingest phase's garbage must not be collected inside the measurement
    server = Server(url, rate_limit=100)
    try:
        proc = psutil.Process(server.proc.pid)
        cpu0 = sum(proc.cpu_times()[:2])
        load0 = os.getloadavg()[0]
        out["http_devices"] = asyncio.run(_devices(server.base, seeded["keys"]))
        requests = DEVICES * (HTTP_BATCHES + 2)
        out["http_devices"].update(
            server_cpu_ms_per_request=round(
                (sum(proc.cpu_times()[:2]) - cpu0) * 1000 / requests, 2),
            server_side_p95_bucket_ms_incl_warmup_and_burst=_server_p95_bucket(
                server.base, "/api/v1/attendance"),
            load_avg_1m_before=round(load0, 2), load_avg_1m_after=round(os.getloadavg()[0], 2),
        )
    finally:
        server.stop()
    server = Server(url, rate_limit=100000)  # the roster phase reads 200 times from one key
    try:
        out["roster"] = bench_roster(server.base, roster_key)
    finally:
        server.stop()
    return out


def _postgres() -> tuple[str, Any] | None:
    try:
        import psycopg

        conn = psycopg.connect(f"{PG_DSN} dbname=postgres connect_timeout=3", autocommit=True)
    except Exception:
        return None
    name = f"agg_bench_{secrets.token_hex(4)}"
    conn.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in PG_DSN.split())
    url = (f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host')}:"
           f"{params.get('port', '5432')}/{name}")

    def drop() -> None:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()

    return url, drop


def run() -> dict[str, Any]:
    results: dict[str, Any] = {"cpu_count": os.cpu_count(),
                               "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = _backend(f"sqlite:///{Path(tmp) / 'bench.db'}")
    pg = _postgres()
    if pg is None:
        results["postgresql"] = {"skipped": f"no PostgreSQL server ({PG_DSN})"}
    else:
        url, drop = pg
        try:
            results["postgresql"] = _backend(url)
        finally:
            drop()
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
