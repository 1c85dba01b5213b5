"""Admin tokens' last use; dead letters pruned by age

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

- ``admin_tokens.last_used_at``: when the token last authenticated a request (for
  ``aggregator admin list-tokens`` and ``GET /api/v1/admin/tokens``; updated at most once a
  minute per token).
- ``ix_dead_letters_received``: the bridge prunes dead letters older than
  ``dead_letter_max_age_days`` and beyond ``dead_letter_max_rows`` (oldest first).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("admin_tokens") as batch:
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_dead_letters_received", "dead_letters", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_received", table_name="dead_letters")
    with op.batch_alter_table("admin_tokens") as batch:
        batch.drop_column("last_used_at")
