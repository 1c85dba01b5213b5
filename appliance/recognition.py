"""Roster (students with one or more face descriptors) and the vectorised open-set matcher.

Matching rule (see docs/RECOGNITION.md): each student is represented by the mean (centroid) of
their descriptors (several photos per student: the centroid measured best on the tuning people,
ahead of "closest photo"; ``aggregate="min"`` keeps the latter). For each query descriptor the
distance to every student is computed at once (numpy): Euclidean for dlib descriptors, cosine
(``1 - cos``, queries and centroids L2-normalised) for SFace's (``metric``). The query is the
closest student only if

- the best student distance is at most ``threshold``, and
- the second-best *student* is at least ``margin`` further away (an ambiguous face is not
  guessed; several photos of the same student never compete with each other).

Otherwise the face is unknown (``student_id`` None).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from appliance.negatives import veto_negatives
from cloud_sync.calibration import distance_confidence
from cloud_sync.protocol import LEGACY_EMBEDDER, RosterEntry

_LOGGER = logging.getLogger(__name__)

EMBEDDING_DIM = 128
ROSTER_FILE_VERSION = 1


class RosterFile(BaseModel):
    """``roster.json``: what `appliance roster build` writes and the pipeline reads."""

    v: int = Field(default=ROSTER_FILE_VERSION, description="Format version (1).")
    embedder: str = Field(
        default=LEGACY_EMBEDDER, max_length=100,
        description="`name/model_version` of the embedder that made the descriptors (absent in "
        "rosters made before it was recorded: those were dlib's).")
    students: list[RosterEntry] = Field(description="Students with their face descriptors.")


class RosterError(ValueError):
    """A roster file is missing or malformed; the message names the file and the problem."""


class RosterEmbedderError(RosterError):
    """A roster's descriptors come from another embedder than the device's."""


def check_embedder(roster_embedder: str, expected: str, where: str = "roster") -> None:
    """Raise :class:`RosterEmbedderError` with the fix when the two differ."""
    if roster_embedder == expected:
        return
    raise RosterEmbedderError(
        f"{where} was made by the {roster_embedder} embedder but this device runs "
        f"{expected}: its descriptors are not comparable, so it is refused (every face stays "
        f"unknown). Fix: rebuild the roster with the device's embedder (`appliance roster "
        f"build`, or the aggregator serving {expected.split('/')[0]} descriptors), or set "
        f"recognition.embedder = \"{roster_embedder.split('/')[0]}\".")


@dataclass
class Roster:
    """Students and their descriptors: ``embeddings[k]`` belongs to ``student_ids[owners[k]]``."""

    student_ids: list[str]
    names: list[str]
    embeddings: np.ndarray = field(
        default_factory=lambda: np.zeros((0, EMBEDDING_DIM), np.float32)
    )
    owners: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    embedder: str = LEGACY_EMBEDDER  # `name/model_version` that made the descriptors
    # student id -> (k, EMBEDDING_DIM) descriptors that are NOT that student (see negatives.py)
    negatives: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, np.float32).reshape(-1, EMBEDDING_DIM)
        self.owners = np.asarray(self.owners, np.int64).reshape(-1)
        if len(self.student_ids) != len(self.names):
            raise ValueError("student_ids and names differ in length")
        if len(set(self.student_ids)) != len(self.student_ids):
            raise ValueError("duplicate student id in roster")
        if len(self.embeddings) != len(self.owners):
            raise ValueError("embeddings and owners differ in length")
        if self.owners.size and (self.owners.min() < 0 or self.owners.max() >= len(self)):
            raise ValueError("owner index out of range")

    def __len__(self) -> int:
        return len(self.student_ids)

    @classmethod
    def empty(cls, embedder: str = LEGACY_EMBEDDER) -> Roster:
        return cls([], [], embedder=embedder)

    @classmethod
    def from_entries(cls, entries: Iterable[RosterEntry],
                     embedder: str = LEGACY_EMBEDDER) -> Roster:
        ids: list[str] = []
        names: list[str] = []
        embeddings: list[list[float]] = []
        owners: list[int] = []
        negatives: dict[str, np.ndarray] = {}
        for entry in entries:
            if not entry.embeddings:
                _LOGGER.warning("student %s has no face descriptor; skipped", entry.student_id)
                continue
            owners.extend([len(ids)] * len(entry.embeddings))
            embeddings.extend(entry.embeddings)
            ids.append(entry.student_id)
            names.append(entry.name)
            if entry.negatives:
                negatives[entry.student_id] = np.asarray(entry.negatives, np.float32)
        return cls(ids, names, np.asarray(embeddings, np.float32), np.asarray(owners, np.int64),
                   embedder=embedder, negatives=negatives)

    def to_entries(self) -> list[RosterEntry]:
        return [
            RosterEntry(
                student_id=sid,
                name=name,
                embeddings=[[float(v) for v in e] for e in self.embeddings[self.owners == i]],
                negatives=[[float(v) for v in e] for e in self.negatives.get(sid, [])],
            )
            for i, (sid, name) in enumerate(zip(self.student_ids, self.names, strict=True))
        ]

    def name_of(self, student_id: str) -> str:
        try:
            return self.names[self.student_ids.index(student_id)]
        except ValueError:
            return ""

    @classmethod
    def load(cls, path: Path) -> Roster:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise RosterError(f"cannot read roster {path}: {err}") from err
        try:
            data = RosterFile.model_validate_json(text)
        except ValidationError as err:
            raise RosterError(f"roster {path} is not a valid roster.json: {err}") from err
        if data.v != ROSTER_FILE_VERSION:
            raise RosterError(f"roster {path}: unsupported version {data.v}")
        try:
            return cls.from_entries(data.students, data.embedder)
        except ValueError as err:
            raise RosterError(f"roster {path}: {err}") from err

    def save(self, path: Path) -> None:
        """Write roster.json atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = RosterFile(embedder=self.embedder, students=self.to_entries()).model_dump(
            mode="json")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --- which roster is current -------------------------------------------------------------------

