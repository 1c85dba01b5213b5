"""create_app(settings): the aggregator's FastAPI application.

Lifespan: migrate the database (Alembic), create the PostgreSQL partitions ahead, start the MQTT
bridge when ``settings.mqtt_url`` is set (imported lazily: ``cloud_sync.aggregator.mqtt_bridge``),
stop it and dispose of the engine on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.api import (
    admin,
    device,
    ops,
    privacy,
    recordings,
    reports,
    timelines,
    tokens,
    ws,
)
from cloud_sync.aggregator.api.context import AppContext, CredentialCache, RateLimiter
from cloud_sync.aggregator.api.guard import GuardMiddleware
from cloud_sync.aggregator.api.openapi import document_errors
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db import partitions
from cloud_sync.aggregator.db.migrate import upgrade_engine
from cloud_sync.aggregator.db.session import make_engine, make_session_factory
from cloud_sync.aggregator.db.watch import WriteWatch
from cloud_sync.aggregator.services.common import ServiceError
from cloud_sync.aggregator.services.faces import FaceEncoder
from cloud_sync.aggregator.services.ingest import (
    DESCRIPTOR_DAYS_INFO_KEY,
    EARLY_ARRIVAL_INFO_KEY,
    invalidate_cache,
)
from cloud_sync.aggregator.services.live import LIVE_FEED_INFO_KEY, LiveFeed
from cloud_sync.aggregator.services.reports import Rules
from cloud_sync.aggregator.services.retention import purge
from cloud_sync.protocol import AttendanceBatch, Event

_LOGGER = logging.getLogger(__name__)
PRUNE_PERIOD_S = 3600.0
MAX_JSON_BYTES = 4_000_000  # a full batch of 1,000 records is ~0.4 MB
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around a photo or a CSV file
UPLOAD_ROUTES = ("/api/v1/students/{student_id}/faces", "/api/v1/import/{kind}",
                 "/students/{student_id}/photos", "/timetable/import")  # the last two: console
VIDEO_ROUTE = "/api/v1/students/{student_id}/faces/video"


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
    bridge = MqttBridge(ctx.settings, ctx.sessions)
    bridge.start()
    ctx.mqtt_bridge = bridge


async def _retention_hourly(ctx: AppContext) -> None:
    """The retention purge (services/retention.py), on start and then every hour."""
    while True:
        def run() -> None:
            with ctx.sessions() as session:
                purge(session, ctx.settings)

        try:
            await run_in_threadpool(run)
        except SQLAlchemyError as err:  # try again next hour
            _LOGGER.error("retention purge failed: %s", err)
        await asyncio.sleep(PRUNE_PERIOD_S)


def _document_batch_body(app: FastAPI) -> None:
    """POST /api/v1/attendance reads its body itself (see api/device.py): put the
    AttendanceBatch schema its OpenAPI entry refers to into the components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (AttendanceBatch, Event):
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
    sessions = make_session_factory(
        engine, info={EARLY_ARRIVAL_INFO_KEY: settings.early_arrival_min,
                      LIVE_FEED_INFO_KEY: live,
                      DESCRIPTOR_DAYS_INFO_KEY: settings.record_descriptor_days}
    )
    ctx = AppContext(
        settings=settings, engine=engine, sessions=sessions,
        credentials=CredentialCache(settings.auth_cache_s),
        limiter=RateLimiter(settings.rate_limit_per_min), encoder=FaceEncoder(settings),
        rules=Rules(settings.late_after_min, settings.early_arrival_min), live=live,
        write_watch=WriteWatch(engine),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upgrade_engine(engine)
        invalidate_cache()
        partitions.forget(engine)
        partitions.ensure_ahead(engine, settings.partition_months_ahead)
        _start_bridge(ctx)
        app.state.mqtt_bridge = ctx.mqtt_bridge
        pruner = asyncio.create_task(_retention_hourly(ctx))
        try:
            yield
        finally:
            pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruner
            if ctx.mqtt_bridge is not None:
                ctx.mqtt_bridge.stop()
            engine.dispose()

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
    document_errors(app)
    app.state.mqtt_bridge = None
    for router in (device.router, reports.router, timelines.router, admin.router,
                   privacy.router, tokens.router, ops.router, ws.router, recordings.router):
        # ``/`` is the web console's (console.mount below), which links the API docs
        app.include_router(router)

    upload = settings.max_photo_bytes + MULTIPART_OVERHEAD
    limits = dict.fromkeys(UPLOAD_ROUTES, upload)
    limits[VIDEO_ROUTE] = settings.max_video_bytes + MULTIPART_OVERHEAD
    limits[recordings.CHUNK_ROUTE] = settings.recording_chunk_max_bytes
    limits["/recordings/{recording_id}/content"] = settings.recording_chunk_max_bytes  # console
    app.add_middleware(GuardMiddleware, router=app.router, default_limit=MAX_JSON_BYTES,
                       limits=limits)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, err: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": err.message}, status_code=err.status)

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
    return app
