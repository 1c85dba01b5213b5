"""What the pipeline reports about itself, for the status page, /health, /metrics, the alerts
and the sync agent's heartbeat: :class:`PipelineStatus`, the students present
(:class:`PresentEntry`) and the per-stage timings (:class:`StageTimer`).

Light on purpose (no numpy, no OpenCV): the readers import it without the pipeline.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime

from appliance.placement import PlacementSummary

STAGES = ("decode", "detect", "track", "embed", "match")


@dataclass
class PresentEntry:
    student_id: str
    name: str
    first_seen: datetime
    confidence: float


@dataclass
class PipelineStatus:
    camera_source: str
    camera_state: str  # "ok" | "reopening" | "failed" | "ended" | "starting"
    last_frame_at: datetime | None
    frames: int
    fps: float
    stage_ms: dict[str, float]  # decode, detect, track, embed, match (recent means per frame)
    room_id: str
    course_id: str | None
    course_name: str | None
    present: list[PresentEntry]  # recognised in the current class so far
    unknown_count: int
    tracks_active: int
    started_at: datetime
    # additions beyond the interface contract (defaults keep it compatible):
    roster_size: int = 0  # students in the active roster; 0: everyone is unknown
    note: str | None = None  # e.g. "no roster: every face is unknown"
    camera_error: str | None = None
    frames_dropped: int = 0
    placement: PlacementSummary | None = None  # face sizes of the class (appliance/placement.py)


class StageTimer:
    """Per-stage milliseconds per frame: recent means (last ``window`` frames) and totals."""

    def __init__(self, window: int = 100) -> None:
        self.recent: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STAGES}
        self.total: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.frames = 0

    def add(self, ms: dict[str, float]) -> None:
        self.frames += 1
        for stage in STAGES:
            value = ms.get(stage, 0.0)
            self.recent[stage].append(value)
            self.total[stage] += value

    def recent_means(self) -> dict[str, float]:
        return {s: (sum(v) / len(v) if v else 0.0) for s, v in self.recent.items()}

    def total_means(self) -> dict[str, float]:
        n = max(self.frames, 1)
        return {s: self.total[s] / n for s in STAGES}
