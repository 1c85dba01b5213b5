"""Course pages: the courses a user may see, a course's day (per session: present, first seen,
confidence, missing) with corrections, a range summary, and the CSV downloads (the API's)."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo

from fastapi import APIRouter, BackgroundTasks, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import func, select

from cloud_sync.aggregator.api.notify import notify_rosters
from cloud_sync.aggregator.api.reports import (
    PCT_HEADER,
    From,
    To,
    course_day_csv,
    csv_response,
    pct_rows,
)
from cloud_sync.aggregator.console import corrections
from cloud_sync.aggregator.console.accounts import ConsolePrincipal
from cloud_sync.aggregator.console.web import DB, PostUser, User, back, context, render
from cloud_sync.aggregator.db.models import (
    ConsoleUser,
    Course,
    CourseTeacher,
    Enrollment,
    Room,
    Schedule,
    Student,
)
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import reports
from cloud_sync.aggregator.services.common import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServiceError,
    utcnow,
)

router = APIRouter(include_in_schema=False)
Day = Annotated[date | None, Query(alias="date")]
SEEN = ("present", "late")  # statuses a mark by hand would not change


def visible_courses(session: DB, who: ConsolePrincipal) -> list[Course]:
    query = select(Course).order_by(Course.id)
    if not who.is_admin:
        query = query.where(Course.id.in_(who.courses or {""}))
    return list(session.scalars(query))


def _check(who: ConsolePrincipal, course_id: str) -> None:
    if not who.can_see_course(course_id):
        raise ForbiddenError("you do not teach this course")


@router.get("/courses", response_class=HTMLResponse)
def courses_page(request: Request, who: User, session: DB) -> Response:
    courses = visible_courses(session, who)
    counts = dict(session.execute(
        select(Enrollment.course_id, func.count()).group_by(Enrollment.course_id)
    ).all())
    teachers: dict[str, list[str]] = {}
    for course_id, name in session.execute(
        select(CourseTeacher.course_id, ConsoleUser.name)
        .join(ConsoleUser, ConsoleUser.id == CourseTeacher.user_id).order_by(ConsoleUser.name)
    ):
        teachers.setdefault(course_id, []).append(name)
    return render(request, "courses.html", who, courses=courses, counts=counts,
                  teachers=teachers, today=utcnow().date())


@router.get("/courses/{course_id}", response_class=HTMLResponse)
def course_page(request: Request, who: User, session: DB, course_id: str,
                day: Day = None) -> Response:
    _check(who, course_id)
    day = day or utcnow().date()
    report = reports.course_day(session, course_id, day, context(request).rules)
    history = corrections.history(session, course_id, 50)
    struck: dict[tuple[int, str], object] = {}
    if report.sessions:
        lo = min(s.starts_at for s in report.sessions)
        hi = max(s.starts_at for s in report.sessions) + timedelta(seconds=1)
        for row in corrections.active_strikes(session, course_id, lo, hi):
            struck[(int(row.at.timestamp()), row.student_id)] = row
    pending = corrections.pending_counts(session, [c.id for c in history])
    return render(request, "course.html", who, report=report, day=day, history=history,
                  now=utcnow(), struck=struck, pending=pending)


@router.get("/courses/{course_id}/day.csv")
def course_day_download(request: Request, who: User, session: DB, course_id: str,
                        day: Day = None) -> Response:
    _check(who, course_id)
    report = reports.course_day(session, course_id, day or utcnow().date(),
                                context(request).rules)
    return course_day_csv(report)


def _summary(request: Request, who: ConsolePrincipal, session: DB, course_id: str,
             date_from: date | None, date_to: date | None) -> reports.CourseSummary:
    _check(who, course_id)
    return reports.course_summary(session, course_id, date_from, date_to,
                                  context(request).rules)


@router.get("/courses/{course_id}/summary", response_class=HTMLResponse)
def course_summary_page(request: Request, who: User, session: DB, course_id: str,
                        date_from: From = None, date_to: To = None) -> Response:
    summary = _summary(request, who, session, course_id, date_from, date_to)
    return render(request, "summary.html", who, summary=summary)


@router.get("/courses/{course_id}/summary.csv")
def course_summary_download(request: Request, who: User, session: DB, course_id: str,
                            date_from: From = None, date_to: To = None) -> Response:
    summary = _summary(request, who, session, course_id, date_from, date_to)
    return csv_response(f"attendance-{course_id}", PCT_HEADER, pct_rows(summary.students))


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _marked(request: Request, course_id: str, starts_at: datetime, names: list[str]
            ) -> Response:
    """After marking by hand: JSON for the page's script (it refreshes the class in place, no
    reload), else back to the day's page with a notice."""
    message = (f"{names[0]} marked present" if len(names) == 1
               else f"{len(names)} students marked present")
    if _wants_json(request):
        return JSONResponse({"marked": len(names), "message": message})
    return back(f"/courses/{course_id}?date={starts_at.date().isoformat()}", message)