class RosterProvider(Protocol):
    """What the pipeline asks, about once a second, for the class in the room and its roster:
    :class:`FileRosterProvider` here, ``appliance.sync.ScheduleRosterProvider`` (the class
    scheduled now, from the schedule the sync agent caches) on a device with an aggregator."""

    def current(self, now: datetime) -> tuple[str | None, str | None, Roster]:
        """(course_id, course_name, Roster) of the class in the room at ``now``."""
        ...


class FileRosterProvider:
    """A roster.json made by `appliance roster build` (setting ``recognition.roster_file``).

    Re-read when the file changes (checked at most every 5 s). A missing or unreadable file
    means an empty roster: everyone is unknown, and :attr:`error` says why."""

    CHECK_S = 5.0

    def __init__(self, path: Path | None, course_id: str | None = None,
                 course_name: str | None = None) -> None:
        self.path = Path(path) if path else None
        self.course_id, self.course_name = course_id, course_name
        self.error: str | None = None
        self._roster: Roster | None = None
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if self.path is None:
            self._roster, self.error = Roster.empty(), "no roster configured"
            return
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            if self._roster is None or self._mtime is not None:
                _LOGGER.warning("roster file %s not found: everyone is unknown", self.path)
            self._roster, self._mtime = Roster.empty(), None
            self.error = f"roster file {self.path} not found"
            return
        if mtime == self._mtime and self._roster is not None:
            return
        try:
            roster = Roster.load(self.path)
        except (OSError, ValueError) as err:
            _LOGGER.error("roster file %s unreadable: %s", self.path, err)
            self._roster, self._mtime = Roster.empty(), mtime
            self.error = f"roster file {self.path} unreadable: {err}"
            return
        self._roster, self._mtime, self.error = roster, mtime, None
        _LOGGER.info("roster %s: %d students", self.path, len(roster.student_ids))

    def current(self, now: datetime) -> tuple[str | None, str | None, Roster]:
        with self._lock:
            mono = time.monotonic()
            if mono - self._checked >= self.CHECK_S:
                self._checked = mono
                self._load()
            assert self._roster is not None  # _load always sets one
            return self.course_id, self.course_name, self._roster


# --- matching -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Match:
    """Result for one face. ``second_distance`` is ``inf`` when the roster has one student."""

    student_id: str | None
    distance: float  # to the closest student (whether accepted or not); inf for an empty roster
    second_distance: float
    confidence: float  # 0..1; 0 for unknown


