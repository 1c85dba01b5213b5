"""The status page application: FastAPI, server-rendered Jinja2, a little plain JS over SSE.

Routes (see docs/STATUS_PAGE.md):

- open: ``GET /health`` (JSON, 200 or 503), ``GET /metrics`` (Prometheus; a setting can close
  it), ``GET /login``, ``POST /login``, ``/static/*``;
- login required (session cookie, or ``Authorization: Bearer <device API key>``): ``GET /``,
  ``GET /api/status``, ``GET /api/status/stream`` (SSE), ``GET /preview.jpg``,
  ``GET /preview.mjpg``, ``POST /logout``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shlex
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import FastAPI, Form, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.concurrency import run_in_threadpool

import appliance
from appliance import metrics
from appliance.config import ApplianceSettings
from appliance.health import (
    CAMERA_OK,
    UNHEALTHY,
    PipelineSource,
    StoreSource,
    SyncStatusFn,
    SyncStatusLike,
    check_health,
    read_sync_status,
)
from appliance.system import SystemSnapshot, read_system
from appliance.web.auth import COOKIE_NAME, PASSWORD_FILE, Authenticator

_LOGGER = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
_CREDENTIALS_IN_URL = re.compile(r"(?<=://)[^/@\s]+@")
MJPEG_BOUNDARY = "frame"
_SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin: no referrer to other sites, and the browser still names this page's origin
    # on its own form posts (with no-referrer it sends "Origin: null"); see same_origin()
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
}


def mask_url(source: str) -> str:
    """Hide ``user:password@`` in a camera URL (rtsp://user:pw@host/...)."""
    return _CREDENTIALS_IN_URL.sub("***@", source)


def _mask_optional(text: str | None) -> str | None:
    return None if text is None else mask_url(text)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None]:
    parts = urlsplit(f"{scheme}://{netloc}")
    try:
        port = parts.port
    except ValueError:
        return "", None
    return (parts.hostname or "").lower(), port


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another page than this one's:
    ``Sec-Fetch-Site`` other than ``same-origin``/``none``, or (older browsers) an ``Origin``
    naming another host or port. Requests with neither header (curl, scripts with the Bearer
    key) do not come from a browser page."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:  # set by the browser itself (Chrome, Firefox, Safari 16.4+)
        return fetch_site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:  # "null", file://, junk
        return False
    o_host, o_port = _host_port(parts.netloc, parts.scheme)
    h_host, h_port = _host_port(request.headers.get("host", ""), request.url.scheme)
    if not h_host or o_host != h_host:
        return False
    if h_port is None:  # a default port (a TLS proxy may hide which scheme): so must Origin's
        return o_port is None
    return (o_port or _DEFAULT_PORTS[parts.scheme]) == h_port


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        _LOGGER.warning("unknown time zone %r; showing UTC", name)
        return UTC


def match_label(confidence: float | None) -> str | None:
    """The match confidence in words for a teacher. ``confidence`` is 0.5 when the face is
    just at the recognition threshold and 1 when it is twice as close; lower than 0.5 when
    another student is nearly as close."""
    if confidence is None:
        return None
    if confidence >= 0.75:
        return "clear"
    if confidence >= 0.5:
        return "good"
    return "borderline"


def preview_note(state: str, frames: int, error: str | None) -> str | None:
    """Why there is no camera picture to show (None: there is one)."""
    why = f" ({error})" if error else ""
    if state == CAMERA_OK:
        return None if frames else "Waiting for the first picture from the camera."
    if state == "starting":
        return "The camera is starting: waiting for its first picture."
    if state == "reopening":
        return f"The camera stopped delivering pictures{why}; the device keeps trying to reopen it."
    if state == "ended":
        return "The video used as the camera has ended (camera.loop_file is off)."
    return (f"The camera cannot be opened{why}. Check that it is connected, or set "
            "camera.source in the device's configuration.")


def _round(value: float | None, digits: int = 1) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(value, digits)


