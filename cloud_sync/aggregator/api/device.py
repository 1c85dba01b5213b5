"""Device endpoints: schedule + rosters down; attendance, heartbeats and events up."""

from __future__ import annotations

import base64
from typing import Annotated, Literal, NoReturn

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cloud_sync.aggregator.api import releases as releases_api
from cloud_sync.aggregator.api.context import AppContext, DevicePrincipal
from cloud_sync.aggregator.api.deps import DB, Device, DeviceOrAdmin, context
from cloud_sync.aggregator.api.openapi import IsoDateTime
from cloud_sync.aggregator.services import devices as device_service
from cloud_sync.aggregator.services import ingest
from cloud_sync.aggregator.services.common import RoomMismatchError
from cloud_sync.aggregator.services.schedule import build_schedule, build_window, render
from cloud_sync.protocol import (
    EMBEDDER_IDS,
    MAX_SCHEDULE_DAYS,
    AttendanceBatch,
    BatchResult,
    Heartbeat,
    HeartbeatReply,
    Identifier,
    ScheduleResponse,
    ScheduleWindow,
    UnsupportedVersionError,
    parse_event,
)

router = APIRouter(prefix="/api/v1", tags=["devices"])


class Stored(BaseModel):
    stored: bool
    duplicate: bool = False


async def _body(request: Request) -> bytes:
    """The request's body; a device that hung up while sending it gets a 400 nobody reads,
    instead of a traceback in the log ('Exception in ASGI application')."""
    try:
        return await request.body()
    except ClientDisconnect as err:
        raise HTTPException(400, "the client disconnected before its body arrived") from err


ROOM_MISMATCH_DOC = (
    "A device spoke for another room than the one it is registered to: `code` "
    "`room_mismatch` with `registered_room` and `configured_room` (change the device's "
    "`device.room_id`, or move the device on the aggregator); recorded on the device's row "
    "for the console.")


async def _refuse_room(ctx: AppContext, err: RoomMismatchError) -> NoReturn:
    """Record the refused contact on the device's row (the console names the cause), then
    answer 403 ``room_mismatch``."""
    sessions = ctx.sessions

    def note() -> None:
        with sessions() as session:
            device_service.note_refusal(session, err.device_id, err.code,
                                        err.configured_room)

    await run_in_threadpool(note)
    raise err


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(part.strip().removeprefix("W/") == etag for part in header.split(","))


