"""Unknown-face alerts: a face the roster does not know, seen during a class.

One ``unknown_face`` alert (severity warning) per cooldown for the room; ``unknown_several``
unknown faces within ``unknown_window_s`` are their own, critical alert with its own cooldown
(so a group of strangers is reported even right after a single one was). The time of the last
alert of each severity is kept in the store, so a restart does not re-alert.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta
from typing import Protocol

SEVERITIES = ("warning", "critical")


class StateStore(Protocol):
    def get_state(self, key: str) -> str | None: ...
    def set_state(self, key: str, value: str) -> None: ...


class UnknownFaces:
    def __init__(self, store: StateStore, cooldown_s: float, several: int,
                 window_s: float) -> None:
        self._store = store
        self.cooldown = timedelta(seconds=cooldown_s)
        self.several = several
        self.window = timedelta(seconds=window_s)
        self._seen: deque[tuple[datetime, int]] = deque()  # (at, track id) decided unknown
        self._known_tracks: set[int] = set()
        self._last: dict[str, datetime | None] = {}

    def _last_alert(self, severity: str) -> datetime | None:
        if severity not in self._last:
            raw = self._store.get_state(f"events.unknown.{severity}")
            self._last[severity] = datetime.fromisoformat(raw) if raw else None
        return self._last[severity]

    def note(self, now: datetime, track_id: int) -> bool:
        """A track decided unknown (once per track); True when it is new."""
        if track_id in self._known_tracks:
            return False
        self._known_tracks.add(track_id)
        if len(self._known_tracks) > 10_000:  # bounded: old ids can go
            self._known_tracks = {track_id}
        self._seen.append((now, track_id))
        return True

    def check(self, now: datetime) -> tuple[str, list[int]] | None:
        """(severity, unknown track ids in the window) when an alert is due now, else None."""
        while self._seen and now - self._seen[0][0] > self.window:
            self._seen.popleft()
        if not self._seen:
            return None
        ids = [t for _, t in self._seen]
        severity = "critical" if len(ids) >= self.several else "warning"
        last = self._last_alert(severity)
        if last is not None and now - last < self.cooldown:
            return None
        if last is not None and self._seen[-1][0] <= last:
            return None  # nothing new since the last alert of this severity
        return severity, ids

    def alerted(self, now: datetime, severity: str) -> None:
        self._last[severity] = now
        self._store.set_state(f"events.unknown.{severity}", now.isoformat())
