"""Timetable pages (admin): rooms, courses (with their teachers), weekly schedules created and
edited in forms, "a class from now" in two clicks, and CSV import with the per-line report."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlalchemy import select

from cloud_sync.aggregator.api.admin import _after_write as after_write
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.console.accounts import audit
from cloud_sync.aggregator.console.web import (
    DB,
    PostUser,
    User,
    back,
    context,
    render,
    require_admin,
)
from cloud_sync.aggregator.db.models import ConsoleUser, Course, Room, Schedule
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import admin as svc
from cloud_sync.aggregator.services import admin_schemas as schemas
from cloud_sync.aggregator.services import csv_import
from cloud_sync.aggregator.services.common import (
    ConflictError,
    NotFoundError,
    ServiceError,
    utcnow,
)
from cloud_sync.aggregator.services.timetable import zone

router = APIRouter(include_in_schema=False)
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MAX_CSV_BYTES = 2_000_000


def _validated(model: type[schemas.Strict], values: dict[str, object]) -> schemas.Strict:
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ServiceError(csv_import.validation_message(err)) from err


def _page(request: Request, who: accounts.ConsolePrincipal, session: DB,
          report: csv_import.ImportReport | None = None, status: int = 200,
          filename: str = "", form_name: str = "", form: dict[str, object] | None = None,
          errors: dict[str, str] | None = None) -> Response:
    """The timetable page; ``form_name`` (``room``, ``course``, ``schedule`` or
    ``schedule-<id>``) names the form refused with ``errors`` per field (``row``: the form as
    a whole), shown again with what was typed (``form``)."""
    rooms = list(session.scalars(select(Room).order_by(Room.id)))
    courses = list(session.scalars(select(Course).order_by(Course.id)))
    schedules = list(session.scalars(
        select(Schedule).order_by(Schedule.room_id, Schedule.weekday, Schedule.start_time)))
    teachers = [u for u, _ in accounts.list_users(session) if u.role == "teacher"]
    taught = {u.name: c for u, c in accounts.list_users(session)}
    return render(request, "timetable.html", who, rooms=rooms, courses=courses,
                  schedules=schedules, teachers=teachers, taught=taught, weekdays=WEEKDAYS,
                  report=report, default_tz=context(request).settings.timezone, status=status,
                  filename=filename, form_name=form_name, form=form or {},
                  errors=errors or {})


def _refused(request: Request, who: accounts.ConsolePrincipal, session: DB, form_name: str,
             form: dict[str, object], errors: dict[str, str]) -> Response:
    """The page again, 422, nothing written: the refused form keeps what was typed and says
    why beside each field (the add-student pattern, issue 25 item 5)."""
    session.rollback()
    return _page(request, who, session, status=422, form_name=form_name, form=form,
                 errors=errors)


def _field_errors(err: ValidationError, fields: dict[str, str]) -> dict[str, str]:
    """Per form field, the plain reason (``fields``: schema field -> form field); a reason
    about the whole row goes beside the field it names, else to ``row``."""
    out: dict[str, str] = {}
    for field, message in csv_import.plain_errors(err).items():
        if field == "row":
            field = next((f for f in ("end_time", "effective_to") if f in message), "row")
        out.setdefault(fields.get(field, field), message)
    return out


@router.get("/timetable", response_class=HTMLResponse)
def timetable_page(request: Request, who: User, session: DB) -> Response:
    require_admin(who)
    return _page(request, who, session)


@router.post("/timetable/now")
def class_now(
    request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
    course_id: Annotated[str, Form(max_length=64)],
    room_id: Annotated[str, Form(max_length=64)],
    minutes: Annotated[int, Form(ge=5, le=600)] = 60,
    replace: Annotated[bool, Form()] = False,
) -> Response:
    """A one-day schedule row: the course in the room from now (this minute) for ``minutes``
    (ending at 23:59 local at the latest)."""
    require_admin(who)
    room = session.get(Room, room_id)
    if room is None:
        raise NotFoundError(f"room {room_id!r} does not exist")
    local = utcnow().astimezone(zone(room.timezone))
    start = local.replace(second=0, microsecond=0)
    end = min(start + timedelta(minutes=minutes),
              datetime.combine(start.date(), time(23, 59), tzinfo=start.tzinfo))
    if end <= start:
        raise ServiceError("too late today for a class: try after midnight")
    data = _validated(schemas.ScheduleIn, {
        "course_id": course_id, "room_id": room_id, "weekday": start.weekday(),
        "start_time": start.time(), "end_time": end.time(),
        "effective_from": start.date(), "effective_to": start.date(),
    })
    row, replaced = svc.create_schedule_replacing(
        session, data, replace)  # type: ignore[arg-type]
    audit(session, who.name, "schedule.class_now", f"course:{course_id}", f"room {room_id} "
          f"{start:%Y-%m-%d %H:%M}-{end:%H:%M} (schedule {row.id})" + _replacing(replaced))
    session.commit()
    after_write(context(request), tasks, "schedules")
    return back("/", f"{course_id} in {room_id} from {start:%H:%M} to {end:%H:%M}"
                + _replacing(replaced))


def _replacing(replaced: list[str]) -> str:
    return f", replacing {'; '.join(replaced)}" if replaced else ""


@router.post("/timetable/rooms")
def add_room(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
             room_id: Annotated[str, Form(max_length=64)] = "",
             name: Annotated[str, Form(max_length=200)] = "",
             site: Annotated[str, Form(max_length=64)] = "main",
             timezone: Annotated[str, Form(max_length=64)] = "") -> Response:
    """One transaction: the room and its audit entry. A refusal shows the form again with
    what was typed and the reason beside each field."""
    require_admin(who)
    form = {"room_id": room_id, "name": name, "site": site, "timezone": timezone}
    try:
        data = schemas.RoomIn.model_validate({
            "id": room_id.strip(), "name": name.strip() or None,
            "site": site.strip() or "main", "timezone": timezone.strip() or None})
    except ValidationError as err:
        return _refused(request, who, session, "room", form,
                        _field_errors(err, {"id": "room_id"}))
    begin_write(session)
    if (row := session.get(Room, data.id)) is not None:
        return _refused(request, who, session, "room", form, {
            "room_id": f"{data.id} already exists ({row.name})"})
    svc.create_row(session, "rooms", data, context(request).settings.timezone, commit=False)
    audit(session, who.name, "room.add", f"room:{data.id}")
    session.commit()
    after_write(context(request), tasks, "rooms")
    return back("/timetable", f"room {data.id} added")


@router.post("/timetable/courses")
def add_course(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
               course_id: Annotated[str, Form(max_length=64)] = "",
               name: Annotated[str, Form(max_length=200)] = "",
               teacher: Annotated[str, Form(max_length=100)] = "") -> Response:
    """One transaction: the course, its teacher and the audit entries, all or none. A
    refusal shows the form again with what was typed and the reason beside each field."""
    require_admin(who)
    form = {"course_id": course_id, "name": name, "teacher": teacher}
    errors: dict[str, str] = {}
    data = None
    try:
        data = schemas.CourseIn.model_validate({"id": course_id.strip(), "name": name.strip()})
    except ValidationError as err:
        errors = _field_errors(err, {"id": "course_id"})
    begin_write(session)
    if course_id.strip() and (row := session.get(Course, course_id.strip())) is not None:
        errors["course_id"] = f"{row.id} already exists ({row.name})"
    teacher = teacher.strip()
    if teacher:
        user = session.scalars(select(ConsoleUser).where(ConsoleUser.name == teacher)).first()
        if user is None or user.role != "teacher":
            errors["teacher"] = f"there is no teacher “{teacher}”: pick one in the list"
    if errors or data is None:
        return _refused(request, who, session, "course", form, errors)
    svc.create_row(session, "courses", data, commit=False)
    audit(session, who.name, "course.add", f"course:{data.id}")
    if teacher:
        accounts.assign_courses(session, teacher, [data.id], who.name, commit=False)
    session.commit()
    after_write(context(request), tasks, "courses")
    return back("/timetable", f"course {data.id} added" + (f", taught by {teacher}"
                                                           if teacher else ""))


@router.post("/timetable/teachers")
def assign_teacher(who: PostUser, session: DB,
                   course_id: Annotated[str, Form(max_length=64)],
                   teacher: Annotated[str, Form(max_length=100)]) -> Response:
    require_admin(who)
    accounts.assign_courses(session, teacher, [course_id], who.name)
    return back("/timetable", f"{teacher} teaches {course_id}")


def _schedule_values(course_id: str, room_id: str, weekday: int | str, start_time: str,
                     end_time: str, effective_from: str, effective_to: str) -> dict[str, object]:
    return {"course_id": course_id, "room_id": room_id, "weekday": weekday,
            "start_time": start_time, "end_time": end_time,
            "effective_from": effective_from or None, "effective_to": effective_to or None}


Text64 = Annotated[str, Form(max_length=64)]
Opt = Annotated[str, Form(max_length=32)]


def _schedule_refusal(err: ServiceError) -> dict[str, str]:
    """A service refusal of a slot, beside the field it is about."""
    text = err.message
    if isinstance(err, NotFoundError) and text.startswith("course "):
        return {"course_id": f"{text}: pick one in the list"}
    if isinstance(err, NotFoundError) and text.startswith("room "):
        return {"room_id": f"{text}: pick one in the list"}
    if isinstance(err, ConflictError) and "already has" in text:
        return {"row": text + " (tick “replace the class already there” to replace it)"}
    for field in ("end_time", "effective_to"):  # the merged slot's order (an edit)
        if field in text:
            return {field: text.removeprefix("Value error, ")}
    return {"row": text}


def _save_schedule(request: Request, tasks: BackgroundTasks, who: accounts.ConsolePrincipal,
                   session: DB, schedule_id: int | None, form: dict[str, object],
                   replace: bool) -> Response:
    """Add (``schedule_id`` None) or edit a weekly slot: one transaction with its audit
    entry; a refusal shows the form again, as typed, with the reason beside the field."""
    require_admin(who)
    form_name = "schedule" if schedule_id is None else f"schedule-{schedule_id}"
    values = _schedule_values(**{k: form[k] for k in (  # type: ignore[arg-type]
        "course_id", "room_id", "weekday", "start_time", "end_time", "effective_from",
        "effective_to")})
    model = schemas.ScheduleIn if schedule_id is None else schemas.SchedulePatch
    try:
        data = model.model_validate(values)
    except ValidationError as err:
        return _refused(request, who, session, form_name, form, _field_errors(err, {}))
    try:
        if schedule_id is None:
            row, replaced = svc.create_schedule_replacing(
                session, data, replace, commit=False)  # type: ignore[arg-type]
            saved_id = row.id
        else:
            svc.update_schedule(session, schedule_id, data, replace,  # type: ignore[arg-type]
                                commit=False)
            saved_id, replaced = schedule_id, []
    except ServiceError as err:
        if isinstance(err, NotFoundError) and err.message.startswith("schedule "):
            raise
        return _refused(request, who, session, form_name, form, _schedule_refusal(err))
    action = "schedule.add" if schedule_id is None else "schedule.edit"
    audit(session, who.name, action, f"schedule:{saved_id}",
          f"{form['course_id']}@{form['room_id']}" + _replacing(replaced))
    session.commit()
    after_write(context(request), tasks, "schedules")
    done = "added" if schedule_id is None else "saved"
    return back("/timetable", f"schedule {saved_id} {done}" + _replacing(replaced))


Day = Annotated[str, Form(max_length=8)]


@router.post("/timetable/schedules")
def add_schedule(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                 course_id: Text64 = "", room_id: Text64 = "", weekday: Day = "",
                 start_time: Opt = "", end_time: Opt = "",
                 effective_from: Opt = "", effective_to: Opt = "",
                 replace: Annotated[bool, Form()] = False) -> Response:
    form: dict[str, object] = {
        "course_id": course_id, "room_id": room_id, "weekday": weekday,
        "start_time": start_time, "end_time": end_time, "effective_from": effective_from,
        "effective_to": effective_to, "replace": replace}
    return _save_schedule(request, tasks, who, session, None, form, replace)


@router.post("/timetable/schedules/{schedule_id}")
def edit_schedule(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                  schedule_id: int, course_id: Text64 = "", room_id: Text64 = "",
                  weekday: Day = "", start_time: Opt = "", end_time: Opt = "",
                  effective_from: Opt = "", effective_to: Opt = "",
                  replace: Annotated[bool, Form()] = False) -> Response:
    form: dict[str, object] = {
        "course_id": course_id, "room_id": room_id, "weekday": weekday,
        "start_time": start_time, "end_time": end_time, "effective_from": effective_from,
        "effective_to": effective_to, "replace": replace}
    return _save_schedule(request, tasks, who, session, schedule_id, form, replace)


@router.post("/timetable/schedules/{schedule_id}/delete")
def remove_schedule(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                    schedule_id: int) -> Response:
    require_admin(who)
    svc.delete_schedule(session, schedule_id)
    audit(session, who.name, "schedule.delete", f"schedule:{schedule_id}")
    session.commit()
    after_write(context(request), tasks, "schedules")
    return back("/timetable", f"schedule {schedule_id} deleted")


@router.post("/timetable/import", response_class=HTMLResponse)
async def import_csv(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                     kind: Annotated[str, Form(max_length=20)],
                     file: Annotated[UploadFile, File()]) -> Response:
    require_admin(who)
    data = await file.read(MAX_CSV_BYTES + 1)
    if len(data) > MAX_CSV_BYTES:
        raise ServiceError(f"CSV larger than {MAX_CSV_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ServiceError(f"the file is not UTF-8 text ({err.reason})") from err
    report = csv_import.import_csv(session, kind, text, context(request).settings.timezone,
                                   accounts.actor(who.name))
    audit(session, who.name, "import.csv", f"import:{kind}",
          f"{file.filename}: {report.rows} rows, {report.created} created, "
          f"{report.updated} updated, {len(report.errors)} errors")
    session.commit()
    after_write(context(request), tasks, kind if kind != "enrollments" else "students")
    if kind == "students" and "withdrawn" in text.lower():  # face data deleted: scrub it
        context(request).scrubber.request()
    return _page(request, who, session, report, filename=file.filename or "")


__all__ = ["ConsoleUser", "router"]