class StatusView:
    """Collects everything the page shows into one JSON-ready dict (page, /api and SSE alike)."""

    def __init__(self, settings: ApplianceSettings, pipeline: PipelineSource, store: StoreSource,
                 sync_status: SyncStatusFn | None,
                 system: Callable[[], SystemSnapshot]) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.store = store
        self.sync_status = sync_status
        self.system = system
        self.zone = _zone(settings.device.timezone)
        self._cache: tuple[float, dict[str, Any]] | None = None
        self._cache_lock = threading.Lock()

    def cached(self, max_age_s: float) -> dict[str, Any]:
        """:meth:`build`, shared by every open page for ``max_age_s`` (several viewers on a Pi
        must not multiply the work)."""
        with self._cache_lock:
            now = time.monotonic()
            if self._cache is None or now - self._cache[0] > max_age_s:
                self._cache = (now, self.build())
            return self._cache[1]

    def _local(self, when: datetime | None, fmt: str = "%H:%M:%S") -> str | None:
        return None if when is None else when.astimezone(self.zone).strftime(fmt)

    def _last_sync(self, sync: SyncStatusLike | None) -> str:
        if not (self.settings.sync.aggregator_url or self.settings.sync.mqtt_url):
            return "not configured (offline)"
        if sync is None:
            return "sync agent not running"
        if sync.last_success_at is None:
            return "never"
        return self._local(sync.last_success_at, "%Y-%m-%d %H:%M:%S") or "never"

    def build(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        st = self.pipeline.status()
        system = self.system()
        sync = read_sync_status(self.sync_status)
        depth = self.store.outbox_depth()
        oldest = self.store.oldest_unsent_age_s(now)
        present = sorted(st.present, key=lambda p: p.first_seen)
        health = check_health(self.settings, self.pipeline, self.store, system,
                              self.sync_status, now)
        sync_cfg = self.settings.sync
        return {
            "version": appliance.__version__,
            "device_id": self.settings.device.device_id,
            "room_id": st.room_id or self.settings.device.room_id,
            "now": self._local(now, "%Y-%m-%d %H:%M:%S %Z"),
            "course_id": st.course_id,
            "course_name": st.course_name,
            "roster_size": st.roster_size,
            "note": st.note,
            "camera": {
                "source": mask_url(st.camera_source),
                "state": st.camera_state,
                "ok": st.camera_state == CAMERA_OK,
                "fps": _round(st.fps),
                "frames": st.frames,
                "last_frame_at": self._local(st.last_frame_at),
                "error": _mask_optional(st.camera_error),
                "preview_note": preview_note(
                    st.camera_state, st.frames, _mask_optional(st.camera_error)),
            },
            "stage_ms": {name: _round(ms) for name, ms in st.stage_ms.items()},
            "present": [
                {"student_id": p.student_id, "name": p.name,
                 "first_seen": self._local(p.first_seen),
                 "confidence": _round(p.confidence, 2), "match": match_label(p.confidence)}
                for p in present
            ],
            "unknown_count": st.unknown_count,
            "tracks_active": st.tracks_active,
            "sync": {
                "configured": bool(sync_cfg.aggregator_url or sync_cfg.mqtt_url),
                "transport": sync.transport if sync else None,
                "connected": sync.connected if sync else False,
                "last_success_at": self._local(sync.last_success_at, "%Y-%m-%d %H:%M:%S")
                if sync else None,
                "last_sync": self._last_sync(sync),
                "last_error": _mask_optional(sync.last_error) if sync else None,
                "outbox_depth": depth,
                "oldest_unsent_age_s": _round(oldest, 0),
            },
            "system": {
                "cpu_percent": _round(system.cpu_percent),
                "load_1m": system.load_1m,
                "cpu_count": system.cpu_count,
                "cpu_temp_c": _round(system.cpu_temp_c),
                "memory_percent": _round(system.memory_percent),
                "memory_available_mb": _round(system.memory_available_mb, 0),
                "disk_percent": _round(system.disk_percent),
                "disk_free_gb": _round(system.disk_free_gb),
            },
            "health": {name: c["status"] for name, c in health["components"].items()},
            "health_status": health["status"],
            "provisioning": health["components"]["provisioning"]["message"],
        }


def refresh_gauges(pipeline: PipelineSource, store: StoreSource, system: SystemSnapshot) -> None:
    """Set the gauges that describe "now" (called on every scrape)."""
    try:
        st = pipeline.status()
    except Exception:  # the scrape must still answer
        _LOGGER.exception("metrics: pipeline status failed")
        metrics.CAMERA_UP.set(0)
    else:
        metrics.FPS.set(st.fps)
        metrics.CAMERA_UP.set(1 if st.camera_state == CAMERA_OK else 0)
    try:
        metrics.OUTBOX_DEPTH.set(store.outbox_depth())
    except (sqlite3.Error, OSError) as err:
        _LOGGER.warning("metrics: outbox depth unreadable: %s", err)
    temp = system.cpu_temp_c
    metrics.CPU_TEMPERATURE.set(float("nan") if temp is None else temp)


def create_app(
    settings: ApplianceSettings,
    pipeline: PipelineSource,
    store: StoreSource,
    sync_status: SyncStatusFn | None = None,
    *,
    system: Callable[[], SystemSnapshot] | None = None,
) -> FastAPI:
    """The status page app. ``system`` overrides the host reader (tests)."""
    data_dir = settings.paths.data_dir
    read_host = system or (lambda: read_system(data_dir))
    auth = Authenticator(settings)
    view = StatusView(settings, pipeline, store, sync_status, read_host)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    stopping = threading.Event()

    app = FastAPI(title="Attendance appliance", version=appliance.__version__,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.auth = auth
    app.state.stopping = stopping
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def same_origin_only(request: Request, call_next: Callable[..., Any]) -> Response:
        # A page elsewhere must not post forms here (log in as someone, log out): a browser
        # names the page's origin on every POST; it must be this page's own.
        if request.method not in SAFE_METHODS and not same_origin(request):
            _LOGGER.warning("cross-origin %s %s refused (Origin %r)", request.method,
                            request.url.path, request.headers.get("origin"))
            return JSONResponse({"detail": "cross-origin request refused"}, status_code=403,
                                headers=_SECURITY_HEADERS)
        return await call_next(request)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[..., Any]) -> Response:
        response: Response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def client_address(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def cookie_secure(request: Request) -> bool:
        # https: served over TLS (directly, or by a proxy in web.trusted_proxies that says so)
        return settings.web.cookie_secure or request.url.scheme == "https"

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return auth.check_api_key(header[7:].strip())
        return auth.valid_session(request.cookies.get(COOKIE_NAME))

    def unauthorized_json() -> JSONResponse:
        return JSONResponse({"detail": "login required"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    # The exact command for this device: `sudo` drops the service's environment, so name the
    # program and the data directory it uses.
    set_password_command = " ".join([
        shlex.quote(str(Path(sys.executable).parent / "appliance")), "web", "set-password",
        "--data-dir", shlex.quote(str(settings.paths.data_dir.resolve())),
    ])

    def login_page(request: Request, status_code: int, error: str | None = None,
                   headers: dict[str, str] | None = None) -> HTMLResponse:
        return templates.TemplateResponse(
            request, "login.html",
            {"configured": auth.configured(), "password_set": auth.password_set(),
             "error": error, "version": appliance.__version__,
             "device_id": settings.device.device_id,
             "password_file": str(settings.paths.data_dir / PASSWORD_FILE),
             "set_password_command": set_password_command},
            status_code=status_code, headers=headers,
        )

    # --- open --------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        def build() -> dict[str, Any]:
            return check_health(settings, pipeline, store, read_host(), sync_status)

        doc = await run_in_threadpool(build)
        code = 503 if doc["status"] == UNHEALTHY else 200
        return JSONResponse(doc, status_code=code)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not settings.web.metrics_public and not authorized(request):
            return unauthorized_json()

        def scrape() -> bytes:
            refresh_gauges(pipeline, store, read_host())
            return generate_latest(REGISTRY)

        return Response(await run_in_threadpool(scrape), media_type=CONTENT_TYPE_LATEST)

    @app.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> Response:
        if authorized(request):
            return RedirectResponse("/", status_code=303)
        return login_page(request, 200 if auth.configured() else 403)

    @app.post("/login")
    async def login(request: Request,
                    password: Annotated[str, Form(max_length=1024)] = "") -> Response:
        result = await run_in_threadpool(auth.login, client_address(request), password)
        metrics.WEB_LOGINS.labels(result=result.reason).inc()
        if result.ok:
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE_NAME, auth.issue_session(), max_age=auth.ttl_s,
                                httponly=True, samesite="strict",
                                secure=cookie_secure(request), path="/")
            return response
        if result.reason == "rate_limited":
            wait = max(1, math.ceil(result.retry_after_s))
            return login_page(request, 429, f"Too many failed logins: try again in {wait} s.",
                              {"Retry-After": str(wait)})
        if result.reason == "not_configured":
            return login_page(request, 403, "No password is set on this device.")
        return login_page(request, 401, "Wrong password.")

    # --- login required ------------------------------------------------------------------------

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        if auth.revoke(request.cookies.get(COOKIE_NAME)):  # the old cookie is dead server-side
            _LOGGER.info("status page logout from %s", client_address(request))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict",
                               secure=cookie_secure(request))
        return response

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> Response:
        if not authorized(request):
            return RedirectResponse("/login", status_code=303)
        try:
            data = await run_in_threadpool(view.build)
        except Exception:  # show a readable error instead of a bare 500
            _LOGGER.exception("status page: building the status failed")
            return HTMLResponse("<!doctype html><title>Status unavailable</title>"
                                "<p>The status is unavailable right now (see the device log)."
                                " <a href=\"/\">Retry</a></p>", status_code=503)
        return templates.TemplateResponse(
            request, "status.html",
            {"s": data, "refresh_ms": int(settings.web.refresh_s * 1000)},
        )

    @app.get("/api/status")
    async def api_status(request: Request) -> JSONResponse:
        if not authorized(request):
            return unauthorized_json()
        try:
            return JSONResponse(await run_in_threadpool(view.build))
        except Exception:  # same as the page: a readable 503, never a bare 500
            _LOGGER.exception("api status: building the status failed")
            return JSONResponse({"detail": "status unavailable"}, status_code=503)

    @app.get("/api/status/stream")
    async def status_stream(request: Request) -> Response:
        if not authorized(request):
            return unauthorized_json()

        async def events() -> AsyncIterator[str]:
            yield f"retry: {int(settings.web.refresh_s * 1000) + 1000}\n\n"
            while not stopping.is_set() and not await request.is_disconnected():
                try:
                    data = await run_in_threadpool(view.cached, settings.web.refresh_s / 2)
                except Exception:  # keep the stream; the page shows stale data meanwhile
                    _LOGGER.exception("status stream: build failed")
                else:
                    yield f"event: status\ndata: {json.dumps(data)}\n\n"
                await asyncio.sleep(settings.web.refresh_s)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    @app.get("/preview.jpg")
    async def preview(request: Request) -> Response:
        if not authorized(request):
            return unauthorized_json()
        jpeg = await run_in_threadpool(pipeline.latest_preview_jpeg)
        if jpeg is None:
            return Response(status_code=204)
        return Response(jpeg, media_type="image/jpeg")

    @app.get("/preview.mjpg")
    async def preview_stream(request: Request) -> Response:
        if not authorized(request):
            return unauthorized_json()

        async def frames() -> AsyncIterator[bytes]:
            last: bytes | None = None
            while not stopping.is_set() and not await request.is_disconnected():
                jpeg = await run_in_threadpool(pipeline.latest_preview_jpeg)
                if jpeg is not None and jpeg is not last:
                    last = jpeg
                    yield (f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                           f"Content-Length: {len(jpeg)}\r\n\r\n").encode() + jpeg + b"\r\n"
                await asyncio.sleep(0.2)

        return StreamingResponse(
            frames(), media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}")

    return app
