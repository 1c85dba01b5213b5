"""The schedule-based roster provider: which class is on now, and its roster.

The agent keeps the room's schedule of today and the next school days (with every class's
roster) in the store; this provider answers the pipeline's ``current(now)`` from that cache
alone, so recognition goes on with the network down (across midnight too), and it switches
roster at class boundaries by the device's clock (appliance.clock). A cached day the
aggregator generated more than ``sync.roster_valid_days`` ago is not used.

With an untrusted clock (a reboot without NTP, aggregator or RTC: appliance/clock.py) no class
is chosen: ``clock.untrusted = "record-flagged"`` recognises against the union of the rosters
of the classes between the last trusted time and ``clock.untrusted_horizon_h`` later, without a
course (the aggregator picks it once it has placed the record in time); "record-nothing"
recognises nobody.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from appliance.clock import DeviceClock
from appliance.config import ApplianceSettings
from appliance.recognition import Roster, RosterProvider
from appliance.store import Store
from cloud_sync.classes import class_now
from cloud_sync.protocol import ClassSession, Event, RosterEntry, ScheduleResponse

_LOGGER = logging.getLogger(__name__)

UNTRUSTED = "\x00untrusted"  # the "course" of the untrusted-clock roster (never an id)


def pick_session(
    sessions: list[ClassSession], now: datetime, early_arrival_s: float
) -> ClassSession | None:
    """The class of the room at ``now`` by the one rule the aggregator and the console use too
    (:func:`cloud_sync.classes.class_now`): a running class wins over an early start of the
    next, and of overlapping classes the one that started first keeps the room."""
    return class_now(sessions, now, timedelta(seconds=early_arrival_s))


class ScheduleRosterProvider:
    """``RosterProvider`` over the schedule cached in the store (appliance.recognition).

    ``fallback`` (e.g. a FileRosterProvider) answers when no schedule of the day is cached.
    Each change of class is written to the outbox as a ``roster_switched`` event.
    """

    def __init__(
        self,
        store: Store,
        *,
        timezone: str,
        device_id: str,
        room_id: str,
        early_arrival_s: float = 600.0,
        fallback: RosterProvider | None = None,
        clock: DeviceClock | None = None,
        valid_days: float = 7.0,
        untrusted: str = "record-flagged",
        untrusted_horizon_h: float = 24.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._valid = timedelta(days=valid_days)
        self._untrusted_policy = untrusted
        self._horizon = timedelta(hours=untrusted_horizon_h)
        self._untrusted: tuple[object, Roster, int] | None = None  # (key, union, classes)
        self._stale_day: Any = None  # the cached day last found too old (logged once)
        self.error: str | None = None  # why there is no roster (the status page shows it)
        self._tz = ZoneInfo(timezone)
        self._device_id = device_id
        self._room_id = room_id
        self._early_arrival_s = early_arrival_s
        self._fallback = fallback
        self._lock = threading.Lock()
        self._day: Any = None
        self._schedule: ScheduleResponse | None = None
        self._rosters: dict[str, Roster] = {}
        self._last_course: str | None = None

    @classmethod
    def for_device(cls, settings: ApplianceSettings, store: Store, *,
                   fallback: RosterProvider | None = None,
                   clock: DeviceClock | None = None) -> ScheduleRosterProvider:
        """The provider of this device's room, by its timezone, as the settings say."""
        device = settings.device
        return cls(store, timezone=device.timezone, device_id=device.device_id,
                   room_id=device.room_id, early_arrival_s=settings.sync.early_arrival_s,
                   fallback=fallback, clock=clock, valid_days=settings.sync.roster_valid_days,
                   untrusted=settings.clock.untrusted,
                   untrusted_horizon_h=settings.clock.untrusted_horizon_h)

    @property
    def has_fallback(self) -> bool:
        return self._fallback is not None

    def invalidate(self) -> None:
        """Forget the cached schedule (the agent saved a new one)."""
        with self._lock:
            self._day = None
            self._schedule = None
            self._rosters.clear()
            self._untrusted = None

    def _valid_schedule(self, day: Any, now: datetime) -> ScheduleResponse | None:
        """The cached schedule of ``day`` unless the aggregator made it too long ago."""
        loaded = self._store.load_schedule(day)
        if loaded is None:
            return None
        schedule = loaded[0]
        if now - schedule.generated_at > self._valid:
            if self._stale_day != day:
                self._stale_day = day
                _LOGGER.warning(
                    "the cached roster of %s is from %s, older than sync.roster_valid_days "
                    "(%.0f): not used", day, schedule.generated_at.date(),
                    self._valid.total_seconds() / 86400)
            return None
        return schedule

    def _schedule_for(self, now: datetime) -> ScheduleResponse | None:
        day = now.astimezone(self._tz).date()
        if self._day != day:
            self._schedule = self._valid_schedule(day, now)
            self._rosters.clear()
            self._day = day
        return self._schedule

    def _untrusted_roster(self, now: datetime) -> tuple[Roster, int]:
        """With an untrusted clock: the union of the rosters of every cached class that may be
        running, from the last trusted time to the horizon after it; (roster, classes)."""
        floor = (self._clock.last_trusted() if self._clock is not None else None) or now
        end = floor + self._horizon
        early = timedelta(seconds=self._early_arrival_s)
        first, last = floor.astimezone(self._tz).date(), end.astimezone(self._tz).date()
        key = (floor, end, first, last)
        if self._untrusted is not None and self._untrusted[0] == key:
            return self._untrusted[1], self._untrusted[2]
        entries: dict[str, RosterEntry] = {}
        classes = 0
        embedder = None
        day = first
        while day <= last:
            schedule = self._valid_schedule(day, floor)
            day += timedelta(days=1)
            if schedule is None:
                continue
            embedder = embedder or schedule.embedder
            for session in schedule.sessions:
                if session.ends_at <= floor or session.starts_at - early >= end:
                    continue
                classes += 1
                for entry in schedule.rosters.get(session.course_id, []):
                    entries.setdefault(entry.student_id, entry)
        roster = (Roster.from_entries(entries.values(), embedder) if entries and embedder
                  else Roster.empty(embedder) if embedder else Roster.empty())
        self._untrusted = (key, roster, classes)
        return roster, classes

    def _roster(self, course_id: str) -> Roster:
        roster = self._rosters.get(course_id)
        if roster is None:
            assert self._schedule is not None
            entries = self._schedule.rosters.get(course_id, [])
            embedder = self._schedule.embedder
            roster = (Roster.from_entries(entries, embedder) if entries
                      else Roster.empty(embedder))
            self._rosters[course_id] = roster
        return roster

    def current(self, now: datetime) -> tuple[str | None, str | None, Roster]:
        with self._lock:
            if self._clock is not None and not self._clock.trusted:
                if self._untrusted_policy == "record-nothing":
                    roster, classes = Roster.empty(), 0
                    self.error = "the clock is not trusted: nobody is recognised until it is"
                else:
                    roster, classes = self._untrusted_roster(now)
                    self.error = None if classes else (
                        "the clock is not trusted and no cached class may be running")
                self._note_untrusted(now, len(roster.student_ids), classes)
                return None, None, roster
            self.error = None
            schedule = self._schedule_for(now)
            if schedule is None and self._stale_day == self._day:
                self.error = (f"the cached roster of {self._day} is older than "
                              "sync.roster_valid_days")
            if schedule is None:
                if self._fallback is not None:
                    return self._fallback.current(now)
                result: tuple[str | None, str | None, Roster] = (None, None, Roster.empty())
            else:
                session = pick_session(schedule.sessions, now, self._early_arrival_s)
                if session is None:
                    result = (None, None, Roster.empty())
                else:
                    result = (session.course_id, session.course_name,
                              self._roster(session.course_id))
            self._note_switch(result[0], result[1], now, len(result[2].student_ids))
        return result

    def _note_untrusted(self, now: datetime, size: int, classes: int) -> None:
        if self._last_course == UNTRUSTED:
            return
        self._last_course = UNTRUSTED
        message = (
            "clock not trusted: recognising nobody until it is"
            if self._untrusted_policy == "record-nothing" else
            f"clock not trusted: recognising the {size} students of {classes} cached "
            "class(es) that may be running; records carry no class")
        self._switch_event(message, now, None, size)

    def _note_switch(
        self, course_id: str | None, course_name: str | None, now: datetime, size: int
    ) -> None:
        if course_id == self._last_course:
            return
        self._last_course = course_id
        message = (
            f"roster switched to {course_id} ({course_name}), {size} students"
            if course_id else "no class scheduled now: empty roster"
        )
        self._switch_event(message, now, course_id, size)

    def _switch_event(self, message: str, now: datetime, course_id: str | None,
                      size: int) -> None:
        _LOGGER.info("%s", message)
        event = Event(
            device_id=self._device_id, room_id=self._room_id, kind="roster_switched",
            severity="info", message=message, at=now,
            data={"course_id": course_id, "students": size},
        )
        try:
            self._store.add_event(event)
        except Exception:  # never let bookkeeping stop recognition
            _LOGGER.exception("could not record the roster_switched event")
