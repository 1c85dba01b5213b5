"""Attention: the class's share of faces facing the front, from the head pose of each face.

Per class by default. Per named student only with ``events.attention_per_student`` (personal
data about minors): then the payload maps each recognised student's id to facing-front.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np

from appliance.vision.headpose import head_pose
from cloud_sync.protocol import AttentionPayload


def facing_front(keypoints: Sequence[np.ndarray], max_yaw: float, max_pitch: float) -> list[bool]:
    """Facing-front per face (a face whose pose cannot be estimated is not facing front)."""
    out = []
    for kp in keypoints:
        pose = head_pose(kp)
        out.append(pose is not None and pose.facing_front(max_yaw, max_pitch))
    return out


class Attention:
    """Facing-front share over a sliding window of counts (faces pooled, not counts averaged,
    so a count with one face weighs less than one with twenty)."""

    def __init__(self, window_s: float) -> None:
        self.window = timedelta(seconds=window_s)
        self._counts: deque[tuple[datetime, int, int]] = deque()  # at, faces, facing front
        self.students: dict[str, bool] = {}

    def add(self, now: datetime, front: Sequence[bool],
            students: dict[str, bool] | None = None) -> None:
        self._counts.append((now, len(front), sum(front)))
        while self._counts and now - self._counts[0][0] > self.window:
            self._counts.popleft()
        if students:
            self.students.update(students)

    def reset(self) -> None:
        self._counts.clear()
        self.students = {}

    def share(self) -> float | None:
        faces = sum(c[1] for c in self._counts)
        return None if faces == 0 else sum(c[2] for c in self._counts) / faces

    def payload(self, per_student: bool) -> AttentionPayload | None:
        if not self._counts:
            return None
        _, faces, front = self._counts[-1]
        share = self.share()
        return AttentionPayload(
            faces=faces, facing_front=front,
            share=None if share is None else round(share, 3),
            window_s=self.window.total_seconds(),
            students=dict(self.students) if per_student else None,
        )
