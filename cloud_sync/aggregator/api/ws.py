"""``/ws/events``: new attendance records and device events, live (admin token).

Authentication: ``Authorization: Bearer <admin token>`` on the handshake or, for browsers
(which cannot set headers on a WebSocket), a first message ``{"token": "<admin token>"}``
within ``AUTH_TIMEOUT_S``. Never in the URL: uvicorn logs every handshake's path with its query
string, so ``?token=`` is refused (1008) and masked in the log (logsafe.py). The credential is
checked again every ``RECHECK_S`` and at once when this process hears of a credential change
(a revocation here or in another process): a revoked token's socket is closed (1008) within
seconds. Filters: ``room_id`` and ``type`` (each may repeat; ``type`` is ``attendance`` or an
event kind). Every message is one JSON object:
``{"type": "attendance", "room_id": ..., "records": [{...}, ...]}`` (the new records of one
batch) or
``{"type": <kind>, "room_id": ..., "event": {...the wire event...}}``.

A client that falls ``ws_queue_messages`` behind is closed with code 1013 ("try again later")
and its backlog freed; so is a client over ``ws_max_clients``. Code 1008: bad, missing or
revoked credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, WebSocket, WebSocketDisconnect
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from cloud_sync.aggregator.api.context import AdminPrincipal, AppContext
from cloud_sync.aggregator.api.deps import admin_token_valid, authenticate
from cloud_sync.aggregator.services.live import LiveFeed, Subscriber, TooManyClientsError
from cloud_sync.protocol import EVENT_KINDS

_LOGGER = logging.getLogger(__name__)
router = APIRouter(tags=["live"])
TYPES = ("attendance", *EVENT_KINDS)
CLOSE_POLICY = 1008
CLOSE_TRY_LATER = 1013


AUTH_TIMEOUT_S = 10.0  # to send the first-message token
RECHECK_S = 5.0  # the credential is looked up again this often (and on any credential change)


def _header_secret(websocket: WebSocket) -> str | None:
    header = websocket.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def _first_message_secret(websocket: WebSocket) -> str | None:
    """The token of the client's first message ``{"token": "..."}`` (None: none in time)."""
    try:
        message = await asyncio.wait_for(websocket.receive(), AUTH_TIMEOUT_S)
    except TimeoutError:
        return None
    text = message.get("text")
    if message["type"] != "websocket.receive" or not text or len(text) > 1000:
        return None
    try:
        token = json.loads(text).get("token")
    except (ValueError, AttributeError):
        return None
    return token if isinstance(token, str) and token else None


async def _admin(websocket: WebSocket, secret: str | None) -> AdminPrincipal | None:
    if not secret:
        return None
    client = websocket.client.host if websocket.client else "?"
    try:
        found = await authenticate(websocket.app.state.ctx, f"Bearer {secret}", client)
    except HTTPException:
        return None
    return found if isinstance(found, AdminPrincipal) else None


async def _watch_credential(ctx: AppContext, secret: str) -> None:
    """Returns when the socket's admin token no longer works (revoked): looked up in the
    database every RECHECK_S, and within a second of a credential change this process hears
    of (AppContext.forget: a revocation here, or in another process through the bus)."""
    epoch, last = ctx.credential_epoch, time.monotonic()
    while True:
        await asyncio.sleep(1.0)
        if ctx.credential_epoch == epoch and time.monotonic() - last < RECHECK_S:
            continue
        epoch, last = ctx.credential_epoch, time.monotonic()
        try:
            if not await run_in_threadpool(admin_token_valid, ctx, secret):
                return
        except SQLAlchemyError as err:  # the database is down: keep the feed, check again
            _LOGGER.warning("live feed: credential check failed: %s", err)


async def _pump(websocket: WebSocket, sub: Subscriber) -> None:
    while True:
        text = await sub.queue.get()
        await websocket.send_text(text)


async def _drain_incoming(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, to notice it leaving."""
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return


@router.websocket("/ws/events")
async def events_feed(
    websocket: WebSocket,
    room_id: Annotated[list[str] | None, Query(description="Only these rooms.")] = None,
    type: Annotated[list[str] | None, Query(
        description="Only these types: attendance or event kinds.")] = None,
) -> None:
    ctx: AppContext = websocket.app.state.ctx
    if "token" in websocket.query_params:
        await websocket.close(CLOSE_POLICY, "no token in the URL (it would be logged): send "
                              "it as the Authorization header or the first message")
        return
    unknown = sorted(set(type or ()) - set(TYPES))
    if unknown:
        await websocket.close(CLOSE_POLICY, f"unknown type(s): {', '.join(unknown)}"[:120])
        return
    secret = _header_secret(websocket)
    if secret is not None:
        who = await _admin(websocket, secret)
        if who is None:
            await websocket.close(CLOSE_POLICY, "an admin token is required")
            return
        await websocket.accept()
    else:  # a browser: the token comes as the first message
        await websocket.accept()
        secret = await _first_message_secret(websocket)
        who = await _admin(websocket, secret)
        if who is None or secret is None:
            await websocket.close(CLOSE_POLICY, "an admin token is required")
            return
    feed: LiveFeed = ctx.live
    try:
        sub = feed.subscribe(room_id, type)
    except TooManyClientsError as err:
        await websocket.close(CLOSE_TRY_LATER, str(err))
        return
    _LOGGER.info("live client %s connected (rooms %s, types %s)", who.name, room_id, type)
    revoked = asyncio.create_task(_watch_credential(ctx, secret))
    tasks = [asyncio.create_task(_pump(websocket, sub)),
             asyncio.create_task(_drain_incoming(websocket)),
             asyncio.create_task(sub.dropped.wait()), revoked]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        feed.unsubscribe(sub)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if revoked.done() and not revoked.cancelled() and revoked.exception() is None:
        _LOGGER.info("live client %s closed: its token was revoked", who.name)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                websocket.close(CLOSE_POLICY, "the admin token was revoked"), timeout=2)
        return
    if sub.dropped.is_set():
        _LOGGER.warning("live client %s dropped: it fell behind", who.name)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                websocket.close(CLOSE_TRY_LATER, "client too slow: dropped"), timeout=2)
