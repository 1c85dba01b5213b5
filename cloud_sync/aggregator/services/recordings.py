"""Recorded sessions: resumable uploads, the upload check, and processing jobs.

Upload (``POST /api/v1/recordings`` then ``PUT .../content`` chunks): the recording row is
created with its metadata (room, course, start, instructor) and announced size; each chunk says
its offset (``Upload-Offset``) and is written at that offset, then ``received_bytes`` moves on
by a compare-and-set, so a chunk re-sent after a dropped connection is harmless and a chunk at
the wrong offset is a 409 that tells the right one. Bytes of a chunk that broke off count as
received (they are on disk), so a resumed upload sends only what is missing. The last chunk
runs the check (services/media.py: container, duration, the first seconds decode); a file that
fails it is deleted and the recording ``rejected`` with the reason; one that passes gets a job.

Jobs: the ``recording_jobs`` row is the job's truth (status, progress, time left, error) with
either queue (services/jobqueue.py). State changes are conditional updates, so a job is claimed
by one worker only, and cancel / retry / delete race safely with a running worker.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import Course, Recording, RecordingJob, Room, Student
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import audit, media
from cloud_sync.aggregator.services.common import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServiceError,
    utcnow,
)
from cloud_sync.aggregator.services.timetable import zone
from cloud_sync.protocol import RESERVED_DEVICE_PREFIX

_LOGGER = logging.getLogger(__name__)
JOB_STATES = ("queued", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
ORIGINAL = "original"  # file names inside a recording's directory (plus the suffix)
PLAYBACK = "playback.mp4"
POSTER = "poster.jpg"


class TooLargeError(ServiceError):
    status = 413


class InsufficientStorageError(ServiceError):
    """Not enough free disk for the recording (or this chunk) beside what is reserved."""

    status = 507


class OffsetError(ConflictError):
    """A chunk at another offset than the bytes received so far."""

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


RECORDING_DEVICE_PREFIX = RESERVED_DEVICE_PREFIX  # no device may be registered under it


def recording_device_id(room_id: str) -> str:
    """The room's virtual device whose records and events come from recorded sessions."""
    return f"{RECORDING_DEVICE_PREFIX}{room_id}"[:64]


def is_recording_device(device_id: str) -> bool:
    return device_id.lower().startswith(RECORDING_DEVICE_PREFIX)


def new_id() -> str:
    return uuid.uuid4().hex


def _write(session: Session) -> None:
    """Start a write transaction afresh: end the read transaction the session may hold first.
    On SQLite a read transaction whose snapshot is older than another connection's commit
    cannot become a write one (SQLITE_BUSY_SNAPSHOT, 'database is locked' at once, whatever
    busy_timeout says): two identical last chunks at once met that in 3 of 6 runs."""
    session.rollback()
    begin_write(session)


# --- files ------------------------------------------------------------------------------------

def folder(settings: AggregatorSettings, recording_id: str) -> Path:
    return aggregator_config.recordings_dir(settings) / recording_id


def original_path(settings: AggregatorSettings, rec: Recording) -> Path:
    suffix = Path(rec.filename).suffix.lower()
    return folder(settings, rec.id) / (ORIGINAL + (suffix if suffix in media.SUFFIXES
                                                   else ".mp4"))


def playback_path(settings: AggregatorSettings, rec: Recording) -> Path:
    return folder(settings, rec.id) / PLAYBACK


def poster_path(settings: AggregatorSettings, rec: Recording) -> Path:
    return folder(settings, rec.id) / POSTER


def delete_files(settings: AggregatorSettings, recording_id: str) -> bool:
    """Remove a recording's directory; True if there was one."""
    path = folder(settings, recording_id)
    if not path.exists():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


# --- space ------------------------------------------------------------------------------------

HELD_STATES = ("uploading", "checking", "ready")
CHECK_STALE_S = 2 * media.PROBE_TIMEOUT_S + 60  # a check longer than this: its process died
SPACE_CHECK_EVERY = 4 * 1024 * 1024  # bytes of a chunk between two free-space readings


