"""OpenCV sources: USB cameras (index or /dev/videoN), RTSP/HTTP streams, and video files."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np

from appliance.capture.base import SourceError
from cloud_sync.settings import mask_url_password

_LOGGER = logging.getLogger(__name__)

STREAM_TIMEOUT_MS = 5000
_VIDEO_NODE = re.compile(r"video(\d+)")
# OpenCV's own warnings ("[ WARN:0@5.024] global cap_v4l.cpp:914 ... can't open camera by
# index") go straight to stderr at every reopen; the capture worker logs what went wrong and
# what to do instead. Errors still show.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def v4l2_device(spec: str) -> int | str:
    """The V4L2 index of ``0``, ``/dev/video0`` or a link to it (``/dev/v4l/by-id/...``):
    OpenCV's V4L2 backend opens cameras by index, not by file name."""
    if spec.isdigit():
        return int(spec)
    match = _VIDEO_NODE.fullmatch(Path(spec).resolve().name)
    return int(match.group(1)) if match else spec


def _release(cap: cv2.VideoCapture | None) -> None:
    if cap is not None:
        cap.release()


class OpenCVCameraSource:
    """A V4L2 camera (``0``, ``/dev/video0``) or a network stream (``rtsp://...``,
    ``http://...``). Network streams open and read with a timeout, so an unreachable camera
    fails fast instead of hanging the capture thread."""

    live = True

    def __init__(self, spec: str, width: int = 1280, height: int = 720, fps: float = 15.0) -> None:
        self.spec = spec
        self.width, self.height, self.requested_fps = width, height, fps
        self.is_stream = "://" in spec
        self.description = mask_url_password(spec)  # logs, status page
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        self.close()
        if self.is_stream:
            cap = cv2.VideoCapture(self.spec, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
            ])
        else:
            device = v4l2_device(self.spec)
            cap = cv2.VideoCapture(device, cv2.CAP_V4L2 if isinstance(device, int)
                                   else cv2.CAP_ANY)
        if not cap.isOpened():
            _release(cap)
            raise SourceError(f"cannot open camera {self.description}")
        if not self.is_stream:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            cap.set(cv2.CAP_PROP_FPS, self.requested_fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self._cap = cap

    def read(self) -> np.ndarray | None:
        if self._cap is None:
            raise SourceError(f"camera {self.description} is not open")
        ok, frame = self._cap.read()
        if not ok or frame is None:
            raise SourceError(f"camera {self.description} stopped delivering frames")
        return frame

    def close(self) -> None:
        _release(self._cap)
        self._cap = None

    @property
    def fps(self) -> float | None:
        if self._cap is None:
            return None
        value = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        return value if 0 < value < 1000 else None


class VideoFileSource:
    """A video file, read frame by frame. ``read`` returns None at the end."""

    live = False

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        self._cap: cv2.VideoCapture | None = None
        self._fps: float | None = None
        self.expected_frames: int | None = None  # from the container, when it says
        self._delivered = 0

    def open(self) -> None:
        self.close()
        if not self.path.is_file():
            raise SourceError(f"video file {self.path} does not exist")
        # one decoder thread: a file's frames are decoded beside detection, and FFmpeg's
        # thread pool would only compete with it (0.36 vs 0.5-0.65 ms CPU per 640x360 frame)
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
        if not cap.isOpened():
            _release(cap)
            raise SourceError(f"video file {self.path} is not a readable video (not a video, "
                              "or truncated or damaged: FFmpeg cannot open it)")
        value = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._fps = value if 0 < value < 1000 else None
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.expected_frames = count if count > 0 else None
        self._cap = cap
        self._delivered = 0

    def read(self) -> np.ndarray | None:
        if self._cap is None:
            raise SourceError(f"video file {self.path} is not open")
        ok, frame = self._cap.read()
        if not ok or frame is None:
            if self._delivered == 0:
                raise SourceError(f"video file {self.path} has no readable frame (damaged, or "
                                  "a codec FFmpeg cannot decode)")
            expected = self.expected_frames
            if expected is not None and self._delivered < expected - max(2, expected // 50):
                raise SourceError(
                    f"video file {self.path}: decoding stopped at frame {self._delivered} of "
                    f"{expected}: the file is damaged or truncated")
            return None
        self._delivered += 1
        return frame

    def close(self) -> None:
        _release(self._cap)
        self._cap = None

    @property
    def fps(self) -> float | None:
        return self._fps
