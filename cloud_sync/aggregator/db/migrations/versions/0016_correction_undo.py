"""Corrections that strike a whole class, pending negatives, undo

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07

Issue 25 item 3: "not this student" struck one record and its negative example reached the
devices at once, with no way back but deleting the student's face data.

- ``attendance_corrections.span_from`` / ``span_to``: the class meeting a ``not_student``
  correction strikes (every record of the student for the course in it); NULL for the
  corrections made before (they strike their one record, as they did).
- ``attendance_corrections.undone_at`` / ``undone_by``: an undone correction counts for nothing.
- ``face_negatives.state`` (``pending`` | ``confirmed``; rows from before are ``confirmed``: they
  were already in the rosters), ``correction_id`` (the correction it came from; undo deletes
  it), ``confirmed_by`` / ``confirmed_at``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("attendance_corrections") as batch:
        batch.add_column(sa.Column("span_from", TS, nullable=True))
        batch.add_column(sa.Column("span_to", TS, nullable=True))
        batch.add_column(sa.Column("undone_at", TS, nullable=True))
        batch.add_column(sa.Column("undone_by", sa.String(100), nullable=True))
    with op.batch_alter_table("face_negatives") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False,
                                   server_default="confirmed"))
        batch.add_column(sa.Column("correction_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("confirmed_by", sa.String(100), nullable=True))
        batch.add_column(sa.Column("confirmed_at", TS, nullable=True))
        batch.create_foreign_key("fk_face_negatives_correction", "attendance_corrections",
                                 ["correction_id"], ["id"], ondelete="CASCADE")
        batch.create_index("ix_face_negatives_correction", ["correction_id"])


def downgrade() -> None:
    with op.batch_alter_table("face_negatives") as batch:
        batch.drop_index("ix_face_negatives_correction")
        batch.drop_constraint("fk_face_negatives_correction", type_="foreignkey")
        batch.drop_column("confirmed_at")
        batch.drop_column("confirmed_by")
        batch.drop_column("correction_id")
        batch.drop_column("state")
    with op.batch_alter_table("attendance_corrections") as batch:
        batch.drop_column("undone_by")
        batch.drop_column("undone_at")
        batch.drop_column("span_to")
        batch.drop_column("span_from")
