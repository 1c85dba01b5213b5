"""Student pages: list and search, a student's attendance over a date range (CSV as the API),
enrolment in courses, face data (quality and count of descriptors), photo upload with a
per-photo result, and deletion of a student's face data (a parent's request)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy import func, or_, select
from starlette.concurrency import run_in_threadpool

from cloud_sync.aggregator.api.admin import _after_write as after_write
from cloud_sync.aggregator.api.reports import PCT_HEADER, From, To, csv_response, pct_rows
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.console.accounts import ConsolePrincipal, audit
from cloud_sync.aggregator.console.courses import visible_courses
from cloud_sync.aggregator.console.web import (
    DB,
    PostUser,
    User,
    back,
    context,
    render,
    require_admin,
)
from cloud_sync.aggregator.db.models import (
    Course,
    Enrollment,
    FaceEmbedding,
    FaceNegative,
    Student,
)
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import admin as admin_service
from cloud_sync.aggregator.services import admin_schemas as schemas
from cloud_sync.aggregator.services import csv_import, faces, privacy, reports
from cloud_sync.aggregator.services.common import NotFoundError, ServiceError, utcnow

_LOGGER = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
MAX_PHOTOS_PER_REQUEST = 50
# A photo scoring below this (size, sharpness and frontal pose: appliance/vision/quality.py) is
# enrolled with a warning: its descriptor matches the student's real faces less reliably.
LOW_QUALITY = 0.2
LOW_QUALITY_WARNING = ("low quality (small, blurred or turned face): recognition may miss "
                       "this student; add a sharper, frontal photo")
PAGE = 200


def _visible_student(session: DB, who: ConsolePrincipal, student_id: str) -> Student:
    """The student, if ``who`` may see them. A teacher gets the same 404 (same words) for an
    id that does not exist and for a student in none of their courses: a teacher cannot tell
    which ids exist."""
    student = session.get(Student, student_id)
    if student is not None and not who.is_admin:
        taught = session.scalars(select(Enrollment.course_id).where(
            Enrollment.student_id == student_id, Enrollment.course_id.in_(who.courses or {""})
        )).first()
        if taught is None:
            student = None
    if student is None:
        raise NotFoundError(f"no student {student_id!r}" + (
            "" if who.is_admin else " in your courses"))
    return student


def _students_page(request: Request, who: ConsolePrincipal, session: DB, q: str = "",
                   form: dict[str, str] | None = None, errors: dict[str, str] | None = None,
                   status: int = 200) -> Response:
    query = select(Student).order_by(Student.id)
    if not who.is_admin:
        query = query.where(Student.id.in_(select(Enrollment.student_id).where(
            Enrollment.course_id.in_(who.courses or {""}))))
    if q.strip():
        like = f"%{q.strip()}%"
        query = query.where(or_(Student.id.ilike(like), Student.name.ilike(like)))
    rows = list(session.scalars(query.limit(PAGE)))
    counts = dict(session.execute(
        select(FaceEmbedding.student_id, func.count()).where(
            FaceEmbedding.student_id.in_([s.id for s in rows]), FaceEmbedding.photo_of.is_(None))
        .group_by(FaceEmbedding.student_id)
    ).all())
    courses = visible_courses(session, who) if who.is_admin else []
    return render(request, "students.html", who, students=rows, q=q, counts=counts, page=PAGE,
                  courses=courses, form=form or {}, errors=errors or {}, status=status)


@router.get("/students", response_class=HTMLResponse)
def students_page(request: Request, who: User, session: DB,
                  q: Annotated[str, Query(max_length=100)] = "") -> Response:
    return _students_page(request, who, session, q)


FORM_FIELDS = {"id": "student_id", "name": "name"}


@router.post("/students")
def add_student(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                student_id: Annotated[str, Form(max_length=64)] = "",
                name: Annotated[str, Form(max_length=200)] = "",
                course_id: Annotated[str, Form(max_length=64)] = "",
                consent: Annotated[str, Form(max_length=10)] = "") -> Response:
    """One transaction: the student, their enrolment and consent are all written or none is.
    A refusal shows the form again with what was typed and the reason beside each field."""
    require_admin(who)
    form = {"student_id": student_id, "name": name, "course_id": course_id, "consent": consent}
    errors: dict[str, str] = {}
    data = None
    try:
        data = schemas.StudentIn(id=student_id, name=name)
    except ValidationError as err:
        errors = {FORM_FIELDS.get(k, k): v for k, v in csv_import.plain_errors(err).items()}
    begin_write(session)  # the checks and the writes in one transaction
    if data is not None and session.get(Student, data.id) is not None:
        errors["student_id"] = f"{data.id} already exists ({session.get(Student, data.id).name})"
    if course_id and session.get(Course, course_id.strip()) is None:
        errors["course_id"] = f"there is no course “{course_id.strip()}”: pick one in the list"
    if errors or data is None:
        session.rollback()
        return _students_page(request, who, session, form=form, errors=errors, status=422)
    now = utcnow()
    session.add(Student(id=data.id, name=data.name, created_at=now))
    session.flush()  # the student's row before the rows that refer to it
    detail = "no course"
    if course_id:
        session.add(Enrollment(student_id=data.id, course_id=course_id.strip(), created_at=now))
        detail = f"course {course_id.strip()}"
    session.flush()
    if consent == "granted":
        privacy.apply_consent(session, data.id, "granted", f"console:{who.name}",
                              "recorded when the student was added")
        detail += ", consent granted"
    audit(session, who.name, "student.add", f"student:{data.id}", detail)
    session.commit()
    after_write(context(request), tasks, "students")
    return back(f"/students/{data.id}", f"{data.name} ({data.id}) added"
                + (f" to {course_id.strip()}" if course_id else ""))


@router.get("/students/{student_id}", response_class=HTMLResponse)
def student_page(
    request: Request, who: User, session: DB, student_id: str,
    date_from: From = None, date_to: To = None,
) -> Response:
    student = _visible_student(session, who, student_id)
    report = reports.student_report(session, student_id, date_from, date_to,
                                    context(request).rules, 200)
    if not who.is_admin:
        report.courses = [p for p in report.courses if who.can_see_course(p.course_id)]
        report.records = [r for r in report.records if who.can_see_course(r.course_id)]
    face_rows = faces.list_faces(session, student_id)
    negatives = session.scalar(select(func.count()).where(
        FaceNegative.student_id == student_id, FaceNegative.state == "confirmed"))
    pending = session.scalar(select(func.count()).where(
        FaceNegative.student_id == student_id, FaceNegative.state == "pending"))
    enrolled = {p.course_id for p in report.courses}
    # the office enrols students in courses (docs/PRIVACY.md, "Who may do what")
    others = [c for c in visible_courses(session, who)
              if c.id not in enrolled] if who.is_admin else []
    return render(request, "student.html", who, student=student, report=report,
                  faces=face_rows, negatives=negatives, pending=pending, other_courses=others,
                  low_quality=LOW_QUALITY)


@router.get("/students/{student_id}/attendance.csv")
def student_download(
    request: Request, who: User, session: DB, student_id: str,
    date_from: From = None, date_to: To = None,
) -> Response:
    _visible_student(session, who, student_id)
    report = reports.student_report(session, student_id, date_from, date_to,
                                    context(request).rules)
    rows = [p for p in report.courses if who.can_see_course(p.course_id)]
    return csv_response(f"attendance-{student_id}-summary", PCT_HEADER, pct_rows(rows))


@router.post("/students/{student_id}/enrol")
def enrol(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
          student_id: str,
          course_id: Annotated[str, Form(max_length=64)]) -> Response:
    """Enrol a student in a course: the office's job (admins), never a teacher's. Enrolment
    puts the student's face descriptors into the room devices' rosters of that course, so a
    teacher who could enrol anyone could pull any child's descriptors (docs/PRIVACY.md)."""
    require_admin(who)  # before anything is looked up: the answer tells nothing about the id
    admin_service.create_enrollment(
        session, schemas.EnrollmentIn(student_id=student_id, course_id=course_id))
    audit(session, who.name, "student.enrol", f"student:{student_id}", f"course {course_id}")
    session.commit()
    after_write(context(request), tasks, "students")
    student, course = session.get(Student, student_id), session.get(Course, course_id)
    return back(f"/students/{student_id}", f"{student.name if student else student_id} "
                f"enrolled in {course.name if course else course_id}")


