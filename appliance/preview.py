"""The status page's preview: the latest frame with each track's box and name, as JPEG.

The processing thread only keeps a reference to the frame and the boxes
(:meth:`Preview.keep`); the JPEG is drawn and encoded in the caller's thread when asked
(:meth:`Preview.latest_jpeg`), at most every ``PREVIEW_MIN_INTERVAL_S``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import cv2
import numpy as np

PREVIEW_MIN_INTERVAL_S = 0.5
PREVIEW_MAX_WIDTH = 960

Box = tuple[float, float, float, float]
Colour = tuple[int, int, int]
GREEN, RED, YELLOW = (0, 200, 0), (0, 0, 230), (0, 200, 230)  # BGR


def box_label(track_id: int, label: str | None) -> tuple[str, Colour]:
    """The text and colour of one track's box: a name in green, "unknown" in red, an
    undecided track's number in yellow."""
    text = label or f"#{track_id}"
    if label is None:
        return text, YELLOW
    return text, RED if label == "unknown" else GREEN


class Preview:
    """The latest frame and its boxes (thread-safe), and its JPEG encoded on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._image: np.ndarray | None = None
        self._boxes: list[tuple[Box, str, Colour]] = []
        self._jpeg: bytes | None = None
        self._encoded_at = 0.0

    def keep(self, image: np.ndarray, tracks: Sequence[tuple[Box, int, str | None]]) -> None:
        """Keep ``image`` (a reference: frames are never modified in place) and the boxes of
        ``tracks``: (box, track id, label or None while undecided)."""
        boxes = [(box, *box_label(track_id, label)) for box, track_id, label in tracks]
        with self._lock:
            self._image = image
            self._boxes = boxes

    def latest_jpeg(self) -> bytes | None:
        """The latest frame with boxes and names, as JPEG; encoded on demand in the caller's
        thread, at most every 0.5 s (a cached copy in between). None before the first frame."""
        with self._lock:
            now = time.monotonic()
            if self._jpeg is not None and now - self._encoded_at < PREVIEW_MIN_INTERVAL_S:
                return self._jpeg
            if self._image is None:
                return self._jpeg
            image, boxes = self._image, list(self._boxes)
        jpeg = annotate_jpeg(image, boxes)
        with self._lock:
            self._jpeg, self._encoded_at = jpeg, time.monotonic()
        return jpeg


def annotate_jpeg(image: np.ndarray, boxes: Sequence[tuple[Box, str, Colour]]) -> bytes:
    """``image`` scaled to at most ``PREVIEW_MAX_WIDTH`` wide with the labelled boxes drawn."""
    scale = min(1.0, PREVIEW_MAX_WIDTH / image.shape[1])
    canvas = (cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
              if scale < 1.0 else image.copy())
    for box, label, colour in boxes:
        x1, y1, x2, y2 = (int(np.rint(v * scale)) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, 2)
        cv2.putText(canvas, label, (x1, max(12, y1 - 6)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    colour, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return buf.tobytes() if ok else b""
