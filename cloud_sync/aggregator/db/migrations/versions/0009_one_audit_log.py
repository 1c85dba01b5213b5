"""One audit log: the console's ``console_audit`` rows move into ``audit_log``

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

The console wrote its own table (``user_name``, ``action``, ``target``); the API, the CLI and the
retention purge wrote ``audit_log`` (``actor``, ``action``, ``subject``). The console now writes
``audit_log`` through ``services/audit.record``. Each old row becomes an ``audit_log`` row:

- actor ``console:<user>`` (``cli:unknown`` for the rows the CLI wrote as ``cli``);
- the action renamed to the log's ``noun.verb`` names (``login`` -> ``user.login``, ...);
- the target typed (``S001`` -> ``student:S001``; ``CS101/S001`` -> ``student:S001`` with
  ``course CS101`` in the detail), so ``GET /api/v1/audit?subject=student:S001`` and a
  student's export find them.

A console consent row is left out when ``audit_log`` already holds the privacy service's entry
for the same change (same user, student and action within 5 s): the console wrote both.
Downgrade recreates an empty ``console_audit``; the entries stay in ``audit_log``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# old action -> (new action, subject kind of the target)
ACTIONS: dict[str, tuple[str, str]] = {
    "login": ("user.login", "user"), "logout": ("user.logout", "user"),
    "user_add": ("user.add", "user"), "user_password": ("user.password", "user"),
    "teacher_assign": ("user.assign", "user"), "user_remove": ("user.remove", "user"),
    "mark_present": ("attendance.mark_present", "course/student"),
    "not_student": ("attendance.not_student", "course/student"),
    "enrol": ("student.enrol", "course/student"),
    "student_add": ("student.add", "student"), "face_add": ("face.enrol", "student"),
    "face_data_deleted": ("face.delete", "student"),
    "consent_granted": ("consent.grant", "student"),
    "consent_withdrawn": ("consent.withdraw", "student"),
    "unknown_labelled": ("unknown.label", "student"),
    "unknown_dismissed": ("unknown.dismiss", "unknown-faces"),
    "device_add": ("device.add", "device"), "device_key_rotated": ("device.rotate_key", "device"),
    "device_moved": ("device.move", "device"),
    "class_now": ("schedule.class_now", "course@room"),
    "room_add": ("room.add", "room"), "course_add": ("course.add", "course"),
    "schedule_add": ("schedule.add", "schedule"), "schedule_edit": ("schedule.edit", "schedule"),
    "schedule_delete": ("schedule.delete", "schedule"), "import": ("import.csv", "import"),
}
DUPLICATE_WINDOW = timedelta(seconds=5)


def convert(user: str, action: str, target: str, detail: str) -> tuple[str, str, str, str]:
    """(actor, action, subject, detail) of one ``console_audit`` row."""
    actor = "cli:unknown" if user == "cli" else f"console:{user}"
    new_action, kind = ACTIONS.get(action, (f"console.{action}", ""))
    subject = target
    if kind == "course/student" and "/" in target:
        course, student = target.split("/", 1)
        subject, detail = f"student:{student}", f"course {course} {detail}".strip()
    elif kind == "course@room" and "@" in target:
        course, room = target.split("@", 1)
        subject, detail = f"course:{course}", f"room {room} {detail}".strip()
    elif kind == "unknown-faces":
        subject, detail = "unknown-faces", f"{target} {detail}".strip()
    elif kind in ("user", "student", "device", "room", "course", "schedule", "import"):
        subject = f"{kind}:{target}"
    return actor[:200], new_action[:64], subject[:200], detail[:1000]


def _same_instant(a: datetime, b: datetime) -> bool:
    if (a.tzinfo is None) != (b.tzinfo is None):  # SQLite hands back naive UTC
        a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
    return abs(a - b) <= DUPLICATE_WINDOW


def upgrade() -> None:
    bind = op.get_bind()
    audit_log = sa.table(
        "audit_log", sa.column("at", TS), sa.column("actor", sa.String),
        sa.column("action", sa.String), sa.column("subject", sa.String),
        sa.column("detail", sa.String),
    )
    console_audit = sa.table(
        "console_audit", sa.column("id", BIGID), sa.column("at", TS),
        sa.column("user_name", sa.String), sa.column("action", sa.String),
        sa.column("target", sa.String), sa.column("detail", sa.String),
    )
    old = bind.execute(sa.select(
        console_audit.c.at, console_audit.c.user_name, console_audit.c.action,
        console_audit.c.target, console_audit.c.detail).order_by(console_audit.c.id)).all()
    consent = bind.execute(sa.select(
        audit_log.c.at, audit_log.c.actor, audit_log.c.action, audit_log.c.subject,
    ).where(audit_log.c.action.like("consent.%"))).all()
    rows: list[dict[str, Any]] = []
    for at, user, action, target, detail in old:
        actor, new_action, subject, new_detail = convert(user, action, target, detail or "")
        if new_action.startswith("consent.") and any(
            (c.actor, c.action, c.subject) == (actor, new_action, subject)
            and _same_instant(c.at, at) for c in consent
        ):
            continue
        rows.append({"at": at, "actor": actor, "action": new_action, "subject": subject,
                     "detail": new_detail})
    if rows:
        op.bulk_insert(audit_log, rows)
    op.drop_index("ix_console_audit_at", table_name="console_audit")
    op.drop_table("console_audit")


def downgrade() -> None:
    op.create_table(
        "console_audit",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("user_name", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("detail", sa.String(length=1000), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_console_audit_at", "console_audit", ["at"])
