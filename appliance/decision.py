"""Decision: from per-sample matches to "present: S001" or "unknown", and the debounce.

* :class:`TrackVote` collects the recognition samples of one track. Each sample is a
  (student id or None, face quality, distance, match confidence). The track is decided
  *present* for student S once at least ``votes_required`` samples name S and S holds a strict
  majority of the quality-weighted vote; samples naming nobody count against S with
  ``unknown_weight`` (default half) of their weight, samples naming another student with all of
  it. It is decided *unknown* once ``max_samples`` samples were taken without that.
* :class:`Debouncer` allows one attendance record per student per ``debounce_s`` window; it is
  seeded from the store's latest record times so a restart does not record everyone again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from appliance.config import DecisionConfig

Verdict = Literal["pending", "present", "unknown"]


@dataclass(frozen=True, slots=True)
class Sample:
    student_id: str | None
    quality: float
    distance: float
    confidence: float


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    student_id: str | None = None
    confidence: float = 0.0
    distance: float | None = None
    samples: int = 0


_EPS = 1e-3  # a zero-quality sample still counts a little


@dataclass
class TrackVote:
    """The quality-weighted vote of one track."""

    votes_required: int
    max_samples: int
    unknown_weight: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    decision: Decision = field(default_factory=lambda: Decision("pending"))

    @classmethod
    def from_config(cls, cfg: DecisionConfig) -> TrackVote:
        return cls(votes_required=cfg.votes_required, max_samples=cfg.max_samples,
                   unknown_weight=cfg.unknown_sample_weight)

    @property
    def decided(self) -> bool:
        return self.decision.verdict != "pending"

    def add(self, sample: Sample) -> Decision:
        """Add one sample (ignored once decided) and return the decision so far."""
        if self.decided:
            return self.decision
        self.samples.append(sample)
        self.decision = self._decide()
        return self.decision

    def leader(self) -> tuple[str | None, float]:
        """The student with the largest weighted vote so far and its share of the total
        (samples naming nobody count ``unknown_weight`` of their quality)."""
        weights: dict[str, float] = {}
        total = 0.0
        for s in self.samples:
            w = max(s.quality, 0.0) + _EPS
            if s.student_id is None:
                total += w * self.unknown_weight
            else:
                total += w
                weights[s.student_id] = weights.get(s.student_id, 0.0) + w
        if not weights or total <= 0:
            return None, 0.0
        best = max(weights, key=lambda k: weights[k])
        return best, weights[best] / total

    def _decide(self) -> Decision:
        n = len(self.samples)
        best, share = self.leader()
        if best is not None:
            agreeing = [s for s in self.samples if s.student_id == best]
            if len(agreeing) >= self.votes_required and share > 0.5:
                wsum = sum(max(s.quality, 0.0) + _EPS for s in agreeing)
                match_conf = sum((max(s.quality, 0.0) + _EPS) * s.confidence
                                 for s in agreeing) / wsum
                return Decision(
                    "present", best, confidence=round(min(1.0, share * match_conf), 4),
                    distance=min(s.distance for s in agreeing), samples=n,
                )
        if n >= self.max_samples:
            return Decision("unknown", None, confidence=round(1.0 - share, 4), samples=n)
        return Decision("pending", best, samples=n)


class Debouncer:
    """One record per student per window; windows are measured on the sightings' times."""

    def __init__(self, window_s: float, last_seen: Mapping[str, datetime] | None = None) -> None:
        self.window = timedelta(seconds=window_s)
        self._last: dict[str, datetime] = dict(last_seen or {})

    def seed(self, last_seen: Mapping[str, datetime]) -> None:
        """Merge record times read back from the store (keeps the later of two times)."""
        for student, at in last_seen.items():
            old = self._last.get(student)
            if old is None or at > old:
                self._last[student] = at

    def last(self, student_id: str) -> datetime | None:
        return self._last.get(student_id)

    def allow(self, student_id: str, at: datetime) -> bool:
        """True (and the window restarts at ``at``) when no record of this student was made
        within the window before ``at``; False for a repeat sighting inside the window."""
        last = self._last.get(student_id)
        if last is not None and at - last < self.window:
            return False
        self._last[student_id] = at
        return True
