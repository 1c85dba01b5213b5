"""The aggregator's web console for the school office and the teachers (server-rendered
FastAPI + Jinja2, one small plain script, every asset served locally).

:func:`mount` adds its pages to the aggregator app: ``/`` (dashboard), ``/login``, ``/logout``,
``/courses...``, ``/students...``, ``/timetable...``, ``/devices...``, ``/releases...``,
``/unknown...``,
``/recordings...``, ``/accounts...``, ``/audit``, ``POST /api/v1/unknown-faces`` (devices), and the
static files under ``/console/static``. API paths (``/api/...``) keep their JSON errors.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_sync.aggregator.console import (
    core,
    courses,
    devices,
    recordings,
    releases,
    staff,
    students,
    timetable,
    unknown,
)
from cloud_sync.aggregator.console.accounts import LoginLimits
from cloud_sync.aggregator.console.web import (
    HERE,
    LoginRequired,
    SessionGate,
    login_redirect,
    render,
)
from cloud_sync.aggregator.services.common import ServiceError

_LOGGER = logging.getLogger(__name__)
API_PREFIXES = ("/api/", "/health", "/metrics", "/docs", "/openapi", "/redoc")
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'",
}
TITLES = {400: "Not accepted", 403: "Not allowed", 404: "Not found", 409: "Conflict",
          413: "Too large", 422: "Not accepted", 503: "Unavailable"}


def _wants_json(request: Request) -> bool:
    """The console's own script asks for JSON (in-place marks, photo upload): errors as JSON."""
    return "application/json" in request.headers.get("accept", "")


def is_console(request: Request) -> bool:
    return not request.url.path.startswith(API_PREFIXES)


class _ErrorPages:
    """Errors on console pages are pages (with the user's menu when logged in); on API paths
    they stay the app's own JSON answers."""

    def __init__(self, app: FastAPI) -> None:
        self.ctx = app.state.ctx
        # the app's own handlers, registered before the console's
        self.service_handler = app.exception_handlers.get(ServiceError)
        self.http_handler = app.exception_handlers.get(HTTPException)

    def page(self, request: Request, status: int, message: str) -> Response:
        who = None
        try:
            from cloud_sync.aggregator.console.web import user

            with self.ctx.sessions() as session:
                who = user(request, session)
        except LoginRequired:
            who = None
        return render(request, "error.html", who, status=status,
                      title=TITLES.get(status, "Error"), message=message)

    async def on_service_error(self, request: Request, err: Exception) -> Response:
        assert isinstance(err, ServiceError)
        if is_console(request) and not _wants_json(request):
            return self.page(request, err.status, err.message)
        if self.service_handler is not None:
            return await self.service_handler(request, err)  # type: ignore[no-any-return]
        return JSONResponse({"detail": err.message}, status_code=err.status)

    async def on_http_error(self, request: Request, err: Exception) -> Response:
        assert isinstance(err, HTTPException)
        if is_console(request) and not _wants_json(request):
            return self.page(request, err.status_code, str(err.detail))
        if self.http_handler is not None:
            return await self.http_handler(request, err)  # type: ignore[no-any-return]
        return JSONResponse({"detail": err.detail}, status_code=err.status_code,
                            headers=err.headers)


async def _on_login_required(request: Request, err: Exception) -> Response:
    assert isinstance(err, LoginRequired)
    if request.method != "GET" or request.url.path.startswith("/console/fragments"):
        return JSONResponse({"detail": "log in first"}, status_code=401)
    return login_redirect(err.path)


class ConsoleHeaders:
    """Pure ASGI: the console's security headers (and ``Cache-Control: no-store`` but on its
    static files) on console answers only. API paths go straight through: the devices' hot
    path pays nothing for the console (an ``app.middleware("http")`` function wrapped every
    API request in a BaseHTTPMiddleware: ~0.35 ms of CPU each)."""

    def __init__(self, app: ASGIApp, api_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.api_prefixes = api_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(self.api_prefixes):
            await self.app(scope, receive, send)
            return
        cache = not path.startswith("/console/static")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if cache:
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, with_headers)


def mount(app: FastAPI) -> None:
    """Add the console to ``app`` (call after the app's own exception handlers)."""
    ctx = app.state.ctx
    from cloud_sync.aggregator.app import make_limiter

    settings = ctx.settings
    ctx.extra["console_login_limits"] = LoginLimits(
        make_limiter(settings, ctx.engine, settings.console_login_max_attempts),
        make_limiter(settings, ctx.engine, settings.console_login_max_per_address))
    app.mount("/console/static", StaticFiles(directory=str(HERE / "static")),
              name="console-static")
    for module in (core, courses, students, timetable, devices, releases, unknown,
                   recordings, staff):
        app.include_router(module.router)
    app.include_router(unknown.api_router)
    errors = _ErrorPages(app)
    app.add_exception_handler(ServiceError, errors.on_service_error)
    app.add_exception_handler(HTTPException, errors.on_http_error)
    app.add_exception_handler(LoginRequired, _on_login_required)

    app.add_middleware(SessionGate, api_prefixes=API_PREFIXES)
    app.add_middleware(ConsoleHeaders, api_prefixes=API_PREFIXES)
