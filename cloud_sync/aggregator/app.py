"""create_app(settings): the aggregator's FastAPI application.

Lifespan: migrate the database (Alembic; on PostgreSQL under an advisory lock, so servers
starting together migrate once), create the PostgreSQL partitions ahead, connect the bus to the
other processes (PostgreSQL or Redis; not on SQLite, which runs one process), start the MQTT
bridge when ``settings.mqtt_url`` is set (imported lazily: ``cloud_sync.aggregator.mqtt_bridge``),
stop them, close the app's state and dispose of the engine on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy import text
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator import logsafe
from cloud_sync.aggregator.api import (
    admin,
    device,
    ops,
    privacy,
    recordings,
    releases,
    reports,
    timelines,
    tokens,
    ws,
)
from cloud_sync.aggregator.api.context import AppContext, CredentialCache
from cloud_sync.aggregator.api.guard import GuardMiddleware
from cloud_sync.aggregator.api.limiter import (
    Limiter,
    MemoryRateLimiter,
    PostgresRateLimiter,
    RedisRateLimiter,
)
from cloud_sync.aggregator.api.openapi import document_errors
from cloud_sync.aggregator.bus import Bus, PostgresBus, RedisBus, split_records
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db import partitions
from cloud_sync.aggregator.db.migrate import upgrade_engine
from cloud_sync.aggregator.db.session import THREADS, make_engine, make_session_factory
from cloud_sync.aggregator.db.watch import WriteWatch
from cloud_sync.aggregator.services.common import ServiceError
from cloud_sync.aggregator.services.faces import FaceEncoder
from cloud_sync.aggregator.services.ingest import DESCRIPTOR_DAYS_INFO_KEY, EARLY_ARRIVAL_INFO_KEY
from cloud_sync.aggregator.services.live import LISTENING_EVERY_S, LIVE_FEED_INFO_KEY, LiveFeed
from cloud_sync.aggregator.services.reports import Rules
from cloud_sync.aggregator.services.retention import purge
from cloud_sync.aggregator.state import STATE_INFO_KEY, AppState
from cloud_sync.protocol import AttendanceBatch, Event, Heartbeat

_LOGGER = logging.getLogger(__name__)
PRUNE_PERIOD_S = 3600.0
MAX_JSON_BYTES = 4_000_000  # a full batch of 1,000 records is ~0.4 MB
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around a photo or a CSV file
UPLOAD_ROUTES = ("/api/v1/students/{student_id}/faces", "/api/v1/import/{kind}",
                 "/students/{student_id}/photos", "/timetable/import")  # the last two: console
VIDEO_ROUTE = "/api/v1/students/{student_id}/faces/video"


def instance_name(settings: AggregatorSettings) -> str:
    return settings.instance_name or socket.gethostname().split(".")[0] or "aggregator"


def make_limiter(settings: AggregatorSettings, engine: Any, per_min: int) -> Limiter:
    """``per_min`` a minute per key, where every process sees the same count: Redis when
    configured, else PostgreSQL's table, else (SQLite: one process) memory. The devices' rate
    limit, and the console's login limits (console/accounts.py)."""
    if settings.redis_url is not None:
        return RedisRateLimiter(settings.redis_url.get_secret_value(), settings.redis_prefix,
                                per_min)
    if engine.dialect.name == "postgresql":
        return PostgresRateLimiter(engine, per_min)
    return MemoryRateLimiter(per_min)


