"""The quality-weighted vote and the per-student debounce."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from appliance.config import DecisionConfig
from appliance.decision import Debouncer, Sample, TrackVote


def s(student: str | None, quality: float = 0.8, distance: float = 0.35) -> Sample:
    return Sample(student, quality, distance, confidence=0.9 if student else 0.0)


def test_present_after_k_agreeing_samples() -> None:
    vote = TrackVote.from_config(DecisionConfig(votes_required=3, max_samples=6))
    assert vote.add(s("S001")).verdict == "pending"
    assert vote.add(s("S001")).verdict == "pending"
    d = vote.add(s("S001", distance=0.3))
    assert (d.verdict, d.student_id, d.samples, d.distance) == ("present", "S001", 3, 0.3)
    assert 0.8 < d.confidence <= 0.9
    # decided: further samples change nothing
    assert vote.add(s("S002")).student_id == "S001" and len(vote.samples) == 3


def test_disagreement_needs_weighted_majority() -> None:
    vote = TrackVote(votes_required=2, max_samples=6)
    vote.add(s("S001", quality=0.2))
    vote.add(s("S002", quality=0.9))
    # S001 has two votes now but a small share of the quality weight: not present
    assert vote.add(s("S001", quality=0.2)).verdict == "pending"
    d = vote.add(s("S002", quality=0.9))
    assert (d.verdict, d.student_id) == ("present", "S002")
    assert d.confidence < 0.9  # the disagreeing samples lower the confidence


def test_unknown_after_max_samples() -> None:
    vote = TrackVote(votes_required=2, max_samples=4)
    for student in (None, "S001", None):
        assert vote.add(s(student)).verdict == "pending"
    d = vote.add(s(None))
    assert (d.verdict, d.student_id, d.samples) == ("unknown", None, 4)


def test_unknown_samples_vote_against() -> None:
    vote = TrackVote(votes_required=2, max_samples=5, unknown_weight=1.0)
    for student in (None, None, "S001", None):
        vote.add(s(student))
    # the 5th sample gives S001 two agreeing votes, but 2 of 5 is no majority
    assert vote.add(s("S001")).verdict == "unknown"


def test_unknown_samples_count_half_by_default() -> None:
    cfg = DecisionConfig(votes_required=2, max_samples=6)
    assert cfg.unknown_sample_weight == 0.5
    vote = TrackVote.from_config(cfg)
    for student in (None, None, None, "S001"):
        assert vote.add(s(student)).verdict == "pending"
    # 2 x S001 against 3 no-match samples at half weight: 2 > 1.5, a majority
    d = vote.add(s("S001"))
    assert (d.verdict, d.student_id) == ("present", "S001")
    # but no-match samples still outvote a lone pair when they are many
    vote = TrackVote.from_config(cfg)
    for student in (None, None, None, None, "S001"):
        vote.add(s(student))
    assert vote.add(s("S001")).verdict == "unknown"


def test_single_vote_config() -> None:
    vote = TrackVote(votes_required=1, max_samples=1)
    assert vote.add(s("S007")).student_id == "S007"


def test_debounce_one_record_per_window() -> None:
    t0 = datetime(2026, 3, 1, 9, tzinfo=UTC)
    deb = Debouncer(30)
    assert deb.allow("S001", t0)
    assert not deb.allow("S001", t0 + timedelta(seconds=5))
    assert not deb.allow("S001", t0 + timedelta(seconds=29.9))
    assert deb.allow("S002", t0 + timedelta(seconds=1))  # per student
    assert deb.allow("S001", t0 + timedelta(seconds=30))
    assert deb.last("S001") == t0 + timedelta(seconds=30)


def test_debounce_survives_restart_via_seed() -> None:
    t0 = datetime(2026, 3, 1, 9, tzinfo=UTC)
    deb = Debouncer(30, {"S001": t0})
    assert not deb.allow("S001", t0 + timedelta(seconds=10))
    deb.seed({"S001": t0 - timedelta(hours=1), "S002": t0})  # older time does not win
    assert deb.last("S001") == t0
    assert not deb.allow("S002", t0 + timedelta(seconds=3))
    assert Debouncer(0).allow("S001", t0) and Debouncer(0, {"S001": t0}).allow("S001", t0)
