"""The placement check: how big the faces the camera sees are, and how many were recognised.

A camera above a door is placed well when the faces that pass it are big enough to recognise
(docs/OPERATIONS.md 6.9: 50 px and wider reliably, 40 px often, 32 px rarely). Each track that
ends (a person who walked past) counts once, at its largest face width (the closest it came),
in a size band, with whether it was recognised as a student. The figures are kept per class:
the current class so far and the last finished one; ``summary()`` reports the current class
once it has :data:`MIN_FACES` faces, else the last class, with a plain hint.

Read by the status page, ``/metrics`` and the heartbeat (``cloud_sync.protocol.Placement``).
Light on purpose (no numpy): the readers import it without the pipeline.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance import metrics

if TYPE_CHECKING:
    from cloud_sync.protocol import PlacementReport

# band lower edges in pixels (face width in the full-resolution frame): <24, 24-31, ... 120+
BAND_EDGES = (0, 24, 32, 40, 50, 60, 80, 120)
RECOGNISABLE_PX = 50  # recognised reliably from here (door benchmark)
MARGINAL_PX = 40
TOO_LARGE_PX = 300  # the camera is very close: people cross the frame in a few frames
MIN_FACES = 5  # fewer faces than this: no verdict yet
MIN_HITS = 3  # a track seen in fewer frames is not counted (a passing false detection)
LOW_RECOGNITION = 0.3  # of the faces in the recognisable bands, when the roster is not empty


def band_label(index: int) -> str:
    lo = BAND_EDGES[index]
    if index + 1 < len(BAND_EDGES):
        return f"{lo}-{BAND_EDGES[index + 1] - 1}"
    return f"{lo}+"


BAND_LABELS = tuple(band_label(i) for i in range(len(BAND_EDGES)))


def band_of(width_px: float) -> int:
    index = 0
    for i, edge in enumerate(BAND_EDGES):
        if width_px >= edge:
            index = i
    return index


@dataclass
class PlacementSummary:
    """One class's face sizes: per band, faces and recognised; the verdict and a hint."""

    course_id: str | None
    faces: int
    recognised: int
    median_px: float | None
    bands: list[tuple[str, int, int]]  # (label, faces, recognised)
    status: str  # "no_data" | "ok" | "too_small" | "marginal" | "too_large" | "low_recognition"
    hint: str
    current_class: bool  # True: the class now running; False: the last finished one


@dataclass
class _Tally:
    course_id: str | None
    widths: list[float] = field(default_factory=list)
    recognised: list[bool] = field(default_factory=list)


class PlacementStats:
    """Face sizes and recognition per size, per class (processing thread writes, any reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = _Tally(None)
        self._last: _Tally | None = None
        self.roster_size = 0

    def new_class(self, course_id: str | None) -> None:
        """The class changed: the current figures become the last class's."""
        with self._lock:
            if self._current.widths:
                self._last = self._current
            self._current = _Tally(course_id)

    def track_ended(self, peak_px: float, hits: int, recognised: bool) -> None:
        if hits < MIN_HITS or peak_px <= 0:
            return
        band = BAND_LABELS[band_of(peak_px)]
        metrics.FACE_SIZE.observe(peak_px)
        metrics.FACES_BY_SIZE.labels(size=band, recognised=str(recognised).lower()).inc()
        with self._lock:
            self._current.widths.append(float(peak_px))
            self._current.recognised.append(recognised)

    def ended(self, tracks: Iterable[object]) -> None:
        """Count tracks that ended: ``data['peak_px']`` (kept by :func:`observe_live`), the
        pipeline's decision (``data['state'].label``: a name, "unknown" or None) and ``hits``."""
        for track in tracks:
            data = getattr(track, "data", {})
            label = getattr(data.get("state"), "label", None)
            self.track_ended(float(data.get("peak_px", 0.0)), int(getattr(track, "hits", 0)),
                             label not in (None, "unknown"))

    def summary(self) -> PlacementSummary:
        with self._lock:
            tally, current = self._current, True
            if len(tally.widths) < MIN_FACES and self._last is not None:
                tally, current = self._last, False
            widths, recognised = list(tally.widths), list(tally.recognised)
            course = tally.course_id
        out = summarise(widths, recognised, course, current, self.roster_size)
        metrics.PLACEMENT_OK.set(-1 if out.status == "no_data"
                                 else int(out.status in ("ok", "marginal")))
        metrics.PLACEMENT_MEDIAN_FACE.set(out.median_px or 0.0)
        return out


