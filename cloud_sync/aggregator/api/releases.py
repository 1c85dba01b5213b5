"""Releases over HTTP (docs/HTTP_API.md, docs/OPERATIONS.md 6.10).

Devices (device key): the release meant for them (``/assigned``, also in the heartbeat reply),
its signed manifest and signature, its files by sha256 (resumable: HTTP Range), and their
updater's reports. Admins (admin token): the releases held, the rollout, halting/resuming/
promoting it. Bundles are added on the aggregator's host (``aggregator releases add``): the
API never receives a signing key.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from cloud_sync.aggregator.api.context import AppContext
from cloud_sync.aggregator.api.deps import DB, Admin, Device, DeviceOrAdmin, context
from cloud_sync.aggregator.db.models import Release, Rollout
from cloud_sync.aggregator.services import releases as svc
from cloud_sync.protocol import (
    Heartbeat,
    Identifier,
    ReleaseOffer,
    ReleaseVersion,
    UpdateReport,
)

router = APIRouter(prefix="/api/v1/releases", tags=["releases"])
VersionPath = Annotated[str, Path(min_length=1, max_length=64,
                                  pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$",
                                  description="Release version, e.g. 0.1.0+g1a2b3c4d.")]
ShaPath = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="A file's sha256.")]
SNAPSHOT = "release_snapshot"
LAST_REPORT = "release_last_report"


class ReleaseOut(BaseModel):
    version: str
    key_id: str
    files: int
    total_bytes: int
    added_at: datetime
    added_by: str


class RolloutOut(BaseModel):
    id: int
    version: str
    canary_room: str
    share_pct: int
    stage: str = Field(description="canary | share | all | done")
    during_class: bool
    max_bytes_per_s: int | None
    active: bool
    started_at: datetime
    stage_at: datetime
    started_by: str
    halted_at: datetime | None
    halted_reason: str | None = Field(description="Where and why (device, state, reason).")


class ReleasesOut(BaseModel):
    releases: list[ReleaseOut]
    rollouts: list[RolloutOut] = Field(description="Newest first; at most one active.")


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: ReleaseVersion
    canary_room: Identifier = Field(description="The room whose devices get it first.")
    share_pct: int = Field(default=25, ge=0, le=100,
                           description="Share of the fleet (percent) of the second stage.")
    during_class: bool = Field(default=False, description="Install while a class is in "
                               "session too (default: only outside class time).")
    max_bytes_per_s: int | None = Field(default=None, ge=10_000, le=1_000_000_000,
                                        description="Download bandwidth bound per device.")


class HaltIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=300)


def _rollout(row: Rollout) -> RolloutOut:
    return RolloutOut.model_validate(row, from_attributes=True)


def _release(row: Release) -> ReleaseOut:
    return ReleaseOut.model_validate(row, from_attributes=True)


def _changed(request: Request) -> None:
    cache = context(request).extra.get(SNAPSHOT)
    if cache is not None:
        cache.clear()


# -- devices ----------------------------------------------------------------------------------

def _cache(ctx: AppContext) -> svc.SnapshotCache:
    found = ctx.extra.get(SNAPSHOT)
    if found is None:
        found = ctx.extra[SNAPSHOT] = svc.SnapshotCache()
    return found  # type: ignore[no-any-return]


async def heartbeat_offer(ctx: AppContext, device_id: str, room_id: str,
                          heartbeat: Heartbeat) -> ReleaseOffer | None:
    """After a heartbeat is stored: keep its update report when new, and the release meant
    for the device (None without an active rollout: no database work at all then)."""
    cache = _cache(ctx)
    seen: dict[str, tuple[str, datetime]] = ctx.extra.setdefault(LAST_REPORT, {})
    report = heartbeat.update
    new_report = report is not None and seen.get(device_id) != (report.state, report.at)
    sessions = ctx.sessions

    def work() -> ReleaseOffer | None:
        with sessions() as session:
            if new_report:
                assert report is not None
                if svc.record_report(session, device_id, report):
                    cache.clear()
                seen[device_id] = (report.state, report.at)
            found = cache.get(session)
            return svc.offer_for(session, found, device_id, room_id,
                                 heartbeat.software_version)

    if not new_report and cache.fresh() and cache.value is None:
        return None
    return await run_in_threadpool(work)


@router.get("/assigned", response_model=ReleaseOffer | None,
            responses={204: {"description": "Nothing to install: stay on this release."}},
            summary="The release meant for this device now (what the heartbeat reply names).")
def assigned(request: Request, who: Device, session: DB,
             running: Annotated[str | None, Query(max_length=64, description=(
                 "The release the device runs."))] = None) -> Response:
    found = _cache(context(request)).get(session)
    offer = svc.offer_for(session, found, who.device_id, who.room_id, running)
    if offer is None:
        return Response(status_code=204)
    return Response(offer.model_dump_json(), media_type="application/json")


@router.post("/report", status_code=202, summary="What this device's updater did (kept as the "
             "device's update history; a revert or refusal halts the rollout).",
             responses={422: {"description": "Malformed report (nothing kept)."}})
async def report(request: Request, who: Device) -> Response:
    from cloud_sync.aggregator.api.device import _body, _validation_error

    try:
        item = UpdateReport.model_validate_json(await _body(request))
    except ValidationError as err:
        raise _validation_error(err) from err
    ctx = context(request)
    sessions = ctx.sessions

    def work() -> bool:
        with sessions() as session:
            return svc.record_report(session, who.device_id, item)

    new = await run_in_threadpool(work)
    _cache(ctx).clear()
    return Response(b'{"stored": %s}' % (b"true" if new else b"false"),
                    status_code=202, media_type="application/json")


@router.get("/{version}/manifest.json", summary="The release's signed manifest (exact bytes).")
def manifest(who: DeviceOrAdmin, session: DB, version: VersionPath) -> Response:
    row = svc.get_release(session, version)
    return Response(bytes(row.manifest), media_type="application/json",
                    headers={"Cache-Control": "no-cache"})


@router.get("/{version}/manifest.sig", summary="The manifest's ed25519 signature.")
def signature(who: DeviceOrAdmin, session: DB, version: VersionPath) -> Response:
    row = svc.get_release(session, version)
    return Response(bytes(row.signature), media_type="application/json",
                    headers={"Cache-Control": "no-cache"})


@router.get("/files/{sha256}", summary="A release file by sha256; resumable (Range: bytes=N-).",
            responses={206: {"description": "The requested range."},
                       416: {"description": "Range not satisfiable."}})
def file(request: Request, who: DeviceOrAdmin, session: DB, sha256: ShaPath) -> Response:
    path = svc.file_path(session, context(request).settings, sha256)
    return FileResponse(path, media_type="application/octet-stream",
                        headers={"Cache-Control": "private, max-age=31536000, immutable"})


# -- admins -----------------------------------------------------------------------------------

@router.get("", response_model=ReleasesOut, summary="Releases held and the rollouts.")
def list_all(_who: Admin, session: DB) -> ReleasesOut:
    return ReleasesOut(releases=[_release(r) for r in svc.list_releases(session)],
                       rollouts=[_rollout(r) for r in svc.list_rollouts(session)])


@router.post("/rollout", response_model=RolloutOut, status_code=201,
             summary="Start a rollout: the canary room, then share_pct of the fleet, then all "
             "(supersedes the active rollout).")
def start(request: Request, who: Admin, session: DB, body: RolloutIn) -> RolloutOut:
    row = svc.start_rollout(session, body.version, body.canary_room, body.share_pct,
                            f"admin:{who.name}", during_class=body.during_class,
                            max_bytes_per_s=body.max_bytes_per_s)
    _changed(request)
    return _rollout(row)


@router.post("/rollout/halt", response_model=RolloutOut, summary="Halt the active rollout.")
def halt(request: Request, who: Admin, session: DB, body: HaltIn) -> RolloutOut:
    row = svc.halt_rollout(session, f"admin:{who.name}", body.reason)
    _changed(request)
    return _rollout(row)


@router.post("/rollout/resume", response_model=RolloutOut,
             summary="Clear the active rollout's halt (it goes on from its stage).")
def resume(request: Request, who: Admin, session: DB) -> RolloutOut:
    row = svc.resume_rollout(session, f"admin:{who.name}")
    _changed(request)
    return _rollout(row)


@router.post("/rollout/promote", response_model=RolloutOut,
             summary="Move the active rollout to its next stage now.")
def promote(request: Request, who: Admin, session: DB) -> RolloutOut:
    row = svc.promote_rollout(session, f"admin:{who.name}")
    _changed(request)
    return _rollout(row)

