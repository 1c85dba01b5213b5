"""GET /health and GET /metrics (no credentials: nothing secret in either)."""

from __future__ import annotations

import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from cloud_sync.aggregator import metrics
from cloud_sync.aggregator.api.deps import admin_token_valid, context
from cloud_sync.aggregator.db.migrate import current_revision, head_revision

_LOGGER = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str = Field(description="ok | degraded (MQTT down, the bus to the other processes "
                        "down, or disk space below min_free_disk_mb) | error (not started or "
                        "stopping, database unreachable, behind, or refusing writes). A load "
                        "balancer sends traffic only while the answer is 200 (ok or degraded)")
    instance: str = Field(description="Which process answered: an opaque id of the process "
                          "(the same for its life); <instance_name>:<pid> only with an admin "
                          "token (the bridge's MQTT client id is made from those)")
    ready: bool = Field(description="Migrations done and the app started (false while "
                        "starting and stopping)")
    database: str = Field(description="ok, or the error")
    writes: str = Field(description="ok, or the last write error and since when (e.g. a full "
                        "disk: reads still answer while every write fails)")
    disk_free_mb: float | None = Field(
        description="Free space where the data lives (the SQLite file's file system, else "
        "data_dir), MiB; null if it cannot be read.")
    disk: str = Field(description="ok | low (below min_free_disk_mb) | unknown")
    backend: str = Field(description="sqlite | postgresql")
    migrations: str = Field(description="current | behind | unknown")
    revision: str | None
    head: str | None
    mqtt: str = Field(description="disabled | connected | disconnected | unavailable")
    bus: str = Field(description="Messages to the other processes (cache invalidation, live "
                     "feed): none (SQLite: one process) | postgresql | redis, then "
                     "' connected' or ' disconnected' (caches off until back)")


def mqtt_state(ctx: Any) -> str:
    bridge = ctx.mqtt_bridge
    if bridge is None:
        return ctx.mqtt_state
    state = str(getattr(bridge, "state", "unknown"))
    metrics.MQTT_CONNECTED.set(1 if state == "connected" else 0)
    return state


def _data_path(ctx: Any) -> Path:
    """The SQLite file's directory, else data_dir (photos; a remote PostgreSQL's disk is not
    visible from here)."""
    database = ctx.engine.url.database if ctx.engine.dialect.name == "sqlite" else None
    if database and database != ":memory:" and not database.startswith("file:"):
        return Path(database).expanduser().resolve().parent
    return Path(ctx.settings.data_dir)


def _free_mb(path: Path) -> float | None:
    for candidate in (path, *path.parents):  # data_dir may not exist yet
        try:
            return shutil.disk_usage(candidate).free / 2**20
        except OSError:
            continue
    return None


def _instance(request: Request, ctx: Any) -> str:
    """<instance_name>:<pid> for an admin token, else the process's opaque id: no instance
    name in an answer anyone on the network can read."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secret.strip():
        try:
            if admin_token_valid(ctx, secret.strip()):
                return str(ctx.instance)
        except SQLAlchemyError:
            pass
    return str(ctx.public_instance)


@router.get("/health", response_model=Health, responses={503: {"model": Health}},
            summary="Database reachable and taking writes, migrations current, free disk "
            "space, MQTT bridge state.")
def health(request: Request) -> JSONResponse:
    ctx = context(request)
    head = head_revision()
    revision: str | None = None
    database = "ok"
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        revision = current_revision(ctx.engine)
    except SQLAlchemyError as err:
        database = f"unreachable: {type(err).__name__}"
    migrations = "unknown" if database != "ok" else ("current" if revision == head else "behind")
    mqtt = mqtt_state(ctx)
    failure = ctx.write_watch.failure() if ctx.write_watch is not None else None
    writes = "ok"
    if failure is not None:
        since = datetime.fromtimestamp(failure.since, UTC).isoformat(timespec="seconds")
        writes = f"failing since {since}: {failure.error}"
    free_mb = _free_mb(_data_path(ctx))
    disk = "unknown" if free_mb is None else (
        "low" if free_mb < ctx.settings.min_free_disk_mb else "ok")
    metrics.DISK_FREE.set(-1 if free_mb is None else free_mb * 2**20)
    bus = "none" if ctx.bus is None else (
        f"{ctx.bus.kind} {'connected' if ctx.bus.connected else 'disconnected'}")
    ready = bool(getattr(ctx, "ready", False))
    if not ready or database != "ok" or migrations != "current" or failure is not None:
        status = "error"
    elif ((ctx.settings.mqtt_url is not None and mqtt != "connected") or disk == "low"
          or bus.endswith("disconnected")):
        status = "degraded"
    else:
        status = "ok"
    body = Health(status=status, instance=_instance(request, ctx), ready=ready,
                  database=database, writes=writes,
                  disk_free_mb=None if free_mb is None else round(free_mb, 1), disk=disk,
                  backend=ctx.engine.dialect.name,
                  migrations=migrations, revision=revision, head=head, mqtt=mqtt, bus=bus)
    return JSONResponse(body.model_dump(), status_code=503 if status == "error" else 200)


@router.get("/metrics", summary="Prometheus metrics of this server (every worker of "
            "`serve --workers N`, whichever answers).", response_class=Response)
def prometheus(request: Request) -> Response:
    mqtt_state(context(request))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several workers: prometheus_client's multiprocess files, summed over the workers
        # (gauges per their multiprocess_mode, see metrics.py).
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    # Ours, plus the default registry (process metrics).
    body = generate_latest(metrics.REGISTRY) + generate_latest(DEFAULT_REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
