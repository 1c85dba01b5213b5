"""Occupancy: people in the room per count, smoothed, against the room's capacity.

A count is the faces the counting pass found plus the live tracks it did not find (a pupil
whose face turned away stays counted while the tracker keeps the track). The room's number is
the median of the counts of the last ``window_s`` seconds, so one missed or doubled face in
one count does not move it.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from appliance.tracking import Box, iou_matrix
from cloud_sync.protocol import OccupancyPayload


@dataclass(frozen=True)
class Count:
    faces: int
    turned_away: int

    @property
    def people(self) -> int:
        return self.faces + self.turned_away


def count_people(face_boxes: Sequence[Box], track_boxes: Sequence[Box],
                 min_iou: float = 0.2) -> Count:
    """Faces of the counting pass + live tracks not overlapping any of them."""
    if not track_boxes:
        return Count(len(face_boxes), 0)
    if not face_boxes:
        return Count(0, len(track_boxes))
    iou = iou_matrix(np.asarray(track_boxes, np.float32), np.asarray(face_boxes, np.float32))
    unmatched = int((iou.max(axis=1) < min_iou).sum())
    return Count(len(face_boxes), unmatched)


class Occupancy:
    """Smoothed occupancy of one room over a sliding window of counts."""

    def __init__(self, window_s: float, capacity: int | None) -> None:
        self.window = timedelta(seconds=window_s)
        self.capacity = capacity
        self._counts: deque[tuple[datetime, Count]] = deque()

    def add(self, now: datetime, count: Count) -> None:
        self._counts.append((now, count))
        while self._counts and now - self._counts[0][0] > self.window:
            self._counts.popleft()

    def reset(self) -> None:
        self._counts.clear()

    def smoothed(self) -> int | None:
        if not self._counts:
            return None
        return round(statistics.median(c.people for _, c in self._counts))

    def payload(self) -> OccupancyPayload | None:
        people = self.smoothed()
        if people is None:
            return None
        last = self._counts[-1][1]
        cap = self.capacity
        return OccupancyPayload(
            count=people, faces=last.faces, turned_away=last.turned_away, capacity=cap,
            free=None if cap is None else max(0, cap - people),
            occupied_share=None if cap is None else round(people / cap, 3),
            window_s=self.window.total_seconds(),
        )
