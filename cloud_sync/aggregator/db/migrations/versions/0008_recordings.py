"""Recorded sessions: uploaded recordings and their processing jobs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

- ``recordings``: an uploaded session recording (room, course, start, instructor), its upload
  progress, what the check found (duration, size, codec), the browser copy's state, and the
  last completed job's results (kept after retention deletes the file);
- ``recording_jobs``: a processing job (status, progress, time left, error in words, the
  worker's heartbeat: a stale one means the worker stopped and the job can be retried).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "recordings",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("room_id", sa.String(length=64), nullable=False),
        sa.Column("course_id", sa.String(length=64), nullable=False),
        sa.Column("starts_at", TS, nullable=False),
        sa.Column("instructor_id", sa.String(length=64), nullable=True),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", BIGID, nullable=False),
        sa.Column("received_bytes", BIGID, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("fps", sa.Float(), nullable=True),
        sa.Column("video_codec", sa.String(length=32), nullable=True),
        sa.Column("playback", sa.String(length=16), nullable=False),
        sa.Column("uploaded_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("file_deleted_at", TS, nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["room_id"], ["rooms.id"]),
        sa.ForeignKeyConstraint(["course_id"], ["courses.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["instructor_id"], ["students.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_recordings_course_start", "recordings", ["course_id", "starts_at"])
    op.create_index("ix_recordings_created", "recordings", ["created_at"])
    op.create_table(
        "recording_jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("recording_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("eta_s", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["recording_id"], ["recordings.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_recording_jobs_status", "recording_jobs", ["status", "created_at"])
    op.create_index("ix_recording_jobs_recording", "recording_jobs", ["recording_id"])


def downgrade() -> None:
    op.drop_index("ix_recording_jobs_recording", table_name="recording_jobs")
    op.drop_index("ix_recording_jobs_status", table_name="recording_jobs")
    op.drop_table("recording_jobs")
    op.drop_index("ix_recordings_created", table_name="recordings")
    op.drop_index("ix_recordings_course_start", table_name="recordings")
    op.drop_table("recordings")
