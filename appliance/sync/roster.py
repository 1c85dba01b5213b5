"""The schedule-based roster provider: which class is on now, and its roster.

The agent keeps the room's schedule of the day (with every class's roster) in the store; this
provider answers the pipeline's ``current(now)`` from that cache alone, so recognition goes on
with the network down, and it switches roster at class boundaries by the device's own clock.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from appliance.config import ApplianceSettings
from appliance.recognition import Roster, RosterProvider
from appliance.store import Store
from cloud_sync.protocol import ClassSession, Event, ScheduleResponse

_LOGGER = logging.getLogger(__name__)


def pick_session(
    sessions: list[ClassSession], now: datetime, early_arrival_s: float
) -> ClassSession | None:
    """The class running at ``now``; else the next one if it starts within the early window.

    A running class always wins over an early start of the next one, so a class that ends at
    10:00 keeps its roster until 10:00 even if the next one starts then.
    """
    running = [s for s in sessions if s.starts_at <= now < s.ends_at]
    if running:
        return max(running, key=lambda s: s.starts_at)  # the latest-started of overlaps
    early = timedelta(seconds=early_arrival_s)
    upcoming = [s for s in sessions if s.starts_at - early <= now < s.starts_at]
    if upcoming:
        return min(upcoming, key=lambda s: s.starts_at)
    return None


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
    ) -> None:
        self._store = store
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
                   fallback: RosterProvider | None = None) -> ScheduleRosterProvider:
        """The provider of this device's room, by its timezone, as the settings say."""
        device = settings.device
        return cls(store, timezone=device.timezone, device_id=device.device_id,
                   room_id=device.room_id, early_arrival_s=settings.sync.early_arrival_s,
                   fallback=fallback)

    @property
    def has_fallback(self) -> bool:
        return self._fallback is not None

    def invalidate(self) -> None:
        """Forget the cached schedule (the agent saved a new one)."""
        with self._lock:
            self._day = None
            self._schedule = None
            self._rosters.clear()

    def _schedule_for(self, now: datetime) -> ScheduleResponse | None:
        day = now.astimezone(self._tz).date()
        if self._day != day:
            loaded = self._store.load_schedule(day)
            self._schedule = loaded[0] if loaded else None
            self._rosters.clear()
            self._day = day
        return self._schedule

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
            schedule = self._schedule_for(now)
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
