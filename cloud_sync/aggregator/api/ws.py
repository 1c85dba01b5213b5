"""``/ws/events``: new attendance records and device events, live (admin token).

Authentication: ``Authorization: Bearer <admin token>`` or, for browsers (which cannot set
headers on a WebSocket), ``?token=<admin token>``. Filters: ``room_id`` and ``type`` (each may
repeat; ``type`` is ``attendance`` or an event kind). Every message is one JSON object:
``{"type": "attendance", "room_id": ..., "records": [{...}, ...]}`` (the new records of one
batch) or
``{"type": <kind>, "room_id": ..., "event": {...the wire event...}}``.

A client that falls ``ws_queue_messages`` behind is closed with code 1013 ("try again later")
and its backlog freed; so is a client over ``ws_max_clients``. Code 1008: bad credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, WebSocket, WebSocketDisconnect

from cloud_sync.aggregator.api.context import AdminPrincipal
from cloud_sync.aggregator.api.deps import authenticate
from cloud_sync.aggregator.services.live import LiveFeed, Subscriber, TooManyClientsError
from cloud_sync.protocol import EVENT_KINDS

_LOGGER = logging.getLogger(__name__)
router = APIRouter(tags=["live"])
TYPES = ("attendance", *EVENT_KINDS)
CLOSE_POLICY = 1008
CLOSE_TRY_LATER = 1013


def _secret(websocket: WebSocket, token: str | None) -> str | None:
    header = websocket.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return token or None


async def _admin(websocket: WebSocket, token: str | None) -> AdminPrincipal | None:
    secret = _secret(websocket, token)
    if not secret:
        return None
    client = websocket.client.host if websocket.client else "?"
    try:
        found = await authenticate(websocket.app.state.ctx, f"Bearer {secret}", client)
    except HTTPException:
        return None
    return found if isinstance(found, AdminPrincipal) else None


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
    token: Annotated[str | None, Query(description="Admin token (browsers).")] = None,
) -> None:
    who = await _admin(websocket, token)
    if who is None:
        await websocket.close(CLOSE_POLICY, "an admin token is required")
        return
    unknown = sorted(set(type or ()) - set(TYPES))
    if unknown:
        await websocket.close(CLOSE_POLICY, f"unknown type(s): {', '.join(unknown)}"[:120])
        return
    feed: LiveFeed = websocket.app.state.ctx.live
    await websocket.accept()
    try:
        sub = feed.subscribe(room_id, type)
    except TooManyClientsError as err:
        await websocket.close(CLOSE_TRY_LATER, str(err))
        return
    _LOGGER.info("live client %s connected (rooms %s, types %s)", who.name, room_id, type)
    tasks = [asyncio.create_task(_pump(websocket, sub)),
             asyncio.create_task(_drain_incoming(websocket)),
             asyncio.create_task(sub.dropped.wait())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        feed.unsubscribe(sub)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if sub.dropped.is_set():
        _LOGGER.warning("live client %s dropped: it fell behind", who.name)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                websocket.close(CLOSE_TRY_LATER, "client too slow: dropped"), timeout=2)
