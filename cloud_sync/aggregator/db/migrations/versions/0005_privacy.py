"""Privacy: consent state per student, an append-only audit log

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

- ``students.consent`` (granted | withdrawn | NULL = never recorded), ``consent_at``,
  ``consent_by``: only students with consent granted get face data enrolled or sent to devices.
  Existing students start with NULL: a school records consent before their faces are used
  again (docs/PRIVACY.md);
- ``audit_log``: who viewed, exported, corrected, erased or purged what (no contents).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("students") as batch:
        batch.add_column(sa.Column("consent", sa.String(16), nullable=True))
        batch.add_column(sa.Column("consent_at", TS, nullable=True))
        batch.add_column(sa.Column("consent_by", sa.String(200), nullable=True))
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("detail", sa.String(1000), nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_subject", "audit_log", ["subject"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_subject", table_name="audit_log")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    with op.batch_alter_table("students") as batch:
        batch.drop_column("consent_by")
        batch.drop_column("consent_at")
        batch.drop_column("consent")
