"""Each embedder's calibration, in one place for the device and the aggregator: the default
operating point (threshold, margin) and the measured false-accept points it was chosen from.

The figures come from ``python -m bench.recognition tune EMBEDDER`` on the lfw_dev *tuning*
people only (docs/RECOGNITION.md, "Calibration protocol"): for each target false-accept rate,
the threshold (and margin) with the most identifications whose mean rate of strangers accepted
stays within it. ``appliance.vision.embedding.CALIBRATED`` takes its thresholds and margins
from here, and ``cloud_sync.words`` its match bands (issue 25 item 12), so "clear" and "good"
mean the same risk of a stranger for SFace and dlib.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FarPoint:
    """A measured point of the tuning: at ``threshold`` / ``margin``, ``identified`` of the
    tuning probes were recognised and ``accepted`` of the strangers were taken for a student
    (fractions, 0..1); chosen as the best point whose false-accept rate is at most ``target``."""

    target: float
    threshold: float
    margin: float
    identified: float
    accepted: float


@dataclass(frozen=True)
class Calibration:
    embedder: str
    threshold: float  # the default operating point (recognition.threshold unset)
    margin: float
    points: tuple[FarPoint, ...]

    def at(self, target: float) -> FarPoint:
        """The measured point for a false-accept target (ValueError if not measured)."""
        for point in self.points:
            if point.target == target:
                return point
        raise ValueError(f"{self.embedder}: no calibration point for a false-accept rate of "
                         f"{target:.3%}")


CALIBRATION: dict[str, Calibration] = {
    # docs/RECOGNITION.md: the default is the <= 0.1 % point (no stranger of the tuning rounds
    # accepted at 99.1 % identified)
    "sface": Calibration("sface", 0.50, 0.0, (
        FarPoint(0.001, 0.50, 0.0, 0.991, 0.0),
        FarPoint(0.01, 0.58, 0.0, 0.996, 0.0098),
    )),
    # dlib keeps its earlier default 0.48 / 0.04 (95.9 % identified, 0.57 % accepted), between
    # its <= 0.1 % and <= 1 % points
    "dlib": Calibration("dlib", 0.48, 0.04, (
        FarPoint(0.001, 0.47, 0.08, 0.918, 0.0010),
        FarPoint(0.01, 0.49, 0.0, 0.961, 0.0086),
    )),
}


def calibration(embedder: str | None) -> Calibration:
    """The calibration of ``sface``, ``dlib`` or a ``name/model_version`` id; an unrecorded
    embedder (None, empty: descriptors from before embedders were recorded) is dlib."""
    family = (embedder or "dlib").split("/", 1)[0].lower()
    if family == "face_recognition":
        family = "dlib"
    try:
        return CALIBRATION[family]
    except KeyError:
        raise ValueError(f"unknown embedder {embedder!r} (known: {', '.join(CALIBRATION)})"
                         ) from None


def distance_confidence(distance: float, threshold: float) -> float:
    """The distance part of a match's confidence (``appliance.recognition.confidence``): 0.5 at
    the threshold, 1 at half of it, 0 at 1.5 times it."""
    return min(1.0, max(0.0, (1.5 * threshold - distance) / threshold))
