"""Recorded sessions in the console: the list with the upload form (chunked, resumed after a
dropped connection, by console.js), and a recording's page: the video (the browser copy)
beside the class's attendance, the occupancy and attention timelines and the instructor's
presence, with the job's live progress and its cancel / retry / delete buttons.

Teachers see and upload recordings of the courses they teach; admins all of them.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Header, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from sqlalchemy import select

from cloud_sync.aggregator.api.recordings import receive_chunk
from cloud_sync.aggregator.console.accounts import ConsolePrincipal
from cloud_sync.aggregator.console.courses import visible_courses
from cloud_sync.aggregator.console.web import DB, PostUser, User, back, context, render
from cloud_sync.aggregator.db.models import (
    Attendance,
    Course,
    Enrollment,
    Recording,
    RecordingJob,
    Room,
    Schedule,
    Student,
)
from cloud_sync.aggregator.services import events, jobqueue, reports
from cloud_sync.aggregator.services import recordings as svc
from cloud_sync.aggregator.services.common import ForbiddenError, NotFoundError, ServiceError
from cloud_sync.aggregator.services.timetable import zone
from cloud_sync.protocol import make_session_id

router = APIRouter(include_in_schema=False)
CHUNK_ROUTE = "/recordings/{recording_id}/content"
CHART_W, CHART_H = 600, 120


def _by(who: ConsolePrincipal) -> str:
    return f"user:{who.name}"


def _hidden(recording_id: str) -> NotFoundError:
    """The answer for a recording that does not exist and for one of a course the user does
    not teach alike (the API's words): nothing tells them apart."""
    return NotFoundError(f"recording {recording_id!r} does not exist")


def _recording(session: DB, who: ConsolePrincipal, recording_id: str) -> Recording:
    rec = session.get(Recording, recording_id)
    if rec is None or not who.can_see_course(rec.course_id):
        raise _hidden(recording_id)
    return rec


def course_rooms(session: DB, course_id: str) -> set[str]:
    """The rooms a course is scheduled in (weekly or one-day slots)."""
    return set(session.scalars(select(Schedule.room_id).where(
        Schedule.course_id == course_id)).all())


def _check_teacher_upload(session: DB, who: ConsolePrincipal, course_id: str, room_id: str,
                          instructor_id: str) -> None:
    """A teacher records only their course, in a room it is scheduled in (a job writes the
    room's records and events), with an instructor enrolled in it; an instructor outside the
    course answers as one that does not exist."""
    if not who.can_see_course(course_id):
        raise ForbiddenError("you do not teach this course")
    if who.is_admin:
        return
    if room_id not in course_rooms(session, course_id):
        raise ForbiddenError(f"{course_id} is not scheduled in room {room_id}: record a room "
                             "your course meets in")
    if instructor_id and session.get(Enrollment, (instructor_id, course_id)) is None:
        raise NotFoundError(f"instructor {instructor_id!r} is not enrolled (add them as a "
                            "student with a face, then enrol them in the course)")


def _latest_jobs(session: DB, ids: list[str]) -> dict[str, RecordingJob]:
    out: dict[str, RecordingJob] = {}
    if not ids:
        return out
    for job in session.scalars(select(RecordingJob).where(RecordingJob.recording_id.in_(ids))
                               .order_by(RecordingJob.created_at)):
        out[job.recording_id] = job
    return out


def _workers(request: Request, session: DB) -> int | None:
    """Workers alive (None: cannot tell): the pages say when queued jobs have nobody to run
    them (issue 25 item 11)."""
    return jobqueue.workers_alive(session, context(request).settings)


@router.get("/recordings", response_class=HTMLResponse)
def recordings_page(request: Request, who: User, session: DB) -> Response:
    courses = visible_courses(session, who)
    ids = {c.id for c in courses}
    rows = [r for r in session.scalars(select(Recording).order_by(Recording.created_at.desc())
                                       .limit(200)) if r.course_id in ids]
    jobs = _latest_jobs(session, [r.id for r in rows])
    rooms = list(session.scalars(select(Room).order_by(Room.id)))
    if not who.is_admin:  # a teacher records the rooms their courses meet in
        taught = set(session.scalars(select(Schedule.room_id).where(
            Schedule.course_id.in_(ids or {""}))).all())
        rooms = [r for r in rooms if r.id in taught]
    people = session.execute(
        select(Student.id, Student.name, Enrollment.course_id)
        .join(Enrollment, Enrollment.student_id == Student.id)
        .where(Enrollment.course_id.in_(ids or {""})).order_by(Student.name)).all()
    instructors = sorted({(sid, name) for sid, name, _ in people}, key=lambda p: p[1])
    return render(request, "recordings.html", who, rows=rows, jobs=jobs, courses=courses,
                  rooms=rooms, instructors=instructors, workers=_workers(request, session),
                  chunk=context(request).settings.recording_chunk_max_bytes,
                  max_bytes=context(request).settings.recording_max_bytes)


@router.post("/recordings/new")
def new_recording(
    request: Request, who: PostUser, session: DB,
    course_id: Annotated[str, Form(max_length=64)], room_id: Annotated[str, Form(max_length=64)],
    day: Annotated[date, Form(alias="date")], start: Annotated[time, Form()],
    filename: Annotated[str, Form(max_length=255)], size_bytes: Annotated[int, Form(gt=0)],
    instructor_id: Annotated[str, Form(max_length=64)] = "",
) -> JSONResponse:
    """Start an upload (console.js then sends the chunks). The date and time are the room's."""
    _check_teacher_upload(session, who, course_id, room_id, instructor_id)
    room = session.get(Room, room_id)
    if room is None:
        raise NotFoundError(f"room {room_id!r} does not exist")
    starts_at = datetime.combine(day, start, tzinfo=zone(room.timezone))
    rec = svc.create_upload(session, context(request).settings, svc.NewRecording(
        room_id=room_id, course_id=course_id, starts_at=starts_at, filename=filename,
        size_bytes=size_bytes, instructor_id=instructor_id or None), _by(who))
    return JSONResponse({"id": rec.id, "received_bytes": 0, "size_bytes": rec.size_bytes,
                         "chunk_bytes": context(request).settings.recording_chunk_max_bytes,
                         "url": f"/recordings/{rec.id}"}, status_code=201)


@router.put(CHUNK_ROUTE)
async def upload_chunk(request: Request, who: PostUser, recording_id: str,
                       upload_offset: Annotated[int, Header(alias="Upload-Offset", ge=0)],
                       ) -> Response:
    def allowed(rec: Recording) -> None:  # before anything about the upload is told
        if not who.can_see_course(rec.course_id):
            raise _hidden(recording_id)

    return await receive_chunk(request, recording_id, upload_offset, _by(who), allowed)


@router.get("/recordings/{recording_id}/status")
def upload_status(who: User, session: DB, recording_id: str) -> JSONResponse:
    """Where a resumed upload continues."""
    rec = _recording(session, who, recording_id)
    return JSONResponse({"received_bytes": rec.received_bytes, "size_bytes": rec.size_bytes,
                         "state": rec.state, "error": rec.error})


def _svg_points(points: list[tuple[float, float]], x_max: float,
                y_max: float) -> list[tuple[float, float]]:
    """Readings as points of a CHART_W x CHART_H box (x: seconds, y: value; 4 px margins)."""
    x_max, y_max = max(x_max, 1e-6), max(y_max, 1e-6)
    return [(round(4 + (CHART_W - 8) * x / x_max, 1),
             round(CHART_H - 4 - (CHART_H - 8) * y / y_max, 1)) for x, y in points]


def _timelines(session: DB, rec: Recording) -> dict[str, Any]:
    """Occupancy and attention of the recording's class session, within the recording."""
    session_id = make_session_id(rec.course_id, rec.starts_at.date())
    assert session_id is not None
    found = events.session_timeline(session, rec.room_id, session_id)
    length = rec.duration_s or 1.0
    end = rec.starts_at + timedelta(seconds=length)

    def within(at: datetime) -> float | None:
        return (at - rec.starts_at).total_seconds() if rec.starts_at <= at <= end else None

    occ = [(x, float(p.count)) for p in found.occupancy if (x := within(p.at)) is not None]
    att = [(x, float(p.share)) for p in found.attention
           if (x := within(p.at)) is not None and p.share is not None]
    top = max([y for _, y in occ] + [1.0])
    return {"occupancy": occ, "attention": att, "occ_pts": _svg_points(occ, length, top),
            "att_pts": _svg_points(att, length, 1.0), "occ_max": int(top),
            "session_id": session_id}


def _attendance(request: Request, session: DB, rec: Recording) -> Any:
    day = rec.starts_at.astimezone(zone(_room_tz(session, rec))).date()
    report = reports.course_day(session, rec.course_id, day, context(request).rules)
    match = None
    for s in report.sessions:
        lo = s.starts_at - timedelta(minutes=context(request).rules.early_arrival_min)
        if s.room_id == rec.room_id and lo <= rec.starts_at < s.ends_at:
            match = s
    keys = [st.record_key for st in (match.students if match else []) if st.record_key]
    devices = dict(session.execute(select(Attendance.key, Attendance.device_id).where(
        Attendance.key.in_([_uuid(k) for k in keys]))).all()) if keys else {}
    sources = {str(k): ("recording" if svc.is_recording_device(d) else f"device {d}")
               for k, d in devices.items()}
    return match, sources


def _uuid(value: str) -> Any:
    import uuid

    return uuid.UUID(value)


def _room_tz(session: DB, rec: Recording) -> str:
    room = session.get(Room, rec.room_id)
    return room.timezone if room is not None else "UTC"


@router.get("/recordings/{recording_id}", response_class=HTMLResponse)
def recording_page(request: Request, who: User, session: DB, recording_id: str) -> Response:
    rec = _recording(session, who, recording_id)
    course = session.get(Course, rec.course_id)
    jobs = svc.jobs_of(session, rec.id)
    svc.fail_stale(session, context(request).settings.job_lease_s)
    match, sources = _attendance(request, session, rec)
    instructor = (rec.result or {}).get("instructor")
    inst_name = None
    if rec.instructor_id:
        student = session.get(Student, rec.instructor_id)
        inst_name = student.name if student else rec.instructor_id
    tz = zone(_room_tz(session, rec))
    return render(request, "recording.html", who, rec=rec, course=course, jobs=jobs,
                  job=jobs[-1] if jobs else None, report=match, sources=sources,
                  timelines=_timelines(session, rec), instructor=instructor,
                  instructor_name=inst_name, local_start=rec.starts_at.astimezone(tz),
                  chart_w=CHART_W, chart_h=CHART_H, workers=_workers(request, session),
                  refresh_s=2 if jobs and jobs[-1].status in ("queued", "running") else 0)


@router.get("/recordings/{recording_id}/job", response_class=HTMLResponse)
def job_fragment(request: Request, who: User, session: DB, recording_id: str) -> Response:
    """The job box alone (the page refreshes it while the job runs)."""
    rec = _recording(session, who, recording_id)
    svc.fail_stale(session, context(request).settings.job_lease_s)
    jobs = svc.jobs_of(session, rec.id)
    return render(request, "_job.html", who, rec=rec, job=jobs[-1] if jobs else None,
                  workers=_workers(request, session))


def _job_of(session: DB, who: ConsolePrincipal, recording_id: str, job_id: str) -> str:
    rec = _recording(session, who, recording_id)
    job = svc.get_job(session, job_id)
    if job.recording_id != rec.id:
        raise NotFoundError("no such job of this recording")
    return job.id


@router.post("/recordings/{recording_id}/jobs/{job_id}/cancel")
def cancel(request: Request, who: PostUser, session: DB, recording_id: str,
           job_id: str) -> Response:
    svc.cancel(session, _job_of(session, who, recording_id, job_id), _by(who))
    return back(f"/recordings/{recording_id}", "Cancel requested")


@router.post("/recordings/{recording_id}/jobs/{job_id}/retry")
def retry(request: Request, who: PostUser, session: DB, recording_id: str,
          job_id: str) -> Response:
    from cloud_sync.aggregator.api.recordings import _enqueue

    job = svc.retry(session, _job_of(session, who, recording_id, job_id), _by(who))
    _enqueue(context(request), job)
    return back(f"/recordings/{recording_id}", "Job queued again")


@router.post("/recordings/{recording_id}/delete")
def delete(request: Request, who: PostUser, session: DB, recording_id: str) -> Response:
    _recording(session, who, recording_id)
    svc.delete_recording(session, context(request).settings, recording_id, _by(who))
    return back("/recordings", "Recording deleted (its attendance stays)")


def _media(request: Request, who: ConsolePrincipal, session: DB, recording_id: str,
           which: str) -> FileResponse:
    rec = _recording(session, who, recording_id)
    settings = context(request).settings
    path = (svc.playback_path if which == "playback" else svc.poster_path)(settings, rec)
    if rec.playback != "ready" or not path.is_file():
        raise ServiceError("no browser copy of this recording")
    return FileResponse(path, media_type="video/mp4" if which == "playback" else "image/jpeg")


@router.get("/recordings/{recording_id}/playback.mp4")
def playback(request: Request, who: User, session: DB, recording_id: str) -> FileResponse:
    return _media(request, who, session, recording_id, "playback")


@router.get("/recordings/{recording_id}/poster.jpg")
def poster(request: Request, who: User, session: DB, recording_id: str) -> FileResponse:
    return _media(request, who, session, recording_id, "poster")
