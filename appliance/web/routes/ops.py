"""Open routes for monitoring: ``GET /health`` (200, or 503 when a component is unhealthy)
and ``GET /metrics`` (Prometheus; ``web.metrics_public = false`` asks for a login)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.concurrency import run_in_threadpool

from appliance.health import UNHEALTHY, check_health
from appliance.web.context import Context, unauthorized_json
from appliance.web.view import refresh_gauges

router = APIRouter()


@router.get("/health")
async def health(ctx: Context) -> JSONResponse:
    def build() -> dict[str, Any]:
        return check_health(ctx.settings, ctx.pipeline, ctx.store, ctx.read_host(),
                            ctx.sync_status, clock=ctx.clock)

    doc = await run_in_threadpool(build)
    code = 503 if doc["status"] == UNHEALTHY else 200
    return JSONResponse(doc, status_code=code)


@router.get("/metrics")
async def prometheus(request: Request, ctx: Context) -> Response:
    if not ctx.settings.web.metrics_public and not ctx.authorized(request):
        return unauthorized_json()

    def scrape() -> bytes:
        refresh_gauges(ctx.pipeline, ctx.store, ctx.read_host())
        return generate_latest(REGISTRY)

    return Response(await run_in_threadpool(scrape), media_type=CONTENT_TYPE_LATEST)
