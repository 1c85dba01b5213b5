"""Attendance reports (admin token): JSON, or CSV with ?format=csv or Accept: text/csv."""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response

from cloud_sync.aggregator.api.deps import DB, Admin, context
from cloud_sync.aggregator.api.openapi import IsoDate
from cloud_sync.aggregator.api.privacy import actor
from cloud_sync.aggregator.services import audit, privacy, reports
from cloud_sync.aggregator.services.common import csv_cell
from cloud_sync.protocol import Identifier

router = APIRouter(prefix="/api/v1/attendance", tags=["reports"])
Format = Annotated[Literal["json", "csv"] | None, Query(description="csv for a CSV download.")]
From = Annotated[IsoDate | None, Query(alias="from", description="First day (default: term).")]
To = Annotated[IsoDate | None, Query(alias="to", description="Last day (default: today).")]


def wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    accept = request.headers.get("accept", "")
    return "text/csv" in accept and "application/json" not in accept


CSV_ANSWER = {200: {"description": "JSON, or CSV with `format=csv` (or `Accept: text/csv`)",
                    "content": {"text/csv": {"schema": {"type": "string"}}}}}

def csv_response(name: str, header: list[str], rows: list[list[Any]]) -> Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])
    return Response(
        buffer.getvalue(), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


PCT_HEADER = ["student_id", "name", "course_id", "course_name", "held", "present", "late",
              "absent", "percentage", "no_data"]


def pct_rows(items: list[reports.Percentage]) -> list[list[Any]]:
    return [[p.student_id, p.name, p.course_id, p.course_name, p.held, p.present, p.late,
             p.absent, p.percentage, p.no_data] for p in items]


DAY_HEADER = ["course_id", "room_id", "starts_at", "ends_at", "student_id", "name", "status",
              "first_seen_at", "confidence", "source"]


def course_day_csv(report: reports.CourseDayReport) -> Response:
    """The CSV of a course's day (the API's and the console's download alike)."""
    return csv_response(
        f"attendance-{report.course_id}-{report.date.isoformat()}", DAY_HEADER,
        [[report.course_id, s.room_id, s.starts_at.isoformat(), s.ends_at.isoformat(),
          st.student_id, st.name, st.status,
          st.first_seen_at.isoformat() if st.first_seen_at else None, st.confidence, st.source]
         for s in report.sessions for st in s.students],
    )


@router.get(
    "/student/{student_id}",
    response_model=reports.StudentReport,
    summary="A student's records and attendance percentage per enrolled course.",
    responses=CSV_ANSWER,  # type: ignore[arg-type]
)
def student(
    request: Request, who: Admin, session: DB, student_id: Identifier,
    date_from: From = None, date_to: To = None, format: Format = None,
    limit: Annotated[int, Query(ge=1, le=10000, description="Most records listed.")] = 1000,
    view: Annotated[
        Literal["records", "summary"],
        Query(description="CSV content: the records, or the per-course percentages."),
    ] = "records",
) -> Any:
    report = reports.student_report(
        session, student_id, date_from, date_to, context(request).rules, limit
    )
    audit.record_now(session, actor(who), "report.student", privacy.subject(student_id),
                     f"format={'csv' if wants_csv(request, format) else 'json'}")
    if wants_csv(request, format) and view == "summary":
        return csv_response(
            f"attendance-{student_id}-summary", PCT_HEADER, pct_rows(report.courses)
        )
    if wants_csv(request, format):
        return csv_response(
            f"attendance-{student_id}",
            ["student_id", "key", "course_id", "room_id", "device_id", "at", "seen_at",
             "confidence", "time_uncertain", "correction"],
            [[report.student_id, r.key, r.course_id, r.room_id, r.device_id, r.at.isoformat(),
              r.seen_at.isoformat(), r.confidence, r.time_uncertain, r.correction]
             for r in report.records],
        )
    return report


@router.get(
    "/course/{course_id}",
    response_model=reports.CourseDayReport | reports.CourseSummary,
    summary="With ?date=: who was present, late, absent at each class that day; without: "
    "attendance percentage per enrolled student over a date range.",
    responses=CSV_ANSWER,  # type: ignore[arg-type]
)
def course(
    request: Request, _who: Admin, session: DB, course_id: Identifier,
    day: Annotated[IsoDate | None, Query(alias="date", description="A day (room-local).")] = None,
    date_from: From = None, date_to: To = None, format: Format = None,
) -> Any:
    rules = context(request).rules
    if day is not None:
        report = reports.course_day(session, course_id, day, rules)
        if wants_csv(request, format):
            return course_day_csv(report)
        return report
    summary = reports.course_summary(session, course_id, date_from, date_to, rules)
    if wants_csv(request, format):
        return csv_response(f"attendance-{course_id}", PCT_HEADER, pct_rows(summary.students))
    return summary
