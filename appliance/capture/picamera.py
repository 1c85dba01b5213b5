"""The Raspberry Pi camera through picamera2, imported only when this source is used."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from appliance.capture.base import SourceError

_LOGGER = logging.getLogger(__name__)


class Picamera2Source:
    """The Pi's CSI camera. ``picamera2`` (python3-picamera2 or the ``pi`` extra) is imported
    lazily, so the rest of the appliance runs on any machine."""

    live = True

    def __init__(self, width: int = 1280, height: int = 720, fps: float = 15.0) -> None:
        self.width, self.height, self.requested_fps = width, height, fps
        self.description = "picamera2"
        self._cam: Any = None

    def open(self) -> None:
        self.close()
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError as err:
            raise SourceError(
                "picamera2 is not installed (apt install python3-picamera2, or pip install "
                "-e '.[pi]')"
            ) from err
        try:
            cam = Picamera2()
            # libcamera's "RGB888" is B, G, R in memory: the BGR order OpenCV expects.
            config = cam.create_video_configuration(
                main={"size": (self.width, self.height), "format": "RGB888"},
                controls={"FrameRate": self.requested_fps},
                buffer_count=2,
            )
            cam.configure(config)
            cam.start()
        except Exception as err:  # picamera2 raises plain RuntimeError/IndexError etc.
            raise SourceError(f"cannot start the Pi camera: {err}") from err
        self._cam = cam

    def read(self) -> np.ndarray | None:
        if self._cam is None:
            raise SourceError("Pi camera is not open")
        try:
            frame = self._cam.capture_array("main")
        except Exception as err:
            raise SourceError(f"Pi camera stopped delivering frames: {err}") from err
        if frame.ndim == 3 and frame.shape[2] == 4:
            frame = frame[:, :, :3]
        return np.ascontiguousarray(frame)

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is None:
            return
        try:
            cam.stop()
            cam.close()
        except Exception as err:
            _LOGGER.warning("closing the Pi camera: %s", err)

    @property
    def fps(self) -> float | None:
        return self.requested_fps