def observe_live(tracks: Iterable[object]) -> None:
    """Keep each matched track's largest face width (``data['peak_px']``)."""
    for track in tracks:
        if getattr(track, "missed", 1) != 0:
            continue
        det = track.detection  # type: ignore[attr-defined]
        data = track.data  # type: ignore[attr-defined]
        data["peak_px"] = max(float(data.get("peak_px", 0.0)), float(det.width))


def summarise(widths: list[float], recognised: list[bool], course_id: str | None,
              current: bool, roster_size: int = 0) -> PlacementSummary:
    bands = [[label, 0, 0] for label in BAND_LABELS]
    for w, r in zip(widths, recognised, strict=True):
        b = bands[band_of(w)]
        b[1] += 1
        b[2] += int(r)
    n = len(widths)
    median = round(statistics.median(widths), 1) if widths else None
    status, hint = verdict(widths, recognised, roster_size)
    return PlacementSummary(course_id, n, sum(recognised), median,
                            [(str(b[0]), int(b[1]), int(b[2])) for b in bands], status, hint,
                            current)


def verdict(widths: list[float], recognised: list[bool], roster_size: int = 0
            ) -> tuple[str, str]:
    """(status, plain hint) from the faces of one class."""
    n = len(widths)
    if n < MIN_FACES:
        return "no_data", (f"{n} face(s) seen so far: the check needs {MIN_FACES} people "
                           "walking past the camera")
    median = statistics.median(widths)
    if median < MARGINAL_PX:
        return "too_small", (f"most faces are {median:.0f} px: move the camera closer to where "
                             "people walk, or raise the resolution (1280x720); faces need "
                             f"{RECOGNISABLE_PX} px or more to be recognised reliably")
    if median < RECOGNISABLE_PX:
        return "marginal", (f"most faces are {median:.0f} px: many are recognised, but "
                            f"{RECOGNISABLE_PX} px or more is reliable; move the camera a "
                            "little closer or raise the resolution")
    if median > TOO_LARGE_PX:
        return "too_large", (f"most faces are {median:.0f} px: the camera is very close; people "
                             "cross the picture in a moment, aim it 1.5-3 m ahead")
    big = [r for w, r in zip(widths, recognised, strict=True) if w >= RECOGNISABLE_PX]
    share = sum(big) / len(big) if big else 0.0
    if roster_size > 0 and big and share < LOW_RECOGNITION:
        return "low_recognition", (
            f"faces are big enough ({median:.0f} px) but only {share:.0%} were recognised: "
            "check the light (no window behind people), the camera's angle (people should "
            "face it), and that the students' photos are enrolled")
    return "ok", f"placement looks good: most faces are {median:.0f} px"


def placement_report(summary: PlacementSummary | None) -> PlacementReport | None:
    """The summary as the heartbeat's optional ``placement`` field."""
    if summary is None:
        return None
    from cloud_sync.protocol import PlacementBand, PlacementReport

    return PlacementReport(
        status=summary.status, faces=summary.faces, recognised=summary.recognised,  # type: ignore[arg-type]
        median_px=summary.median_px, hint=summary.hint[:300], course_id=summary.course_id,
        current_class=summary.current_class,
        bands=[PlacementBand(size=s, faces=f, recognised=r) for s, f, r in summary.bands])
