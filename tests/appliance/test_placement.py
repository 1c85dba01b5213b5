"""The placement check: face sizes per class, the verdict and its hint, /metrics and the
heartbeat's optional field (backward compatible)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import generate_latest

from appliance import metrics
from appliance.placement import (
    MIN_FACES,
    PlacementStats,
    band_of,
    observe_live,
    placement_report,
    summarise,
)
from cloud_sync.protocol import Heartbeat


@dataclass
class _Det:
    width: float


@dataclass
class _State:
    label: str | None


@dataclass
class _Track:
    detection: _Det
    hits: int = 10
    missed: int = 0
    data: dict[str, Any] = field(default_factory=dict)


def _walk(stats: PlacementStats, widths: list[float], label: str | None) -> None:
    """People walking past: each track grows to its width, then ends."""
    for w in widths:
        t = _Track(_Det(w * 0.6))
        observe_live([t])
        t.detection = _Det(w)
        observe_live([t])
        t.detection = _Det(w * 0.8)  # walking away: the largest width counts
        observe_live([t])
        t.data["state"] = _State(label)
        stats.ended([t])


def test_bands() -> None:
    assert [band_of(w) for w in (10, 24, 31.9, 32, 49, 50, 119, 120, 900)] == \
        [0, 1, 1, 2, 3, 4, 6, 7, 7]


def test_small_faces_say_move_the_camera_closer() -> None:
    stats = PlacementStats()
    stats.roster_size = 20
    stats.new_class("MATH-1")
    _walk(stats, [33, 35, 36, 34, 38, 35], None)
    s = stats.summary()
    assert s.status == "too_small" and s.current_class and s.course_id == "MATH-1"
    assert s.median_px == 35.0
    assert "most faces are 35 px" in s.hint and "closer" in s.hint
    assert dict((b, f) for b, f, _ in s.bands)["32-39"] == 6


def test_good_placement_and_recognition_per_size() -> None:
    stats = PlacementStats()
    stats.roster_size = 20
    _walk(stats, [70, 80, 90, 75], "Ada")
    _walk(stats, [45], None)
    s = stats.summary()
    assert s.status == "ok" and s.faces == 5 and s.recognised == 4
    bands = {b: (f, r) for b, f, r in s.bands}
    assert bands["60-79"] == (2, 2) and bands["80-119"] == (2, 2) and bands["40-49"] == (1, 0)
    assert "looks good" in s.hint


def test_big_faces_seldom_recognised_point_at_light_and_angle() -> None:
    stats = PlacementStats()
    stats.roster_size = 25
    _walk(stats, [80] * 9, None)
    _walk(stats, [80], "Ada")
    assert stats.summary().status == "low_recognition"
    stats.roster_size = 0  # no roster: nobody can be recognised, that is not the camera
    assert stats.summary().status == "ok"


def test_few_faces_no_verdict_and_the_last_class_is_kept() -> None:
    stats = PlacementStats()
    _walk(stats, [30] * (MIN_FACES - 1), None)
    assert stats.summary().status == "no_data"
    _walk(stats, [30], None)
    stats.new_class("NEXT")  # the finished class stays readable until the new one has data
    s = stats.summary()
    assert s.status == "too_small" and not s.current_class and s.faces == MIN_FACES
    _walk(stats, [90] * MIN_FACES, "Ada")
    assert stats.summary().status == "ok" and stats.summary().current_class


def test_short_tracks_are_not_counted() -> None:
    stats = PlacementStats()
    stats.track_ended(60, hits=2, recognised=False)  # a passing false detection
    assert stats.summary().faces == 0


def test_metrics_and_heartbeat_field() -> None:
    stats = PlacementStats()
    _walk(stats, [55] * 5, "Ada")
    text = generate_latest().decode()
    assert 'attendance_faces_by_size_total{recognised="true",size="50-59"}' in text
    assert "attendance_face_size_pixels_bucket" in text
    s = stats.summary()
    assert metrics.PLACEMENT_OK._value.get() == 1
    report = placement_report(s)
    assert report is not None
    hb = Heartbeat(device_id="dev-1", room_id="R1", software_version="1", uptime_s=1,
                   sent_at=datetime.now(UTC), outbox_depth=0, placement=report)
    back = Heartbeat.model_validate_json(hb.model_dump_json())
    assert back.placement is not None and back.placement.median_px == 55.0
    assert back.placement.bands[4].size == "50-59" and back.placement.bands[4].recognised == 5
    # a heartbeat of a device from before: no placement field, still valid
    old = {k: v for k, v in hb.model_dump(mode="json").items() if k != "placement"}
    assert Heartbeat.model_validate(old).placement is None


def test_summarise_empty() -> None:
    s = summarise([], [], None, True)
    assert s.status == "no_data" and s.median_px is None and s.faces == 0
