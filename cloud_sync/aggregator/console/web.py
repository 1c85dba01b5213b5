"""Console plumbing shared by its pages: templates, the logged-in user, CSRF, redirects.

Every page needs a session cookie (``console_session``, HttpOnly, SameSite=Strict); a missing
or ended session sends the browser to ``/login``. Every POST needs the session's CSRF token
(form field ``csrf`` or header ``X-CSRF-Token``) and, when the browser sends one, an Origin of
this host.
"""

from __future__ import annotations

import hmac
import logging
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import pass_context
from jinja2.runtime import Context
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud_sync.aggregator.api.deps import DB, context, db
from cloud_sync.aggregator.console.accounts import ConsolePrincipal, load_session
from cloud_sync.aggregator.services.common import ForbiddenError
from cloud_sync.protocol import IDENTIFIER_CHARS
from cloud_sync.words import match_bands, match_label, recogniser

_LOGGER = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
COOKIE = "console_session"
LOGIN_CSRF_COOKIE = "console_login_csrf"
templates = Jinja2Templates(directory=str(HERE / "templates"))


def _when(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return "" if value is None else value.strftime(fmt)


@pass_context
def _match(page: Context, confidence: float | None) -> str:
    """A match as the device's status page says it, then the number: ``good · 0.58``; in
    the bands of the fleet's embedder (the aggregator's first ``embedders``) at its
    calibrated threshold (cloud_sync.words)."""
    if confidence is None:
        return ""
    settings = page.get("settings")
    embedder = settings.embedders[0] if settings is not None else "sface"
    return f"{match_label(confidence, match_bands(embedder))} · {confidence:.2f}"


templates.env.filters["when"] = _when
templates.env.filters["match"] = _match
templates.env.filters["recogniser"] = recogniser
# what an id field accepts, as the API checks it (an HTML pattern is anchored by itself)
templates.env.globals["identifier_pattern"] = IDENTIFIER_CHARS


class LoginRequired(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by :func:`user` when there is no valid session: the handler redirects."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class SessionGate:
    """Pure ASGI, in front of the console: a console POST (other than ``/login``) without a
    live session is answered 401 before one byte of its body is read (as the API's guard does
    for Bearer credentials); the route's own dependencies then check the session and CSRF."""

    def __init__(self, app: ASGIApp, api_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.api_prefixes = api_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or scope.get("method") != "POST" or path == "/login"
                or path.startswith(self.api_prefixes)):
            await self.app(scope, receive, send)
            return
        token = HTTPConnection(scope).cookies.get(COOKIE)
        ctx = scope["app"].state.ctx

        def valid() -> bool:
            with ctx.sessions() as session:
                return load_session(session, token) is not None

        if token and await run_in_threadpool(valid):
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"detail": "log in first"}, status_code=401)
        await response(scope, receive, send)


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def user(request: Request, session: DB) -> ConsolePrincipal:
    found = load_session(session, request.cookies.get(COOKIE))
    session.rollback()  # end the read transaction: the page's own queries start fresh
    if found is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return found


async def checked_user(request: Request, who: Annotated[ConsolePrincipal, Depends(user)]
                       ) -> ConsolePrincipal:
    """The user of a POST: the session's CSRF token must come with it (form or header)."""
    if not same_origin(request):
        raise HTTPException(403, "cross-site request refused")
    token = request.headers.get("x-csrf-token")
    if token is None:
        form = await request.form()
        value = form.get("csrf")
        token = value if isinstance(value, str) else None
    if not token or not hmac.compare_digest(token.encode(), who.csrf_token.encode()):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")
    return who


def require_admin(who: ConsolePrincipal) -> None:
    if not who.is_admin:
        raise ForbiddenError("this page is for administrators")


User = Annotated[ConsolePrincipal, Depends(user)]
PostUser = Annotated[ConsolePrincipal, Depends(checked_user)]


def render(request: Request, name: str, who: ConsolePrincipal | None, status: int = 200,
           **values: Any) -> HTMLResponse:
    ctx = context(request)
    return templates.TemplateResponse(request, name, {
        "user": who, "settings": ctx.settings, "path": request.url.path, **values,
    }, status_code=status)


def back(url: str, message: str | None = None) -> RedirectResponse:
    """303 to ``url`` (after a POST), with a one-line notice shown on the next page."""
    if message:
        url += ("&" if "?" in url else "?") + "notice=" + quote(message)
    return RedirectResponse(url, status_code=303)


def login_redirect(path: str) -> RedirectResponse:
    """To the login page, which comes back to ``path`` (the request's own path)."""
    return RedirectResponse(f"/login?next={quote(path)}", status_code=303)


__all__ = ["DB", "context", "db"]
