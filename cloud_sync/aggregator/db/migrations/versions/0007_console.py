"""Web console: users, sessions, course teachers, attendance corrections, audit, negatives

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

- ``console_users`` (Argon2id password hashes), ``console_sessions`` (server-side sessions,
  sha256 of the cookie token), ``course_teachers`` (which courses a teacher sees);
- ``attendance_corrections``: marked present by hand / not this student (the audit trail the
  reports read through), ``console_audit``: who did what;
- ``record_descriptors`` (the descriptor a device matched for a record, when it sent one) and
  ``face_negatives`` (descriptors that are NOT a student, carried in rosters);
- ``unknown_faces``: crops + descriptors of unrecognised faces (only when switched on).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "console_users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "course_teachers",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("course_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["console_users.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["course_id"], ["courses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "course_id"),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["console_users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index("ix_console_sessions_user", "console_sessions", ["user_id"])
    op.create_table(
        "attendance_corrections",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("student_id", sa.String(length=64), nullable=False),
        sa.Column("course_id", sa.String(length=64), nullable=True),
        sa.Column("attendance_key", sa.Uuid(), nullable=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("by_user", sa.String(length=100), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["student_id"], ["students.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["course_id"], ["courses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_corrections_course_at", "attendance_corrections", ["course_id", "at"])
    op.create_index("ix_corrections_student", "attendance_corrections", ["student_id", "at"])
    op.create_index("ix_corrections_key", "attendance_corrections", ["attendance_key"])
    op.create_table(
        "face_negatives",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("student_id", sa.String(length=64), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("embedder", sa.String(length=100), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["student_id"], ["students.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_face_negatives_student", "face_negatives", ["student_id"])
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
    op.create_table(
        "record_descriptors",
        sa.Column("key", sa.Uuid(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("embedder", sa.String(length=100), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "unknown_faces",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("room_id", sa.String(length=64), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("embedder", sa.String(length=100), nullable=False),
        sa.Column("crop", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_unknown_faces_received", "unknown_faces", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_unknown_faces_received", table_name="unknown_faces")
    op.drop_table("unknown_faces")
    op.drop_table("record_descriptors")
    op.drop_index("ix_console_audit_at", table_name="console_audit")
    op.drop_table("console_audit")
    op.drop_index("ix_face_negatives_student", table_name="face_negatives")
    op.drop_table("face_negatives")
    for name in ("ix_corrections_key", "ix_corrections_student", "ix_corrections_course_at"):
        op.drop_index(name, table_name="attendance_corrections")
    op.drop_table("attendance_corrections")
    op.drop_index("ix_console_sessions_user", table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_table("course_teachers")
    op.drop_table("console_users")
