"""Admin endpoints (admin token): CRUD, CSV import, face enrollment."""

# No `from __future__ import annotations`: the CRUD routes are made in a loop and FastAPI must
# see their real (closure) types.

import logging
import uuid
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    BackgroundTasks,
    File,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    UploadFile,
)
from pydantic import BaseModel, Field

from appliance.vision.enroll import VIDEO_SUFFIXES
from cloud_sync.aggregator import metrics
from cloud_sync.aggregator.api.context import AppContext
from cloud_sync.aggregator.api.deps import DB, Admin, context
from cloud_sync.aggregator.api.notify import notify_rosters
from cloud_sync.aggregator.api.openapi import IsoDateTime
from cloud_sync.aggregator.api.privacy import actor
from cloud_sync.aggregator.services import admin as svc
from cloud_sync.aggregator.services import admin_schemas as schemas
from cloud_sync.aggregator.services import audit, csv_import, faces, media, privacy
from cloud_sync.aggregator.services import devices as device_svc
from cloud_sync.protocol import EventKind, Identifier

_LOGGER = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["admin"])
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=10**9, description="Rows to skip.")]
RowId = Annotated[int, Path(ge=1, le=2**31 - 1, description="Numeric id.")]
ROSTER_KINDS = {"students", "courses", "rooms", "enrollments", "schedules"}  # change ETags


def _after_write(ctx: AppContext, tasks: BackgroundTasks, kind: str) -> None:
    if kind in {"devices", "rooms", "courses", "schedules"}:
        ctx.invalidate()  # here and in every other process (credentials, rooms, timetables)
    if kind in ROSTER_KINDS and ctx.mqtt_bridge is not None:
        tasks.add_task(notify_rosters, ctx)


def _simple_routes(kind: str, create: type[BaseModel], patch: type[BaseModel],
                   out: type[BaseModel]) -> None:
    noun = kind[:-1]

    def list_rows(_who: Admin, session: DB, limit: Limit = 100, offset: Offset = 0) -> Any:
        return svc.list_rows(session, kind, limit, offset)

    def get_row(who: Admin, session: DB, key: Identifier) -> Any:
        row = svc.get_row(session, kind, key)
        if kind == "students":
            audit.record_now(session, actor(who), "student.view", privacy.subject(key))
        return row

    def create_row(request: Request, tasks: BackgroundTasks, _who: Admin, session: DB,
                   body: create) -> Any:  # type: ignore[valid-type]
        row = svc.create_row(session, kind, body, context(request).settings.timezone)
        _after_write(context(request), tasks, kind)
        return row

    def update_row(request: Request, tasks: BackgroundTasks, _who: Admin, session: DB,
                   key: Identifier, body: patch) -> Any:  # type: ignore[valid-type]
        row = svc.update_row(session, kind, key, body)
        _after_write(context(request), tasks, kind)
        return row

    def delete_row(request: Request, tasks: BackgroundTasks, _who: Admin, session: DB,
                   key: Identifier) -> Response:
        svc.delete_row(session, kind, key)
        _after_write(context(request), tasks, kind)
        return Response(status_code=204)

    path = f"/{kind}"
    router.add_api_route(path, list_rows, methods=["GET"], response_model=list[out],
                         summary=f"List {kind}.", tags=[kind])
    router.add_api_route(f"{path}/{{key}}", get_row, methods=["GET"], response_model=out,
                         summary=f"One {noun}.", tags=[kind])
    if kind != "devices":
        router.add_api_route(path, create_row, methods=["POST"], response_model=out,
                             status_code=201, summary=f"Create a {noun}.", tags=[kind])
    router.add_api_route(f"{path}/{{key}}", update_row, methods=["PATCH"], response_model=out,
                         summary=f"Update a {noun}.", tags=[kind])
    router.add_api_route(f"{path}/{{key}}", delete_row, methods=["DELETE"], status_code=204,
                         summary=f"Delete a {noun}.", tags=[kind])


_simple_routes("students", schemas.StudentIn, schemas.StudentPatch, schemas.StudentOut)
_simple_routes("courses", schemas.CourseIn, schemas.CoursePatch, schemas.CourseOut)
_simple_routes("rooms", schemas.RoomIn, schemas.RoomPatch, schemas.RoomOut)
_simple_routes("devices", schemas.DeviceIn, schemas.DevicePatch, schemas.DeviceOut)


