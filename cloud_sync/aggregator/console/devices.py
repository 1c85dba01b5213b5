"""Devices page (admin): register a device (its key shown once), rotate its key, move it to
another room, see its health (last heartbeat, version, temperature, outbox) and last error;
the releases held and the rollout (its forms: console/releases.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlalchemy import func, select

from cloud_sync.aggregator.api.admin import _after_write as after_write
from cloud_sync.aggregator.console import dashboard
from cloud_sync.aggregator.console.accounts import ConsolePrincipal, audit
from cloud_sync.aggregator.console.web import (
    DB,
    PostUser,
    User,
    back,
    context,
    render,
    require_admin,
)
from cloud_sync.aggregator.db.models import Attendance, Device, EventRow, Room
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import admin as svc
from cloud_sync.aggregator.services import admin_schemas as schemas
from cloud_sync.aggregator.services import csv_import
from cloud_sync.aggregator.services import devices as device_svc
from cloud_sync.aggregator.services import releases as release_svc
from cloud_sync.aggregator.services.common import ConflictError, ServiceError, utcnow
from cloud_sync.aggregator.services.recordings import is_recording_device

router = APIRouter(include_in_schema=False)
ERROR_SEVERITIES = ("warning", "critical")


def _last_errors(session: DB, device_ids: list[str]) -> dict[str, EventRow]:
    out: dict[str, EventRow] = {}
    if not device_ids:
        return out
    for row in session.scalars(
        select(EventRow).where(EventRow.device_id.in_(device_ids),
                               EventRow.severity.in_(ERROR_SEVERITIES))
        .order_by(EventRow.at.desc()).limit(20 * len(device_ids))
    ):
        out.setdefault(row.device_id, row)
    return out


@router.get("/devices", response_class=HTMLResponse)
def devices_page(request: Request, who: User, session: DB) -> Response:
    require_admin(who)
    return page(request, who, session)


def page(request: Request, who: ConsolePrincipal, session: DB, status: int = 200,
         **forms: Any) -> Response:
    """The Devices page; ``forms``: what a refused release form keeps (its ``*_form`` values
    and ``*_errors`` beside the fields, see console/releases.py)."""
    devices = [d for d in session.scalars(select(Device).order_by(Device.id))
               if not is_recording_device(d.id)]  # recorded sessions' virtual devices
    ctx = context(request)
    views = dashboard.device_views(session, devices, utcnow(),
                                   ctx.settings.console_offline_after_s)
    rooms = {d.id: d.room_id for d in devices}
    rollout = release_svc.active_rollout(session)
    return render(request, "devices.html", who, devices=views, device_rooms=rooms,
                  rooms=list(session.scalars(select(Room).order_by(Room.id))),
                  errors=_last_errors(session, [d.id for d in devices]),
                  updates=release_svc.device_updates(session, [d.id for d in devices]),
                  rollout=rollout, releases=release_svc.list_releases(session)[:5],
                  stage_of={d.id: release_svc.stage_of(rollout, d.id, d.room_id)
                            for d in devices} if rollout else {},
                  upload_max_mb=ctx.settings.release_upload_max_bytes / 1e6, status=status,
                  **{"add_errors": {}, "rollout_form": {}, "rollout_errors": {}, **forms})


@router.post("/releases/rollout/{action}")
def rollout_action(request: Request, who: PostUser, session: DB, action: str,
                   reason: Annotated[str, Form(max_length=300)] = "") -> Response:
    """Halt or resume the active rollout, or move it to its next stage."""
    require_admin(who)
    actor = f"console:{who.name}"
    if action == "halt":
        row = release_svc.halt_rollout(session, actor, reason.strip() or "from the console")
    elif action == "resume":
        row = release_svc.resume_rollout(session, actor)
    elif action == "promote":
        row = release_svc.promote_rollout(session, actor)
    else:
        raise ServiceError(f"unknown rollout action {action!r} (halt, resume, promote)")
    cache = context(request).extra.get("release_snapshot")
    if cache is not None:
        cache.clear()
    return back("/devices", f"rollout of {row.version}: {action} done (stage {row.stage})")


def _key_page(request: Request, who: PostUser, device_id: str, room_id: str, key: str,
              rotated: bool) -> Response:
    return render(request, "device_key.html", who, device_id=device_id, room_id=room_id,
                  key=key, rotated=rotated, url=str(request.base_url).rstrip("/"))


@router.post("/devices", response_class=HTMLResponse)
def register(request: Request, who: PostUser, session: DB,
             room_id: Annotated[str, Form(max_length=64)],
             device_id: Annotated[str, Form(max_length=64)] = "") -> Response:
    require_admin(who)
    try:
        data = schemas.DeviceIn(room_id=room_id, id=device_id or None)
    except ValidationError as err:  # e.g. a reserved id: the reason, not a 500
        raise ServiceError(csv_import.validation_message(err)) from err
    device, key = device_svc.add_device(session, data.room_id, data.id)
    audit(session, who.name, "device.add", f"device:{device.id}", f"room {room_id}")
    session.commit()
    context(request).invalidate()
    return _key_page(request, who, device.id, device.room_id, key, False)


@router.post("/devices/{device_id}/rotate", response_class=HTMLResponse)
def rotate(request: Request, who: PostUser, session: DB, device_id: str) -> Response:
    require_admin(who)
    key = device_svc.rotate_device_key(session, device_id)
    audit(session, who.name, "device.rotate_key", f"device:{device_id}")
    session.commit()
    context(request).invalidate()
    device = session.get(Device, device_id)
    return _key_page(request, who, device_id, device.room_id if device else "", key, True)


@router.post("/devices/{device_id}/delete")
def delete_device(request: Request, who: PostUser, session: DB, device_id: str) -> Response:
    """A device taken out of service: its row, key, heartbeats and events go. One whose
    attendance records are kept (they name it) is refused with what to do instead."""
    require_admin(who)
    begin_write(session)
    records = session.scalar(select(func.count()).select_from(Attendance).where(
        Attendance.device_id == device_id)) or 0
    if records:
        raise ConflictError(f"{device_id} made {records} attendance record"
                            f"{'' if records == 1 else 's'}, kept with its name: it cannot be "
                            "deleted. Rotate its key to lock it out instead.")
    svc.delete_row(session, "devices", device_id)
    audit(session, who.name, "device.delete", f"device:{device_id}")
    session.commit()
    context(request).invalidate()
    return back("/devices", f"device {device_id} deleted: its key no longer works")


@router.post("/devices/{device_id}/move")
def move(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB, device_id: str,
         room_id: Annotated[str, Form(max_length=64)]) -> Response:
    require_admin(who)
    svc.update_row(session, "devices", device_id, schemas.DevicePatch(room_id=room_id))
    audit(session, who.name, "device.move", f"device:{device_id}", f"to room {room_id}")
    session.commit()
    after_write(context(request), tasks, "devices")
    return back("/devices", f"{device_id} moved to {room_id}")
