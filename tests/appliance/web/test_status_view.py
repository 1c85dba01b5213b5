"""What the status page says about the camera picture and the match confidence (the JSON the
page and /api/status share); the browser test looks at the rendered page."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from appliance.recognition import confidence
from appliance.vision.embedding import spec
from appliance.web.app import create_app
from appliance.web.view import preview_note
from cloud_sync.calibration import CALIBRATION
from cloud_sync.words import CLEAR_FAR, GOOD_FAR, match_bands, match_label, recogniser
from tests.appliance.conftest import Present


@pytest.mark.parametrize(("confidence", "label"), [
    (0.91, "clear"), (0.5, "clear"), (0.45, "good"), (0.35, "good"), (0.33, "borderline"),
    (None, None),
])
def test_match_label_sface(confidence, label) -> None:
    # SFace at its default 0.50 (its <= 0.1 % false-accept point): every match at or inside
    # the threshold with a clear second best is "clear"; "good" reaches its 1 % point (0.58)
    assert match_label(confidence, match_bands("sface")) == label


def test_bands_come_from_each_embedders_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edges are the confidences at each embedder's measured false-accept points, not one
    pair for all: a match at the same risk gets the same word with SFace and dlib."""
    for name, cal in CALIBRATION.items():
        assert (spec(name).threshold, spec(name).margin) == (cal.threshold, cal.margin)
        bands = match_bands(name)
        for far, inside, outside in ((CLEAR_FAR, "clear", "good"),
                                     (GOOD_FAR, "good", "borderline")):
            edge = cal.at(far).threshold
            at_edge = confidence(edge, float("inf"), cal.threshold, cal.margin)
            beyond = confidence(edge + 0.005, float("inf"), cal.threshold, cal.margin)
            assert match_label(at_edge, bands) == inside, (name, far)
            assert match_label(beyond, bands) == outside, (name, far)
    assert match_bands("sface") != match_bands("dlib")
    # a threshold set by hand moves the edges on the confidence scale, not the risk
    loose = match_bands("sface", 0.58)
    assert match_label(confidence(0.55, float("inf"), 0.58, 0.0), loose) == "good"
    assert match_label(confidence(0.49, float("inf"), 0.58, 0.0), loose) == "clear"
    # derived, not copied: change the measured point and the band follows
    sface = CALIBRATION["sface"]
    moved = replace(sface, points=(replace(sface.points[0], threshold=0.40), sface.points[1]))
    monkeypatch.setitem(CALIBRATION, "sface", moved)
    assert match_bands("sface").clear == pytest.approx(1.5 - 0.40 / 0.50)


def test_device_status_uses_its_own_embedders_bands(settings, pipeline, store, host) -> None:
    pipeline.set(present=[Present("s-2", "Alan Turing", datetime.now(UTC), 0.5)])
    key = __import__("pydantic").SecretStr("key-abcdefgh")
    words = {}
    for name in ("sface", "dlib"):
        cfg = settings.model_copy(update={
            "sync": settings.sync.model_copy(update={"api_key": key}),
            "recognition": settings.recognition.model_copy(update={"embedder": name})})
        c = TestClient(create_app(cfg, pipeline, store, system=host))
        body = c.get("/api/status", headers={"Authorization": "Bearer key-abcdefgh"}).json()
        words[name] = body["present"][0]["match"]
        assert body["match_bands"]["recogniser"] == recogniser(name)
        assert body["match_bands"]["clear"] == match_bands(name).clear
    # 0.5 is exactly the threshold: SFace's is its 0.1 % point, dlib's lies beyond its own
    assert words == {"sface": "clear", "dlib": "good"}


def test_preview_note_says_why() -> None:
    assert preview_note("ok", 12, None) is None
    assert "first picture" in (preview_note("ok", 0, None) or "")
    failed = preview_note("failed", 0, "cannot open camera 0") or ""
    assert "cannot open camera 0" in failed and "camera.source" in failed
    assert "reopen" in (preview_note("reopening", 50, "stopped") or "")
    assert "ended" in (preview_note("ended", 50, None) or "")


def test_api_status_carries_note_and_match(settings, pipeline, store, host) -> None:
    pipeline.set(camera_state="failed", frames=0, camera_source="rtsp://u:secret@cam/x",
                 camera_error="cannot open camera rtsp://u:secret@cam/x",
                 present=[Present("s-2", "Alan Turing", datetime.now(UTC), 0.3)])
    settings = settings.model_copy(update={"sync": settings.sync.model_copy(
        update={"api_key": __import__("pydantic").SecretStr("key-abcdefgh")})})
    c = TestClient(create_app(settings, pipeline, store, system=host))
    body = c.get("/api/status", headers={"Authorization": "Bearer key-abcdefgh"}).json()
    assert "cannot be opened" in body["camera"]["preview_note"]
    assert "secret" not in body["camera"]["preview_note"]  # URL credentials masked
    assert body["present"][0]["match"] == "borderline"
    assert body["present"][0]["confidence"] == 0.3