@router.post("/devices", response_model=schemas.DeviceCreated, status_code=201, tags=["devices"],
             summary="Register a device; the API key is in this answer only.")
def create_device(request: Request, _who: Admin, session: DB,
                  body: schemas.DeviceIn) -> schemas.DeviceCreated:
    device, key = device_svc.add_device(session, body.room_id, body.id)
    context(request).invalidate()
    return schemas.DeviceCreated(**schemas.DeviceOut.model_validate(device, from_attributes=True)
                             .model_dump(), api_key=key)


class NewKey(BaseModel):
    device_id: str
    api_key: str = Field(description="Shown once; the old key stops working at once.")


@router.post("/devices/{key}/rotate-key", response_model=NewKey, tags=["devices"],
             summary="Issue a new API key for a device.")
def rotate_key(request: Request, _who: Admin, session: DB, key: Identifier) -> NewKey:
    new = device_svc.rotate_device_key(session, key)
    context(request).invalidate()
    return NewKey(device_id=key, api_key=new)


class EventOut(BaseModel):
    key: uuid.UUID
    device_id: str
    room_id: str
    kind: str
    severity: str
    message: str
    at: datetime = Field(description="Device time of the event.")
    received_at: datetime
    data: dict[str, Any]
    session_id: str | None = Field(default=None, description="<course_id>@<date> (schema v2).")
    v: int = Field(default=1, description="Event schema version.")


@router.get("/events", response_model=list[EventOut], tags=["devices"],
            summary="Device events and alerts (camera offline, temperature, disk, stale "
            "outbox, starts), newest first.")
def list_events(_who: Admin, session: DB, device_id: Identifier | None = None,
                room_id: Identifier | None = None, kind: EventKind | None = None,
                since: IsoDateTime | None = None, limit: Limit = 100,
                offset: Offset = 0) -> Any:
    rows = device_svc.list_events(session, device_id=device_id, room_id=room_id, kind=kind,
                                  since=since, limit=limit, offset=offset)
    return [EventOut.model_validate(r, from_attributes=True) for r in rows]


# ---- enrollments -----------------------------------------------------------------------------

@router.get("/enrollments", response_model=list[schemas.EnrollmentOut], tags=["enrollments"],
            summary="List enrollments (filter by course or student).")
def list_enrollments(_who: Admin, session: DB, course_id: Identifier | None = None,
                     student_id: Identifier | None = None, limit: Limit = 100,
                     offset: Offset = 0) -> Any:
    return svc.list_enrollments(session, course_id, student_id, limit, offset)


@router.post("/enrollments", response_model=schemas.EnrollmentOut, status_code=201,
             tags=["enrollments"], summary="Enrol a student in a course.")
def create_enrollment(request: Request, tasks: BackgroundTasks, _who: Admin, session: DB,
                      body: schemas.EnrollmentIn) -> Any:
    row = svc.create_enrollment(session, body)
    _after_write(context(request), tasks, "enrollments")
    return row


@router.delete("/enrollments/{student_id}/{course_id}", status_code=204, tags=["enrollments"],
               summary="Remove an enrollment.")
def delete_enrollment(request: Request, tasks: BackgroundTasks, _who: Admin, session: DB,
                      student_id: Identifier, course_id: Identifier) -> Response:
    svc.delete_enrollment(session, student_id, course_id)
    _after_write(context(request), tasks, "enrollments")
    return Response(status_code=204)


# ---- schedules -------------------------------------------------------------------------------

Replace = Annotated[bool, Query(
    description="Replace the classes the slot overlaps in its room: they lose the slot's days "
    "(from its effective_from, today when none, to its effective_to) and keep the rest.")]


@router.get("/schedules", response_model=list[schemas.ScheduleOut], tags=["schedules"],
            summary="List weekly schedule slots (filter by room or course).")
def list_schedules(_who: Admin, session: DB, room_id: Identifier | None = None,
                   course_id: Identifier | None = None, limit: Limit = 100,
                   offset: Offset = 0) -> Any:
    return svc.list_schedules(session, room_id, course_id, limit, offset)


@router.get("/schedules/{schedule_id}", response_model=schemas.ScheduleOut, tags=["schedules"],
            summary="One schedule slot.")