def _bus(ctx: AppContext) -> Bus | None:
    """The bus to the other processes (None on SQLite without Redis: one process)."""
    settings, live = ctx.settings, ctx.live

    def on_message(message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "invalidate":
            ctx.forget()
        elif kind == "live" and isinstance(message.get("msg"), dict):
            live.deliver(str(message.get("room")), str(message.get("kind")), message["msg"])
        elif kind == "listening":
            live.heard_listener()

    if settings.redis_url is not None:
        return RedisBus(settings.redis_url.get_secret_value(), settings.redis_prefix,
                        on_message, ctx.forget)
    if ctx.engine.dialect.name == "postgresql":
        return PostgresBus(aggregator_config.database_url(settings), on_message, ctx.forget)
    return None


def _connect_bus(ctx: AppContext) -> None:
    bus = _bus(ctx)
    if bus is None:
        return
    bus.start()
    ctx.bus = bus

    def relay(room_id: str, kind: str, message: dict[str, Any]) -> None:
        for part in split_records(message, bus.max_payload):
            bus.publish({"t": "live", "room": room_id, "kind": kind, "msg": part})

    ctx.live.relay = relay
    ctx.live.announce = lambda: bus.publish({"t": "listening"})


async def _announce_listening(ctx: AppContext) -> None:
    """While this process has /ws/events clients, tell the others every few seconds."""
    while True:
        await asyncio.sleep(LISTENING_EVERY_S)
        if ctx.bus is not None and ctx.live.clients:
            try:
                await run_in_threadpool(ctx.bus.publish, {"t": "listening"})
            except Exception as err:
                _LOGGER.warning("live feed: cannot tell the other processes: %s", err)


def _start_bridge(ctx: AppContext) -> None:
    if ctx.settings.mqtt_url is None:
        ctx.mqtt_state = "disabled"
        return
    try:
        from cloud_sync.aggregator.mqtt_bridge import MqttBridge
    except ImportError as err:
        _LOGGER.warning("MQTT bridge unavailable: %s", err)
        ctx.mqtt_state = "unavailable"
        return
    bridge = MqttBridge(ctx.settings, ctx.sessions, instance_name(ctx.settings))
    bridge.start()
    ctx.mqtt_bridge = bridge


RETENTION_LOCK_ID = 4_242_003  # pg_try_advisory_lock: one purging process at a time


def _purge_once(ctx: AppContext) -> None:
    """One retention purge; on PostgreSQL only if no other process is purging right now
    (every process runs the hourly loop; they start together)."""
    if ctx.engine.dialect.name != "postgresql":
        with ctx.sessions() as session:
            purge(session, ctx.settings)
        return
    with ctx.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock:
        if not lock.scalar(text("SELECT pg_try_advisory_lock(:id)"), {"id": RETENTION_LOCK_ID}):
            _LOGGER.info("retention purge: another process is running it")
            return
        try:
            with ctx.sessions() as session:
                purge(session, ctx.settings)
        finally:
            lock.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": RETENTION_LOCK_ID})


async def _retention_hourly(ctx: AppContext) -> None:
    """The retention purge (services/retention.py), on start and then every hour."""
    while True:
        def run() -> None:
            _purge_once(ctx)

        try:
            await run_in_threadpool(run)
        except SQLAlchemyError as err:  # try again next hour
            _LOGGER.error("retention purge failed: %s", err)
        await asyncio.sleep(PRUNE_PERIOD_S)


RECOVER_PERIOD_S = 60.0
# how long a stopping server lets a pending privacy scrub finish (services/privacy.py)
SHUTDOWN_SCRUB_WAIT_S = 10.0


async def _recover_checks(ctx: AppContext) -> None:
    """Recordings a crashed process left ``checking`` are checked again (services/
    recordings.recover_checks): at start, then every minute."""
    from cloud_sync.aggregator.services import jobqueue
    from cloud_sync.aggregator.services import recordings as recording_svc

    def run() -> None:
        with ctx.sessions() as session:
            jobs = recording_svc.recover_checks(session, ctx.settings)
        for job in jobs:  # the database queue has them already; RQ needs them sent
            with contextlib.suppress(ServiceError):
                jobqueue.enqueue(ctx.settings, job)

    while True:
        try:
            await run_in_threadpool(run)
        except SQLAlchemyError as err:  # try again next time
            _LOGGER.error("recovering recording checks failed: %s", err)
        await asyncio.sleep(RECOVER_PERIOD_S)


def _document_batch_body(app: FastAPI) -> None:
    """POST /api/v1/attendance, /heartbeat and /events read their bodies themselves (see
    api/device.py): put the schemas their OpenAPI entries refer to into the components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (AttendanceBatch, Event, Heartbeat):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: AggregatorSettings) -> FastAPI:
    engine = make_engine(
        aggregator_config.database_url(settings), sqlite_synchronous=settings.sqlite_synchronous
    )
    live = LiveFeed(settings.ws_queue_messages, settings.ws_max_clients)
    trusted: list[Any] = []  # the context's trusted(), once the context exists
    state = AppState(engine, trusted=lambda: trusted[0]())
    sessions = make_session_factory(
        engine, info={EARLY_ARRIVAL_INFO_KEY: settings.early_arrival_min,
                      LIVE_FEED_INFO_KEY: live, STATE_INFO_KEY: state,
                      DESCRIPTOR_DAYS_INFO_KEY: settings.record_descriptor_days}
    )
    ctx = AppContext(
        settings=settings, engine=engine, sessions=sessions,
        credentials=CredentialCache(settings.auth_cache_s, trusted=lambda: trusted[0]()),
        limiter=make_limiter(settings, engine, settings.rate_limit_per_min),
        encoder=FaceEncoder(settings),
        rules=Rules(settings.late_after_min, settings.early_arrival_min,
                    settings.console_offline_after_s), live=live,
        write_watch=WriteWatch(engine), state=state,
        instance=f"{instance_name(settings)}:{os.getpid()}",
    )
    trusted.append(ctx.trusted)

    logsafe.install()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the request thread pool, sized with the database pool (db/session.py)
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        logsafe.install()  # again: uvicorn has configured its loggers by now
        upgrade_engine(engine)
        partitions.ensure_ahead(engine, settings.partition_months_ahead, known=state)
        _connect_bus(ctx)
        _start_bridge(ctx)
        app.state.mqtt_bridge = ctx.mqtt_bridge
        tasks = [asyncio.create_task(_retention_hourly(ctx)),
                 asyncio.create_task(_announce_listening(ctx)),
                 asyncio.create_task(_recover_checks(ctx))]
        ctx.ready = True
        try:
            yield
        finally:
            ctx.ready = False
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if ctx.mqtt_bridge is not None:
                ctx.mqtt_bridge.stop()
            if ctx.bus is not None:
                ctx.bus.close()
                ctx.bus = None
            ctx.live.relay = ctx.live.announce = None
            # a scrub asked for by the last requests finishes before the engine goes
            await anyio.to_thread.run_sync(ctx.scrubber.wait, SHUTDOWN_SCRUB_WAIT_S)
            state.close()
            engine.dispose()
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())

    # /docs and /redoc with Swagger UI's and ReDoc's files served from the fastapi-offline
    # package (/static-offline-docs): the API docs work without internet.
    app = FastAPIOffline(
        title="Classroom attendance aggregator",
        version="1",
        description="Rosters and schedules down to the room devices, attendance up; reports "
        "and administration. Authentication: `Authorization: Bearer <device key | admin token>`.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    _document_batch_body(app)
    recordings.document_limits(app, settings)
    document_errors(app)
    app.state.mqtt_bridge = None
    for router in (device.router, reports.router, timelines.router, admin.router,
                   privacy.router, tokens.router, ops.router, ws.router, recordings.router,
                   releases.router):
        # ``/`` is the web console's (console.mount below), which links the API docs
        app.include_router(router)

    upload = settings.max_photo_bytes + MULTIPART_OVERHEAD
    limits = dict.fromkeys(UPLOAD_ROUTES, upload)
    limits[VIDEO_ROUTE] = settings.max_video_bytes + MULTIPART_OVERHEAD
    limits[recordings.CHUNK_ROUTE] = settings.recording_chunk_max_bytes
    limits["/recordings/{recording_id}/content"] = settings.recording_chunk_max_bytes  # console
    # console: a signed release's archive. The route bounds its own body (the Content-Length
    # announced, then the bytes received: release_upload_max_bytes) to refuse with a page
    # that says why; the guard's plain 413 would replace that page (console/releases.py)
    limits["/releases/add"] = sys.maxsize
    app.add_middleware(GuardMiddleware, router=app.router, default_limit=MAX_JSON_BYTES,
                       limits=limits)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, err: ServiceError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(IntegrityError)
    async def integrity_error(_request: Request, err: IntegrityError) -> JSONResponse:
        _LOGGER.info("integrity error: %s", err.orig)
        return JSONResponse({"detail": "conflicts with existing data"}, status_code=409)

    @app.exception_handler(DataError)
    async def data_error(_request: Request, err: DataError) -> JSONResponse:
        _LOGGER.info("value refused by the database: %s", err.orig)
        return JSONResponse({"detail": "a value is not storable (range or characters)"},
                            status_code=422)

    @app.exception_handler(OperationalError)
    async def db_unavailable(_request: Request, err: OperationalError) -> JSONResponse:
        _LOGGER.error("database error: %s", err.orig)
        return JSONResponse({"detail": "database unavailable, retry later"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(SQLAlchemyError)
    async def db_error(_request: Request, err: SQLAlchemyError) -> JSONResponse:
        _LOGGER.exception("database error")
        return JSONResponse({"detail": "database error, retry later"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, err: RequestValidationError) -> JSONResponse:
        errors = []
        for item in err.errors()[:50]:
            errors.append({
                "loc": [str(p) for p in item.get("loc", ())],
                "msg": str(item.get("msg", "")),
                "type": str(item.get("type", "")),
            })
        return JSONResponse({"detail": errors}, status_code=422)

    from cloud_sync.aggregator.console import mount as mount_console

    mount_console(app)
    _trust_proxies(app, settings)
    return app


def _trust_proxies(app: FastAPI, settings: AggregatorSettings) -> None:
    """X-Forwarded-For/-Proto believed from ``trusted_proxies`` only. Outermost (add it last):
    every part of the app sees the client's address and scheme as the trusted proxy reports
    them; `serve` runs uvicorn without its own proxy handling (which would believe 127.0.0.1
    whatever trusted_proxies says)."""
    proxies = settings.trusted_proxy_list()
    if proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=proxies)


def app_from_env() -> FastAPI:
    """One worker of ``aggregator serve --workers N``: the settings from ``AGGREGATOR_CONFIG``
    and the environment (which ``serve`` set), logging as ``serve`` sets it."""
    import faulthandler
    import gc
    import signal
    import sys

    settings = aggregator_config.load(None)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # as `serve` does
    logging.basicConfig(level=settings.log_level, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    return app