def free_bytes(settings: AggregatorSettings) -> int:
    """Free bytes where recordings are written (its nearest existing directory)."""
    path = aggregator_config.recordings_dir(settings)
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def _margin(settings: AggregatorSettings) -> int:
    return settings.min_free_disk_mb * 1024 * 1024


def _check_announce(session: Session, settings: AggregatorSettings, size: int, by: str) -> None:
    """413 over the uploader's quota; 507 when the disk, less what announced uploads still
    need and ``min_free_disk_mb``, has no room for ``size`` more bytes."""
    held = session.scalar(select(func.coalesce(func.sum(Recording.size_bytes), 0)).where(
        Recording.uploaded_by == by[:200], Recording.state.in_(HELD_STATES),
        Recording.file_deleted_at.is_(None))) or 0
    if held + size > settings.recording_quota_bytes:
        raise TooLargeError(f"over your recording quota: you hold {held} bytes of "
                            f"{settings.recording_quota_bytes} (recording_quota_bytes); delete "
                            "recordings you no longer need")
    pending = session.scalar(select(func.coalesce(func.sum(
        Recording.size_bytes - Recording.received_bytes), 0)).where(
        Recording.state == "uploading")) or 0
    room = free_bytes(settings) - pending - _margin(settings)
    if size > room:
        raise InsufficientStorageError(
            f"not enough disk space for {size} bytes: {max(room, 0)} bytes are free beside "
            f"the uploads in progress and min_free_disk_mb")


def check_chunk_space(settings: AggregatorSettings, length: int) -> None:
    """507 when writing ``length`` more bytes would leave less than ``min_free_disk_mb``."""
    free = free_bytes(settings)
    if free - length < _margin(settings):
        raise InsufficientStorageError(f"the server's disk is full ({free} bytes free): the "
                                       "upload resumes when there is room again")


# --- uploads ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NewRecording:
    room_id: str
    course_id: str
    starts_at: datetime  # aware; a naive time is the room's local time
    filename: str
    size_bytes: int
    instructor_id: str | None = None


