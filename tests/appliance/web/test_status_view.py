"""What the status page says about the camera picture and the match confidence (the JSON the
page and /api/status share); the browser test looks at the rendered page."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from appliance.web.app import create_app
from appliance.web.view import match_label, preview_note
from tests.appliance.conftest import Present


@pytest.mark.parametrize(("confidence", "label"), [
    (0.91, "clear"), (0.75, "clear"), (0.6, "good"), (0.5, "good"), (0.49, "borderline"),
    (None, None),
])
def test_match_label(confidence, label) -> None:
    assert match_label(confidence) == label


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
                 present=[Present("s-2", "Alan Turing", datetime.now(UTC), 0.49)])
    settings = settings.model_copy(update={"sync": settings.sync.model_copy(
        update={"api_key": __import__("pydantic").SecretStr("key-abcdefgh")})})
    c = TestClient(create_app(settings, pipeline, store, system=host))
    body = c.get("/api/status", headers={"Authorization": "Bearer key-abcdefgh"}).json()
    assert "cannot be opened" in body["camera"]["preview_note"]
    assert "secret" not in body["camera"]["preview_note"]  # URL credentials masked
    assert body["present"][0]["match"] == "borderline"
    assert body["present"][0]["confidence"] == 0.49
