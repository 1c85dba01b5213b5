"""The aggregator's CPU per request against a bare endpoint's, in one run (JSON).

    python -m bench cost

For SQLite (a temporary file, ``synchronous=FULL`` as shipped) and PostgreSQL (a temporary
database on 127.0.0.1:5432; skipped, with the reason, when the server is not reachable):
seeded like ``bench aggregator`` (100 rooms with one device each, 5,000 students), then
``aggregator serve`` (one process, the shipped settings but for the rate limit, raised so the
load is not refused; the limiter's code path still runs) and, beside it, the bare Starlette
endpoint of bench/bare_app.py under the same uvicorn settings.

Load: ``wrk`` with DEVICES connections, each request from the next of DEVICES devices (its own
key), back to back (a closed loop), for WARMUP_S uncounted then COUNTED_S counted seconds, per
kind of request as the appliance sends it:

- ``heartbeat``: POST /api/v1/heartbeat (synchronised clock, boot id, monotonic clock);
- ``batch_1``: POST /api/v1/attendance with one record and its 128-d descriptor (a fresh key
  on every request);
- ``event``: POST /api/v1/events, an occupancy event (a fresh key on every request).

Reported per kind: the server's CPU ms per request, the bare endpoint's for the same body in
the same run, their ratio (issue 28's target for the heartbeat: at most 8), the database's CPU
per request (PostgreSQL backends of the bench database) and the connections the server
opened during the counted run (after the warm-up: a pool that churns opens them all along;
pg_stat_database.sessions),
latency P50/P95/P99 at DEVICES
concurrent devices, the server's share of one core, its run-queue wait, CPU pressure and the
load average (bench/loadgen.py says how each is read).

``BENCH_COST_SERVER_CPU=N``: "one core's worth of server", as the target is stated. Both servers
(the aggregator and the bare endpoint) run pinned to CPU N (``taskset``) and, as root, at nice
-10 (their session's autogroup too), so other work on the machine (its other test suites,
PostgreSQL) yields that core to them; the bench itself and wrk run on the other CPUs. Unset:
nothing is pinned (the shipped way to measure CPU per request, which pinning does not change).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.aggregator import PG_DSN, REPO, _free_port, _postgres, _seed, _settle, stop_process
from bench.loadgen import KEY, WRK_MISSING, Target, key_prefix, measure, wrk_available
from bench.scaleout import _postgres_cpu
from cloud_sync.aggregator.state import STATE_INFO_KEY

DEVICES = 50
WARMUP_S = 2.0
COUNTED_S = 6.0
KINDS = ("heartbeat", "batch_1", "event")
TARGET_RATIO = 8.0
TARGET_P95_MS = 100.0


@functools.cache
def server_cpu() -> int | None:
    """The CPU the servers are pinned to (``BENCH_COST_SERVER_CPU``), checked against this
    machine's CPUs; None: not pinned."""
    raw = os.environ.get("BENCH_COST_SERVER_CPU", "").strip()
    if not raw:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if not raw.isdigit() or int(raw) not in cpus or len(cpus) < 2:
        raise SystemExit(f"BENCH_COST_SERVER_CPU={raw!r}: expected one of the CPUs {cpus} "
                         "(and at least two CPUs, one left for the load generator)")
    return int(raw)


def pinned(argv: list[str]) -> list[str]:
    """``argv`` on the servers' CPU (and at nice -10 as root), when one is set."""
    cpu = server_cpu()
    if cpu is None:
        return argv
    prefix = ["taskset", "-c", str(cpu)]
    if os.geteuid() == 0:
        prefix += ["nice", "-n", "-10"]
    return prefix + argv


def prioritise(pid: int) -> None:
    """With the kernel's autogroups (sched_autogroup_enabled), nice only ranks tasks of one
    session against each other: a pinned server (a session of its own) gets its autogroup's
    nice set to -10 too, so other sessions' work yields the core to it."""
    group = Path(f"/proc/{pid}/autogroup")
    if server_cpu() is None or os.geteuid() != 0 or not group.exists():
        return
    with contextlib.suppress(OSError):  # no autogroup write side: the plain nice applies
        group.write_text("-10")


class Process:
    """A server command in a subprocess on a free loopback port, ready once ``ready_path``
    answers 200 (any method but POST: GET)."""

    def __init__(self, argv: list[str], env: dict[str, str], ready: Callable[[str], bool],
                 port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(pinned(argv), cwd=REPO, env=env,
                                     start_new_session=server_cpu() is not None)
        prioritise(self.proc.pid)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[2:4]} exited with {self.proc.returncode}")
            try:
                if ready(self.base):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{argv} did not start")

    def stop(self) -> None:
        stop_process(self.proc, 20)


def aggregator(url: str) -> Process:
    port = _free_port()
    env = {**os.environ, "AGGREGATOR_DATABASE_URL": url, "AGGREGATOR_LOG_LEVEL": "WARNING",
           "AGGREGATOR_RATE_LIMIT_PER_MIN": "100000"}
    for name in ("AGGREGATOR_CONFIG", "AGGREGATOR_MQTT_URL", "AGGREGATOR_REDIS_URL"):
        env.pop(name, None)
    return Process(
        [sys.executable, "-m", "cloud_sync.aggregator.cli", "serve", "--host", "127.0.0.1",
         "--port", str(port)], env,
        lambda base: httpx.get(f"{base}/health", timeout=2).status_code == 200, port)


def bare() -> Process:
    port = _free_port()

    def ready(base: str) -> bool:
        return httpx.post(f"{base}/api/v1/heartbeat", content=b"{}",
                          timeout=2).status_code == 200

    return Process([sys.executable, "-m", "bench.bare_app", "--port", str(port)],
                   dict(os.environ), ready, port)