def _aware(starts_at: datetime) -> datetime:
    if starts_at.tzinfo is None:
        raise ServiceError("starts_at needs a time zone")
    return starts_at


DEFAULT_REASON = "seen in class by the teacher"


@router.post("/courses/{course_id}/present")
def mark_present(
    request: Request, who: PostUser, session: DB, course_id: str,
    student_id: Annotated[str, Form(max_length=64)],
    starts_at: Annotated[datetime, Form()],
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    row = corrections.mark_present(session, who, course_id, student_id, _aware(starts_at),
                                   reason)
    name = session.scalar(select(Student.name).where(Student.id == row.student_id))
    return _marked(request, course_id, starts_at, [name or student_id])


@router.post("/courses/{course_id}/present-all")
def mark_all_present(
    request: Request, who: PostUser, session: DB, course_id: str,
    starts_at: Annotated[datetime, Form()],
    reason: Annotated[str, Form(max_length=500)] = DEFAULT_REASON,
) -> Response:
    """Every student of the class at ``starts_at`` not yet present or late: present by hand,
    in one transaction (the class as it stands when the request is read)."""
    _check(who, course_id)
    starts_at = _aware(starts_at)
    begin_write(session)  # read the class and write the marks in one transaction
    report = reports.course_day(session, course_id, starts_at.date(), context(request).rules)
    found = next((s for s in report.sessions if s.starts_at == starts_at), None)
    if found is None:
        raise NotFoundError(f"no class of {course_id} starts at {starts_at.isoformat()}")
    # a student marked "not this student" in this class was not there: left to the teacher
    struck = {row.student_id for row in corrections.active_strikes(
        session, course_id, starts_at, starts_at + timedelta(seconds=1))}
    todo = [st for st in found.students if st.status not in SEEN and st.student_id not in struck]
    if not todo:
        raise ConflictError("everyone is already present")
    corrections.mark_all_present(session, who, course_id, [st.student_id for st in todo],
                                 starts_at, reason)
    return _marked(request, course_id, starts_at, [st.name for st in todo])


def _marked_absent(request: Request, course_id: str, starts_at: datetime, names: list[str]
                   ) -> Response:
    message = (f"{names[0]} marked absent" if len(names) == 1
               else f"{len(names)} students marked absent")
    if _wants_json(request):
        return JSONResponse({"marked": len(names), "message": message})
    return back(f"/courses/{course_id}?date={starts_at.date().isoformat()}", message)


ABSENT_REASON = "absent on the class register"


@router.post("/courses/{course_id}/absent")
def mark_absent(
    request: Request, who: PostUser, session: DB, course_id: str,
    student_id: Annotated[str, Form(max_length=64)],
    starts_at: Annotated[datetime, Form()],
    reason: Annotated[str, Form(max_length=500)] = ABSENT_REASON,
) -> Response:
    """A student of a class without data (no device online, or no face data) was absent: the
    office fills it in by hand (it then counts in the percentages)."""
    _check(who, course_id)
    rows = corrections.mark_absent(session, who, course_id, [student_id], _aware(starts_at),
                                   reason, context(request).rules)
    name = session.scalar(select(Student.name).where(Student.id == rows[0].student_id))
    return _marked_absent(request, course_id, starts_at, [name or student_id])


@router.post("/courses/{course_id}/absent-rest")
def mark_rest_absent(
    request: Request, who: PostUser, session: DB, course_id: str,
    starts_at: Annotated[datetime, Form()],
    reason: Annotated[str, Form(max_length=500)] = ABSENT_REASON,
) -> Response:
    """Every student of the class at ``starts_at`` still without data (``no_data`` or
    ``no_face_data``, none struck): absent by hand, in one transaction. The office marks
    those on the register present first, then the rest absent."""
    _check(who, course_id)
    starts_at = _aware(starts_at)
    report = reports.course_day(session, course_id, starts_at.date(), context(request).rules)
    found = next((s for s in report.sessions if s.starts_at == starts_at), None)
    if found is None:
        raise NotFoundError(f"no class of {course_id} starts at {starts_at.isoformat()}")
    todo = [st for st in found.students if st.status in reports.UNCOUNTED]
    if not todo:
        raise ConflictError("nobody in this class is without data")
    session.rollback()  # mark_absent reads the class again in its own write transaction
    corrections.mark_absent(session, who, course_id, [st.student_id for st in todo],
                            starts_at, reason, context(request).rules)
    return _marked_absent(request, course_id, starts_at, [st.name for st in todo])


@router.post("/courses/{course_id}/wrong")
def mark_wrong(
    request: Request, who: PostUser, session: DB, course_id: str,
    record_key: Annotated[str, Form(max_length=64)],
    day: Annotated[date, Form(alias="date")],
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """"Not this student": the student's attendance for the whole class is struck; the face
    is held (pending) until the teacher confirms it on the correction's page."""
    row = corrections.mark_wrong(session, who, record_key, reason, context(request).rules)
    name = session.scalar(select(Student.name).where(Student.id == row.student_id))
    held = corrections.pending_counts(session, [row.id]).get(row.id, 0)
    message = (f"{name or row.student_id} struck for the whole class"
               + (f"; the face is held until you confirm it (correction {row.id})" if held
                  else ""))
    return back(f"/courses/{course_id}?date={day.isoformat()}", message)


CorrectionId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("/courses/{course_id}/corrections/{correction_id}", response_class=HTMLResponse)
def correction_page(request: Request, who: User, session: DB, course_id: str,
                    correction_id: CorrectionId) -> Response:
    """A correction: what it struck, the faces it holds and what they would turn away on the
    devices; confirm them (teacher of the course or admin), or undo the correction."""
    _check(who, course_id)
    found = corrections.review(session, who, correction_id, course_id)
    return render(request, "correction.html", who, review=found, course_id=course_id,
                  zone=_zone(session, course_id))


def _zone(session: DB, course_id: str) -> ZoneInfo:
    """The time zone of the course's (first) room, for times in plain words."""
    tz = session.scalar(select(Room.timezone).join(Schedule, Schedule.room_id == Room.id)
                        .where(Schedule.course_id == course_id).limit(1))
    try:
        return ZoneInfo(tz or "UTC")
    except (ValueError, KeyError):
        return ZoneInfo("UTC")


def _class_day(row_at: datetime, session: DB, course_id: str) -> str:
    return row_at.astimezone(_zone(session, course_id)).date().isoformat()


@router.post("/courses/{course_id}/corrections/{correction_id}/confirm")
def confirm_correction(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                       course_id: str, correction_id: CorrectionId) -> Response:
    _check(who, course_id)
    count = corrections.confirm_negatives(session, who, correction_id, course_id)
    tasks.add_task(notify_rosters, context(request))
    return back(f"/courses/{course_id}/corrections/{correction_id}",
                f"confirmed: the room devices get {count} face{'' if count == 1 else 's'} "
                "at their next roster pull")


@router.post("/courses/{course_id}/corrections/{correction_id}/undo")
def undo_correction(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                    course_id: str, correction_id: CorrectionId,
                    back_to: Annotated[str, Form(max_length=16)] = "course") -> Response:
    """Undo any correction: the attendance is as it was before it; its negatives are deleted
    (the roster changes back when one had been confirmed)."""
    _check(who, course_id)
    done = corrections.undo(session, who, correction_id, course_id)
    if done.roster_changed:
        tasks.add_task(notify_rosters, context(request))
    name = session.scalar(select(Student.name).where(Student.id == done.row.student_id))
    name = name or done.row.student_id
    what = (f"{name} marked present by hand" if done.row.kind == "present"
            else f"“not {name}” in this class")
    message = f"undone: {what}; attendance restored"
    if done.roster_changed:
        message += "; the room devices get the restored roster at their next pull"
    if back_to == "review":
        return back(f"/courses/{course_id}/corrections/{correction_id}", message)
    return back(f"/courses/{course_id}?date={_class_day(done.row.at, session, course_id)}",
                message)
