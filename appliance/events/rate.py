"""When to send a periodic classroom event: on change, no more often than the minimum interval,
and at least every maximum interval."""

from __future__ import annotations

from datetime import datetime


class RateGate:
    """``due(now, changed)``: True when an event should go now; ``sent(now)`` records it."""

    def __init__(self, min_interval_s: float, max_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.last: datetime | None = None

    def due(self, now: datetime, changed: bool) -> bool:
        if self.last is None:
            return True
        age = (now - self.last).total_seconds()
        return age >= self.max_interval_s or (changed and age >= self.min_interval_s)

    def sent(self, now: datetime) -> None:
        self.last = now

    def reset(self) -> None:
        self.last = None
