"""The recognition pipeline: frames in, attendance records out. The only module that knows
every stage.

Threads:

* capture (:class:`appliance.capture.CaptureWorker`): reads the camera/stream/file, reopens it
  with backoff when it fails, and hands over the newest frame (live) or every frame (replay).
* processing (:meth:`Pipeline._run`): per frame, detect -> track -> pick the tracks that
  deserve a descriptor (their best crop so far) -> hand those crops to the embedding thread;
  then match the descriptors that came back -> vote -> debounce -> store. Descriptors are
  computed only for tracks not yet decided, best crops first, at most
  ``recognition.max_embeddings_per_track`` per track and ``recognition.max_embeddings_per_frame``
  per frame, never for every face of every frame.
* embedding (:meth:`Pipeline._embed_loop`): hands the queued crops to a child process
  (:class:`appliance.vision.embedder_process.EmbedderProcess`) that computes the descriptors
  on another core; if the child dies it is restarted and the pipeline goes on.

Callers on other threads (status page, watchdog) use :meth:`Pipeline.status`
(:mod:`appliance.status`) and :meth:`Pipeline.latest_preview_jpeg` (:mod:`appliance.preview`),
which encodes an annotated frame only when asked, at most ~2 times a second. Which class is on
and its roster: :mod:`appliance.class_roster`; face sizes per class (the placement check):
:mod:`appliance.placement`; `appliance replay` is :mod:`appliance.replay`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np

from appliance import metrics
from appliance.capture import CaptureWorker, Frame, FrameSource, source_from_config
from appliance.class_roster import ClassRoster
from appliance.clock import DeviceClock
from appliance.config import ApplianceSettings, DetectorConfig
from appliance.decision import Debouncer, Decision, Sample, TrackVote
from appliance.placement import PlacementStats, observe_live
from appliance.preview import Preview
from appliance.recognition import (
    FileRosterProvider,
    RosterProvider,
)
from appliance.status import PipelineStatus, PresentEntry, StageTimer
from appliance.store import Store
from appliance.tracking import CutDetector, Track, Tracker
from appliance.vision.detector import Detection
from appliance.vision.detectors import Detector, detector_from_config
from appliance.vision.embedder_process import EMBED_TIMEOUT_S, EmbedderProcess, InProcessEmbedder
from appliance.vision.embedding import Embedder
from cloud_sync.protocol import EMBEDDING_DIM, AttendanceRecord

if TYPE_CHECKING:
    from appliance.events import ClassroomEvents

_LOGGER = logging.getLogger(__name__)

STALL_S = 30.0
REPLAY_MAX_LAG_FRAMES = 24
MAX_RECORD_LAG_S = 600.0  # a track older than this at its record: the clock jumped
REFRESH_QUALITY_RATIO = 0.9  # a refresh descriptor needs a crop this close to the best one
CROP_MARGIN = 1.0  # context kept around a face crop (in face sizes), as the embedder keeps


def _descriptor(vector: np.ndarray | None) -> list[float] | None:
    if vector is None or vector.shape != (EMBEDDING_DIM,) or not np.all(np.isfinite(vector)):
        return None
    return [float(v) for v in vector]


@dataclass
class TrackState:
    """What the pipeline keeps per track (in ``Track.data['state']``)."""

    vote: TrackVote
    embedded: int = 0
    best_quality: float = -1.0
    last_embed_frame: int = -(10**9)
    # quality, crop, detection in the crop, frame, whether to refine it before embedding
    candidate: tuple[float, np.ndarray, Detection, int, bool] | None = None
    label: str | None = None
    in_flight: bool = False  # a crop of this track is queued for / in the embedding thread
    desc_sum: np.ndarray | None = None  # quality-weighted sum of the track's descriptors
    desc_weight: float = 0.0


def _label(track: Track) -> str | None:
    """The name (or "unknown") the track was decided as; None while undecided."""
    state = track.data.get("state")
    return state.label if state is not None else None


@dataclass
class _EmbedJob:
    track: Track
    state: TrackState
    quality: float
    crop: np.ndarray
    det: Detection
    frame_index: int = 0
    embedding: np.ndarray | None = None
    ms: float = 0.0


@dataclass(frozen=True)
class RecordedSighting:
    """One attendance record written by this pipeline (for replay reports and tests)."""

    student_id: str
    name: str
    seen_at: datetime
    pts_s: float | None
    confidence: float
    distance: float | None
    track_id: int
    key: uuid.UUID
    decided_pts_s: float | None = None  # video time of the frame the decision was made in


def detector_config_for_pipeline(settings: ApplianceSettings) -> DetectorConfig:
    """``detector`` settings with the interpreter threads capped at cores - 1: the embedding
    and capture threads run beside detection, and an interpreter thread pool as wide as the
    machine only makes them fight for the cores (on 2 cores: 1 thread is ~1.5x faster here;
    a Pi 4 keeps its 2 threads)."""
    cfg = settings.detector
    cap = max(1, (os.cpu_count() or 1) - 1)
    if cfg.threads <= cap:
        return cfg
    _LOGGER.info("detector threads %d -> %d (%d cores, one left for descriptors)",
                 cfg.threads, cap, os.cpu_count())
    return cfg.model_copy(update={"threads": cap})


def _classroom_events(settings: ApplianceSettings, store: Store) -> ClassroomEvents | None:
    """Occupancy, attention and unknown-face events (``events.enabled``), or None."""
    if not settings.events.enabled:
        return None
    from appliance.events import ClassroomEvents

    return ClassroomEvents(settings, store)


def crop_for_embedding(frame: np.ndarray, det: Detection,
                       margin: float = CROP_MARGIN) -> tuple[np.ndarray, Detection]:
    """A copy of the face region (with margin, so alignment has context) and the detection
    moved into the crop's coordinates: lets the pipeline keep the best crop of a track
    without holding whole frames."""
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = det.box
    m = margin * max(x2 - x1, y2 - y1)
    cx1, cy1 = max(0, int(x1 - m)), max(0, int(y1 - m))
    cx2, cy2 = min(w, int(np.ceil(x2 + m))), min(h, int(np.ceil(y2 + m)))
    crop = np.ascontiguousarray(frame[cy1:cy2, cx1:cx2])
    moved = Detection(
        box=(x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1), score=det.score,
        keypoints=(det.keypoints - np.array([cx1, cy1], dtype=np.float32)).astype(np.float32),
    )
    return crop, moved


def refine_for_embedding(detector: Detector, crop: np.ndarray, det: Detection,
                         quality: Callable[[np.ndarray, Detection], float], min_quality: float
                         ) -> tuple[Detection, float] | None:
    """A crop picked for a descriptor whose face was small in the detector's scaled-down
    input: its landmarks again from a detector pass on the full-resolution crop
    (``detector.refine_landmarks``, YuNet), and the quality gate judged on them only (the
    coarse landmarks of a small face are too rough to judge its pose and chip sharpness by).
    Returns the detection to embed and its quality, or None when that crop is below
    ``min_quality`` (no descriptor). A detector without ``refine``, or a refine pass that
    finds no face, keeps ``det``, gated on its own landmarks."""
    refine = getattr(detector, "refine", None)
    refined = refine(crop, det) if refine is not None else None
    picked = det if refined is None else refined
    q = float(quality(crop, picked))
    return (picked, q) if q >= min_quality else None


# --- the pipeline -----------------------------------------------------------------------------

class Pipeline:
    """Capture + processing threads; start()/stop(); status() and latest_preview_jpeg()."""

    def __init__(
        self,
        settings: ApplianceSettings,
        store: Store,
        roster_provider: RosterProvider | None = None,
        *,
        source: FrameSource | None = None,
        every_frame: bool = False,
        paced: bool = True,
        loop: bool | None = None,
        detector: Detector | None = None,
        embedder: Embedder | None = None,
        quality: Callable[[np.ndarray, Detection], float] | None = None,
        unknown_sink: Callable[[np.ndarray, np.ndarray, datetime], None] | None = None,
        clock: DeviceClock | None = None,
    ) -> None:
        """Live use: ``Pipeline(settings, store, provider)`` (source from ``camera``).
        Replay: pass ``source=VideoFileSource(path), every_frame=True, paced=realtime``.
        ``clock``: the device's clock (appliance.clock: frames, records and the class are
        stamped with its time and whether it is trusted); default: the system clock, trusted
        when NTP-synchronised."""
        from appliance.vision.quality import face_quality

        self.settings = settings
        self.clock = clock or DeviceClock(settings.clock)
        self._unknown_sink = unknown_sink
        self.store = store
        model_dir = settings.paths.model_dir
        self.detector = detector or detector_from_config(
            detector_config_for_pipeline(settings), model_dir)
        self.embedder: EmbedderProcess | InProcessEmbedder = (
            InProcessEmbedder(embedder) if embedder is not None
            else EmbedderProcess(model_dir, settings.detector.model,
                                 settings.recognition.embedder))
        # `name/model_version` a roster must have been made by (descriptors of another
        # embedder are not comparable): the configured one, or the injected embedder's
        from appliance.vision.embedding import spec

        self.embedder_spec = spec(getattr(embedder, "name", settings.recognition.embedder))
        self.quality = quality or face_quality
        self.roster_provider: RosterProvider = roster_provider or FileRosterProvider(
            settings.recognition.roster_file)
        self.classes = ClassRoster(self.roster_provider, store, settings.recognition,
                                   self.embedder_spec)
        src = source or source_from_config(settings.camera)
        self.capture = CaptureWorker(
            src, every_frame=every_frame, paced=paced,
            loop=settings.camera.loop_file if loop is None else loop,
            backoff_max_s=settings.camera.reopen_backoff_max_s, clock=self.clock.now,
        )
        # frames stamped by the clock (live, or a file at its own pace), not by a file's time
        self._clock_stamped = src.live or paced
        self.tracker = Tracker()
        # detection every Nth frame, at once after a cut (detector.detect_every_frames)
        self.detect_every = max(1, settings.detector.detect_every_frames)
        self._refine = (settings.detector.refine_landmarks
                        and hasattr(self.detector, "needs_refine"))
        self._last_detect_frame: int | None = None
        self.detected_frames = 0
        self.refined = 0  # crops whose landmarks were refined at full resolution
        self.cut_detector = CutDetector()
        self.placement = PlacementStats()  # face sizes per class (the status page's check)
        self.splits = 0  # tracks whose face changed (descriptors disagreed): new identity
        self.reverified = 0  # descriptors computed for already decided tracks
        self._now: tuple[datetime | None, float | None] = (None, None)  # current frame
        self.timer = StageTimer()
        self.recorded: list[RecordedSighting] = []
        self.unknown_tracks = 0
        self.decided_tracks = 0
        self.embeddings = 0
        self.started_at = self.clock.now()
        cfg = settings.decision
        self.debouncer = Debouncer(cfg.debounce_s)
        # an encrypted store still waiting for its key is read when the pipeline starts
        self._seed_pending = bool(getattr(store, "locked", False))
        if not self._seed_pending:
            self._seed_debounce(self.started_at)
        self._present: dict[str, PresentEntry] = {}
        self._unknown_in_class = 0
        self._frames = 0
        self._frame_times: deque[float] = deque(maxlen=60)
        self._last_frame_at: datetime | None = None
        self._lock = threading.Lock()
        self.preview = Preview()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = time.monotonic()
        self.error: BaseException | None = None
        self.frame_errors = 0
        self._last_error_log = -1e9
        rcfg = settings.recognition
        self._jobs: queue.Queue[_EmbedJob] = queue.Queue(
            maxsize=2 * rcfg.max_embeddings_per_frame)
        self._done: queue.SimpleQueue[_EmbedJob] = queue.SimpleQueue()
        self._pending_jobs = 0  # queued or running (processing thread only)
        self._pending_frames: deque[int] = deque()  # frame index of each pending request
        # replay: descriptors may lag this many frames behind detection, no more (below)
        self.max_lag_frames: int | None = REPLAY_MAX_LAG_FRAMES if every_frame else None
        self._embed_thread: threading.Thread | None = None
        self.events = _classroom_events(settings, store)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._seed_pending:
            self._seed_pending = False
            self._seed_debounce(self.clock.now())
        if self._thread is not None:
            return
        self._heartbeat = time.monotonic()
        if not self.embedder.start():
            _LOGGER.error("no descriptor process: faces are tracked but not recognised until "
                          "it starts")
        self.capture.start()
        self._embed_thread = threading.Thread(target=self._embed_loop, name="embedder",
                                              daemon=True)
        self._embed_thread.start()
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self._thread.start()
        _LOGGER.info("pipeline started on %s", self.capture.description)

    def stop(self) -> None:
        self._stop.set()
        self.capture.stop()
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._embed_thread is not None:
            self._embed_thread.join(timeout=EMBED_TIMEOUT_S + 5)
        self.embedder.stop()
        _LOGGER.info("pipeline stopped after %d frames", self._frames)

    def alive(self) -> bool:
        """Both threads running and the processing loop not stuck (for the watchdog)."""
        if self._thread is None or not self._thread.is_alive():
            return False
        if self._embed_thread is None or not self._embed_thread.is_alive():
            return False
        if not self.capture.is_alive() and self.capture.state != "ended":
            return False
        return time.monotonic() - self._heartbeat < STALL_S

    def wait_finished(self, timeout: float | None = None) -> bool:
        """For a video file without loop: wait until every frame went through."""
        return self._finished.wait(timeout)

    # -- processing thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                frame = self.capture.get(timeout=0.1 if self._pending_jobs else 0.5)
                if frame is None:
                    self._collect(timeout=0.0)
                    if self.capture.finished and not self._finished.is_set():
                        self._finish()
                    elif self._finished.is_set():
                        self._stop.wait(0.5)
                    continue
                try:
                    self.process(frame)
                except Exception as err:  # one bad frame must not end the pipeline
                    self.frame_errors += 1
                    if time.monotonic() - self._last_error_log > 60:
                        self._last_error_log = time.monotonic()
                        _LOGGER.exception("frame %d failed (%d so far): %s", frame.index,
                                          self.frame_errors, err)
        except Exception as err:  # logged and visible via alive(): the watchdog restarts us
            self.error = err
            _LOGGER.exception("pipeline processing failed")
            raise

    def _finish(self) -> None:
        """End of a video file: wait for the descriptors still queued, then end the tracks."""
        while self._pending_jobs and not self._stop.is_set():
            self._heartbeat = time.monotonic()
            self._collect(timeout=0.5)
        self.placement.ended(self.tracker.flush())
        self._finished.set()

    # -- embedding thread -----------------------------------------------------------------------
    def _embed_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                job.embedding, job.ms = self.embedder.embed(job.crop, job.det)
            except Exception:  # one bad crop must not end recognition
                _LOGGER.exception("descriptor failed for track %d", job.track.track_id)
            metrics.EMBEDDING_SECONDS.observe(job.ms / 1e3)
            self._done.put(job)

    def _collect(self, timeout: float = 0.0) -> float:
        """Match and vote the descriptors the embedding thread finished; returns their ms."""
        jobs: list[_EmbedJob] = []
        try:
            jobs.append(self._done.get(timeout=timeout) if timeout > 0 else
                        self._done.get_nowait())
            while True:
                jobs.append(self._done.get_nowait())
        except queue.Empty:
            pass
        if not jobs:
            return 0.0
        self._pending_jobs -= len(jobs)
        for job in jobs:
            job.state.in_flight = False
            with contextlib.suppress(ValueError):
                self._pending_frames.remove(job.frame_index)
        done = [j for j in jobs if j.embedding is not None]
        self.embeddings += len(done)
        if done:
            self._match_and_decide(done)
        return sum(j.ms for j in jobs)

    def _refresh_roster(self, now: datetime) -> None:
        change = self.classes.refresh(now)
        if change is None:
            return
        self.placement.roster_size = self.roster_size
        if change.switched:
            self.placement.new_class(self.classes.course[0])
            with self._lock:
                self._present = change.present
                self._unknown_in_class = 0

    def _seed_debounce(self, now: datetime) -> None:
        window = timedelta(seconds=self.settings.decision.debounce_s)
        self.debouncer.seed(self.store.last_seen_by_student(now - window))

    def process(self, frame: Frame) -> list[Track]:
        """Run one frame through every stage (the processing thread calls this)."""
        now = frame.captured_at
        self._refresh_roster(now)
        self._wait_for_lagging(frame.index)
        image = frame.image
        if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
            # checked here, not only by the detector: it does not see every frame
            raise ValueError(f"expected a BGR image (h, w, 3), got shape {image.shape}")
        t0 = time.perf_counter()
        self._now = (now, frame.pts_s)
        cut = self.cut_detector.update(image)
        if cut:
            ended = self.tracker.cut()
            self.placement.ended(ended)
            _LOGGER.debug("frame %d: camera cut, %d tracks ended", frame.index, len(ended))
        detect = (cut or self._last_detect_frame is None
                  or frame.index - self._last_detect_frame >= self.detect_every
                  or frame.index < self._last_detect_frame)
        t1 = time.perf_counter()
        if detect:
            detections = self.detector.detect(image)
            t1 = time.perf_counter()
            self._last_detect_frame = frame.index
            self.detected_frames += 1
            tracks = self.tracker.update(detections, frame.index, at=now, pts_s=frame.pts_s)
            self.placement.ended(self.tracker.expired)
            observe_live(tracks)
        else:  # the tracks carried as they are; no crop comes from a frame not detected on
            tracks = list(self.tracker.tracks)
        t2 = time.perf_counter()
        if detect:
            self._schedule(image, tracks, frame.index)
        t3 = time.perf_counter()
        embed_ms = self._collect()
        self._decide_without_roster(tracks)
        t4 = time.perf_counter()
        # "embed": crop selection here plus the compute time of the descriptors that came
        # back since the previous frame (the child's work, accounted per frame)
        ms = {
            "decode": frame.decode_ms, "detect": (t1 - t0) * 1e3, "track": (t2 - t1) * 1e3,
            "embed": (t3 - t2) * 1e3 + embed_ms, "match": (t4 - t3) * 1e3,
        }
        metrics.FRAMES_PROCESSED.inc()
        if detect:
            metrics.DETECTION_SECONDS.observe(t1 - t0)
        with self._lock:
            self.timer.add(ms)
            self._frames += 1
            self._frame_times.append(time.monotonic())
            self._last_frame_at = now
            fps = self._fps_locked()
        metrics.FPS.set(fps)
        self.preview.keep(image, [(t.box, t.track_id, _label(t)) for t in tracks if t.matched])
        if self.events is not None:
            self.events.observe(image, now, tracks, self.classes.course[0], self.roster_size)
        return tracks

    def _wait_for_lagging(self, frame_index: int) -> float:
        """Replay only: wait for descriptors requested more than ``max_lag_frames`` ago.

        A replay runs faster than the video, and the descriptors (computed beside detection)
        would otherwise come back later and later in video time, so what is recognised would
        depend on the machine's speed. Live, frames are dropped instead and this never waits.
        Returns the milliseconds spent waiting (descriptor results matched meanwhile)."""
        if self.max_lag_frames is None:
            return 0.0
        ms = 0.0
        while (self._pending_frames and frame_index - self._pending_frames[0]
               > self.max_lag_frames and not self._stop.is_set()):
            t0 = time.perf_counter()
            self._collect(timeout=0.5)
            ms += (time.perf_counter() - t0) * 1e3
            self._heartbeat = time.monotonic()
        return ms

    # -- recognition scheduling -----------------------------------------------------------------
    def _state(self, track: Track) -> TrackState:
        state = track.data.get("state")
        if state is None:
            state = TrackState(vote=TrackVote.from_config(self.settings.decision))
            track.data["state"] = state
        return state

    def _schedule(self, image: np.ndarray, tracks: Sequence[Track], frame_index: int) -> int:
        """Queue the crops that get a descriptor this frame, best quality first; returns
        how many.

        Every undecided track seen in this frame keeps its best crop since its last
        descriptor (a small copy, not the frame). A track gets a descriptor when at least
        ``embed_min_gap_frames`` passed since its last one and that best crop beats the
        quality of every earlier sample, or ``embed_refresh_frames`` passed and the crop is
        nearly as good as the best one (so a track whose first crop was its best still
        collects the votes it needs, without spending descriptors on poor crops).

        A decided track (present or unknown) is re-verified: every ``reverify_frames`` it gets
        one more descriptor if this frame has room after the undecided tracks; a descriptor
        that disagrees with the track's earlier ones splits the track (see
        :meth:`_match_and_decide`)."""
        rcfg = self.settings.recognition
        if self.roster_size == 0:
            return 0
        due: list[tuple[float, Track, TrackState]] = []
        recheck: list[tuple[float, Track, TrackState]] = []
        for track in tracks:
            if not track.matched:
                continue
            state = self._state(track)
            decided = state.vote.decided
            if not decided and state.embedded >= rcfg.max_embeddings_per_track:
                continue
            if decided and frame_index - state.last_embed_frame < rcfg.reverify_frames // 2:
                continue  # a re-verification crop is picked in the second half of the period
            q = float(self.quality(image, track.detection))
            refine = self._refine and self.detector.needs_refine(  # type: ignore[attr-defined]
                track.detection, image.shape[1])
            # a face small in the detector's input is gated on its refined landmarks only (in
            # _dispatch); its coarse quality just ranks its crops
            if ((refine or q >= rcfg.min_quality)
                    and (state.candidate is None or q > state.candidate[0])):
                crop, det = crop_for_embedding(image, track.detection)
                state.candidate = (q, crop, det, frame_index, refine)
            if state.candidate is None or state.in_flight:
                continue
            since = frame_index - state.last_embed_frame
            if decided:
                if since >= rcfg.reverify_frames:
                    recheck.append((state.candidate[0], track, state))
                continue
            age = frame_index - track.first_frame
            if since < rcfg.embed_min_gap_frames or age + 1 < rcfg.embed_min_gap_frames:
                continue
            q = state.candidate[0]
            if q > state.best_quality or (since >= rcfg.embed_refresh_frames
                                          and q >= REFRESH_QUALITY_RATIO * state.best_quality):
                due.append((q, track, state))
        due.sort(key=lambda item: item[0], reverse=True)
        recheck.sort(key=lambda item: item[0], reverse=True)
        return self._dispatch((due + recheck)[: rcfg.max_embeddings_per_frame], frame_index)

    def _dispatch(self, picked: Sequence[tuple[float, Track, TrackState]],
                  frame_index: int) -> int:
        """Hand the picked tracks' candidate crops to the embedding thread (refined first
        where ``detector.refine_landmarks`` applies); returns how many were queued."""
        rcfg = self.settings.recognition
        queued = 0
        for q, track, state in picked:
            assert state.candidate is not None
            _, crop, det, _, refine = state.candidate
            if refine:
                refined = refine_for_embedding(self.detector, crop, det, self.quality,
                                               rcfg.min_quality)
                self.refined += 1
                if refined is None:  # below the gate on its full-resolution landmarks
                    state.candidate = None
                    continue
                det, q = refined
            try:
                self._jobs.put_nowait(_EmbedJob(track, state, q, crop, det, frame_index))
            except queue.Full:  # the embedding thread is behind: keep the crop for later
                break
            state.candidate = None
            state.in_flight = True
            state.last_embed_frame = frame_index
            state.embedded += 1
            state.best_quality = max(state.best_quality, q)
            self._pending_jobs += 1
            self._pending_frames.append(frame_index)
            queued += 1
        return queued

    def _disagrees(self, state: TrackState, embedding: np.ndarray) -> bool:
        """Whether a new descriptor is another person than the track's earlier ones (its
        distance to their mean is above the embedder's ``split_distance``)."""
        if state.desc_sum is None or state.desc_weight <= 0:
            return False
        mean = state.desc_sum / state.desc_weight
        if self.embedder_spec.metric == "cosine":
            denom = float(np.linalg.norm(mean) * np.linalg.norm(embedding)) or 1e-12
            distance = 1.0 - float(np.dot(mean, embedding)) / denom
        else:
            distance = float(np.linalg.norm(mean - embedding))
        return distance > self.settings.recognition.split_at()

    def _split(self, job: _EmbedJob) -> TrackState:
        """The track's face changed: a new identity (new id, new vote) that starts with this
        descriptor; what the old identity decided stays decided."""
        track = job.track
        old = self.tracker.split(track, at=self._now[0], pts_s=self._now[1])
        self.splits += 1
        state = self._state(track)
        state.embedded, state.best_quality = 1, job.quality
        state.last_embed_frame = job.frame_index
        _LOGGER.debug("track %d: descriptor disagrees with its earlier ones: now track %d",
                      old, track.track_id)
        return state

    def _match_and_decide(self, jobs: Sequence[_EmbedJob]) -> None:
        """Each new descriptor updates its track's quality-weighted mean descriptor, and the
        sample that goes to the vote is the match of that mean: the mean of several views of
        one face is closer to the person than any single view (one blurred or turned crop
        counts less), so the vote gets steadier as the track collects descriptors.

        A descriptor far from the track's mean (another person took the place of the track's
        face: a cut the detector missed, students swapping places) splits the track first; a
        re-verification descriptor of a decided track that agrees changes nothing."""
        means = []
        voting: list[_EmbedJob] = []
        for job in jobs:
            assert job.embedding is not None
            if job.track.data.get("state") is not job.state:
                continue  # the track was split since this crop was queued
            if job.state.vote.decided:
                self.reverified += 1
            if self._disagrees(job.state, job.embedding):
                job.state = self._split(job)
            elif job.state.vote.decided:
                continue
            state, w = job.state, max(job.quality, 1e-3)
            state.desc_sum = (job.embedding * w if state.desc_sum is None
                              else state.desc_sum + job.embedding * w)
            state.desc_weight += w
            means.append(state.desc_sum / state.desc_weight)
            voting.append(job)
        if not voting:
            return
        jobs = voting
        matcher = self.classes.matcher
        assert matcher is not None  # the roster was refreshed before any crop was queued
        matches = matcher.match(np.stack(means).astype(np.float32))
        for job, match, mean in zip(jobs, matches, means, strict=True):
            track, state, q = job.track, job.state, job.quality
            decision = state.vote.add(Sample(match.student_id, q, float(match.distance),
                                             float(match.confidence)))
            _LOGGER.debug("track %d frame %d q %.2f: %s at %.3f (2nd %.3f) -> %s",
                          track.track_id, track.last_frame, q, match.student_id,
                          match.distance, match.second_distance, decision.verdict)
            if decision.verdict == "pending":
                continue
            self.decided_tracks += 1
            metrics.RECOGNITIONS.labels(result=decision.verdict).inc()
            if decision.verdict == "unknown":
                state.label = "unknown"
                self._count_unknown()
                if self._unknown_sink is not None:  # appliance/unknown_faces.py, if enabled
                    self._unknown_sink(job.crop, mean, track.first_seen or datetime.now(UTC))
                continue
            assert decision.student_id is not None
            name = self.classes.names.get(decision.student_id, decision.student_id)
            state.label = name
            self._record(track, decision.student_id, name, decision.confidence,
                         decision.distance, mean)

    def _decide_without_roster(self, tracks: Sequence[Track]) -> None:
        """With an empty roster nobody can be recognised: a track is unknown at once."""
        if self.roster_size > 0:
            return
        for track in tracks:
            state = self._state(track)
            if not state.vote.decided and track.matched:
                state.vote.decision = Decision("unknown")
                state.label = "unknown"
                self.decided_tracks += 1
                metrics.RECOGNITIONS.labels(result="unknown").inc()
                self._count_unknown()

    def _count_unknown(self) -> None:
        with self._lock:
            self.unknown_tracks += 1
            self._unknown_in_class += 1

    def _record(self, track: Track, student_id: str, name: str, confidence: float,
                distance: float | None, descriptor: np.ndarray | None = None) -> None:
        clock = self.clock.reading()
        seen_at = track.first_seen or clock.at
        lag_s = (clock.at - seen_at).total_seconds()
        if self._clock_stamped and not 0.0 <= lag_s <= MAX_RECORD_LAG_S:
            seen_at, lag_s = clock.at, 0.0  # the clock became trusted since the sighting
        if not self.debouncer.allow(student_id, seen_at):
            _LOGGER.debug("track %d: %s again within the debounce window", track.track_id,
                          student_id)
            return
        record = AttendanceRecord(
            key=uuid.uuid4(), student_id=student_id, course_id=self.classes.course[0],
            room_id=self.settings.device.room_id, device_id=self.settings.device.device_id,
            seen_at=seen_at, confidence=max(0.0, min(1.0, confidence)),
            distance=None if distance is None else max(0.0, min(2.0, distance)),
            # trusted time, or flagged for the aggregator to place by this boot's heartbeats
            clock_synced=clock.trusted, boot_id=clock.boot_id,
            monotonic_s=max(0.0, clock.monotonic_s - lag_s),
            # the track's mean descriptor: lets a "not this student" correction become a
            # negative example in the roster (appliance/negatives.py)
            descriptor=_descriptor(descriptor),
            descriptor_embedder=self.embedder_spec.id if descriptor is not None else None,
        )
        self.store.add_record(record)
        metrics.ATTENDANCE_RECORDS.inc()
        metrics.OUTBOX_DEPTH.set(self.store.outbox_depth())
        sighting = RecordedSighting(student_id, name, seen_at, track.first_pts_s, confidence,
                                    distance, track.track_id, record.key, self._now[1])
        with self._lock:
            self.recorded.append(sighting)
            if student_id not in self._present:
                self._present[student_id] = PresentEntry(student_id, name, seen_at, confidence)
        _LOGGER.info("present: %s (%s) confidence %.2f, track %d", student_id, name,
                     confidence, track.track_id)

    # -- status ---------------------------------------------------------------------------------
    def _fps_locked(self) -> float:
        times = self._frame_times
        if len(times) < 2:
            return 0.0
        span = times[-1] - times[0]
        if time.monotonic() - times[-1] > 5.0:
            return 0.0
        return (len(times) - 1) / span if span > 0 else 0.0

    @property
    def roster_size(self) -> int:
        """Students in the active roster (0: everyone is unknown)."""
        return self.classes.size

    def status(self) -> PipelineStatus:
        cap = self.capture
        size = self.roster_size
        note = None
        if size == 0:
            why = self.classes.error or getattr(self.roster_provider, "error", None)
            note = "no roster: every face is unknown" + (f" ({why})" if why else "")
        with self._lock:
            return PipelineStatus(
                camera_source=cap.description, camera_state=cap.state,
                last_frame_at=self._last_frame_at or cap.last_frame_at, frames=self._frames,
                fps=round(self._fps_locked(), 2),
                stage_ms={k: round(v, 3) for k, v in self.timer.recent_means().items()},
                room_id=self.settings.device.room_id, course_id=self.classes.course[0],
                course_name=self.classes.course[1],
                present=sorted(self._present.values(), key=lambda p: p.first_seen),
                unknown_count=self._unknown_in_class,
                tracks_active=len(self.tracker.tracks), started_at=self.started_at,
                roster_size=size, note=note, camera_error=cap.last_error,
                frames_dropped=cap.dropped, placement=self.placement.summary(),
            )

    # -- preview -------------------------------------------------------------------------------
    def latest_preview_jpeg(self) -> bytes | None:
        """The latest frame with boxes and names, as JPEG (:meth:`Preview.latest_jpeg`)."""
        return self.preview.latest_jpeg()
