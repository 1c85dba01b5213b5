"""FastAPI dependencies: the database session and authentication (Bearer keys/tokens)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

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
            token = authenticate_admin(session, secret)
            if token is not None:
                return AdminPrincipal(token.id, token.name)
    return None


async def principal(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, from ``Authorization: Bearer``. Async: a cached credential costs no
    thread hop; a miss looks the hash up in the database in the thread pool."""
    if creds is None or not creds.credentials:
        raise _unauthorised("missing credentials: send 'Authorization: Bearer <key>'")
    secret = creds.credentials
    ctx = context(request)
    digest = hash_secret(secret)
    found = ctx.credentials.get(digest)
    if found is not None:
        return found
    found = await run_in_threadpool(_lookup, ctx, secret)
    if found is None:
        _LOGGER.info("rejected credentials from %s", request.client.host if request.client else "?")
        raise _unauthorised("invalid credentials")
    ctx.credentials.put(digest, found)
    return found


def _rate_limit(request: Request, device: DevicePrincipal) -> None:
    wait = context(request).limiter.acquire(device.device_id)
    if wait > 0:
        metrics.RATE_LIMITED.inc()
        raise HTTPException(
            429, "rate limit exceeded for this device",
            headers={"Retry-After": context(request).limiter.retry_after(wait)},
        )


async def device(
    request: Request, who: Annotated[Principal, Depends(principal)]
) -> DevicePrincipal:
    if not isinstance(who, DevicePrincipal):
        raise HTTPException(403, "this endpoint needs a device API key")
    _rate_limit(request, who)
    return who


async def admin(who: Annotated[Principal, Depends(principal)]) -> AdminPrincipal:
    if not isinstance(who, AdminPrincipal):
        raise HTTPException(403, "this endpoint needs an admin token")
    return who


async def device_or_admin(
    request: Request, who: Annotated[Principal, Depends(principal)]
) -> Principal:
    if isinstance(who, DevicePrincipal):
        _rate_limit(request, who)
    return who


Device = Annotated[DevicePrincipal, Depends(device)]
Admin = Annotated[AdminPrincipal, Depends(admin)]
DeviceOrAdmin = Annotated[Principal, Depends(device_or_admin)]
