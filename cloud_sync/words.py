"""Words the device's status page and the aggregator's console share, so that one face match
or one recogniser is called the same on both (issue 25 item 12)."""

from __future__ import annotations

CLEAR = 0.75  # confidence from which a match is "clear"
LIMIT = 0.5  # the recognition threshold: below, "borderline"

RECOGNISERS = {"sface": "SFace", "dlib": "dlib", "face_recognition": "dlib"}


def match_label(confidence: float | None) -> str | None:
    """The match confidence in words for a teacher. ``confidence`` is 0.5 when the face is
    just at the recognition threshold and 1 when it is twice as close; lower than 0.5 when
    another student is nearly as close."""
    if confidence is None:
        return None
    if confidence >= CLEAR:
        return "clear"
    if confidence >= LIMIT:
        return "good"
    return "borderline"


def recogniser(embedder: str | None) -> str:
    """``sface/sface-2021dec-int8bq`` -> ``SFace``; a descriptor from before embedders were
    recorded (empty) -> ``dlib`` (the only one then)."""
    family = (embedder or "dlib").split("/", 1)[0].lower()
    return RECOGNISERS.get(family, family)
