"""Recorded sessions (admin token): resumable upload, the recording's results, and its jobs.

See services/recordings.py (upload, jobs), services/recording_job.py (what a job does) and
docs/HTTP_API.md ("Recorded sessions").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cloud_sync.aggregator.api.context import AppContext
from cloud_sync.aggregator.api.deps import DB, Admin, context
from cloud_sync.aggregator.api.openapi import IsoDateTime
from cloud_sync.aggregator.api.privacy import actor
from cloud_sync.aggregator.db.models import Recording
from cloud_sync.aggregator.services import jobqueue, media
from cloud_sync.aggregator.services import recordings as svc
from cloud_sync.aggregator.services.common import ServiceError, UnavailableError
from cloud_sync.protocol import Identifier, SessionId

router = APIRouter(prefix="/api/v1", tags=["recordings"])
CHUNK_ROUTE = "/api/v1/recordings/{recording_id}/content"
RecordingId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
JobId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class RecordingIn(BaseModel):
    room_id: Identifier
    course_id: Identifier
    starts_at: IsoDateTime = Field(description="When the recording's first frame was filmed.")
    filename: str = Field(min_length=5, max_length=255, pattern=r"(?i)\.(mp4|mkv|mov)$",
                          description="The file's name (.mp4, .mkv or .mov).")
    size_bytes: int = Field(gt=0, le=10**12, description="The whole file's size.")
    instructor_id: Identifier | None = Field(
        default=None, description="The instructor, enrolled like a student (a face, consent, "
        "enrolled in the course): the job reports their presence over the session.")


def document_limits(app: Any, settings: Any) -> None:
    """The OpenAPI description says this server's largest recording (``recording_max_bytes``)
    as ``RecordingIn.size_bytes``'s maximum, not the model's static 10^12: a client (or a
    fuzzer) reading the schema knows where 413 begins."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            field = schema["components"]["schemas"]["RecordingIn"]["properties"]["size_bytes"]
            field["maximum"] = settings.recording_max_bytes
            field["description"] = (f"The whole file's size; at most recording_max_bytes "
                                    f"({settings.recording_max_bytes} on this server).")
        return app.openapi_schema  # type: ignore[no-any-return]

    app.openapi = openapi


class JobOut(BaseModel):
    id: str
    recording_id: str
    status: str = Field(description="queued | running | completed | failed | cancelled")
    phase: str | None = Field(description="starting | analysing | writing | transcoding")
    progress: float = Field(description="0..1")
    eta_s: float | None = Field(description="Estimated seconds left (running jobs).")
    error: str | None = Field(description="Why a job failed, in words.")
    attempts: int
    worker: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class RecordingOut(BaseModel):
    id: str
    room_id: str
    course_id: str
    starts_at: datetime
    instructor_id: str | None
    filename: str
    size_bytes: int
    received_bytes: int = Field(description="Bytes uploaded so far: where a resumed upload "
                                "continues.")
    state: str = Field(description="uploading | checking (the last byte arrived: the file "
                       "is checked) | ready | rejected")
    error: str | None = Field(description="Why the upload check refused the file.")
    duration_s: float | None
    width: int | None
    height: int | None
    fps: float | None
    video_codec: str | None
    playback: str = Field(description="none | ready | failed: the browser copy")
    uploaded_by: str
    created_at: datetime
    file_deleted_at: datetime | None = Field(description="Retention deleted the files then.")
    result: dict[str, Any] | None = Field(description="The last completed job's results.")
    jobs: list[JobOut]


class ErrorOut(BaseModel):
    detail: str


class ChunkOut(BaseModel):
    recording: RecordingOut
    job: JobOut | None = Field(description="The job created when the last byte arrived.")


def _out(session: Any, rec: Recording) -> RecordingOut:
    return RecordingOut.model_validate(svc.recording_out(rec, svc.jobs_of(session, rec.id)))


def _enqueue(ctx: AppContext, job: Any) -> None:
    # the row is queued whatever happens: `aggregator worker` enqueues it when it starts
    with contextlib.suppress(UnavailableError):
        jobqueue.enqueue(ctx.settings, job)