def pairwise_distances(queries: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(n, m)`` between two sets of descriptors."""
    q = np.asarray(queries, np.float64)
    e = np.asarray(embeddings, np.float64)
    sq = (q * q).sum(1)[:, None] + (e * e).sum(1)[None, :] - 2.0 * q @ e.T
    return np.sqrt(np.maximum(sq, 0.0))


def confidence(distance: float, gap: float, threshold: float, margin: float) -> float:
    """0..1 for an accepted match: 0.5 at the threshold, 1 at half of it; scaled down towards
    0.5x when the gap to the second student is only just the margin."""
    dist_c = distance_confidence(distance, threshold)
    ref = max(margin, 0.05)
    gap_c = float(np.clip(0.5 + gap / (4.0 * ref), 0.5, 1.0)) if math.isfinite(gap) else 1.0
    return dist_c * gap_c


class Matcher:
    """Vectorised open-set matching of descriptors against a roster."""

    def __init__(
        self, roster: Roster, threshold: float, margin: float, *, aggregate: str = "centroid",
        metric: str = "euclidean",
    ) -> None:
        if aggregate not in ("centroid", "min"):
            raise ValueError(f"aggregate must be 'centroid' or 'min', not {aggregate!r}")
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', not {metric!r}")
        self.roster = roster
        self.threshold = threshold
        self.margin = margin
        self.aggregate = aggregate
        self.metric = metric
        order = np.argsort(roster.owners, kind="stable")
        embeddings = self._prepare(roster.embeddings[order])
        owners = roster.owners[order]
        starts = (
            np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
            if owners.size
            else np.zeros((0,), np.int64)
        )
        self._student_of_group = owners[starts] if owners.size else owners
        if aggregate == "centroid" and starts.size:
            counts = np.diff(np.r_[starts, len(owners)])
            embeddings = np.add.reduceat(embeddings, starts, axis=0) / counts[:, None]
            embeddings = self._prepare(embeddings)
            starts = np.arange(len(starts))
        self._starts = starts
        self._embeddings = embeddings
        self._sq = (embeddings**2).sum(1)

    @classmethod
    def for_embedder(cls, roster: Roster, cfg: Any) -> Matcher:
        """The matcher of a ``RecognitionConfig``: its embedder's metric, its threshold and
        margin (or the embedder's calibrated ones)."""
        from appliance.vision.embedding import spec

        return cls(roster, cfg.match_threshold(), cfg.match_margin(),
                   metric=spec(cfg.embedder).metric)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        """float64 copies; unit length for the cosine metric."""
        v = np.asarray(vectors, np.float64).reshape(-1, EMBEDDING_DIM)
        if self.metric == "cosine":
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v

    def student_distances(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, s)``: each query's distance to each student (to the centroid of their
        descriptors, or the closest one with ``aggregate="min"``), columns in the order of the
        students that have at least one descriptor."""
        q = self._prepare(embeddings)
        if not self._starts.size:
            return np.zeros((len(q), 0))
        if self.metric == "cosine":
            dist = np.maximum(1.0 - q @ self._embeddings.T, 0.0)
        else:
            sq = (q * q).sum(1)[:, None] + self._sq[None, :] - 2.0 * q @ self._embeddings.T
            dist = np.sqrt(np.maximum(sq, 0.0))
        if self.aggregate == "centroid":
            return dist
        return np.minimum.reduceat(dist, self._starts, axis=1)

    def match(self, embeddings: np.ndarray) -> list[Match]:
        q = np.asarray(embeddings, np.float32).reshape(-1, EMBEDDING_DIM)
        per_student = self.student_distances(q)
        if per_student.shape[1] == 0:
            return [Match(None, math.inf, math.inf, 0.0) for _ in range(len(q))]
        if per_student.shape[1] == 1:
            best_idx = np.zeros(len(q), np.int64)
            best = per_student[:, 0]
            second = np.full(len(q), math.inf)
        else:
            two = np.argpartition(per_student, 1, axis=1)[:, :2]
            rows = np.arange(len(q))
            d2 = per_student[rows[:, None], two]
            first_is_min = d2[:, 0] <= d2[:, 1]
            best_idx = np.where(first_is_min, two[:, 0], two[:, 1])
            best = np.minimum(d2[:, 0], d2[:, 1])
            second = np.maximum(d2[:, 0], d2[:, 1])
        gap = second - best
        accepted = (best <= self.threshold) & (gap >= self.margin)
        out = []
        for i in range(len(q)):
            if accepted[i]:
                sid = self.roster.student_ids[int(self._student_of_group[best_idx[i]])]
                conf = confidence(float(best[i]), float(gap[i]), self.threshold, self.margin)
                out.append(Match(sid, float(best[i]), float(second[i]), conf))
            else:
                out.append(Match(None, float(best[i]), float(second[i]), 0.0))
        return veto_negatives(out, q, self.roster.negatives, self._distances)

    def _distances(self, query: np.ndarray, others: np.ndarray) -> np.ndarray:
        """Distances from one query to some descriptors, in this matcher's metric."""
        q = self._prepare(query)
        o = self._prepare(others)
        if self.metric == "cosine":
            return np.maximum(1.0 - o @ q[0], 0.0)
        return np.sqrt(((o - q) ** 2).sum(1))
