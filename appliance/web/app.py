"""The status page application: FastAPI, server-rendered Jinja2, a little plain JS over SSE.

Routes (see docs/STATUS_PAGE.md), one router per kind in ``appliance/web/routes/``:

- open: ``GET /health`` (JSON, 200 or 503), ``GET /metrics`` (Prometheus; a setting can close
  it) in ``ops.py``; ``GET /login``, ``POST /login``, ``POST /logout`` in ``session.py``;
  ``/static/*``;
- login required (session cookie, or ``Authorization: Bearer <device API key>``): ``GET /``,
  ``GET /api/status``, ``GET /api/status/stream`` (SSE), ``GET /preview.jpg``,
  ``GET /preview.mjpg`` in ``status.py``.

What the routes share is one :class:`appliance.web.context.WebContext` in ``app.state.web``;
what the page shows is :class:`appliance.web.view.StatusView`; the headers and the
cross-origin refusal every answer gets are in ``security.py``.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

import appliance
from appliance.config import ApplianceSettings
from appliance.health import ClockSource, PipelineSource, StoreSource, SyncStatusFn
from appliance.system import SystemSnapshot, read_system
from appliance.web.auth import Authenticator
from appliance.web.context import HERE, WebContext
from appliance.web.routes import ops, session, status
from appliance.web.security import same_origin_only, security_headers
from appliance.web.view import StatusView


def create_app(
    settings: ApplianceSettings,
    pipeline: PipelineSource,
    store: StoreSource,
    sync_status: SyncStatusFn | None = None,
    *,
    system: Callable[[], SystemSnapshot] | None = None,
    clock: ClockSource | None = None,
) -> FastAPI:
    """The status page app. ``system`` overrides the host reader (tests); ``clock`` is the
    device's (appliance.clock: whether its time is trusted)."""
    data_dir = settings.paths.data_dir
    read_host = system or (lambda: read_system(data_dir))
    context = WebContext(
        settings, pipeline, store, sync_status, read_host, auth=Authenticator(settings),
        view=StatusView(settings, pipeline, store, sync_status, read_host, clock=clock),
        clock=clock)

    app = FastAPI(title="Attendance appliance", version=appliance.__version__,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web = context
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    # the last added runs first: the cross-origin refusal gets the security headers too
    app.middleware("http")(same_origin_only)
    app.middleware("http")(security_headers)
    for module in (ops, session, status):
        app.include_router(module.router)
    return app