def get_schedule(_who: Admin, session: DB, schedule_id: RowId) -> Any:
    return svc.get_schedule(session, schedule_id)


@router.post("/schedules", response_model=schemas.ScheduleOut, status_code=201, tags=["schedules"],
             summary="Create a weekly slot (409 naming the other class when it would "
             "overlap one in the room, unless ?replace=true).")
def create_schedule(request: Request, tasks: BackgroundTasks, _who: Admin, session: DB,
                    body: schemas.ScheduleIn, replace: Replace = False) -> Any:
    row = svc.create_schedule(session, body, replace)
    _after_write(context(request), tasks, "schedules")
    return row


@router.patch("/schedules/{schedule_id}", response_model=schemas.ScheduleOut, tags=["schedules"],
              summary="Update a weekly slot (overlaps refused as on create).")
def update_schedule(request: Request, tasks: BackgroundTasks, _who: Admin, session: DB,
                    schedule_id: RowId, body: schemas.SchedulePatch,
                    replace: Replace = False) -> Any:
    row = svc.update_schedule(session, schedule_id, body, replace)
    _after_write(context(request), tasks, "schedules")
    return row


@router.delete("/schedules/{schedule_id}", status_code=204, tags=["schedules"],
               summary="Delete a weekly slot.")
def delete_schedule(request: Request, tasks: BackgroundTasks, _who: Admin, session: DB,
                    schedule_id: RowId) -> Response:
    svc.delete_schedule(session, schedule_id)
    _after_write(context(request), tasks, "schedules")
    return Response(status_code=204)


# ---- CSV import ------------------------------------------------------------------------------