@router.post("/recordings", response_model=RecordingOut, status_code=201,
             summary="Start a resumable upload of a session recording (then PUT its bytes).",
             responses={413: {"description": "Larger than recording_max_bytes, or over the "
                                            "uploader's recording_quota_bytes."},
                        404: {"description": "Room, course or instructor unknown."},
                        507: {"description": "Not enough free disk beside the uploads in "
                                            "progress and min_free_disk_mb.",
                              "model": ErrorOut}})
def create_recording(request: Request, who: Admin, session: DB,
                     body: RecordingIn) -> RecordingOut:
    ctx = context(request)
    rec = svc.create_upload(session, ctx.settings, svc.NewRecording(
        room_id=body.room_id, course_id=body.course_id, starts_at=body.starts_at,
        filename=body.filename, size_bytes=body.size_bytes, instructor_id=body.instructor_id,
    ), actor(who))
    return _out(session, rec)


def _upload_target(ctx: AppContext, recording_id: str, offset: int,
                   allowed: Callable[[Recording], None] | None) -> Recording:
    with ctx.sessions() as session:
        rec = svc.get_recording(session, recording_id)
        if allowed is not None:  # who may, before anything about the upload's state is told
            allowed(rec)
        svc.check_offset(rec, offset)
        session.expunge(rec)
        return rec


@router.put(CHUNK_ROUTE.removeprefix("/api/v1"), response_model=ChunkOut,
            summary="Upload the next chunk of a recording's bytes at Upload-Offset.",
            responses={409: {"description": "Wrong offset (detail and the Upload-Offset "
                                            "header give the right one), or the upload is "
                                            "over."},
                       413: {"description": "Chunk larger than recording_chunk_max_bytes, "
                                            "or past the announced size."},
                       507: {"description": "The disk is full (less than min_free_disk_mb "
                                            "would be left): the bytes before it are kept, "
                                            "resume later.", "model": ErrorOut},
                       422: {"description": "The last chunk arrived and the file failed "
                                            "the check (the reason is in detail)."}})
async def upload_chunk(
    request: Request, who: Admin, recording_id: RecordingId,
    upload_offset: Annotated[int, Header(alias="Upload-Offset", ge=0, le=10**12,
                                         description="Byte offset of this chunk: the "
                                         "recording's received_bytes.")],
) -> Any:
    return await receive_chunk(request, recording_id, upload_offset, actor(who))


async def _write_body(request: Request, ctx: AppContext, rec: Recording,
                      offset: int) -> tuple[int, ServiceError | None]:
    """The request's bytes written into the recording's file at ``offset``: (bytes written,
    why it stopped early: too large, or the disk is full)."""
    path = svc.original_path(ctx.settings, rec)
    written, refused, space_checked_to = 0, None, -1
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError as err:
        raise HTTPException(409, "the recording's file is gone: start the upload again") \
            from err
    try:
        async for data in request.stream():
            if not data:
                continue
            if written + len(data) > ctx.settings.recording_chunk_max_bytes:
                refused = svc.TooLargeError(
                    "a chunk carries at most "
                    f"{ctx.settings.recording_chunk_max_bytes} bytes")
                break
            if offset + written + len(data) > rec.size_bytes:
                refused = svc.TooLargeError(f"more bytes than the announced size "
                                            f"{rec.size_bytes}")
                break
            if written > space_checked_to:  # free disk, every SPACE_CHECK_EVERY bytes
                try:
                    svc.check_chunk_space(ctx.settings, len(data))
                except svc.InsufficientStorageError as err:
                    refused = err
                    break
                space_checked_to = written + svc.SPACE_CHECK_EVERY
            os.pwrite(fd, data, offset + written)
            written += len(data)
    except ClientDisconnect:
        pass  # what arrived is on disk and counts: the client resumes from there
    finally:
        os.fsync(fd)
        os.close(fd)
    return written, refused


