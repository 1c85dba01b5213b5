"""Negative examples: descriptors a teacher marked "not this student" in the aggregator's
console. The roster carries them per student (``RosterEntry.negatives``); a match to student S
is turned into "unknown" when the face is closer to one of S's negatives than to S itself, so
the same face is not given to S again (other students are unaffected)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from appliance.recognition import Match


def veto_negatives(matches: list[Match], queries: np.ndarray, negatives: dict[str, np.ndarray],
                   distances: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> list[Match]:
    """``distances(query, descriptors)``: the matcher's own metric (Euclidean or cosine)."""
    if not negatives:
        return matches
    out = []
    for match, query in zip(matches, queries, strict=True):
        bad = negatives.get(match.student_id or "")
        if bad is not None and len(bad):
            nearest = float(distances(query, bad).min())
            if nearest < match.distance:
                match = replace(match, student_id=None, confidence=0.0,
                                second_distance=min(match.second_distance, nearest)
                                if math.isfinite(match.second_distance) else nearest)
        out.append(match)
    return out
