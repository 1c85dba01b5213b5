"""The frame-source interface: what every camera or video source provides."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

import numpy as np


class SourceError(RuntimeError):
    """A source cannot be opened or stopped delivering frames (it will be reopened)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame: BGR uint8, with its timing.

    ``index`` counts frames delivered by one capture worker (it keeps increasing across
    reopens and loops); ``pts_s`` is the position in the video for files, else seconds since
    the worker started; ``captured_at`` is the UTC wall time of the frame (for a file replayed
    as fast as possible: the replay's start time plus ``pts_s``); ``decode_ms`` is the time
    spent reading and decoding it.
    """

    image: np.ndarray
    index: int
    pts_s: float
    captured_at: datetime
    decode_ms: float


@runtime_checkable
class FrameSource(Protocol):
    """A camera, a stream or a video file. Not thread-safe: one capture thread uses it."""

    description: str
    live: bool  # True: a camera or stream (keep only the newest frame); False: a video file

    def open(self) -> None:
        """Open the device/stream/file; raise :class:`SourceError` when it cannot."""

    def read(self) -> np.ndarray | None:
        """The next BGR frame; None at the end of a video file; :class:`SourceError` when a
        live source stops delivering."""

    def close(self) -> None:
        """Release the device; safe to call twice or after a failed open."""

    @property
    def fps(self) -> float | None:
        """The source's nominal frame rate, when known."""