async def receive_chunk(request: Request, recording_id: str, offset: int, by: str,
                        allowed: Callable[[Recording], None] | None = None) -> Response:
    """One chunk of a resumable upload (the API's and the console's): written at ``offset``,
    counted, and the last one checks the file and queues its job."""
    ctx = context(request)

    def target() -> Recording:
        return _upload_target(ctx, recording_id, offset, allowed)

    try:
        rec = await run_in_threadpool(target)
    except svc.OffsetError as err:
        return JSONResponse({"detail": err.message, "received_bytes": err.expected},
                            status_code=409, headers={"Upload-Offset": str(err.expected)})
    written, refused = await _write_body(request, ctx, rec, offset)

    def advance() -> tuple[RecordingOut, JobOut | None]:
        with ctx.sessions() as session:
            received = svc.advance(session, rec.id, offset, written)
            job = None
            if received == rec.size_bytes and refused is None:
                job = svc.finish_upload(session, ctx.settings, rec.id, by)
                _enqueue(ctx, job)
            out = _out(session, svc.get_recording(session, rec.id))
            return out, None if job is None else JobOut.model_validate(svc.job_out(job))

    try:
        out, job = await run_in_threadpool(advance)
    except media.MediaError as err:
        raise HTTPException(422, f"recording rejected: {err.message}") from err
    if refused is not None:
        raise refused
    return JSONResponse(ChunkOut(recording=out, job=job).model_dump(mode="json"),
                        status_code=201 if job is not None else 200,
                        headers={"Upload-Offset": str(out.received_bytes)})


@router.get("/recordings", response_model=list[RecordingOut],
            summary="Recordings, newest first.")
def list_recordings(_who: Admin, session: DB,
                    course_id: Annotated[Identifier | None, Query()] = None,
                    limit: Annotated[int, Query(ge=1, le=500)] = 100,
                    offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> list[RecordingOut]:
    query = select(Recording).order_by(Recording.created_at.desc()).limit(limit).offset(offset)
    if course_id is not None:
        query = query.where(Recording.course_id == course_id)
    return [_out(session, r) for r in session.scalars(query).all()]


@router.get("/recordings/{recording_id}", response_model=RecordingOut,
            summary="A recording: upload progress (received_bytes), check, results, jobs.")
def get_recording(_who: Admin, session: DB, recording_id: RecordingId) -> RecordingOut:
    return _out(session, svc.get_recording(session, recording_id))


@router.delete("/recordings/{recording_id}", status_code=204,
               summary="Delete a recording, its jobs and files (its attendance stays).")
def delete_recording(request: Request, who: Admin, session: DB,
                     recording_id: RecordingId) -> Response:
    svc.delete_recording(session, context(request).settings, recording_id, actor(who))
    return Response(status_code=204)


@router.get("/recordings/{recording_id}/instructor",
            summary="The instructor's presence over the recording: coverage share, visible "
            "intervals, gaps (from the pipeline's tracks).",
            responses={404: {"description": "No such recording, or no result yet (no "
                                            "completed job, or no instructor given)."}})
def instructor(_who: Admin, session: DB, recording_id: RecordingId) -> dict[str, Any]:
    rec = svc.get_recording(session, recording_id)
    found = (rec.result or {}).get("instructor")
    if not found:
        raise HTTPException(404, "no instructor result for this recording (no completed job, "
                                 "or no instructor_id given at upload)")
    return {"recording_id": rec.id, "course_id": rec.course_id,
            "starts_at": rec.starts_at.isoformat(), **found}


@router.get("/sessions/{session_id}/instructor",
            summary="The instructor results of every recording of a class session "
            "(<course_id>@<YYYY-MM-DD>).")
def session_instructor(_who: Admin, session: DB,
                       session_id: SessionId) -> list[dict[str, Any]]:
    course_id, _, day = session_id.rpartition("@")
    rows = session.scalars(select(Recording).where(Recording.course_id == course_id)
                           .order_by(Recording.starts_at)).all()
    return [{"recording_id": r.id, "starts_at": r.starts_at.isoformat(),
             **(r.result or {}).get("instructor", {})}
            for r in rows if r.starts_at.date().isoformat() == day
            and (r.result or {}).get("instructor")]


MEDIA_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"description": "The browser copy is not made yet, or its transcoding failed."},
    410: {"description": "The browser copy was deleted by retention."}}


