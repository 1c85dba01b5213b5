"""`appliance replay`: the full pipeline over every frame of a video file, and its report
(what `make bench` and the tests read)."""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.capture import VideoFileSource
from appliance.config import ApplianceSettings
from appliance.pipeline import Pipeline
from appliance.recognition import FileRosterProvider
from appliance.store import Store
from appliance.vision.embedder_process import own_peak_rss_mb


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB: its own (VmHWM) where Linux says it,
    else ru_maxrss (which, in a process started by (v)fork + exec, includes its parent's peak:
    a replay started from a large test process would report that process's size)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(own_peak_rss_mb(peak / (1024 * 1024 if sys.platform == "darwin" else 1024)),
                 1)


def replay_video(
    settings: ApplianceSettings,
    video: Path,
    roster: Path | None,
    *,
    realtime: bool = False,
    store_path: Path | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """The full pipeline over every frame of a video file; the report `appliance replay`
    prints. Records go to ``store_path`` or to a throw-away store."""
    with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
        store = Store(store_path or Path(tmp) / "replay.db")
        provider = FileRosterProvider(roster)
        if roster is not None and provider.error:
            store.close()
            raise FileNotFoundError(provider.error)
        pipeline = Pipeline(settings, store, provider, source=VideoFileSource(video),
                            every_frame=True, paced=realtime, loop=False)
        pipeline.capture.fail_fast = True  # a damaged file is an error, not a reopen loop
        pipeline.start()  # returns once the descriptor process has loaded its models
        t0, cpu0, child_cpu0 = time.perf_counter(), time.process_time(), pipeline.embedder.cpu_s
        try:
            finished = pipeline.wait_finished(timeout_s)
            elapsed = time.perf_counter() - t0
            cpu_s = time.process_time() - cpu0 + pipeline.embedder.cpu_s - child_cpu0
        finally:
            pipeline.stop()
            store.close()
    cap = pipeline.capture
    if pipeline.error is not None:
        raise RuntimeError(f"replay failed: {pipeline.error}") from pipeline.error
    if cap.fatal_error is not None or cap.frames_read == 0:
        raise ValueError(cap.fatal_error or cap.last_error or f"{video}: no frame could be read")
    frames = pipeline.timer.frames
    return {
        "video": str(video),
        "frames": frames,
        "complete": bool(finished),
        "seconds": round(elapsed, 3),
        "fps": round(frames / elapsed, 2) if elapsed > 0 else 0.0,
        "cpu_ms_per_frame": round(cpu_s * 1e3 / max(frames, 1), 2),  # all threads + child
        "stage_ms": {k: round(v, 3) for k, v in pipeline.timer.total_means().items()},
        "records": [
            {"student_id": r.student_id, "name": r.name,
             "first_seen_s": None if r.pts_s is None else round(r.pts_s, 3),
             "confidence": round(r.confidence, 4),
             "distance": None if r.distance is None else round(r.distance, 4)}
            for r in pipeline.recorded
        ],
        "unknown_tracks": pipeline.unknown_tracks,
        "tracks": pipeline.tracker.total_tracks,
        "cuts": pipeline.cut_detector.cuts,
        "track_splits": pipeline.splits,
        "reverified": pipeline.reverified,
        "embeddings": pipeline.embeddings,
        "detected_frames": pipeline.detected_frames,  # detector.detect_every_frames
        "refined": pipeline.refined,  # crops refined at full resolution before a descriptor
        "roster_size": pipeline.roster_size,
        "peak_rss_mb": peak_rss_mb(),  # this process
        "embedder_peak_rss_mb": round(pipeline.embedder.peak_rss_mb, 1),  # descriptor child
        "events": None if pipeline.events is None else pipeline.events.status(),
    }
