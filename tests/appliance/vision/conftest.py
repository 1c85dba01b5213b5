"""Shared vision fixtures: one detector per model for the whole session (loading costs ~50 ms)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.vision.detector import FaceDetector


@pytest.fixture(scope="session")
def detector(model_dir: Path) -> FaceDetector:
    return FaceDetector(model_dir, model="full_range", min_face_px=20)


@pytest.fixture(scope="session")
def short_detector(model_dir: Path) -> FaceDetector:
    return FaceDetector(model_dir, model="short_range", min_face_px=20)
