"""Course pages: the courses a user may see, a course's day (per session: present, first seen,
confidence, missing) with corrections, a range summary, and the CSV downloads (the API's)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import func, select

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
    return render(request, "course.html", who, report=report, day=day, history=history,
                  now=utcnow())


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
    todo = [st for st in found.students if st.status not in SEEN]
    if not todo:
        raise ConflictError("everyone is already present")
    corrections.mark_all_present(session, who, course_id, [st.student_id for st in todo],
                                 starts_at, reason)
    return _marked(request, course_id, starts_at, [st.name for st in todo])


@router.post("/courses/{course_id}/wrong")
def mark_wrong(
    who: PostUser, session: DB, course_id: str,
    record_key: Annotated[str, Form(max_length=64)],
    day: Annotated[date, Form(alias="date")],
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    row = corrections.mark_wrong(session, who, record_key, reason)
    return back(f"/courses/{course_id}?date={day.isoformat()}",
                f"recognition of {row.student_id} marked wrong")
