"""FastAPI dependencies: the database session and authentication (Bearer keys/tokens)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, Any, Literal, cast

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cloud_sync.aggregator import metrics
from cloud_sync.aggregator.api.context import (
    AdminPrincipal,
    AppContext,
    DevicePrincipal,
    Principal,
)
from cloud_sync.aggregator.api.limiter import retry_after
from cloud_sync.aggregator.db.models import Room
from cloud_sync.aggregator.services.devices import authenticate_admin, authenticate_device
from cloud_sync.aggregator.services.security import ADMIN_PREFIX, DEVICE_PREFIX, hash_secret

_LOGGER = logging.getLogger(__name__)
_bearer = HTTPBearer(auto_error=False, description="A device API key or an admin token.")


def context(request: Request) -> AppContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


def db(request: Request) -> Iterator[Session]:
    with context(request).sessions() as session:
        yield session


DB = Annotated[Session, Depends(db)]


def _unauthorised(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def _lookup(ctx: AppContext, secret: str) -> Principal | None:
    with ctx.sessions() as session:
        if secret.startswith(DEVICE_PREFIX):
            device = authenticate_device(session, secret)
            if device is not None:
                room = session.get(Room, device.room_id)
                return DevicePrincipal(device.id, device.room_id, room.site if room else "")
        elif secret.startswith(ADMIN_PREFIX):
            token = authenticate_admin(session, secret, record_use=True)
            if token is not None:
                return AdminPrincipal(token.id, token.name)
    return None


def admin_token_valid(ctx: AppContext, secret: str) -> bool:
    """Whether ``secret`` is an admin token that exists now (the database, not the cache):
    what a long-lived connection (``/ws/events``) checks again while it is open."""
    with ctx.sessions() as session:
        return authenticate_admin(session, secret) is not None


async def authenticate(ctx: AppContext, authorization: str | None, client: str) -> Principal:
    """The caller, from an ``Authorization: Bearer`` header value, or a 401. A cached
    credential costs no thread hop; a miss looks the hash up in the database in the thread pool
    and records the credential's use."""
    scheme, _, secret = (authorization or "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise _unauthorised("missing credentials: send 'Authorization: Bearer <key>'")
    digest = hash_secret(secret)
    found = ctx.credentials.get(digest)
    if found is not None:
        return found
    found = await run_in_threadpool(_lookup, ctx, secret)
    if found is None:
        _LOGGER.info("rejected credentials from %s", client)
        raise _unauthorised("invalid credentials")
    ctx.credentials.put(digest, found)
    return found


Role = Literal["admin", "device", "any"]


async def authorise(ctx: AppContext, who: Principal, role: Role) -> None:
    """403 when ``who`` may not use a route needing ``role``; 429 when a device is over its
    rate limit (kept in PostgreSQL or Redis when several processes share it: a request the
    process's lease of the device's tokens does not pay for asks the store in the thread
    pool)."""
    if role == "admin" and not isinstance(who, AdminPrincipal):
        raise HTTPException(403, "this endpoint needs an admin token")
    if role == "device" and not isinstance(who, DevicePrincipal):
        raise HTTPException(403, "this endpoint needs a device API key")
    if isinstance(who, DevicePrincipal):
        limiter = ctx.limiter
        if not limiter.blocking:
            wait = limiter.acquire(who.device_id)
        else:  # a token this process leased earlier costs no I/O (api/limiter.py)
            local = getattr(limiter, "try_acquire", None)
            found = local(who.device_id) if local is not None else None
            wait = found if found is not None else await run_in_threadpool(
                limiter.acquire, who.device_id)
        if wait > 0:
            metrics.RATE_LIMITED.inc()
            raise HTTPException(
                429, "rate limit exceeded for this device",
                headers={"Retry-After": retry_after(wait)},
            )


async def _checked(request: Request, role: Role) -> Principal:
    """The principal the guard middleware (api/guard.py) authenticated and authorised before
    the body was read; without the guard (never in create_app), the same checks here."""
    found: Principal | None = getattr(request.state, "principal", None)
    if found is not None:
        return found
    ctx = context(request)
    who = await authenticate(ctx, request.headers.get("authorization"),
                             request.client.host if request.client else "?")
    await authorise(ctx, who, role)
    return who


async def principal(
    request: Request,
    _creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    return await _checked(request, "any")


async def device(
    request: Request,
    _creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> DevicePrincipal:
    return cast(DevicePrincipal, await _checked(request, "device"))


async def admin(
    request: Request,
    _creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AdminPrincipal:
    return cast(AdminPrincipal, await _checked(request, "admin"))


ROLE_OF: dict[Any, Role] = {principal: "any", device: "device", admin: "admin"}

Device = Annotated[DevicePrincipal, Depends(device)]
Admin = Annotated[AdminPrincipal, Depends(admin)]
DeviceOrAdmin = Annotated[Principal, Depends(principal)]
