"""One recording job: the device's own pipeline over the recording, then its records through
the device ingest path.

1. **Analyse.** :class:`appliance.pipeline.Pipeline` (the same detector, tracker, descriptor
   child process, matcher, vote, debounce and classroom events as a device; nothing copied)
   reads the file unpaced, every frame, with frame times starting at the recording's start, and
   the roster of the recording's course (the rosters a device would get, for the first
   configured embedder). Records and events land in a throw-away device store. The pipeline's
   own per-frame result (its tracks and what each was decided to be) also gives the
   instructor's presence: the frames in which a track decided as the instructor is seen.
2. **Write.** Records go through ``services/ingest.ingest_batch`` as from a device: the
   recording's device is a per-room ``rec-<room>`` device row whose key nobody knows (so no one
   can send as it); records carry ``boot_id = "recording:<id>"`` (their source). A record's key
   is derived from course + class occurrence + student, so a retried job, or two recordings of
   the same class, write a student's attendance once; a student a real device already recorded
   in that class occurrence is not written again (counted as ``merged``). Events (occupancy,
   attention, unknown faces) go through ``ingest.record_event`` with keys derived from the
   recording (``event_key``); a re-run replaces this recording's earlier events, never
   another recording's of the same room and hour.
3. **Browser copy.** ffmpeg: H.264/AAC MP4 and a poster frame (``recording_transcode``).

Progress is reported (with the time left) every ``HEARTBEAT_S`` by the same update that checks
for a cancel, so a cancelled job stops within seconds and a silent worker is noticed
(``recordings.fail_stale``).
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import Attendance, Course, Device, EventRow, Room
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import ingest, media
from cloud_sync.aggregator.services import recordings as svc
from cloud_sync.aggregator.services.common import ConflictError, ServiceError, utcnow
from cloud_sync.aggregator.services.timetable import room_timetable, zone
from cloud_sync.protocol import MAX_BATCH, AttendanceBatch, AttendanceRecord, Event

_LOGGER = logging.getLogger(__name__)
HEARTBEAT_S = 2.0
NAMESPACE = uuid.UUID("6f1c33a4-8a47-4b55-9d0c-2a3c1e7f5b10")  # record / event keys of jobs
ANALYSE_SHARE = 0.8  # of the progress bar, with a browser copy to make (else 0.97)
VISIBLE_JOIN_S = 1.0  # sightings closer than this make one visible interval


class JobError(Exception):
    """The job failed; the message is the error shown to the user."""


class JobCancelled(Exception):  # noqa: N818 (a control-flow signal, not an error)
    pass


class WorkerStopping(Exception):  # noqa: N818
    pass


def worker_name() -> str:
    import os

    return f"{socket.gethostname()}:{os.getpid()}"


def recording_device_id(room_id: str) -> str:
    return svc.recording_device_id(room_id)


# --- instructor presence from the pipeline's tracks ------------------------------------------

@dataclass
class Presence:
    """Per frame: its position in the video and the tracks seen in it (by their state object,
    which holds what the track was decided to be; a split track gets a new state)."""

    pts: list[float] = field(default_factory=list)
    seen: dict[int, tuple[Any, list[int]]] = field(default_factory=dict)

    def observe(self, pts_s: float, tracks: Sequence[Any]) -> None:
        index = len(self.pts)
        self.pts.append(pts_s)
        for track in tracks:
            state = track.data.get("state")
            if state is not None and track.matched:
                self.seen.setdefault(id(state), (state, []))[1].append(index)

    def frames_of(self, student_id: str) -> set[int]:
        out: set[int] = set()
        for state, frames in self.seen.values():
            decision = state.vote.decision
            if (decision is not None and decision.verdict == "present"
                    and decision.student_id == student_id):
                out.update(frames)
        return out

    def summary(self, student_id: str, starts_at: datetime, duration_s: float,
                gap_s: float) -> dict[str, Any]:
        """Coverage share, visible intervals and gaps (offsets in s and wall times)."""
        frames = self.frames_of(student_id)
        total = len(self.pts)
        times = sorted(self.pts[i] for i in frames)
        end = max(duration_s, self.pts[-1] if self.pts else 0.0)
        intervals: list[list[float]] = []
        for t in times:
            if intervals and t - intervals[-1][1] <= VISIBLE_JOIN_S:
                intervals[-1][1] = t
            else:
                intervals.append([t, t])
        gaps = []
        edges = [0.0, *[x for iv in intervals for x in iv], end]
        for lo, hi in zip(edges[0::2], edges[1::2], strict=False):
            if hi - lo >= gap_s:
                gaps.append({"start_s": round(lo, 2), "end_s": round(hi, 2),
                             "seconds": round(hi - lo, 2),
                             "start_at": starts_at + timedelta(seconds=lo),
                             "end_at": starts_at + timedelta(seconds=hi)})
        return {
            "student_id": student_id, "frames": total, "frames_seen": len(frames),
            "coverage": round(len(frames) / total, 4) if total else 0.0,
            "first_seen_s": round(times[0], 2) if times else None,
            "last_seen_s": round(times[-1], 2) if times else None,
            "visible": [[round(a, 2), round(b, 2)] for a, b in intervals[:2000]],
            "gaps": gaps[:1000], "gap_min_s": gap_s, "duration_s": round(end, 2),
        }


def preload() -> None:
    """Import the pipeline's modules (a worker does this before forking its work horses)."""
    import appliance.capture
    import appliance.pipeline
    import appliance.recognition
    import appliance.store
    import appliance.vision.embedding  # noqa: F401