@router.post("/students/{student_id}/unenrol")
def unenrol(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
            student_id: str, course_id: Annotated[str, Form(max_length=64)]) -> Response:
    """Take a student out of a course (the office's job): the course's rooms stop carrying
    their descriptors; their past records stay."""
    require_admin(who)
    admin_service.delete_enrollment(session, student_id, course_id)
    audit(session, who.name, "student.unenrol", f"student:{student_id}", f"course {course_id}")
    session.commit()
    after_write(context(request), tasks, "students")
    student, course = session.get(Student, student_id), session.get(Course, course_id)
    return back(f"/students/{student_id}", f"{student.name if student else student_id} "
                f"no longer in {course.name if course else course_id}")


@router.post("/students/{student_id}/rename")
def rename(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
           student_id: str, name: Annotated[str, Form(max_length=200)]) -> Response:
    require_admin(who)
    try:
        patch = schemas.StudentPatch(name=name)
    except ValidationError as err:
        raise ServiceError(csv_import.validation_message(err)) from err
    old = session.get(Student, student_id)
    before = old.name if old else student_id
    admin_service.update_row(session, "students", student_id, patch)
    audit(session, who.name, "student.rename", f"student:{student_id}",
          f"{before} -> {patch.name}")
    session.commit()
    after_write(context(request), tasks, "students")
    return back(f"/students/{student_id}", f"{before} is now {patch.name}")