@router.post(
    "/import/{kind}", response_model=csv_import.ImportReport, tags=["import"],
    summary="Bulk import from CSV (multipart field `file`, or a text/csv body).",
)
async def import_csv(request: Request, tasks: BackgroundTasks, _who: Admin,
                     kind: csv_import.ImportKind) -> Any:
    limit = context(request).settings.max_photo_bytes
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "multipart body needs a file field named 'file'")
        data = await upload.read(limit + 1)
    else:
        data = await request.body()
    if len(data) > limit:
        raise HTTPException(413, f"CSV larger than {limit} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HTTPException(400, f"CSV is not UTF-8 (byte {err.start})") from err
    ctx = context(request)
    from starlette.concurrency import run_in_threadpool

    def run() -> csv_import.ImportReport:
        with ctx.sessions() as session:
            return csv_import.import_csv(session, kind, text, ctx.settings.timezone)

    report = await run_in_threadpool(run)
    _after_write(ctx, tasks, kind)
    return report


# ---- faces -----------------------------------------------------------------------------------

class FaceOut(BaseModel):
    id: int
    student_id: str
    source: str
    quality: float | None
    photo_kept: bool
    created_at: Any
    embedders: list[str] = Field(
        default_factory=list,
        description="`name/model_version` of every embedder with a descriptor of this photo.")


def _face_out(row: Any, embedders: list[str] | None = None) -> FaceOut:
    return FaceOut(id=row.id, student_id=row.student_id, source=row.source, quality=row.quality,
                   photo_kept=row.photo_path is not None, created_at=row.created_at,
                   embedders=embedders if embedders is not None else [row.embedder])


def _read_upload(session: Any, student_id: str, upload: UploadFile, limit: int,
                 what: str) -> bytes:
    """The uploaded bytes for an existing student with consent: 404 for an unknown one, 409
    without consent (checked before the upload is read), 413 above ``limit``."""
    privacy.require_consent(session, student_id)
    session.rollback()
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        metrics.ENROLLMENTS.labels("rejected").inc()
        raise HTTPException(413, f"{what} larger than {limit} bytes")
    return data


@router.post(
    "/students/{student_id}/faces", response_model=FaceOut, status_code=201, tags=["faces"],
    summary="Enrol a photo: exactly one face, big and sharp enough; the embedding is kept. "
    "Only for a student whose consent to face recognition is granted (else 409).",
    responses={409: {"description": "No consent recorded for the student."},
               422: {"description": "No usable face (the reason is in detail)."},
               413: {"description": "Photo too large."},
               503: {"description": "Face models not available on this server."}},
)
def enroll_face(
    request: Request, tasks: BackgroundTasks, who: Admin, session: DB, student_id: Identifier,
    photo: Annotated[UploadFile, File(description="JPEG/PNG/WebP photo of the student.")],
) -> FaceOut:
    ctx = context(request)
    data = _read_upload(session, student_id, photo, ctx.settings.max_photo_bytes, "photo")
    image = faces.decode_image(data)
    result = ctx.encoder.encode(image)
    if result.embedding is None:
        metrics.ENROLLMENTS.labels("rejected").inc()
        raise HTTPException(422, f"photo rejected: {result.reason}")
    suffix = FilePath(photo.filename or "photo.jpg").suffix.lower()
    row = faces.store_embedding(
        session, ctx.settings, student_id, result.vectors or result.embedding, result.quality,
        f"upload:{FilePath(photo.filename or 'photo').name}", data, suffix,
    )
    metrics.ENROLLMENTS.labels("accepted").inc()
    audit.record_now(session, actor(who), "face.enrol", privacy.subject(student_id),
                     f"face={row.id}")
    _after_write(ctx, tasks, "students")
    return _face_out(row, list(result.vectors) or None)


@router.post(
    "/students/{student_id}/faces/video", response_model=list[FaceOut], status_code=201,
    tags=["faces"],
    summary="Enrol from a short video facing the camera: its best, most varied frames are kept.",
    responses={422: {"description": "No usable frame, or not a video (the reason is in "
                                    "detail)."},
               413: {"description": "Video too large."},
               503: {"description": "Face models not available on this server."}},
)
def enroll_video(
    request: Request, tasks: BackgroundTasks, _who: Admin, session: DB, student_id: Identifier,
    video: Annotated[UploadFile, File(description="MP4/MOV/WebM clip, a few seconds of the "
                                                   "student facing the camera.")],
) -> list[FaceOut]:
    import tempfile

    ctx = context(request)
    data = _read_upload(session, student_id, video, ctx.settings.max_video_bytes, "video")
    name = FilePath(video.filename or "video.mp4").name
    suffix = FilePath(name).suffix.lower()
    with tempfile.NamedTemporaryFile(suffix=suffix if suffix in VIDEO_SUFFIXES
                                     else ".mp4") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            # the frame size from the header, by a memory-limited ffprobe, before OpenCV
            # decodes a frame in this process (a small file can declare huge frames)
            media.check_frames(media.probe(FilePath(tmp.name),
                                           ctx.settings.recording_ffmpeg_memory_mb,
                                           containers=False))
            frames = ctx.encoder.encode_video(FilePath(tmp.name))
        except faces.UnavailableError:
            raise
        except faces.ServiceError as err:
            metrics.ENROLLMENTS.labels("rejected").inc()
            raise HTTPException(422, f"video rejected: {err.message}") from err
    if not frames:
        metrics.ENROLLMENTS.labels("rejected").inc()
        raise HTTPException(422, "video rejected: no frame with exactly one sharp, big face")
    rows = [faces.store_embedding(session, ctx.settings, student_id, f.vectors, f.quality,
                                  f"video:{name}#{k + 1}")
            for k, f in enumerate(frames)]
    metrics.ENROLLMENTS.labels("accepted").inc(len(rows))
    _after_write(ctx, tasks, "students")
    return [_face_out(r, list(f.vectors)) for r, f in zip(rows, frames, strict=True)]


@router.get("/students/{student_id}/faces", response_model=list[FaceOut], tags=["faces"],
            summary="A student's stored embeddings (metadata only).")
def list_faces(who: Admin, session: DB, student_id: Identifier) -> list[FaceOut]:
    rows = faces.list_faces(session, student_id)
    embedders = faces.embedders_of(session, [r.id for r in rows])
    out = [_face_out(r, embedders[r.id]) for r in rows]
    audit.record_now(session, actor(who), "face.list", privacy.subject(student_id))
    return out


@router.delete("/students/{student_id}/faces/{face_id:int}", status_code=204, tags=["faces"],
               summary="Delete one embedding (and its photo, if kept).")
def delete_face(request: Request, tasks: BackgroundTasks, who: Admin, session: DB,
                student_id: Identifier, face_id: RowId) -> Response:
    faces.delete_face(session, student_id, face_id)
    audit.record_now(session, actor(who), "face.delete", privacy.subject(student_id),
                     f"face={face_id}")
    _after_write(context(request), tasks, "students")
    context(request).scrubber.request()
    return Response(status_code=204)
