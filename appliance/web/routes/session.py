"""Logging in and out: ``GET /login``, ``POST /login`` (password; rate limited per client),
``POST /logout`` (the session is revoked server-side)."""

from __future__ import annotations

import logging
import math
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from appliance import metrics
from appliance.web.auth import COOKIE_NAME
from appliance.web.context import Context, client_address

_LOGGER = logging.getLogger(__name__)

router = APIRouter()


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, ctx: Context) -> Response:
    if ctx.authorized(request):
        return RedirectResponse("/", status_code=303)
    return ctx.login_page(request, 200 if ctx.auth.configured() else 403)


@router.post("/login")
async def login(request: Request, ctx: Context,
                password: Annotated[str, Form(max_length=1024)] = "") -> Response:
    auth = ctx.auth
    result = await run_in_threadpool(auth.login, client_address(request), password)
    metrics.WEB_LOGINS.labels(result=result.reason).inc()
    if result.ok:
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE_NAME, auth.issue_session(), max_age=auth.ttl_s,
                            httponly=True, samesite="strict",
                            secure=ctx.cookie_secure(request), path="/")
        return response
    if result.reason == "rate_limited":
        wait = max(1, math.ceil(result.retry_after_s))
        return ctx.login_page(request, 429, f"Too many failed logins: try again in {wait} s.",
                              {"Retry-After": str(wait)})
    if result.reason == "not_configured":
        return ctx.login_page(request, 403, "No password is set on this device.")
    return ctx.login_page(request, 401, "Wrong password.")


@router.post("/logout")
async def logout(request: Request, ctx: Context) -> Response:
    if ctx.auth.revoke(request.cookies.get(COOKIE_NAME)):  # the old cookie is dead server-side
        _LOGGER.info("status page logout from %s", client_address(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict",
                           secure=ctx.cookie_secure(request))
    return response