@router.post("/students/{student_id}/delete")
def erase_student(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                  student_id: str) -> Response:
    """The student leaves the school's records (the API's erasure, with the aggregator's
    ``erasure_policy``): face data deleted, records deleted or pseudonymised."""
    require_admin(who)
    ctx = context(request)
    student = session.get(Student, student_id)
    name = student.name if student else student_id
    out = privacy.erase(session, student_id, ctx.settings.erasure_policy,
                        accounts.actor(who.name))
    after_write(ctx, tasks, "students")
    ctx.scrubber.request()
    kept = (f"{out.attendance_pseudonymised} records kept without their name"
            if ctx.settings.erasure_policy == "pseudonymise"
            else f"{out.attendance_deleted} records deleted")
    return back("/students", f"{name} ({student_id}) deleted: face data gone, {kept}")


@router.post("/students/consent")
def bulk_consent(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                 student_ids: Annotated[list[str], Form()],
                 note: Annotated[str, Form(max_length=300)] = "") -> Response:
    """Consent to face recognition recorded for every selected student in one transaction
    (a class's signed forms at once)."""
    require_admin(who)
    if len(student_ids) > PAGE:
        raise ServiceError(f"at most {PAGE} students at once")
    begin_write(session)
    done = 0
    for sid in dict.fromkeys(student_ids):
        student = session.get(Student, sid)
        if student is None:
            raise NotFoundError(f"no student {sid!r}")
        if student.consent != "granted":
            privacy.apply_consent(session, sid, "granted", accounts.actor(who.name),
                                  note or "recorded for several students at once")
            done += 1
    session.commit()
    after_write(context(request), tasks, "students")
    return back("/students", f"consent recorded for {done} student{'' if done == 1 else 's'}"
                + (f" ({len(student_ids) - done} already had it)"
                   if done < len(student_ids) else ""))


