"""The weekly timetable of a room: which class runs when, in the room's local time zone."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_sync.aggregator.db.models import Course, Room, Schedule
from cloud_sync.aggregator.services.common import ServiceError
from cloud_sync.aggregator.state import state_of
from cloud_sync.classes import class_now


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ServiceError(f"unknown time zone {name!r}") from err


def valid_zone(name: str) -> str:
    zone(name)
    return name


@dataclass(frozen=True, slots=True)
class Slot:
    """One weekly schedule row with its course name."""

    schedule_id: int
    course_id: str
    course_name: str
    room_id: str
    weekday: int
    start: object  # datetime.time
    end: object
    effective_from: date | None
    effective_to: date | None

    def runs_on(self, day: date) -> bool:
        if day.weekday() != self.weekday:
            return False
        if self.effective_from is not None and day < self.effective_from:
            return False
        return not (self.effective_to is not None and day > self.effective_to)


@dataclass(frozen=True, slots=True)
class Occurrence:
    """A class on a given day: course in room from starts_at to ends_at (aware datetimes)."""

    course_id: str
    course_name: str
    room_id: str
    starts_at: datetime
    ends_at: datetime


@dataclass
class Timetable:
    """All slots of one room (or of one course) with the room time zones."""

    slots: list[Slot]
    zones: dict[str, ZoneInfo]  # room_id -> zone
    _memo: dict[tuple[date, str | None], list[Occurrence]] = field(
        default_factory=dict, repr=False
    )

    def occurrences(self, day: date, room_id: str | None = None) -> list[Occurrence]:
        """Classes on local date ``day`` (of each room's zone), sorted by start (memoised:
        a timetable is immutable once loaded)."""
        found = self._memo.get((day, room_id))
        if found is None:
            found = self._occurrences(day, room_id)
            if len(self._memo) > 1000:
                self._memo.clear()
            self._memo[(day, room_id)] = found
        return found

    def _occurrences(self, day: date, room_id: str | None) -> list[Occurrence]:
        out: list[Occurrence] = []
        for slot in self.slots:
            if room_id is not None and slot.room_id != room_id:
                continue
            if not slot.runs_on(day):
                continue
            tz = self.zones[slot.room_id]
            starts = datetime.combine(day, slot.start, tzinfo=tz)  # type: ignore[arg-type]
            ends = datetime.combine(day, slot.end, tzinfo=tz)  # type: ignore[arg-type]
            out.append(Occurrence(slot.course_id, slot.course_name, slot.room_id, starts, ends))
        out.sort(key=lambda o: (o.starts_at, o.course_id))
        return out

    def course_at(self, room_id: str, at: datetime, early_min: float = 0.0) -> str | None:
        """The course of ``room_id`` at ``at`` by the one rule
        (:func:`cloud_sync.classes.class_now`): the class running (the first started of
        overlaps); else the one starting soonest within ``early_min`` minutes; else None."""
        occ = self.class_at(room_id, at, early_min)
        return occ.course_id if occ is not None else None

    def class_at(self, room_id: str, at: datetime, early_min: float = 0.0) -> Occurrence | None:
        """The class (occurrence) of :meth:`course_at`."""
        tz = self.zones.get(room_id)
        if tz is None:
            return None
        local = at.astimezone(tz)
        candidates: list[Occurrence] = []
        for day in sorted({local.date(), (local + timedelta(minutes=early_min)).date()}):
            candidates.extend(self.occurrences(day, room_id))
        return class_now(candidates, at, timedelta(minutes=early_min))


def _load(session: Session, *where: object) -> Timetable:
    rows = session.execute(
        select(Schedule, Course.name, Room.timezone)
        .join(Course, Course.id == Schedule.course_id)
        .join(Room, Room.id == Schedule.room_id)
        .where(*where)  # type: ignore[arg-type]
    ).all()
    slots: list[Slot] = []
    zones: dict[str, ZoneInfo] = {}
    for sched, course_name, tz_name in rows:
        slots.append(
            Slot(sched.id, sched.course_id, course_name, sched.room_id, sched.weekday,
                 sched.start_time, sched.end_time, sched.effective_from, sched.effective_to)
        )
        zones[sched.room_id] = zone(tz_name)
    return Timetable(slots, zones)


def room_timetable(session: Session, room: Room) -> Timetable:
    table = _load(session, Schedule.room_id == room.id)
    table.zones[room.id] = zone(room.timezone)
    return table


def course_timetable(session: Session, course_id: str) -> Timetable:
    return _load(session, Schedule.course_id == course_id)


@dataclass(frozen=True, slots=True)
class RoomInfo:
    room_id: str
    site: str
    timezone: str
    timetable: Timetable


def cached_room(session: Session, room_id: str) -> RoomInfo | None:
    """A room and its timetable, cached in the app's state (state.py; one query less per
    request)."""
    state = state_of(session)
    found = state.rooms.get(room_id) if state is not None else None
    if found is not None:
        return found  # type: ignore[no-any-return]
    room = session.get(Room, room_id)
    if room is None:
        return None
    info = RoomInfo(room.id, room.site, room.timezone, room_timetable(session, room))
    if state is not None:
        state.rooms.put(room_id, info)
    return info
