"""What the dashboard shows: each room, the class in it now with present / expected so far,
its devices (online, last heartbeat, version, temperature, outbox) and their open alerts."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud_sync.aggregator.console.accounts import ConsolePrincipal
from cloud_sync.aggregator.db.models import Device, EventRow, Heartbeat, Room
from cloud_sync.aggregator.services.common import ROOM_MISMATCH
from cloud_sync.aggregator.services.recordings import is_recording_device
from cloud_sync.aggregator.services.reports import Rules, course_day
from cloud_sync.aggregator.services.timetable import Occurrence, room_timetable, zone
from cloud_sync.classes import class_now
from cloud_sync.protocol import PlacementReport, StoreUnlockReport

ALERT_WINDOW = timedelta(hours=6)
# an alert of these kinds stays open until the device reports the matching recovery event
RESOLVED_BY = {"camera_offline": "camera_online"}
ALERT_KINDS = ("camera_offline", "cpu_temperature_high", "disk_almost_full", "outbox_stale")


@dataclass
class DeviceView:
    id: str
    online: bool
    last_heartbeat_at: datetime | None
    version: str | None
    cpu_temp_c: float | None
    outbox_depth: int | None
    alerts: list[EventRow] = field(default_factory=list)
    placement: PlacementReport | None = None  # the camera's placement check (issue 22)
    store_unlock: StoreUnlockReport | None = None  # how its store was opened (issue 26)
    refused_at: datetime | None = None  # its last refused contact, newer than any heartbeat
    refusal: str | None = None  # why, for people (issue 25 item 8)

    @property
    def offline_unlock(self) -> bool:
        """This start of the device opened its store offline (the key kept on its card)."""
        return self.store_unlock is not None and self.store_unlock.unlocked_by in UNLOCK_TEXT

    @property
    def unlock_line(self) -> str:
        """One line: how and when the store was opened offline, confirmed or not, the window."""
        u = self.store_unlock
        if u is None or not self.offline_unlock:
            return ""
        text = f"unlocked offline with {UNLOCK_TEXT[str(u.unlocked_by)]}"
        if u.unlocked_at is not None:
            text += f" at {u.unlocked_at:%Y-%m-%d %H:%M} UTC"
        text += (f"; key confirmed by the aggregator at {u.confirmed_at:%H:%M} UTC"
                 if u.confirmed_at is not None else "; not confirmed by the aggregator yet")
        if u.wrapped_until is not None:
            text += f"; next offline unlock possible until {u.wrapped_until:%Y-%m-%d %H:%M} UTC"
        elif u.wrapped is None:
            text += "; no key left on the card"
        return text

    @property
    def placement_bad(self) -> bool:
        """The camera needs moving: faces too small or too large, or seldom recognised."""
        return self.placement is not None and self.placement.status in BAD_PLACEMENT


@dataclass
class RoomView:
    id: str
    name: str
    local_time: str
    course_id: str | None = None
    course_name: str | None = None
    visible: bool = True  # False: another teacher's class (name and numbers hidden)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    present: int = 0
    expected: int = 0
    devices: list[DeviceView] = field(default_factory=list)
    next_class: str | None = None


def current_occurrence(occurrences: list[Occurrence], now: datetime,
                       early_min: float) -> Occurrence | None:
    """The class of a room now: the one rule the devices and ingest use too
    (:func:`cloud_sync.classes.class_now`)."""
    return class_now(occurrences, now, timedelta(minutes=early_min))


def open_alerts(session: Session, device_ids: list[str],
                now: datetime) -> dict[str, list[EventRow]]:
    """Per device: the newest event of each alert kind in the last ALERT_WINDOW that no later
    recovery event closed."""
    if not device_ids:
        return {}
    rows = session.scalars(
        select(EventRow).where(EventRow.device_id.in_(device_ids),
                               EventRow.at >= now - ALERT_WINDOW)
        .order_by(EventRow.at)
    ).all()
    latest: dict[tuple[str, str], EventRow] = {}
    for row in rows:
        if row.kind in ALERT_KINDS:
            latest[(row.device_id, row.kind)] = row
        for opened, closing in RESOLVED_BY.items():
            if row.kind == closing:
                latest.pop((row.device_id, opened), None)
    out: dict[str, list[EventRow]] = {}
    for (device_id, _kind), row in sorted(latest.items()):
        out.setdefault(device_id, []).append(row)
    return out


BAD_PLACEMENT = ("too_small", "too_large", "low_recognition")
UNLOCK_TEXT = {"board-key": "its board key (OTP)", "card-key": "the key kept on its card"}


def _store_unlock(text: str | None) -> StoreUnlockReport | None:
    """The stored unlock report (None: a device from before issue 26, or unreadable)."""
    if not text:
        return None
    try:
        return StoreUnlockReport.model_validate_json(text)
    except ValueError:
        return None


def _placement(text: str | None) -> PlacementReport | None:
    """The stored placement check (None: a device from before issue 22, or unreadable)."""
    if not text:
        return None
    try:
        return PlacementReport.model_validate_json(text)
    except ValueError:
        return None


def device_views(session: Session, devices: list[Device], now: datetime,
                 offline_after_s: float) -> list[DeviceView]:
    ids = [d.id for d in devices]
    beats: dict[str, Heartbeat] = {}
    if ids:
        newest = (select(Heartbeat.device_id, func.max(Heartbeat.id).label("hid"))
                  .where(Heartbeat.device_id.in_(ids)).group_by(Heartbeat.device_id).subquery())
        for beat in session.scalars(select(Heartbeat).join(newest, Heartbeat.id == newest.c.hid)):
            beats[beat.device_id] = beat
    alerts = open_alerts(session, ids, now)
    views = []
    for device in devices:
        beat = beats.get(device.id)
        last = device.last_heartbeat_at
        views.append(DeviceView(
            id=device.id,
            online=last is not None and (now - last).total_seconds() <= offline_after_s,
            last_heartbeat_at=last, version=device.software_version,
            cpu_temp_c=beat.cpu_temp_c if beat else None,
            outbox_depth=beat.outbox_depth if beat else None,
            alerts=alerts.get(device.id, []),
            placement=_placement(beat.placement if beat else None),
            store_unlock=_store_unlock(beat.store_unlock if beat else None),
            refused_at=device.refused_at if _refusal(device) else None,
            refusal=_refusal(device),
        ))
    return views


def _refusal(device: Device) -> str | None:
    """Why the aggregator refuses a device that talks to it with a valid key, while that is
    newer than its last accepted heartbeat (None: nothing refused since)."""
    refused = device.refused_at
    if refused is None or (device.last_heartbeat_at is not None
                           and device.last_heartbeat_at >= refused):
        return None
    if device.refused_reason == ROOM_MISMATCH and device.refused_room != device.room_id:
        return (f"registered to {device.room_id}, configured for {device.refused_room}: "
                "change config or re-register")
    return None


def build(session: Session, who: ConsolePrincipal, now: datetime, rules: Rules,
          offline_after_s: float) -> list[RoomView]:
    rooms = session.scalars(select(Room).order_by(Room.id)).all()
    devices = session.scalars(select(Device).order_by(Device.id)).all()
    by_room: dict[str, list[Device]] = {}
    for device in devices:
        if is_recording_device(device.id):
            continue  # the room's recorded sessions (no camera, no heartbeat: never "offline")
        by_room.setdefault(device.room_id, []).append(device)
    views = []
    for room in rooms:
        tz = zone(room.timezone)
        local = now.astimezone(tz)
        table = room_timetable(session, room)
        today = table.occurrences(local.date(), room.id)
        view = RoomView(room.id, room.name, local.strftime("%H:%M %Z"))
        view.devices = device_views(session, by_room.get(room.id, []), now, offline_after_s)
        occ = current_occurrence(today, now, rules.early_arrival_min)
        upcoming = [o for o in today if o.starts_at > now]
        if occ is None and upcoming:
            nxt = upcoming[0]
            shown = nxt.course_name if who.can_see_course(nxt.course_id) else "a class"
            view.next_class = f"{shown} at {nxt.starts_at.astimezone(tz):%H:%M}"
        if occ is not None:
            view.starts_at, view.ends_at = occ.starts_at, occ.ends_at
            view.visible = who.can_see_course(occ.course_id)
            if view.visible:
                view.course_id, view.course_name = occ.course_id, occ.course_name
                report = course_day(session, occ.course_id, local.date(), rules)
                for item in report.sessions:
                    if item.starts_at == occ.starts_at and item.room_id == room.id:
                        view.present = item.present + item.late
                        view.expected = len(item.students)
        views.append(view)
    return views
