"""What the status page's routes share, kept in ``app.state.web`` by :func:`create_app`:
the settings, the pipeline, the store, the sync status, the host reader, the authenticator,
the status view and the templates; and the request-level helpers (who is logged in, the 401)."""

from __future__ import annotations

import shlex
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates

import appliance
from appliance.config import ApplianceSettings
from appliance.health import ClockSource, PipelineSource, StoreSource, SyncStatusFn
from appliance.system import SystemSnapshot
from appliance.web.auth import COOKIE_NAME, PASSWORD_FILE, Authenticator
from appliance.web.view import StatusView

HERE = Path(__file__).resolve().parent


def set_password_command(settings: ApplianceSettings) -> str:
    """The exact command for this device: `sudo` drops the service's environment, so name the
    program and the data directory it uses."""
    return " ".join([
        shlex.quote(str(Path(sys.executable).parent / "appliance")), "web", "set-password",
        "--data-dir", shlex.quote(str(settings.paths.data_dir.resolve())),
    ])


@dataclass
class WebContext:
    settings: ApplianceSettings
    pipeline: PipelineSource
    store: StoreSource
    sync_status: SyncStatusFn | None
    read_host: Callable[[], SystemSnapshot]
    auth: Authenticator
    view: StatusView
    templates: Jinja2Templates = field(
        default_factory=lambda: Jinja2Templates(directory=str(HERE / "templates")))
    stopping: threading.Event = field(default_factory=threading.Event)  # ends the streams
    clock: ClockSource | None = None

    def authorized(self, request: Request) -> bool:
        """A session cookie, or ``Authorization: Bearer <device API key>``."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return self.auth.check_api_key(header[7:].strip())
        return self.auth.valid_session(request.cookies.get(COOKIE_NAME))

    def cookie_secure(self, request: Request) -> bool:
        # https: served over TLS (directly, or by a proxy in web.trusted_proxies that says so)
        return self.settings.web.cookie_secure or request.url.scheme == "https"

    def login_page(self, request: Request, status_code: int, error: str | None = None,
                   headers: dict[str, str] | None = None) -> HTMLResponse:
        auth, settings = self.auth, self.settings
        return self.templates.TemplateResponse(
            request, "login.html",
            {"configured": auth.configured(), "password_set": auth.password_set(),
             "error": error, "version": appliance.__version__,
             "device_id": settings.device.device_id,
             "password_file": str(settings.paths.data_dir / PASSWORD_FILE),
             "set_password_command": set_password_command(settings)},
            status_code=status_code, headers=headers,
        )


def web_context(request: Request) -> WebContext:
    context: WebContext = request.app.state.web
    return context


Context = Annotated[WebContext, Depends(web_context)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def unauthorized_json() -> JSONResponse:
    return JSONResponse({"detail": "login required"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})
