"""Capture: frame sources (Pi camera, USB/V4L2, RTSP/HTTP streams, video files) and the
capture thread that reopens them with backoff and hands the newest frame to the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from appliance.capture.base import Frame, FrameSource, SourceError
from appliance.capture.opencv import OpenCVCameraSource, VideoFileSource
from appliance.capture.picamera import Picamera2Source
from appliance.capture.worker import CameraState, CaptureWorker

if TYPE_CHECKING:
    from appliance.config import CameraConfig

__all__ = [
    "CameraState",
    "CaptureWorker",
    "Frame",
    "FrameSource",
    "OpenCVCameraSource",
    "Picamera2Source",
    "SourceError",
    "VideoFileSource",
    "make_source",
]


def make_source(spec: str, width: int = 1280, height: int = 720, fps: float = 15.0) -> FrameSource:
    """The source for a ``camera.source`` value: ``picamera2``, a USB index (``0``), a device
    (``/dev/video0``), a URL (``rtsp://``, ``http(s)://`` ...) or a video file path."""
    spec = spec.strip()
    if spec.lower() == "picamera2":
        return Picamera2Source(width, height, fps)
    if spec.isdigit() or spec.startswith("/dev/"):
        return OpenCVCameraSource(spec, width, height, fps)
    if spec.startswith("file://"):
        return VideoFileSource(Path(spec.removeprefix("file://")))
    if "://" in spec:
        return OpenCVCameraSource(spec, width, height, fps)
    return VideoFileSource(Path(spec))


def source_from_config(cfg: CameraConfig) -> FrameSource:
    return make_source(cfg.source, cfg.width, cfg.height, cfg.fps)