def bodies(keys: dict[str, str]) -> dict[str, Target]:
    """Per kind, each device's request as the appliance sends it (KEY: a fresh key)."""
    now = datetime.now(UTC).replace(microsecond=0)
    rng = np.random.default_rng(28)
    targets = {"heartbeat": Target("/api/v1/heartbeat"), "batch_1": Target("/api/v1/attendance"),
               "event": Target("/api/v1/events")}
    for index, (device, key) in enumerate(list(keys.items())[:DEVICES]):
        room = f"LAB-{device.split('-')[1]}"
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        boot = uuid.uuid4().hex
        mono = 3600.0 + index
        heartbeat = {
            "v": 1, "device_id": device, "room_id": room, "software_version": "1.4.0",
            "sent_at": now.isoformat(), "clock_synced": True, "boot_id": boot,
            "monotonic_s": mono, "uptime_s": mono + 20, "cpu_temp_c": 51.5, "outbox_depth": 0,
            "oldest_unsent_age_s": None, "last_frame_at": now.isoformat(), "fps": 14.8}
        descriptor = rng.normal(size=128)
        record = {
            "key": KEY, "student_id": f"S{index:05d}", "course_id": "CS101", "room_id": room,
            "device_id": device, "seen_at": (now - timedelta(seconds=5)).isoformat(),
            "confidence": 0.93, "distance": 0.31, "clock_synced": True, "boot_id": boot,
            "monotonic_s": mono - 5,
            "descriptor": [round(float(v), 7) for v in descriptor / np.linalg.norm(descriptor)],
            "descriptor_embedder": "sface/2021dec-int8bq"}
        event = {
            "v": 2, "key": KEY, "device_id": device, "room_id": room, "kind": "occupancy",
            "severity": "info", "message": "24 people (capacity 30)", "at": now.isoformat(),
            "session_id": f"CS101@{now.date().isoformat()}",
            "data": {"count": 24, "faces": 23, "turned_away": 1, "capacity": 30, "free": 6,
                     "occupied_share": 80.0, "window_s": 60.0}}
        targets["heartbeat"].bodies.append((headers, json.dumps(heartbeat)))
        targets["batch_1"].bodies.append(
            (headers, json.dumps({"v": 1, "device_id": device, "records": [record]})))
        targets["event"].bodies.append((headers, json.dumps(event)))
    return targets


def _pg_sessions(database: str | None) -> int:
    """Connections ever opened to ``database`` (pg_stat_database.sessions, PostgreSQL 14+;
    read after a second: the backends' statistics reach it within one)."""
    if database is None:
        return 0
    import psycopg

    time.sleep(1.2)
    with psycopg.connect(f"{PG_DSN} dbname=postgres connect_timeout=3",
                         autocommit=True) as conn:
        row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s",
                           [database]).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _backend(url: str, pg_database: str | None) -> dict[str, Any]:
    seeded = _seed(url)
    _settle(seeded["engine"])
    seeded["sessions"].kw["info"][STATE_INFO_KEY].close()
    seeded["engine"].dispose()
    targets = bodies(seeded["keys"])
    extra = None
    if pg_database is not None:
        def extra() -> float:
            return sum(_postgres_cpu(pg_database).values())

    out: dict[str, Any] = {}
    floor = bare()
    server = None
    try:
        server = aggregator(url)
        for kind in KINDS:  # side by side: each kind on the bare endpoint, then the aggregator
            out[kind] = {"bare": measure(
                floor.base, targets[kind], [floor.proc.pid], DEVICES, WARMUP_S, COUNTED_S,
                key_prefix())}
            counters = {} if pg_database is None else {
                "postgres_connections_opened": lambda: _pg_sessions(pg_database)}
            out[kind]["aggregator"] = measure(
                server.base, targets[kind], [server.proc.pid], DEVICES, WARMUP_S, COUNTED_S,
                key_prefix(), extra_cpu=extra, counters=counters)
    finally:
        floor.stop()
        if server is not None:
            server.stop()
    for kind in KINDS:
        agg, flat = out[kind]["aggregator"], out[kind]["bare"]
        out[kind]["ratio_cpu_per_request"] = round(
            agg["server_cpu_ms_per_request"] / flat["server_cpu_ms_per_request"], 1) \
            if flat["server_cpu_ms_per_request"] else None
    beat = out["heartbeat"]
    out["target"] = {
        "heartbeat_ratio_at_most": TARGET_RATIO, "p95_ms_under": TARGET_P95_MS,
        "ratio_ok": beat["ratio_cpu_per_request"] is not None
        and beat["ratio_cpu_per_request"] <= TARGET_RATIO,
        "p95_ok": all(out[k]["aggregator"]["latency_ms"]["p95_ms"] < TARGET_P95_MS
                      for k in KINDS),
    }
    return out


def run() -> dict[str, Any]:
    cpu = server_cpu()
    if cpu is not None:  # the bench and wrk (its children) on the other CPUs
        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) - {cpu})
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "devices": DEVICES,
                               "counted_s": COUNTED_S,
                               "servers_pinned_to_cpu": cpu,
                               "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    if not wrk_available():
        results["skipped"] = WRK_MISSING
        return results
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = _backend(f"sqlite:///{Path(tmp) / 'bench.db'}", None)
    pg = _postgres()
    if pg is None:
        results["postgresql"] = {"skipped": "no PostgreSQL server on 127.0.0.1:5432"}
        return results
    url, drop = pg
    try:
        results["postgresql"] = _backend(url, url.rsplit("/", 1)[-1])
    finally:
        drop()
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
