"""The status itself, login required: ``GET /`` (the page), ``GET /api/status`` (JSON),
``GET /api/status/stream`` (SSE), ``GET /preview.jpg`` and ``GET /preview.mjpg`` (the camera
picture with boxes and names)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool

from appliance.web.context import Context, unauthorized_json

_LOGGER = logging.getLogger(__name__)

MJPEG_BOUNDARY = "frame"

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def index(request: Request, ctx: Context) -> Response:
    if not ctx.authorized(request):
        return RedirectResponse("/login", status_code=303)
    try:
        data = await run_in_threadpool(ctx.view.build)
    except Exception:  # show a readable error instead of a bare 500
        _LOGGER.exception("status page: building the status failed")
        return HTMLResponse("<!doctype html><title>Status unavailable</title>"
                            "<p>The status is unavailable right now (see the device log)."
                            " <a href=\"/\">Retry</a></p>", status_code=503)
    return ctx.templates.TemplateResponse(
        request, "status.html",
        {"s": data, "refresh_ms": int(ctx.settings.web.refresh_s * 1000)},
    )


@router.get("/api/status")
async def api_status(request: Request, ctx: Context) -> JSONResponse:
    if not ctx.authorized(request):
        return unauthorized_json()
    try:
        return JSONResponse(await run_in_threadpool(ctx.view.build))
    except Exception:  # same as the page: a readable 503, never a bare 500
        _LOGGER.exception("api status: building the status failed")
        return JSONResponse({"detail": "status unavailable"}, status_code=503)


@router.get("/api/status/stream")
async def status_stream(request: Request, ctx: Context) -> Response:
    if not ctx.authorized(request):
        return unauthorized_json()
    refresh_s = ctx.settings.web.refresh_s

    async def events() -> AsyncIterator[str]:
        yield f"retry: {int(refresh_s * 1000) + 1000}\n\n"
        while not ctx.stopping.is_set() and not await request.is_disconnected():
            try:
                data = await run_in_threadpool(ctx.view.cached, refresh_s / 2)
            except Exception:  # keep the stream; the page shows stale data meanwhile
                _LOGGER.exception("status stream: build failed")
            else:
                yield f"event: status\ndata: {json.dumps(data)}\n\n"
            await asyncio.sleep(refresh_s)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"X-Accel-Buffering": "no"})


@router.get("/preview.jpg")
async def preview(request: Request, ctx: Context) -> Response:
    if not ctx.authorized(request):
        return unauthorized_json()
    jpeg = await run_in_threadpool(ctx.pipeline.latest_preview_jpeg)
    if jpeg is None:
        return Response(status_code=204)
    return Response(jpeg, media_type="image/jpeg")


@router.get("/preview.mjpg")
async def preview_stream(request: Request, ctx: Context) -> Response:
    if not ctx.authorized(request):
        return unauthorized_json()

    async def frames() -> AsyncIterator[bytes]:
        last: bytes | None = None
        while not ctx.stopping.is_set() and not await request.is_disconnected():
            jpeg = await run_in_threadpool(ctx.pipeline.latest_preview_jpeg)
            if jpeg is not None and jpeg is not last:
                last = jpeg
                yield (f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                       f"Content-Length: {len(jpeg)}\r\n\r\n").encode() + jpeg + b"\r\n"
            await asyncio.sleep(0.2)

    return StreamingResponse(
        frames(), media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}")