def _encode_one(request: Request, student_id: str, name: str, data: bytes,
                who: str) -> dict[str, object]:
    ctx = context(request)
    result: dict[str, object] = {"file": name, "ok": False, "reason": None, "quality": None,
                                 "warning": None}
    try:
        if len(data) > ctx.settings.max_photo_bytes:
            raise ServiceError(f"larger than {ctx.settings.max_photo_bytes} bytes")
        encoded = ctx.encoder.encode(faces.decode_image(data))
        if encoded.embedding is None:
            raise ServiceError(encoded.reason or "no usable face")
        with ctx.sessions() as session:
            row = faces.store_embedding(session, ctx.settings, student_id, encoded.vectors,
                                        encoded.quality, f"console:{who}:{name}"[:200], data,
                                        Path(name).suffix.lower())
            audit(session, who, "face.enrol", f"student:{student_id}", f"{name} (face {row.id})")
            session.commit()
    except ServiceError as err:
        result["reason"] = err.message
        return result
    result.update(ok=True, quality=encoded.quality, warning=(
        LOW_QUALITY_WARNING if encoded.quality is not None and encoded.quality < LOW_QUALITY
        else None))
    return result


@router.post("/students/{student_id}/photos")
async def upload_photos(
    request: Request, tasks: BackgroundTasks, who: PostUser, student_id: str,
    photos: Annotated[list[UploadFile], File()],
) -> Response:
    """Several photos at once; the page's script sends them one by one for its progress bar.
    JSON for ``Accept: application/json``, else the student page with a notice."""
    require_admin(who)
    if len(photos) > MAX_PHOTOS_PER_REQUEST:
        raise ServiceError(f"at most {MAX_PHOTOS_PER_REQUEST} photos at once")
    ctx = context(request)
    with ctx.sessions() as session:
        privacy.require_consent(session, student_id)  # 404 unknown, 409 without consent
    results = []
    for photo in photos:
        data = await photo.read(ctx.settings.max_photo_bytes + 1)
        results.append(await run_in_threadpool(
            _encode_one, request, student_id, photo.filename or "photo", data, who.name))
    after_write(context(request), tasks, "students")
    accepted = sum(1 for r in results if r["ok"])
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"accepted": accepted, "results": results})
    summary = "; ".join(
        f"{r['file']}: " + ((f"accepted, {r['warning']}" if r["warning"] else "accepted")
                            if r["ok"] else str(r["reason"]))
        for r in results)
    return back(f"/students/{student_id}", f"{accepted} of {len(results)} accepted — {summary}")


@router.post("/students/{student_id}/consent")
def consent(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
            student_id: str, state: Annotated[str, Form(pattern="^(granted|withdrawn)$")],
            note: Annotated[str, Form(max_length=300)] = "") -> Response:
    """Record the consent to face recognition (the privacy service's rule: no enrolment
    without it); a withdrawal deletes the student's face data at once."""
    require_admin(who)
    # A withdrawal deletes the face data in the privacy service (the API's and CLI's rule).
    privacy.set_consent(session, student_id, state, f"console:{who.name}", note)  # type: ignore[arg-type]
    session.commit()
    after_write(context(request), tasks, "students")
    if state == "withdrawn":
        context(request).scrubber.request()
    student = session.get(Student, student_id)
    name = student.name if student else student_id
    return back(f"/students/{student_id}", f"consent to face recognition {state} for {name}"
                + (": face data deleted" if state == "withdrawn" else ""))


@router.post("/students/{student_id}/faces/delete")
def delete_face_data(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
                     student_id: str) -> Response:
    """Every descriptor, kept photo and negative example of the student, and the descriptors
    devices sent with the student's records (a parent's request); attendance records stay."""
    require_admin(who)
    begin_write(session)
    if session.get(Student, student_id) is None:
        raise NotFoundError(f"student {student_id!r} does not exist")
    count, _ = privacy.delete_face_data(session, student_id)
    audit(session, who.name, "face.delete", f"student:{student_id}", f"{count} descriptors")
    session.commit()
    after_write(context(request), tasks, "students")
    context(request).scrubber.request()
    student = session.get(Student, student_id)
    return back(f"/students/{student_id}", f"face data of {student.name if student else student_id}"
                f" deleted ({count} descriptor{'' if count == 1 else 's'})")


__all__ = ["Course", "router"]