def create_upload(session: Session, settings: AggregatorSettings, new: NewRecording,
                  by: str) -> Recording:
    """A recording row in state ``uploading`` (and its empty file). Commits."""
    if not settings.recordings_enabled:
        raise ForbiddenError("recorded sessions are switched off on this server (setting "
                             "recordings_enabled; a recording keeps every face in it: see "
                             "docs/PRIVACY.md)")
    suffix = Path(new.filename).suffix.lower()
    if suffix not in media.SUFFIXES:
        raise ServiceError(f"file name {new.filename!r}: only {', '.join(media.SUFFIXES)} "
                           "recordings are taken")
    if new.size_bytes > settings.recording_max_bytes:
        raise TooLargeError(f"{new.size_bytes} bytes is more than the largest recording "
                            f"({settings.recording_max_bytes} bytes, recording_max_bytes)")
    if new.size_bytes <= 0:
        raise ServiceError("size_bytes must be positive")
    room = session.get(Room, new.room_id)
    if room is None:
        raise NotFoundError(f"room {new.room_id!r} does not exist")
    if session.get(Course, new.course_id) is None:
        raise NotFoundError(f"course {new.course_id!r} does not exist")
    if new.instructor_id is not None and session.get(Student, new.instructor_id) is None:
        raise NotFoundError(f"instructor {new.instructor_id!r} is not enrolled (add them as "
                            "a student with a face, then enrol them in the course)")
    starts_at = new.starts_at
    if starts_at.tzinfo is None:
        starts_at = starts_at.replace(tzinfo=zone(room.timezone))
    _write(session)  # the quota and space sums and the new row in one write transaction
    _check_announce(session, settings, new.size_bytes, by)
    now = utcnow()
    rec = Recording(
        id=new_id(), room_id=new.room_id, course_id=new.course_id, starts_at=starts_at,
        instructor_id=new.instructor_id, filename=Path(new.filename).name[:255],
        size_bytes=new.size_bytes, received_bytes=0, state="uploading", playback="none",
        uploaded_by=by[:200], created_at=now, updated_at=now,
    )
    path = original_path(settings, rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    session.add(rec)
    audit.record(session, by, "recording.upload", f"recording:{rec.id}",
                 f"room={rec.room_id} course={rec.course_id} bytes={rec.size_bytes}")
    session.commit()
    return rec


def get_recording(session: Session, recording_id: str) -> Recording:
    rec = session.get(Recording, recording_id)
    if rec is None:
        raise NotFoundError(f"recording {recording_id!r} does not exist")
    return rec


def check_offset(rec: Recording, offset: int) -> None:
    if rec.state != "uploading":
        raise ConflictError(f"recording {rec.id} is {rec.state}: its upload is over")
    if offset != rec.received_bytes:
        raise OffsetError(f"this upload continues at byte {rec.received_bytes}, not {offset}",
                          rec.received_bytes)


def advance(session: Session, rec_id: str, offset: int, written: int) -> int:
    """Move ``received_bytes`` from ``offset`` to ``offset + written`` (compare-and-set);
    returns the bytes received now. Commits."""
    _write(session)
    session.execute(update(Recording).where(
        Recording.id == rec_id, Recording.received_bytes == offset,
        Recording.state == "uploading").values(received_bytes=offset + written,
                                                 updated_at=utcnow()))
    session.commit()
    rec = get_recording(session, rec_id)
    return rec.received_bytes


def finish_upload(session: Session, settings: AggregatorSettings, rec_id: str,
                  by: str) -> RecordingJob:
    """All bytes are here: check the file; a good one becomes ``ready`` with a queued job
    (returned), a bad one ``rejected`` (file deleted) and MediaError. Commits."""
    rec = get_recording(session, rec_id)
    if rec.state != "uploading" or rec.received_bytes != rec.size_bytes:
        raise ConflictError(f"recording {rec.id}: {rec.received_bytes} of {rec.size_bytes} "
                            "bytes received")
    _write(session)  # one check per recording, however many last chunks race
    taken = session.execute(update(Recording).where(
        Recording.id == rec_id, Recording.state == "uploading").values(
        state="checking", updated_at=utcnow())).rowcount
    session.commit()
    if not taken:
        raise ConflictError(f"recording {rec_id} is already being checked")
    return _run_check(session, settings, rec_id, by)


def _run_check(session: Session, settings: AggregatorSettings, rec_id: str,
               by: str) -> RecordingJob:
    """The check of a recording this caller moved to ``checking``; see finish_upload."""
    rec = get_recording(session, rec_id)
    path = original_path(settings, rec)
    try:
        if not path.is_file() or path.stat().st_size != rec.size_bytes:
            raise media.MediaError("the uploaded file is gone or incomplete: upload it again")
        found = media.check(path, settings.recording_min_duration_s,
                            settings.recording_max_duration_s,
                            settings.recording_ffmpeg_memory_mb)
    except media.MediaError as err:
        session.rollback()
        delete_files(settings, rec.id)
        _write(session)
        rec = get_recording(session, rec_id)
        err.message = media.clean(err.message)
        rec.state, rec.error, rec.updated_at = "rejected", err.message, utcnow()
        audit.record(session, by, "recording.reject", f"recording:{rec.id}", err.message)
        session.commit()
        raise
    session.rollback()
    _write(session)
    rec = get_recording(session, rec_id)
    rec.state, rec.updated_at = "ready", utcnow()
    rec.duration_s, rec.width, rec.height = found.duration_s, found.width, found.height
    rec.fps, rec.video_codec = found.fps, found.video_codec
    job = _add_job(session, rec.id)
    session.commit()
    return job


def recover_checks(session: Session, settings: AggregatorSettings,
                   now: datetime | None = None) -> list[RecordingJob]:
    """Recordings left ``checking`` by a process that died during their check (longer ago
    than CHECK_STALE_S): each is taken (a conditional update, so one process does it) and
    checked again; it ends ``ready`` with a job, or ``rejected`` with the reason. Commits;
    returns the jobs made (for the caller to enqueue)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=CHECK_STALE_S)
    stale = session.scalars(select(Recording.id).where(
        Recording.state == "checking", Recording.updated_at < cutoff)).all()
    session.rollback()
    jobs: list[RecordingJob] = []
    for rec_id in stale:
        _write(session)
        taken = session.execute(update(Recording).where(
            Recording.id == rec_id, Recording.state == "checking",
            Recording.updated_at < cutoff).values(updated_at=utcnow())).rowcount
        session.commit()
        if not taken:
            continue
        _LOGGER.warning("recording %s was left 'checking' (the server stopped during its "
                        "check): checking it again", rec_id)
        with contextlib.suppress(media.MediaError):  # a bad file: rejected, with the reason
            jobs.append(_run_check(session, settings, rec_id, "system"))
    return jobs


def expire_uploads(session: Session, settings: AggregatorSettings,
                   now: datetime | None = None) -> int:
    """Uploads that received no byte for ``recording_upload_expire_hours``: the file is
    deleted and the recording rejected (its announced size stops counting). Commits."""
    now = now or utcnow()
    cutoff = now - timedelta(hours=settings.recording_upload_expire_hours)
    old = session.scalars(select(Recording.id).where(
        Recording.state == "uploading", Recording.updated_at < cutoff)).all()
    session.rollback()
    count = 0
    for rec_id in old:
        _write(session)
        done = session.execute(update(Recording).where(
            Recording.id == rec_id, Recording.state == "uploading",
            Recording.updated_at < cutoff).values(
            state="rejected", updated_at=now, file_deleted_at=now,
            error=f"upload abandoned: no byte arrived for "
                  f"{settings.recording_upload_expire_hours:g} h")).rowcount
        if done:
            audit.record(session, "system", "recording.expire", f"recording:{rec_id}",
                         "abandoned upload")
        session.commit()
        if done:
            delete_files(settings, rec_id)
            count += 1
    return count


# --- jobs -------------------------------------------------------------------------------------

def _add_job(session: Session, recording_id: str) -> RecordingJob:
    job = RecordingJob(id=new_id(), recording_id=recording_id, status="queued", progress=0.0,
                       attempts=0, cancel_requested=False, created_at=utcnow())
    session.add(job)
    return job


def get_job(session: Session, job_id: str) -> RecordingJob:
    job = session.get(RecordingJob, job_id)
    if job is None:
        raise NotFoundError(f"job {job_id!r} does not exist")
    return job


def list_jobs(session: Session, status: str | None = None, limit: int = 100,
              offset: int = 0) -> list[RecordingJob]:
    query = select(RecordingJob).order_by(RecordingJob.created_at.desc()).limit(limit) \
        .offset(offset)
    if status is not None:
        query = query.where(RecordingJob.status == status)
    return list(session.scalars(query))


def claim(session: Session, job_id: str, worker: str) -> bool:
    """queued -> running for this worker (one conditional update: of two workers that try,
    one wins). Commits."""
    now = utcnow()
    _write(session)
    done = session.execute(update(RecordingJob).where(
        RecordingJob.id == job_id, RecordingJob.status == "queued").values(
        status="running", worker=worker[:200], started_at=now, heartbeat_at=now,
        attempts=RecordingJob.attempts + 1, progress=0.0, eta_s=None, error=None,
        phase="starting", finished_at=None))
    session.commit()
    return bool(done.rowcount)


def claim_next(session: Session, worker: str) -> str | None:
    """The oldest queued job, claimed for ``worker`` (database queue); None if none."""
    candidates = session.scalars(
        select(RecordingJob.id).where(RecordingJob.status == "queued")
        .order_by(RecordingJob.created_at).limit(5)).all()
    session.rollback()
    for job_id in candidates:
        if claim(session, job_id, worker):
            return job_id
    return None


def heartbeat(session: Session, job_id: str, worker: str, progress: float,
              eta_s: float | None, phase: str) -> bool:
    """Report progress; False when the job should stop (cancel requested, deleted, or no
    longer this worker's). Commits."""
    _write(session)
    done = session.execute(update(RecordingJob).where(
        RecordingJob.id == job_id, RecordingJob.status == "running",
        RecordingJob.worker == worker, RecordingJob.cancel_requested.is_(False)).values(
        heartbeat_at=utcnow(), progress=round(min(max(progress, 0.0), 1.0), 4),
        eta_s=None if eta_s is None else round(eta_s, 1), phase=phase))
    session.commit()
    return bool(done.rowcount)


def finish(session: Session, job_id: str, worker: str, status: str,
           error: str | None = None) -> bool:
    """running -> completed | failed | cancelled, if still this worker's. Commits."""
    assert status in FINISHED
    _write(session)
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error,
                              "eta_s": None, "phase": None}
    if status == "completed":
        values["progress"] = 1.0
    done = session.execute(update(RecordingJob).where(
        RecordingJob.id == job_id, RecordingJob.status == "running",
        RecordingJob.worker == worker).values(**values))
    session.commit()
    return bool(done.rowcount)


def cancel(session: Session, job_id: str, by: str) -> RecordingJob:
    """A queued job is cancelled at once; a running one is asked to stop (its worker sees it
    within seconds and ends it as cancelled). Commits."""
    job = get_job(session, job_id)
    if job.status in FINISHED:
        raise ConflictError(f"job {job_id} is already {job.status}")
    _write(session)
    session.execute(update(RecordingJob).where(
        RecordingJob.id == job_id, RecordingJob.status == "queued").values(
        status="cancelled", finished_at=utcnow(), cancel_requested=True))
    session.execute(update(RecordingJob).where(
        RecordingJob.id == job_id, RecordingJob.status == "running").values(
        cancel_requested=True))
    audit.record(session, by, "job.cancel", f"job:{job_id}")
    session.commit()
    return get_job(session, job_id)


def retry(session: Session, job_id: str, by: str) -> RecordingJob:
    """A failed or cancelled job goes back to the queue (same id, attempts kept). Commits."""
    job = get_job(session, job_id)
    rec = get_recording(session, job.recording_id)
    if rec.file_deleted_at is not None:
        raise ConflictError(f"the recording of job {job_id} was deleted (retention): nothing "
                            "to process")
    status = job.status
    _write(session)
    done = session.execute(update(RecordingJob).where(
        RecordingJob.id == job_id, RecordingJob.status.in_(("failed", "cancelled"))).values(
        status="queued", progress=0.0, eta_s=None, error=None, phase=None, worker=None,
        cancel_requested=False, created_at=utcnow(), started_at=None, finished_at=None,
        heartbeat_at=None))
    if not done.rowcount:
        session.rollback()
        raise ConflictError(f"job {job_id} is {status}: only a failed or cancelled job can "
                            "be retried")
    audit.record(session, by, "job.retry", f"job:{job_id}")
    session.commit()
    return get_job(session, job_id)


def delete_recording(session: Session, settings: AggregatorSettings, recording_id: str,
                     by: str) -> None:
    """The recording, its jobs (a running one is told to stop: its row is gone) and its
    files. Attendance and events it produced stay (they are the school's records). Commits."""
    get_recording(session, recording_id)
    _write(session)
    session.execute(delete(RecordingJob).where(RecordingJob.recording_id == recording_id))
    session.execute(delete(Recording).where(Recording.id == recording_id))
    audit.record(session, by, "recording.delete", f"recording:{recording_id}")
    session.commit()
    delete_files(settings, recording_id)


def delete_job(session: Session, settings: AggregatorSettings, job_id: str, by: str) -> None:
    """A job goes with its recording (the issue's "delete (with its recording)")."""
    job = get_job(session, job_id)
    delete_recording(session, settings, job.recording_id, by)


def fail_stale(session: Session, lease_s: float, now: datetime | None = None) -> int:
    """Running jobs whose worker has not reported for ``lease_s``: failed, retryable (the
    worker crashed or was killed). Commits; returns how many."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=lease_s)
    stale = session.scalars(select(RecordingJob).where(
        RecordingJob.status == "running", RecordingJob.heartbeat_at < cutoff)).all()
    session.rollback()
    count = 0
    for job in stale:
        _write(session)
        done = session.execute(update(RecordingJob).where(
            RecordingJob.id == job.id, RecordingJob.status == "running",
            RecordingJob.heartbeat_at < cutoff).values(
            status="failed", finished_at=now, eta_s=None, phase=None,
            error=f"the worker {job.worker or '?'} stopped reporting at "
                  f"{round((job.progress or 0) * 100)}% (crashed or was killed): retry the job"))
        session.commit()
        count += int(bool(done.rowcount))
    if count:
        _LOGGER.warning("%d recording job(s) failed: their worker stopped", count)
    return count


def purge_files(session: Session, settings: AggregatorSettings,
                now: datetime | None = None) -> int:
    """Retention: delete the files of recordings uploaded more than ``recording_keep_days``
    ago (rows and derived results stay; ``file_deleted_at`` is set). Commits; returns how
    many. A recording whose job is running is left for the next pass."""
    now = now or utcnow()
    cutoff = now - timedelta(days=settings.recording_keep_days)
    running = select(RecordingJob.recording_id).where(RecordingJob.status == "running")
    old = session.scalars(select(Recording.id).where(
        Recording.created_at < cutoff, Recording.file_deleted_at.is_(None),
        Recording.id.not_in(running))).all()
    session.rollback()
    for rec_id in old:
        delete_files(settings, rec_id)
        _write(session)
        session.execute(update(Recording).where(Recording.id == rec_id).values(
            file_deleted_at=now, playback="none"))
        session.execute(update(RecordingJob).where(
            RecordingJob.recording_id == rec_id, RecordingJob.status == "queued").values(
            status="cancelled", finished_at=now,
            error="the recording was deleted by retention before it was processed"))
        session.commit()
    return len(old)


def job_out(job: RecordingJob) -> dict[str, Any]:
    return {
        "id": job.id, "recording_id": job.recording_id, "status": job.status,
        "phase": job.phase, "progress": round(job.progress or 0.0, 4), "eta_s": job.eta_s,
        "error": job.error, "attempts": job.attempts, "worker": job.worker,
        "cancel_requested": job.cancel_requested, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at,
        "heartbeat_at": job.heartbeat_at,
    }


def recording_out(rec: Recording, jobs: list[RecordingJob] | None = None) -> dict[str, Any]:
    return {
        "id": rec.id, "room_id": rec.room_id, "course_id": rec.course_id,
        "starts_at": rec.starts_at, "instructor_id": rec.instructor_id,
        "filename": rec.filename, "size_bytes": rec.size_bytes,
        "received_bytes": rec.received_bytes, "state": rec.state, "error": rec.error,
        "duration_s": rec.duration_s, "width": rec.width, "height": rec.height, "fps": rec.fps,
        "video_codec": rec.video_codec, "playback": rec.playback,
        "uploaded_by": rec.uploaded_by, "created_at": rec.created_at,
        "file_deleted_at": rec.file_deleted_at, "result": rec.result,
        "jobs": [job_out(j) for j in jobs or []],
    }


def jobs_of(session: Session, recording_id: str) -> list[RecordingJob]:
    return list(session.scalars(select(RecordingJob).where(
        RecordingJob.recording_id == recording_id).order_by(RecordingJob.created_at)))
