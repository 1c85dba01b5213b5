"""Console pages: login, logout, the dashboard (and its live fragment), the audit trail."""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from cloud_sync.aggregator.api.limiter import LimiterUnavailableError
from cloud_sync.aggregator.console import accounts, dashboard
from cloud_sync.aggregator.console.web import (
    COOKIE,
    DB,
    LOGIN_CSRF_COOKIE,
    PostUser,
    User,
    context,
    db,
    render,
    require_admin,
    same_origin,
)
from cloud_sync.aggregator.services import audit as audit_log
from cloud_sync.aggregator.services.common import utcnow

_LOGGER = logging.getLogger(__name__)
AUDIT_PAGE_ROWS = 300
router = APIRouter(include_in_schema=False)


def _cookie_flags(request: Request) -> dict[str, object]:
    return {"httponly": True, "samesite": "strict", "secure": request.url.scheme == "https",
            "path": "/"}


def _safe_next(target: str | None) -> str:
    # only a path of this site: not //host, /\host (browsers read it as //host) or a scheme
    if (not target or not target.startswith("/") or target.startswith("//")
            or "\\" in target or any(ord(c) < 32 for c in target)):
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, next=_safe_next(next), csrf=token,
                      error=None)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, **_cookie_flags(request))
    return response


def _login_page_error(request: Request, message: str, status: int, next_url: str,
                      retry_after: float = 0) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, status=status, next=next_url, csrf=token,
                      error=message)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, **_cookie_flags(request))
    if retry_after:
        response.headers["Retry-After"] = str(int(retry_after) + 1)
    return response


@router.post("/login")
async def login(
    request: Request,
    name: Annotated[str, Form(max_length=100)],
    password: Annotated[str, Form(max_length=1000)],
    csrf: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    ctx = context(request)
    target = _safe_next(next)
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not same_origin(request) or not expected or not hmac.compare_digest(
        csrf.encode(), expected.encode()
    ):
        return _login_page_error(request, "The login form expired: please try again.", 403,
                                 target)
    # behind a proxy in trusted_proxies: the real client (app.py's proxy headers middleware)
    client = request.client.host if request.client else "unknown"
    limits: accounts.LoginLimits = ctx.extra["console_login_limits"]
    try:
        wait = await limits.acquire(name.strip(), client)
    except LimiterUnavailableError:
        _LOGGER.error("console login refused: the shared login limit does not answer")
        return _login_page_error(request, "The server cannot check logins right now: retry "
                                 "in a minute.", 503, target, 30)
    if wait > 0:
        _LOGGER.warning("console login for %r from %s refused: too many attempts", name, client)
        return _login_page_error(request, f"Too many attempts: wait {int(wait) + 1} s.", 429,
                                 target, wait)

    def check() -> str | None:
        with ctx.sessions() as session:
            found = accounts.check_credentials(session, name.strip(), password)
            if found is None:
                return None
            return accounts.create_session(session, found, ctx.settings.console_session_ttl_s)

    token = await run_in_threadpool(check)
    if token is None:
        _LOGGER.warning("console login for %r from %s failed", name, client)
        return _login_page_error(request, "Wrong name or password.", 401, target)
    _LOGGER.info("console login: %s from %s", name, client)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token, max_age=int(ctx.settings.console_session_ttl_s),
                        **_cookie_flags(request))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, who: PostUser, session: DB) -> Response:
    accounts.end_session(session, request.cookies.get(COOKIE), who.name)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


def _dashboard_rooms(request: Request, who: accounts.ConsolePrincipal, session: DB
                     ) -> list[dashboard.RoomView]:
    ctx = context(request)
    return dashboard.build(session, who, utcnow(), ctx.rules,
                           ctx.settings.console_offline_after_s)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, who: User, session: DB) -> Response:
    rooms = _dashboard_rooms(request, who, session)
    return render(request, "dashboard.html", who, rooms=rooms, now=utcnow())


@router.get("/console/fragments/dashboard", response_class=HTMLResponse)
def dashboard_fragment(request: Request, who: User, session: DB) -> Response:
    rooms = _dashboard_rooms(request, who, session)
    return render(request, "_rooms.html", who, rooms=rooms, now=utcnow())


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, who: User, session: DB) -> Response:
    require_admin(who)
    rows = audit_log.entries(session, limit=AUDIT_PAGE_ROWS)
    # reading the audit log is itself audited, as GET /api/v1/audit is
    audit_log.record_now(session, accounts.actor(who.name), "audit.view", "audit", "console")
    return render(request, "audit.html", who, rows=rows)


__all__ = ["db", "router"]
