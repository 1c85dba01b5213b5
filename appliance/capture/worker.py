"""The capture thread: reads a frame source, reopens it with backoff, hands frames over.

Two hand-over modes:

* newest only (live cameras, and `appliance run` with a file): a one-frame slot; a frame not
  taken before the next one arrives is dropped (counted in ``attendance_frames_dropped``), so
  the processing thread always works on the newest frame and never lags behind.
* every frame (`appliance replay`): a small bounded queue; the reader waits for the consumer.

A source that fails to open or stops delivering is closed and reopened after an exponential
backoff (0.5 s, 1 s, 2 s ... up to ``backoff_max_s``); the thread never dies of it and
:attr:`CaptureWorker.state` says what is going on. Except with ``fail_fast`` (replay): a video
file that cannot be opened or decoded ends the worker with :attr:`CaptureWorker.fatal_error`.
Video files can be paced at their own frame rate and looped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from appliance import metrics
from appliance.capture.base import Frame, FrameSource, SourceError
from appliance.logging_setup import LogThrottle

_LOGGER = logging.getLogger(__name__)

CameraState = Literal["starting", "ok", "reopening", "failed", "ended"]
DEFAULT_FILE_FPS = 25.0
RETRY_LOG_EVERY_S = 300.0
_SOURCES = ("a USB index such as 0, /dev/videoN, picamera2, an rtsp:// URL or a video "
            "file")
CAMERA_HINT = ("is the camera connected? Otherwise set camera.source in the config (or "
               f"APPLIANCE_CAMERA__SOURCE): {_SOURCES}")
FILE_HINT = f"set camera.source (or APPLIANCE_CAMERA__SOURCE) to an existing file, or {_SOURCES}"


class CaptureWorker:
    """Runs one :class:`FrameSource` in its own thread. start()/stop(); get() for frames."""

    def __init__(
        self,
        source: FrameSource,
        *,
        every_frame: bool = False,
        paced: bool = True,
        loop: bool = False,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        queue_size: int = 4,
        fail_fast: bool = False,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """``every_frame``: hand over every frame (replay) instead of the newest only;
        ``paced``: deliver a video file at its own frame rate (live sources are never paced);
        ``loop``: restart a video file at its end; ``fail_fast``: a video file that cannot be
        opened or decoded ends the worker ("failed", :attr:`fatal_error`) instead of being
        reopened (replay; a live source is always reopened); ``clock``: the wall time
        frames are stamped with (default: the system clock)."""
        self.source = source
        self.every_frame = every_frame
        self.paced = paced
        self.loop = loop
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = max(backoff_max_s, backoff_initial_s)
        self.fail_fast = fail_fast
        # the wall time frames are stamped with (the device's trusted clock: appliance.clock)
        self._now: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.fatal_error: str | None = None
        self._retry_log = LogThrottle(RETRY_LOG_EVERY_S)
        self.state: CameraState = "starting"
        self.last_error: str | None = None
        self.last_frame_at: datetime | None = None
        self.frames_read = 0
        self.dropped = 0
        self.reopens = 0
        self.fps: float | None = None
        self._ever_ok = False
        self._failures = 0
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize=queue_size)
        self._slot: Frame | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ended = threading.Event()
        self._thread: threading.Thread | None = None
        self._origin_wall = self._now()
        self._origin_mono = time.monotonic()
        # a file read unpaced: the wall time of its first frame (a recorded session's start,
        # so its frames carry the time they were filmed); None: the time start() is called
        self.file_origin: datetime | None = None

    @property
    def description(self) -> str:
        return self.source.description

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._origin_wall = self.file_origin or self._now()
        self._origin_mono = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                _LOGGER.warning("capture thread did not stop within %.0f s", timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def finished(self) -> bool:
        """True once a video file ended (no loop) and every frame was taken."""
        if not self._ended.is_set():
            return False
        if self.every_frame:
            return self._queue.empty()
        with self._cond:
            return self._slot is None

    # -- consumer side --------------------------------------------------------------------------
    def get(self, timeout: float = 0.5) -> Frame | None:
        """The next frame (newest-only mode: the newest one), or None after ``timeout``."""
        if self.every_frame:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    return self._queue.get(timeout=min(0.05, max(0.0, timeout)))
                except queue.Empty:
                    if self._ended.is_set() or self._stop.is_set():
                        return None
                    if time.monotonic() >= deadline:
                        return None
        with self._cond:
            if self._slot is None:
                self._cond.wait_for(
                    lambda: self._slot is not None or self._ended.is_set()
                    or self._stop.is_set(),
                    timeout,
                )
            frame, self._slot = self._slot, None
            return frame

    # -- capture thread -------------------------------------------------------------------------
    def _set_state(self, state: CameraState, error: str | None = None) -> None:
        if state != self.state:
            if state == "ok":
                self._retry_log.reset("retry")
                _LOGGER.info("camera %s: ok", self.description)
            elif state == "failed" and not self._ever_ok and self.fatal_error is None:
                _LOGGER.warning("camera %s: %s (%s); %s", self.description, state, error,
                                CAMERA_HINT if self.source.live else FILE_HINT)
            elif state in ("reopening", "failed"):
                _LOGGER.warning("camera %s: %s (%s)", self.description, state, error)
            else:
                _LOGGER.info("camera %s: %s", self.description, state)
        self.state = state
        if state == "ok":
            self._ever_ok = True
        if error is not None:
            self.last_error = error
        metrics.CAMERA_UP.set(1 if state == "ok" else 0)

    def _emit(self, frame: Frame) -> None:
        if self.every_frame:
            while not self._stop.is_set():
                try:
                    self._queue.put(frame, timeout=0.1)
                    return
                except queue.Full:
                    continue
            return
        with self._cond:
            if self._slot is not None:
                self.dropped += 1
                metrics.FRAMES_DROPPED.inc()
            self._slot = frame
            self._cond.notify_all()

    def _backoff(self, failures: int) -> float:
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, failures - 1))

    def _run(self) -> None:
        self._failures = 0
        file_offset_s = 0.0  # video time of the loops already played (non-live sources)
        while not self._stop.is_set():
            try:
                self.source.open()
            except SourceError as err:
                if self._give_up(err):
                    return
                self._failures += 1
                delay = self._backoff(self._failures)
                self._set_state("reopening" if self._ever_ok else "failed", str(err))
                # at every retry: the first line, then one every few minutes (with a count)
                self._retry_log.log(_LOGGER, logging.INFO, "retry",
                                    "camera %s still unavailable (%s): retrying, next in %.1f s",
                                    self.description, err, delay)
                self._stop.wait(delay)
                continue
            self.fps = self.source.fps
            try:
                outcome, played_s = self._read_loop(file_offset_s)
            except SourceError as err:
                self.source.close()
                if self._give_up(err):
                    return
                self._failures += 1
                delay = self._backoff(self._failures)
                self._set_state("reopening", str(err))
                self._stop.wait(delay)
                continue
            self.source.close()
            if outcome == "stopped":
                break
            if outcome == "end":
                if self.loop:
                    file_offset_s += played_s
                    self.reopens += 1
                    continue
                self._set_state("ended")
                self._ended.set()
                with self._cond:
                    self._cond.notify_all()
                return
        self.source.close()

    def _give_up(self, err: SourceError) -> bool:
        """fail_fast and a video file: end in "failed" (a reopen would fail the same way)."""
        if not self.fail_fast or self.source.live:
            return False
        self.fatal_error = str(err)
        self._set_state("failed", str(err))
        self._ended.set()
        with self._cond:
            self._cond.notify_all()
        return True

    def _read_loop(self, file_offset_s: float) -> tuple[str, float]:
        """Read until the end of a file ("end") or stop ("stopped"); SourceError on failure."""
        live = self.source.live
        fps = self.fps or DEFAULT_FILE_FPS
        start_mono = time.monotonic()
        n = 0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            image = self.source.read()
            decode_ms = (time.perf_counter() - t0) * 1000.0
            if image is None:
                return "end", n / fps
            if live:
                pts = time.monotonic() - self._origin_mono
                at = self._now()
            else:
                pts = file_offset_s + n / fps
                if self.paced:
                    wait = start_mono + n / fps - time.monotonic()
                    if wait > 0 and self._stop.wait(wait):
                        return "stopped", n / fps
                    at = self._now()
                else:
                    at = self._origin_wall + timedelta(seconds=pts)
            n += 1
            frame = Frame(image=image, index=self.frames_read, pts_s=pts, captured_at=at,
                          decode_ms=decode_ms)
            self.frames_read += 1
            self.last_frame_at = at
            if self.state != "ok":
                self._set_state("ok")
                self._failures = 0
            self._emit(frame)
        return "stopped", n / fps
