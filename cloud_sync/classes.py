"""Which class is on in a room, and when two weekly slots collide: one rule in one place.

The device (``appliance.sync.roster``: which roster to recognise against), the aggregator
(``services.timetable``: which course a record counts for; ``services.schedule``: the
schedule's ``current_course_id``) and the console (the dashboard's "class now") all call
:func:`class_now`, so they cannot disagree about the class in a room.

The rule: a class that is running wins over one that has not started (a class that ends at
10:00 keeps the room until 10:00 even if the next one's early-arrival window has opened); of
several running classes (overlaps refused since issue 25, but older timetables may hold some),
the one that started first keeps the room (a class that starts in the middle of another never
takes it over); else the class starting soonest within the early-arrival window; ties by
course id.

:func:`slots_collide` is the overlap rule the aggregator enforces on every way a schedule is
written (API, console form, CSV import, ``schedules add``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Protocol, TypeVar


class TimedClass(Protocol):
    """What :func:`class_now` needs of a class: its course and its start and end (aware)."""

    @property
    def course_id(self) -> str: ...

    @property
    def starts_at(self) -> datetime: ...

    @property
    def ends_at(self) -> datetime: ...


C = TypeVar("C", bound=TimedClass)


def class_now(classes: Iterable[C], now: datetime, early: timedelta = timedelta(0)) -> C | None:
    """The class of a room at ``now`` (see the module's rule); None when there is none."""
    items = list(classes)
    running = [c for c in items if c.starts_at <= now < c.ends_at]
    if running:
        return min(running, key=lambda c: (c.starts_at, c.course_id))
    upcoming = [c for c in items if c.starts_at - early <= now < c.starts_at]
    if upcoming:
        return min(upcoming, key=lambda c: (c.starts_at, c.course_id))
    return None


@dataclass(frozen=True, slots=True)
class WeeklySlot:
    """A weekly slot of a room: weekday (0 = Monday), local start and end, and the dates it
    is in effect (None: unbounded)."""

    weekday: int
    start: time
    end: time
    effective_from: date | None = None
    effective_to: date | None = None


def _first_weekday_on_or_after(day: date, weekday: int) -> date:
    return day + timedelta(days=(weekday - day.weekday()) % 7)


def has_days(slot: WeeklySlot) -> bool:
    """Whether the slot's date range holds at least one day of its weekday."""
    if slot.effective_from is None or slot.effective_to is None:
        return True
    return _first_weekday_on_or_after(slot.effective_from, slot.weekday) <= slot.effective_to


def slots_collide(a: WeeklySlot, b: WeeklySlot) -> bool:
    """Whether two slots of one room would ever hold classes at the same time: the same
    weekday, times that intersect (touching ends do not: 9-10 and 10-11 are fine) and date
    ranges that share a day of that weekday."""
    if a.weekday != b.weekday or not (a.start < b.end and b.start < a.end):
        return False
    lo = max((d for d in (a.effective_from, b.effective_from) if d is not None), default=None)
    hi = min((d for d in (a.effective_to, b.effective_to) if d is not None), default=None)
    return has_days(WeeklySlot(a.weekday, a.start, a.end, lo, hi))


def remainder(slot: WeeklySlot, replaced_from: date | None,
              replaced_to: date | None) -> list[WeeklySlot]:
    """What is left of ``slot`` once the days from ``replaced_from`` to ``replaced_to`` (None:
    unbounded) are taken from it: zero, one or two slots, each with at least one day."""
    parts: list[WeeklySlot] = []
    first, last = slot.effective_from, slot.effective_to
    if replaced_from is not None:
        to = replaced_from - timedelta(days=1)
        to = to if last is None else min(last, to)
        if first is None or first <= to:
            parts.append(WeeklySlot(slot.weekday, slot.start, slot.end, first, to))
    if replaced_to is not None:
        since = replaced_to + timedelta(days=1)
        since = since if first is None else max(first, since)
        if last is None or since <= last:
            parts.append(WeeklySlot(slot.weekday, slot.start, slot.end, since, last))
    return [p for p in dict.fromkeys(parts) if has_days(p)]


WEEKDAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def describe(slot: WeeklySlot) -> str:
    """E.g. ``Mon 14:00-15:30`` or ``Mon 14:00-15:30 on 2026-12-07`` or ``... from 2026-09-01``."""
    text = f"{WEEKDAY_NAMES[slot.weekday]} {slot.start:%H:%M}-{slot.end:%H:%M}"
    if slot.effective_from is not None and slot.effective_from == slot.effective_to:
        return f"{text} on {slot.effective_from.isoformat()}"
    if slot.effective_from is not None:
        text += f" from {slot.effective_from.isoformat()}"
    if slot.effective_to is not None:
        text += f" until {slot.effective_to.isoformat()}"
    return text
