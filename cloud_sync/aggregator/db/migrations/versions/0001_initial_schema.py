"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22

On PostgreSQL `attendance` is declaratively partitioned by month on `at` (RANGE), with a
default partition as a safety net; monthly partitions are created by db/partitions.py. The
idempotency key's global uniqueness is kept by `attendance_keys` (key PRIMARY KEY), because a
unique constraint on a partitioned table must contain the partition key. On SQLite attendance
is one table with a unique index on `key`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "courses",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "rooms",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("site", sa.String(length=64), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "students",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("room_id", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_heartbeat_at", TS, nullable=True),
        sa.Column("software_version", sa.String(length=64), nullable=True),
        sa.Column("clock_offset_s", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["room_id"],
            ["rooms.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_table(
        "enrollments",
        sa.Column("student_id", sa.String(length=64), nullable=False),
        sa.Column("course_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["course_id"], ["courses.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["student_id"], ["students.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("student_id", "course_id"),
    )
    op.create_index("ix_enrollments_course", "enrollments", ["course_id", "student_id"])

    op.create_table(
        "face_embeddings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("student_id", sa.String(length=64), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("quality", sa.Float(), nullable=True),
        sa.Column("photo_path", sa.String(length=500), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["student_id"], ["students.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_face_embeddings_student", "face_embeddings", ["student_id"])

    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("course_id", sa.String(length=64), nullable=False),
        sa.Column("room_id", sa.String(length=64), nullable=False),
        sa.Column("weekday", sa.SmallInteger(), nullable=False),
        sa.Column("start_time", sa.Time(), nullable=False),
        sa.Column("end_time", sa.Time(), nullable=False),
        sa.Column("effective_from", sa.Date(), nullable=True),
        sa.Column("effective_to", sa.Date(), nullable=True),
        sa.ForeignKeyConstraint(["course_id"], ["courses.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["room_id"], ["rooms.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_schedules_course", "schedules", ["course_id"])
    op.create_index("ix_schedules_room_weekday", "schedules", ["room_id", "weekday"])

    _create_attendance()

    op.create_table(
        "events",
        sa.Column("key", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("room_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("message", sa.String(length=500), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_events_device_at", "events", ["device_id", "at"])

    op.create_table(
        "heartbeats",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("sent_at", TS, nullable=False),
        sa.Column("clock_synced", sa.Boolean(), nullable=False),
        sa.Column("boot_id", sa.String(length=64), nullable=True),
        sa.Column("monotonic_s", sa.Float(), nullable=True),
        sa.Column("software_version", sa.String(length=64), nullable=False),
        sa.Column("uptime_s", sa.Float(), nullable=False),
        sa.Column("cpu_temp_c", sa.Float(), nullable=True),
        sa.Column("outbox_depth", sa.Integer(), nullable=False),
        sa.Column("oldest_unsent_age_s", sa.Float(), nullable=True),
        sa.Column("last_frame_at", TS, nullable=True),
        sa.Column("fps", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_heartbeats_device_boot", "heartbeats", ["device_id", "boot_id", "clock_synced"]
    )
    op.create_index("ix_heartbeats_device_received", "heartbeats", ["device_id", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_heartbeats_device_received", table_name="heartbeats")
    op.drop_index("ix_heartbeats_device_boot", table_name="heartbeats")

    op.drop_table("heartbeats")
    op.drop_index("ix_events_device_at", table_name="events")

    op.drop_table("events")

    _drop_attendance()
    op.drop_index("ix_schedules_room_weekday", table_name="schedules")
    op.drop_index("ix_schedules_course", table_name="schedules")

    op.drop_table("schedules")
    op.drop_index("ix_face_embeddings_student", table_name="face_embeddings")

    op.drop_table("face_embeddings")
    op.drop_index("ix_enrollments_course", table_name="enrollments")

    op.drop_table("enrollments")
    op.drop_table("devices")
    op.drop_table("students")
    op.drop_table("rooms")
    op.drop_table("dead_letters")
    op.drop_table("courses")
    op.drop_table("admin_tokens")


_ATTENDANCE_INDEXES = {
    "ix_attendance_course_at": ["course_id", "at"],
    "ix_attendance_room_at": ["room_id", "at"],
    "ix_attendance_student_at": ["student_id", "at"],
    "ix_attendance_uncertain": ["device_id", "boot_id", "time_uncertain"],
}

_PG_ATTENDANCE = """
CREATE TABLE attendance (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY,
    key UUID NOT NULL,
    student_id VARCHAR(64) NOT NULL REFERENCES students (id),
    course_id VARCHAR(64) REFERENCES courses (id),
    device_course_id VARCHAR(64),
    room_id VARCHAR(64) NOT NULL REFERENCES rooms (id),
    device_id VARCHAR(64) NOT NULL REFERENCES devices (id),
    at TIMESTAMP WITH TIME ZONE NOT NULL,
    seen_at TIMESTAMP WITH TIME ZONE NOT NULL,
    received_at TIMESTAMP WITH TIME ZONE NOT NULL,
    confidence DOUBLE PRECISION NOT NULL,
    distance DOUBLE PRECISION,
    clock_synced BOOLEAN NOT NULL,
    boot_id VARCHAR(64),
    monotonic_s DOUBLE PRECISION,
    time_uncertain BOOLEAN NOT NULL,
    correction VARCHAR(16) NOT NULL,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at)
"""


def _create_attendance() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_table(
            "attendance_keys",
            sa.Column("key", sa.Uuid(), nullable=False),
            sa.PrimaryKeyConstraint("key"),
        )
        op.execute(_PG_ATTENDANCE)
        op.execute("CREATE TABLE attendance_default PARTITION OF attendance DEFAULT")
        op.create_index("ix_attendance_key", "attendance", ["key"])
    else:
        op.create_table(
            "attendance",
            sa.Column("id", BIGID, autoincrement=True, nullable=False),
            sa.Column("key", sa.Uuid(), nullable=False),
            sa.Column("student_id", sa.String(length=64), nullable=False),
            sa.Column("course_id", sa.String(length=64), nullable=True),
            sa.Column("device_course_id", sa.String(length=64), nullable=True),
            sa.Column("room_id", sa.String(length=64), nullable=False),
            sa.Column("device_id", sa.String(length=64), nullable=False),
            sa.Column("at", TS, nullable=False),
            sa.Column("seen_at", TS, nullable=False),
            sa.Column("received_at", TS, nullable=False),
            sa.Column("confidence", sa.Float(), nullable=False),
            sa.Column("distance", sa.Float(), nullable=True),
            sa.Column("clock_synced", sa.Boolean(), nullable=False),
            sa.Column("boot_id", sa.String(length=64), nullable=True),
            sa.Column("monotonic_s", sa.Float(), nullable=True),
            sa.Column("time_uncertain", sa.Boolean(), nullable=False),
            sa.Column("correction", sa.String(length=16), nullable=False),
            sa.ForeignKeyConstraint(["course_id"], ["courses.id"]),
            sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
            sa.ForeignKeyConstraint(["room_id"], ["rooms.id"]),
            sa.ForeignKeyConstraint(["student_id"], ["students.id"]),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index("ix_attendance_key", "attendance", ["key"], unique=True)
    for name, columns in _ATTENDANCE_INDEXES.items():
        op.create_index(name, "attendance", columns)


def _drop_attendance() -> None:
    op.drop_table("attendance")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_table("attendance_keys")