def _media_file(request: Request, recording_id: str, which: str) -> FileResponse:
    ctx = context(request)
    with ctx.sessions() as session:
        rec = svc.get_recording(session, recording_id)
    path = (svc.playback_path if which == "playback" else svc.poster_path)(ctx.settings, rec)
    # The recording exists (an unknown id is 404 above): a copy deleted by retention is 410,
    # one not made yet, or whose transcoding failed, 409 with its state.
    if rec.file_deleted_at is not None:
        raise HTTPException(410, "the browser copy of this recording was deleted by retention")
    if rec.playback != "ready" or not path.is_file():
        reason = ("its transcoding failed" if rec.playback == "failed"
                  else "it is not processed yet")
        raise HTTPException(409, f"no browser copy of this recording: {reason}")
    return FileResponse(path, media_type="video/mp4" if which == "playback" else "image/jpeg")


@router.get("/recordings/{recording_id}/playback.mp4", response_class=FileResponse,
            summary="The browser copy (H.264/AAC MP4; Range requests work).",
            responses={200: {"content": {"video/mp4": {}}}, **MEDIA_ERRORS})
def playback(request: Request, _who: Admin, recording_id: RecordingId) -> FileResponse:
    return _media_file(request, recording_id, "playback")


@router.get("/recordings/{recording_id}/poster.jpg", response_class=FileResponse,
            summary="The poster frame (JPEG).",
            responses={200: {"content": {"image/jpeg": {}}}, **MEDIA_ERRORS})
def poster(request: Request, _who: Admin, recording_id: RecordingId) -> FileResponse:
    return _media_file(request, recording_id, "poster")


# --- jobs -------------------------------------------------------------------------------------

@router.get("/jobs", response_model=list[JobOut], summary="Recording jobs, newest first.")
def list_jobs(request: Request, _who: Admin, session: DB,
              status: Annotated[str | None, Query(
                  pattern="^(queued|running|completed|failed|cancelled)$")] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 100,
              offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> list[JobOut]:
    svc.fail_stale(session, context(request).settings.job_lease_s)
    return [JobOut.model_validate(svc.job_out(j))
            for j in svc.list_jobs(session, status, limit, offset)]


@router.get("/jobs/{job_id}", response_model=JobOut,
            summary="A job: status, progress, time left, error.")
def get_job(request: Request, _who: Admin, session: DB, job_id: JobId) -> JobOut:
    svc.fail_stale(session, context(request).settings.job_lease_s)
    return JobOut.model_validate(svc.job_out(svc.get_job(session, job_id)))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut,
             summary="Cancel a queued job, or stop a running one (within seconds).",
             responses={409: {"description": "The job is already finished."}})
def cancel_job(who: Admin, session: DB, job_id: JobId) -> JobOut:
    return JobOut.model_validate(svc.job_out(svc.cancel(session, job_id, actor(who))))


@router.post("/jobs/{job_id}/retry", response_model=JobOut,
             summary="Queue a failed or cancelled job again.",
             responses={409: {"description": "The job is not failed or cancelled, or its "
                                            "recording was deleted."}})
def retry_job(request: Request, who: Admin, session: DB, job_id: JobId) -> JobOut:
    ctx = context(request)
    job = svc.retry(session, job_id, actor(who))
    _enqueue(ctx, job)
    return JobOut.model_validate(svc.job_out(job))


@router.delete("/jobs/{job_id}", status_code=204,
               summary="Delete a job with its recording (a running job stops).")
def delete_job(request: Request, who: Admin, session: DB, job_id: JobId) -> Response:
    svc.delete_job(session, context(request).settings, job_id, actor(who))
    return Response(status_code=204)


__all__ = ["CHUNK_ROUTE", "ServiceError", "router"]