# --- the run ----------------------------------------------------------------------------------

@dataclass
class Reporter:
    """Heartbeat + progress + cancel check, at most every HEARTBEAT_S."""

    sessions: sessionmaker[Session]
    job_id: str
    worker: str
    started: float = field(default_factory=time.monotonic)
    last: float = 0.0

    def __call__(self, progress: float, phase: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < HEARTBEAT_S:
            return
        self.last = now
        from cloud_sync.aggregator.services.jobqueue import STOPPING

        if STOPPING.is_set():
            raise WorkerStopping
        elapsed = now - self.started
        eta = elapsed / progress * (1.0 - progress) if progress >= 0.02 else None
        with self.sessions() as session:
            if not svc.heartbeat(session, self.job_id, self.worker, progress, eta, phase):
                raise JobCancelled


def sampled_source(path: Path, target_fps: float) -> Any:
    """The recording as a frame source that delivers every n-th frame, n such that about
    ``target_fps`` frames per second of video reach the pipeline (the frames between are
    only grabbed, not converted); its ``fps`` is the delivered rate, so frame times stay
    right. ``target_fps`` 0: every frame."""
    from appliance.capture import VideoFileSource

    class SampledVideoSource(VideoFileSource):
        step = 1

        def open(self) -> None:
            super().open()
            native = self._fps
            self.step = max(1, round(native / target_fps)) if native and target_fps else 1
            if self.expected_frames is not None:
                self.expected_frames = -(-self.expected_frames // self.step)

        def read(self) -> Any:
            frame = super().read()
            if frame is not None and self._cap is not None:
                for _ in range(self.step - 1):
                    if not self._cap.grab():
                        break
            return frame

        @property
        def fps(self) -> float | None:
            return None if self._fps is None else self._fps / self.step

    return SampledVideoSource(path)


def _appliance_settings(settings: AggregatorSettings, room_id: str, data_dir: Path) -> Any:
    from appliance.config import ApplianceSettings
    from models import DEFAULT_MODEL_DIR

    return ApplianceSettings.model_validate({
        "device": {"device_id": recording_device_id(room_id), "room_id": room_id},
        "paths": {"data_dir": str(data_dir),
                  "model_dir": str(settings.model_dir or DEFAULT_MODEL_DIR)},
        "detector": {"model": settings.detector_model},
        "recognition": {"embedder": settings.embedders[0]},
    })


class _CourseRoster:
    """The pipeline's roster provider for a recording: its course, always."""

    def __init__(self, course_id: str, course_name: str, roster: Any) -> None:
        self.error: str | None = None
        self._answer = (course_id, course_name, roster)

    def current(self, now: datetime) -> tuple[str | None, str | None, Any]:
        return self._answer


def _roster(session: Session, course_id: str, embedder: str) -> Any:
    from appliance.recognition import Roster
    from appliance.vision.embedding import embedder_id
    from cloud_sync.aggregator.services.schedule import rosters

    spec_id = embedder_id(embedder)
    entries = rosters(session, [course_id], spec_id)[course_id]
    return Roster.from_entries(entries, spec_id) if entries else Roster.empty(spec_id)


def analyse(settings: AggregatorSettings, video: Path, room_id: str, course: tuple[str, str],
            roster: Any, starts_at: datetime, expected_s: float,
            report: Callable[[float, str], None], share: float,
            timeout_s: float) -> tuple[list[AttendanceRecord], list[Event], Presence, dict]:
    """The device pipeline over ``video``: its records, events, the presence per frame, and
    run figures. Raises JobError (the file, the pipeline), JobCancelled (from ``report``)."""
    from appliance.pipeline import Pipeline
    from appliance.store import Store

    presence = Presence()

    class RecordingPipeline(Pipeline):
        """The device pipeline; each processed frame's tracks are also kept for presence."""

        def process(self, frame: Any) -> list[Any]:
            tracks = super().process(frame)
            presence.observe(frame.pts_s, tracks)
            return tracks

    with tempfile.TemporaryDirectory(prefix="recording-job-") as tmp:
        app_settings = _appliance_settings(settings, room_id, Path(tmp))
        store = Store(Path(tmp) / "job.db")
        source = sampled_source(video, settings.recording_analysis_fps)
        pipeline = RecordingPipeline(
            app_settings, store, _CourseRoster(course[0], course[1], roster), source=source,
            every_frame=True, paced=False, loop=False)
        pipeline.capture.fail_fast = True  # a damaged file is an error, not a reopen loop
        pipeline.capture.file_origin = starts_at
        t_start = time.perf_counter()
        try:
            pipeline.start()  # returns once the descriptor process has loaded its model
            t0 = time.perf_counter()
            deadline = time.monotonic() + timeout_s
            while not pipeline.wait_finished(0.5):
                if pipeline.error is not None or not pipeline.alive():
                    break
                if pipeline.capture.fatal_error is not None:
                    break
                if time.monotonic() > deadline:
                    raise JobError(f"the analysis took longer than {timeout_s:.0f} s "
                                   "(job_timeout_s)")
                done_s = presence.pts[-1] if presence.pts else 0.0
                report(share * min(1.0, done_s / max(expected_s, 1e-3)), "analysing")
            seconds = time.perf_counter() - t0
        finally:
            pipeline.stop()
        cap = pipeline.capture
        try:
            if pipeline.error is not None:
                raise JobError(f"the pipeline failed: {pipeline.error}")
            if cap.fatal_error is not None or cap.frames_read == 0:
                raise JobError("the video cannot be processed: " + (
                    cap.fatal_error or cap.last_error or "no frame could be read"))
            records = store.unsent_records(10**7)
            events = store.unsent_events(10**7)
        finally:
            store.close()
    frames = pipeline.timer.frames
    figures = {"frames": frames, "seconds": round(seconds, 2),
               "start_seconds": round(t0 - t_start, 2), "every_nth_frame": source.step,
               "fps": round(frames / seconds, 2) if seconds > 0 else 0.0,
               "tracks": pipeline.tracker.total_tracks, "embeddings": pipeline.embeddings,
               "unknown_tracks": pipeline.unknown_tracks, "embedder": app_settings.recognition
               .embedder, "roster_size": len(roster.student_ids)}
    return records, events, presence, figures


def _ensure_device(session: Session, room_id: str) -> str:
    from cloud_sync.aggregator.services.devices import add_device

    device_id = recording_device_id(room_id)
    found = session.get(Device, device_id)
    if found is None:
        session.rollback()
        try:
            # its key is never shown: nobody can use it
            add_device(session, room_id, device_id, recording=True)
            return device_id
        except (ConflictError, IntegrityError):  # another worker made it just now
            session.rollback()
            found = session.get(Device, device_id)
            if found is None:
                raise
    if found.room_id != room_id:
        raise JobError(f"device {device_id} exists in room {found.room_id}: rename it")
    return device_id


def _occurrence(session: Session, room: Room, course_id: str, at: datetime,
                early_min: float) -> Any:
    day = at.astimezone(zone(room.timezone)).date()
    for occ in room_timetable(session, room).occurrences(day, room.id):
        if (occ.course_id == course_id
                and occ.starts_at - timedelta(minutes=early_min) <= at < occ.ends_at):
            return occ
    return None


def write_records(session: Session, rec: Any, records: list[AttendanceRecord],
                  early_min: float) -> dict[str, Any]:
    """The job's records through the device ingest path; see the module docstring."""
    device_id = _ensure_device(session, rec.room_id)
    room = session.get(Room, rec.room_id)
    assert room is not None
    out: list[AttendanceRecord] = []
    merged: list[str] = []
    written_for: set[str] = set()
    for r in sorted(records, key=lambda r: r.seen_at):
        occ = _occurrence(session, room, rec.course_id, r.seen_at, early_min)
        if occ is not None:
            lo = occ.starts_at - timedelta(minutes=early_min)
            by_device = session.scalar(select(Attendance.key).where(
                Attendance.student_id == r.student_id, Attendance.course_id == rec.course_id,
                Attendance.at >= lo, Attendance.at < occ.ends_at,
                Attendance.device_id != device_id).limit(1))
            if by_device is not None:
                merged.append(r.student_id)
                continue
            name = f"{rec.course_id}|{occ.starts_at.isoformat()}|{r.student_id}"
        else:  # not in the timetable: once per recording
            name = f"{rec.course_id}|recording:{rec.id}|{r.student_id}"
        written_for.add(r.student_id)
        out.append(r.model_copy(update={
            "key": uuid.uuid5(NAMESPACE, name), "device_id": device_id,
            "room_id": rec.room_id, "boot_id": f"recording:{rec.id}"[:64],
            "clock_synced": True}))
    session.rollback()
    accepted = duplicate = 0
    rejected: list[str] = []
    for i in range(0, len(out), MAX_BATCH):
        batch = AttendanceBatch(batch_id=uuid.uuid4(), device_id=device_id,
                                records=out[i:i + MAX_BATCH])
        result = ingest.ingest_batch(session, device_id, batch)
        accepted += result.accepted
        duplicate += result.duplicate
        rejected += [r.reason for r in result.rejected]
    return {"records": len(records), "accepted": accepted, "duplicate": duplicate,
            "merged_with_device": sorted(set(merged)), "rejected": rejected[:20],
            "students": sorted(written_for)}


def event_key(recording_id: str, index: int) -> uuid.UUID:
    """The key of a recording's ``index``-th event: a job's events are found again by their
    keys, whatever else the room's ``rec-<room>`` device holds."""
    return uuid.uuid5(NAMESPACE, f"{recording_id}|event|{index}")


def write_events(session: Session, rec: Any, events: list[Event], end: datetime) -> int:
    """The recording's classroom events; an earlier run's events of THIS recording are
    replaced (never another recording's: two recordings of one room and hour, of two courses,
    keep their own). Commits."""
    device_id = recording_device_id(rec.room_id)
    begin_write(session)
    # this recording's earlier events are among the room device's events in its window, so
    # at most that many: their keys are event_key(rec.id, 0..n-1)
    held = session.scalar(select(func.count()).select_from(EventRow).where(
        EventRow.device_id == device_id, EventRow.at >= rec.starts_at,
        EventRow.at <= end)) or 0
    for first in range(0, held, 500):
        session.execute(delete(EventRow).where(EventRow.key.in_(
            [event_key(rec.id, i) for i in range(first, min(held, first + 500))])))
    session.commit()
    stored = 0
    for i, event in enumerate(sorted(events, key=lambda e: e.at)):
        key = event_key(rec.id, i)
        try:
            stored += ingest.record_event(session, device_id, event.model_copy(
                update={"key": key, "device_id": device_id, "room_id": rec.room_id}))
        except ServiceError as err:
            session.rollback()
            _LOGGER.warning("recording %s: event %s refused: %s", rec.id, event.kind, err)
    return stored


def _browser_copy(settings: AggregatorSettings, rec: Any, report: Callable[[float, str], None],
                  base: float) -> str:
    src = svc.original_path(settings, rec)
    found = media.probe(src, settings.recording_ffmpeg_memory_mb)

    def step(fraction: float) -> bool:
        try:
            report(base + (1.0 - base) * 0.98 * fraction, "transcoding")
        except (JobCancelled, WorkerStopping):
            return False  # ffmpeg is stopped; the job ends cancelled
        return True

    try:
        how = media.transcode(src, svc.playback_path(settings, rec), found, step,
                              settings.job_timeout_s, settings.recording_ffmpeg_memory_mb)
        media.poster(svc.playback_path(settings, rec), svc.poster_path(settings, rec),
                     found.duration_s, settings.recording_ffmpeg_memory_mb)
    except media.MediaError as err:
        _LOGGER.warning("recording %s: no browser copy: %s", rec.id, err.message)
        return "failed"
    except InterruptedError as err:
        raise JobCancelled from err
    _LOGGER.info("recording %s: browser copy made (%s)", rec.id, how)
    return "ready"


def run_job(settings: AggregatorSettings, sessions: sessionmaker[Session], job_id: str,
            worker: str) -> str:
    """Run a job this worker has claimed (status running); returns its final status. Never
    raises for a job's own failure: that is the job's status and error."""
    report = Reporter(sessions, job_id, worker)
    try:
        status, error = "completed", None
        _run(settings, sessions, job_id, report)
    except JobCancelled:
        status, error = "cancelled", None
    except WorkerStopping:
        status, error = "failed", f"the worker {worker} was stopped during the job: retry it"
    except (JobError, media.MediaError) as err:
        status, error = "failed", str(err)
    except Exception as err:  # a bug: the job fails with what happened, the worker goes on
        _LOGGER.exception("job %s failed", job_id)
        status, error = "failed", f"internal error: {type(err).__name__}: {err}"
    if error is not None:
        _LOGGER.info("job %s: %s", job_id, error)
        error = media.clean(error)  # shown to the uploader: no server path in it
    with sessions() as session:
        svc.finish(session, job_id, worker, status, error)
    _LOGGER.info("job %s %s%s", job_id, status, f": {error}" if error else "")
    return status


def _run(settings: AggregatorSettings, sessions: sessionmaker[Session], job_id: str,
         report: Reporter) -> None:
    with sessions() as session:
        job = svc.get_job(session, job_id)
        rec = svc.get_recording(session, job.recording_id)
        if rec.file_deleted_at is not None or not svc.original_path(settings, rec).is_file():
            raise JobError("the recording's file is gone (deleted by retention?)")
        # the frame limits of the upload check, again: a file checked by an older version
        # could be larger than 4K (the pipeline decodes its frames in this process)
        media.check_frames(media.probe(svc.original_path(settings, rec),
                                       settings.recording_ffmpeg_memory_mb))
        course = session.get(Course, rec.course_id)
        if course is None:
            raise JobError(f"course {rec.course_id} no longer exists")
        try:
            roster = _roster(session, rec.course_id, settings.embedders[0])
        except ImportError as err:
            raise JobError(f"the recognition pipeline is not installed here: {err}") from err
        session.expunge(rec)
    report(0.0, "starting", force=True)
    share = ANALYSE_SHARE if settings.recording_transcode else 0.97
    records, events, presence, figures = analyse(
        settings, svc.original_path(settings, rec), rec.room_id, (course.id, course.name),
        roster, rec.starts_at, rec.duration_s or 0.0, report, share, settings.job_timeout_s)
    report(share, "writing", force=True)
    duration = rec.duration_s or (presence.pts[-1] if presence.pts else 0.0)
    end = rec.starts_at + timedelta(seconds=duration + 1)
    with sessions() as session:
        early = float(session.info.get(ingest.EARLY_ARRIVAL_INFO_KEY, settings.early_arrival_min))
        attendance = write_records(session, rec, records, early)
        stored_events = write_events(session, rec, events, end)
    instructor = None
    if rec.instructor_id is not None:
        instructor = presence.summary(rec.instructor_id, rec.starts_at, duration,
                                      settings.instructor_gap_s)
    playback = "none"
    if settings.recording_transcode:
        playback = _browser_copy(settings, rec, report, share)
    kinds: dict[str, int] = {}
    for event in events:
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    result = {"job_id": job_id, "analysis": figures, "attendance": attendance,
              "events": {"stored": stored_events, "by_kind": kinds},
              "instructor": instructor, "finished_at": utcnow().isoformat()}
    with sessions() as session:
        begin_write(session)
        row = svc.get_recording(session, rec.id)
        row.result = _jsonable(result)
        row.playback = playback
        session.commit()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value
