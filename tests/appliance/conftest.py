"""Fixtures for the status page tests: settings in a tmp data dir, a real Store, and a small
in-test pipeline that serves a real PipelineStatus the test sets (the real Pipeline is used end
to end in test_browser.py)."""

from __future__ import annotations

import socket
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.config import ApplianceSettings, load
from appliance.status import PipelineStatus
from appliance.status import PresentEntry as Present
from appliance.store import Store
from appliance.system import SystemSnapshot

__all__ = ["Present"]  # the tests build present students with it


class ScriptedPipeline:
    """Serves whatever status the test sets; the preview is a synthetic JPEG."""

    def __init__(self) -> None:
        now = datetime.now(UTC)
        self._lock = threading.Lock()
        self.current = PipelineStatus(
            camera_source="rtsp://admin:hunter2@10.0.0.9/stream", camera_state="ok",
            last_frame_at=now, frames=120, fps=7.5,
            stage_ms={"decode": 3.0, "detect": 21.5, "track": 0.4, "embed": 30.2,
                      "match": 0.1},
            room_id="LAB-301", course_id="CS101", course_name="Intro to Computing",
            present=[Present("s-0042", "Ada Lovelace", now - timedelta(minutes=3), 0.91)],
            unknown_count=2, tracks_active=1, started_at=now, roster_size=24,
        )
        frame = np.full((120, 160, 3), 60, np.uint8)
        cv2.rectangle(frame, (40, 20), (110, 100), (0, 255, 0), 2)
        self.jpeg: bytes | None = cv2.imencode(".jpg", frame)[1].tobytes()

    def set(self, **changes: object) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self.current, name, value)

    def status(self) -> PipelineStatus:
        with self._lock:
            return replace(self.current)

    def latest_preview_jpeg(self) -> bytes | None:
        return self.jpeg


def snapshot(**changes: float | None) -> SystemSnapshot:
    values: dict[str, object] = dict(
        cpu_percent=12.0, load_1m=0.4, cpu_count=4, memory_percent=40.0,
        memory_available_mb=2048.0, disk_percent=50.0, disk_free_gb=10.0, cpu_temp_c=48.0)
    values.update(changes)
    return SystemSnapshot(**values)  # type: ignore[arg-type]


class HostReadings:
    """A settable host reader (what psutil would say), so thresholds can be crossed."""

    def __init__(self) -> None:
        self.value = snapshot()

    def __call__(self) -> SystemSnapshot:
        return self.value

    def set(self, **changes: float | None) -> None:
        self.value = snapshot(**changes)


def free_port() -> int:
    """A port free right now on 127.0.0.1 (web.port must be >= 1, so no port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ApplianceSettings:
    for name in ("APPLIANCE_CONFIG", "APPLIANCE_SYNC__API_KEY", "APPLIANCE_WEB__PASSWORD_HASH"):
        monkeypatch.delenv(name, raising=False)
    return load(None, paths={"data_dir": tmp_path / "data"}, web={"port": free_port()})


@pytest.fixture
def store(settings: ApplianceSettings):
    st = Store(settings.paths.data_dir)
    yield st
    st.close()


@pytest.fixture
def pipeline() -> ScriptedPipeline:
    return ScriptedPipeline()


@pytest.fixture
def host() -> HostReadings:
    return HostReadings()
