"""Words the device's status page and the aggregator's console share, so that one face match
or one recogniser is called the same on both (issue 25 item 12).

A match's band comes from its embedder's measured false-accept rates (cloud_sync.calibration),
not from one pair of numbers for every embedder: **clear** is a match no farther than the
distance at which that embedder accepted at most 0.1 % of strangers in its tuning, **good** one
within its 1 % point, **borderline** anything beyond (or a match nearly as close to another
student: the confidence also falls when the second-best student is close). The edges are
expressed on the confidence scale of the operating threshold (0.5 at the threshold), so an
SFace "good" and a dlib "good" carry the same risk of a stranger.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloud_sync.calibration import calibration, distance_confidence

CLEAR_FAR = 0.001  # "clear": within the point where at most 0.1 % of strangers were accepted
GOOD_FAR = 0.01  # "good": within the 1 % point

RECOGNISERS = {"sface": "SFace", "dlib": "dlib", "face_recognition": "dlib"}


@dataclass(frozen=True)
class MatchBands:
    """Confidence edges of one embedder at one threshold: ``clear`` from, ``good`` from."""

    embedder: str
    threshold: float
    clear: float
    good: float


def match_bands(embedder: str | None, threshold: float | None = None) -> MatchBands:
    """The bands of ``embedder`` (``sface``, ``dlib`` or a ``name/model_version`` id) at its
    operating ``threshold`` (None: its calibrated default): each edge is the confidence a match
    gets at the distance of the calibration's false-accept point."""
    cal = calibration(embedder)
    at = threshold if threshold is not None else cal.threshold
    clear = distance_confidence(cal.at(CLEAR_FAR).threshold, at)
    good = distance_confidence(cal.at(GOOD_FAR).threshold, at)
    return MatchBands(cal.embedder, at, clear, min(good, clear))


def match_label(confidence: float | None, bands: MatchBands) -> str | None:
    """The match confidence in words for a teacher, in ``bands`` (:func:`match_bands` of the
    embedder that made the match)."""
    if confidence is None:
        return None
    if confidence >= bands.clear:
        return "clear"
    if confidence >= bands.good:
        return "good"
    return "borderline"


def recogniser(embedder: str | None) -> str:
    """``sface/sface-2021dec-int8bq`` -> ``SFace``; a descriptor from before embedders were
    recorded (empty) -> ``dlib`` (the only one then)."""
    family = (embedder or "dlib").split("/", 1)[0].lower()
    return RECOGNISERS.get(family, family)