@router.get(
    "/schedule",
    response_model=ScheduleResponse,
    responses={304: {"description": "Not modified (If-None-Match matched the ETag)."},
               403: {"description": ROOM_MISMATCH_DOC}},
    summary="The room's day: current course, sessions and rosters (enrolled students only).",
)
async def get_schedule(
    request: Request,
    who: DeviceOrAdmin,
    room_id: Annotated[Identifier, Query(description="Room id, e.g. LAB-301.")],
    at: Annotated[IsoDateTime | None, Query(description="ISO time (default: now).")] = None,
    embedder: Annotated[Literal["sface", "dlib"] | None, Query(
        description="The device's embedder (`recognition.embedder`): the rosters hold its "
        "descriptors. Default: the aggregator's first configured embedder.")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    ctx = context(request)
    if isinstance(who, DevicePrincipal) and who.room_id != room_id:
        await _refuse_room(ctx, RoomMismatchError(who.device_id, who.room_id, room_id))
    embedder_id = _embedder_id(ctx.settings.embedders, embedder)
    sessions = ctx.sessions

    def work() -> tuple[bytes, str]:
        with sessions() as session:
            return render(build_schedule(session, room_id, at, embedder_id))

    body, etag = await run_in_threadpool(work)  # one thread hop
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get(
    "/schedule/days",
    response_model=ScheduleWindow,
    responses={304: {"description": "Not modified (If-None-Match matched the ETag)."},
               403: {"description": ROOM_MISMATCH_DOC}},
    summary="Today and the room's next school days, with each course's roster once (what a "
            "device caches to recognise offline across a night or a weekend).",
)
async def get_schedule_days(
    request: Request,
    who: DeviceOrAdmin,
    room_id: Annotated[Identifier, Query(description="Room id, e.g. LAB-301.")],
    days: Annotated[int, Query(ge=0, le=MAX_SCHEDULE_DAYS - 1, description=(
        "Next school days after today (days with a class in the room, within 31 days)."))] = 2,
    at: Annotated[IsoDateTime | None, Query(description="ISO time (default: now).")] = None,
    embedder: Annotated[Literal["sface", "dlib"] | None, Query(
        description="The device's embedder (`recognition.embedder`).")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    ctx = context(request)
    if isinstance(who, DevicePrincipal) and who.room_id != room_id:
        await _refuse_room(ctx, RoomMismatchError(who.device_id, who.room_id, room_id))
    embedder_id = _embedder_id(ctx.settings.embedders, embedder)
    sessions = ctx.sessions

    def work() -> tuple[bytes, str]:
        with sessions() as session:
            return render(build_window(session, room_id, at, days, embedder_id))

    body, etag = await run_in_threadpool(work)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def _embedder_id(configured: list[str], asked: str | None) -> str:
    """``name/model_version`` of the embedder the device asks for (422 if not computed)."""
    name = asked or configured[0]
    if name not in configured:
        raise HTTPException(
            422, f"this aggregator computes no {name} descriptors (embedders = "
            f"{list(configured)}); add {name!r} to `embedders` and run "
            "`aggregator faces reencode`")
    return EMBEDDER_IDS[name]


BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/AttendanceBatch"}}
        },
    }
}


@router.post(
    "/attendance",
    response_model=BatchResult,
    summary="A batch of up to 1,000 records; idempotent on the records' keys.",
    responses={403: {"description": "The batch claims another device; or every record "
                                    "names another room than the device's: "
                                    + ROOM_MISMATCH_DOC},
               422: {"description": "Malformed batch (nothing stored)."}},
    openapi_extra=BATCH_BODY,
)
async def post_attendance(request: Request, who: Device) -> Response:
    # The hot path of the fleet: the body is parsed by pydantic-core straight from the JSON
    # bytes (faster than FastAPI's parse-then-validate); for a device whose room is cached the
    # work is one group-committed job awaited without a thread of the pool.
    try:
        batch = AttendanceBatch.model_validate_json(await _body(request))
    except ValidationError as err:
        raise _validation_error(err) from err
    if batch.device_id != who.device_id:
        raise HTTPException(403, "batch device_id is not the authenticated device")
    ctx = context(request)
    result = None
    try:
        device = ingest.cached_device(ctx.state, who.device_id)
        if device is not None:  # the whole batch in the group committer's transaction
            result = await ingest.ingest_cached_batch(
                ctx.state, device, who.device_id, batch, ctx.settings.early_arrival_min,
                ctx.settings.record_descriptor_days > 0, ctx.live)
        if result is None:  # not cached, or a month's partition to make first
            sessions = ctx.sessions

            def work() -> BatchResult:
                with sessions() as session:
                    return ingest.ingest_batch(session, who.device_id, batch)

            result = await run_in_threadpool(work)
    except RoomMismatchError as err:
        await _refuse_room(ctx, err)
    return Response(result.model_dump_json(), media_type="application/json")


class StoreKey(BaseModel):
    device_id: str
    key: str = Field(description="32 bytes, base64 (standard alphabet): the SQLCipher key of "
                     "the device's store; keep it in memory only")
    created: bool = Field(description="true on the device's first request (a new key)")


@router.post(
    "/store-key", response_model=StoreKey,
    responses={403: {"description": "Not a registered device (deregistered devices get no "
                                    "key: their stores stay unreadable)."}},
    summary="The key of the device's encrypted store (docs/PRIVACY.md); audited.",
)
def post_store_key(who: Device, session: DB, response: Response) -> StoreKey:
    key, created = device_service.release_store_key(session, who.device_id)
    response.headers["Cache-Control"] = "no-store"
    return StoreKey(device_id=who.device_id, key=base64.b64encode(key).decode(),
                    created=created)


HEARTBEAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Heartbeat"}}
        },
    }
}
STORED = Stored(stored=True).model_dump_json().encode()
DUPLICATE = Stored(stored=False, duplicate=True).model_dump_json().encode()


