"""Privacy endpoints (admin token): consent, erasure, subject access export, the audit log."""

# No `from __future__ import annotations`: FastAPI reads the annotations at import.

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from pydantic import BaseModel, Field

from cloud_sync.aggregator.api.context import AdminPrincipal, AppContext
from cloud_sync.aggregator.api.deps import DB, Admin, context
from cloud_sync.aggregator.api.notify import notify_rosters
from cloud_sync.aggregator.api.openapi import IsoDateTime
from cloud_sync.aggregator.services import audit, privacy
from cloud_sync.protocol import Identifier

router = APIRouter(prefix="/api/v1", tags=["privacy"])


def actor(who: AdminPrincipal) -> str:
    """How an admin token appears in the audit log."""
    return f"token:{who.name}"


class ConsentIn(BaseModel):
    state: privacy.ConsentState = Field(description="granted or withdrawn.")
    note: str = Field(default="", max_length=300,
                      description="e.g. who gave or withdrew it (form reference), no contents.")


def _after_face_change(ctx: AppContext, tasks: BackgroundTasks) -> None:
    """Deleted face data: tell every room's devices to pull their (changed) roster now, and
    scrub the database files (on the scrubber's thread: it may wait for readers)."""
    tasks.add_task(notify_rosters, ctx)
    ctx.scrubber.request()


@router.get("/students/{student_id}/consent", response_model=privacy.ConsentOut,
            summary="A student's consent to face recognition (granted, withdrawn, or never "
            "recorded).")
def get_consent(who: Admin, session: DB, student_id: Identifier) -> privacy.ConsentOut:
    return privacy.consent_of(session, student_id)


@router.post(
    "/students/{student_id}/consent", response_model=privacy.ConsentOut,
    summary="Record consent granted or withdrawn. Withdrawal deletes the student's face "
    "descriptors (every embedder's, and kept photos) and pushes the changed roster to devices.",
)
def post_consent(request: Request, tasks: BackgroundTasks, who: Admin, session: DB,
                 student_id: Identifier, body: ConsentIn) -> privacy.ConsentOut:
    ctx = context(request)
    out = privacy.set_consent(session, student_id, body.state, actor(who), body.note)
    if body.state == "withdrawn":
        _after_face_change(ctx, tasks)
    return out


@router.post(
    "/students/{student_id}/erase", response_model=privacy.ErasureOut,
    summary="Erase a student (right to erasure): face data deleted everywhere, records "
    "deleted or pseudonymised by the aggregator's erasure_policy, the student removed.",
)
def post_erase(request: Request, tasks: BackgroundTasks, who: Admin, session: DB,
               student_id: Identifier) -> privacy.ErasureOut:
    ctx = context(request)
    out = privacy.erase(session, student_id, ctx.settings.erasure_policy, actor(who))
    _after_face_change(ctx, tasks)
    return out


@router.get(
    "/students/{student_id}/export",
    summary="Everything held about a student (subject access request), as JSON or CSV.",
    responses={200: {"content": {"application/json": {}, "text/csv": {}}}},
)
def get_export(who: Admin, session: DB, student_id: Identifier,
               format: Annotated[Literal["json", "csv"], Query(
                   description="json (default) or csv.")] = "json") -> Any:
    data = privacy.export(session, student_id)
    audit.record_now(session, actor(who), "student.export", privacy.subject(student_id),
                     f"format={format}")
    if format == "csv":
        return Response(privacy.export_csv(data), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition":
                                 f'attachment; filename="student-{student_id}.csv"'})
    return data


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: str


@router.get("/audit", response_model=list[AuditOut],
            summary="The audit log, newest first (who viewed, exported, corrected, erased, "
            "purged what).")
def get_audit(who: Admin, session: DB, subject: Annotated[str | None, Query(
                  max_length=200, description="e.g. student:S001")] = None,
              since: IsoDateTime | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> Any:
    rows = audit.entries(session, subject, since, limit, offset)
    out = [AuditOut.model_validate(r, from_attributes=True) for r in rows]
    audit.record_now(session, actor(who), "audit.view", subject or "audit", "")
    return out
