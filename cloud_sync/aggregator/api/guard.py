"""The guard in front of every HTTP request (pure ASGI, runs before any body is read):

1. finds the route (its template labels the metrics: only known methods and route templates,
   so ``curl -X M$RANDOM`` or random paths cannot create new label series); a method no route
   of the path takes is a 405 whose ``Allow`` lists every method of the path;
2. authenticates and authorises a route that needs credentials (the ``principal``/``device``/
   ``admin`` dependencies of api/deps.py) from the ``Authorization`` header alone: a caller
   without valid credentials gets its 401/403 (a device over its rate limit its 429) before one
   byte of the body is read;
3. limits the body to the route's limit on the bytes actually received (Content-Length or
   chunked), with Starlette's ``RequestBodyLimitMiddleware``: 413 as soon as the limit is
   passed, whatever the client announced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_sync.aggregator import metrics
from cloud_sync.aggregator.api import deps
from cloud_sync.aggregator.api.limiter import LimiterUnavailableError

_LOGGER = logging.getLogger(__name__)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_role(dependant: Dependant) -> deps.Role | None:
    """The strongest role any dependency of the route needs, or None (no credentials)."""
    found: set[deps.Role] = set()

    def walk(dep: Dependant) -> None:
        role = deps.ROLE_OF.get(dep.call)
        if role is not None:
            found.add(role)
        for sub in dep.dependencies:
            walk(sub)

    walk(dependant)
    for role in ("admin", "device", "any"):
        if role in found:
            return role  # type: ignore[return-value]
    return None


def flat_routes(routes: list[BaseRoute]) -> list[BaseRoute]:
    """The routes in the order the router tries them, routers included with
    ``include_router`` unfolded (FastAPI keeps them as one entry per included router)."""
    flat: list[BaseRoute] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        flat.extend(flat_routes(inner.routes) if inner is not None else [route])
    return flat


class GuardMiddleware:
    """See the module docstring. ``router``: the application's router (its routes are read
    at the first request, so routers included later count); ``limits``: route template ->
    body limit in bytes, ``default_limit`` for every other route."""

    def __init__(self, app: ASGIApp, router: Any, default_limit: int,
                 limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.router = router
        self.routes: list[BaseRoute] | None = None
        self.default_limit = default_limit
        self.limits = dict(limits or {})
        self._roles: dict[int, deps.Role | None] = {}
        self._limited: dict[int, ASGIApp] = {}

    def _match(self, scope: Scope) -> tuple[BaseRoute | None, set[str]]:
        """The route that will answer, and (when none takes this method) every method the
        path's routes take: Starlette's own 405 lists only the first route's methods."""
        if self.routes is None:
            self.routes = flat_routes(self.router.routes)
        partial: BaseRoute | None = None
        allowed: set[str] = set()
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route, set()
            if match == Match.PARTIAL:
                partial = partial or route
                allowed |= set(getattr(route, "methods", None) or ())
        return partial, allowed

    def _role_of(self, route: BaseRoute | None) -> deps.Role | None:
        if not isinstance(route, APIRoute):
            return None
        key = id(route)
        if key not in self._roles:
            self._roles[key] = route_role(route.dependant)
        return self._roles[key]

    def _limited_app(self, template: str) -> ASGIApp:
        limit = self.limits.get(template, self.default_limit)
        app = self._limited.get(limit)
        if app is None:
            app = self._limited[limit] = RequestBodyLimitMiddleware(self.app, limit)
        return app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        route, allowed = self._match(scope)
        template = "unmatched" if route is None else str(
            getattr(route, "path_format", None) or getattr(route, "path", "unmatched"))
        method = scope.get("method", "")
        method = method if method in KNOWN_METHODS else "other"

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if allowed:
                response = JSONResponse({"detail": "Method Not Allowed"}, status_code=405,
                                        headers={"Allow": ", ".join(sorted(allowed))})
                await response(scope, receive, send_wrapper)
                return
            role = self._role_of(route)
            if role is not None and not await self._admit(scope, role, receive, send_wrapper):
                return
            await self._limited_app(template)(scope, receive, send_wrapper)
        finally:
            metrics.REQUESTS.labels(method, template, str(status)).inc()
            metrics.LATENCY.labels(template).observe(time.perf_counter() - started)

    async def _admit(self, scope: Scope, role: deps.Role, receive: Receive, send: Send) -> bool:
        """Authenticate and authorise from the headers; answer the error and return False."""
        ctx = scope["app"].state.ctx
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"authorization")
        client = scope.get("client")
        try:
            who = await deps.authenticate(
                ctx, raw.decode("latin-1") if raw is not None else None,
                client[0] if client else "?",
            )
            await deps.authorise(ctx, who, role)
        except HTTPException as err:
            response = JSONResponse({"detail": err.detail}, status_code=err.status_code,
                                    headers=err.headers)
        except SQLAlchemyError as err:
            _LOGGER.error("database error while authenticating: %s", err)
            response = JSONResponse({"detail": "database unavailable, retry later"},
                                    status_code=503, headers={"Retry-After": "5"})
        except LimiterUnavailableError as err:
            _LOGGER.error("rate limit store unavailable: %s", err)
            response = JSONResponse({"detail": "rate limit store unavailable, retry later"},
                                    status_code=503, headers={"Retry-After": "5"})
        else:
            state: dict[str, Any] = scope.setdefault("state", {})
            state["principal"] = who
            return True
        await response(scope, receive, send)
        return False