def _validation_error(err: ValidationError) -> RequestValidationError:
    return RequestValidationError(
        [{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)])


@router.post(
    "/heartbeat", response_model=HeartbeatReply,
    summary="Device status; also corrects clocks. The reply names the release meant for the "
    "device (`release`, docs/OPERATIONS.md 6.10) while a rollout includes it.",
    responses={403: {"description": ROOM_MISMATCH_DOC},
               422: {"description": "Malformed heartbeat (nothing stored)."}},
    openapi_extra=HEARTBEAT_BODY,
)
async def post_heartbeat(request: Request, who: Device) -> Response:
    # Like the batches: parsed from the bytes, and no thread of the pool held while the
    # group committer commits (a device whose room is cached costs no thread hop at all).
    try:
        heartbeat = Heartbeat.model_validate_json(await _body(request))
    except ValidationError as err:
        raise _validation_error(err) from err
    ctx = context(request)
    device = ingest.cached_device(ctx.state, who.device_id)
    try:
        if device is None:
            sessions = ctx.sessions

            def work() -> None:
                with sessions() as session:
                    ingest.record_heartbeat(session, who.device_id, heartbeat)

            await run_in_threadpool(work)
        else:
            job = ingest.heartbeat_job(device, who.device_id, heartbeat,
                                       ctx.settings.early_arrival_min)
            changed = await ctx.state.committer().submit_async(job, 1, order=who.device_id)
            ingest.heartbeat_stored(who.device_id, heartbeat, changed)
    except RoomMismatchError as err:
        await _refuse_room(ctx, err)
    offer = await releases_api.heartbeat_offer(ctx, who.device_id, who.room_id, heartbeat)
    if offer is None:
        return Response(STORED, media_type="application/json")
    reply = HeartbeatReply(stored=True, release=offer)
    return Response(reply.model_dump_json(), media_type="application/json")


EVENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Event"}}},
    }
}


@router.post(
    "/events", response_model=Stored, summary="A device event (idempotent on key).",
    responses={403: {"description": ROOM_MISMATCH_DOC},
               422: {"description": "Malformed event, or an event schema version this "
                                    "aggregator does not read (kept as a dead letter)."}},
    openapi_extra=EVENT_BODY,
)
async def post_event(request: Request, who: Device) -> Response:
    body = await _body(request)
    ctx = context(request)
    sessions = ctx.sessions
    try:
        event = parse_event(body)
    except UnsupportedVersionError as err:
        reason = str(err)

        def keep() -> None:
            with sessions() as session:
                ingest.record_dead_letter(session, f"http:/api/v1/events:{who.device_id}",
                                          body, reason)

        await run_in_threadpool(keep)
        raise HTTPException(422, reason) from err
    except ValidationError as err:
        raise _validation_error(err) from err
    device = ingest.cached_device(ctx.state, who.device_id)
    try:
        if device is None:
            def work() -> bool:
                with sessions() as session:
                    return ingest.record_event(session, who.device_id, event)

            inserted = await run_in_threadpool(work)
        else:
            job = ingest.event_job(device, who.device_id, event)
            inserted = await ctx.state.committer().submit_async(job, 1)
            ingest.event_stored(ctx.live, event, inserted)
    except RoomMismatchError as err:
        await _refuse_room(ctx, err)
    return Response(STORED if inserted else DUPLICATE, media_type="application/json")
