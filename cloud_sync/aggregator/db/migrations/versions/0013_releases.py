"""Signed releases, rollouts and the devices' update history

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07

``release_keys`` (public keys only), ``releases`` (a verified bundle's signed manifest; its files
are kept by sha256 under data_dir/releases/files), ``rollouts`` (canary room, share, all; halted
by a revert) and ``device_updates`` (every report of a device's updater). Issue 27;
docs/OPERATIONS.md 6.10.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None
TS = sa.DateTime(timezone=True)
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "release_keys",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("public_pem", sa.Text(), nullable=False),
        sa.Column("added_at", TS, nullable=False),
    )
    op.create_table(
        "releases",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("manifest", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("added_at", TS, nullable=False),
        sa.Column("added_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("version", sa.String(64),
                  sa.ForeignKey("releases.version", ondelete="CASCADE"), nullable=False),
        sa.Column("canary_room", sa.String(64), nullable=False),
        sa.Column("share_pct", sa.SmallInteger(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("during_class", sa.Boolean(), nullable=False),
        sa.Column("max_bytes_per_s", sa.Integer(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("stage_at", TS, nullable=False),
        sa.Column("started_by", sa.String(200), nullable=False),
        sa.Column("halted_at", TS, nullable=True),
        sa.Column("halted_reason", sa.String(700), nullable=True),
    )
    op.create_index("ix_rollouts_active", "rollouts", ["active"])
    op.create_table(
        "device_updates",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64),
                  sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("running", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("received_at", TS, nullable=False),
    )
    op.create_index("ix_device_updates_device_at", "device_updates", ["device_id", "at"])
    op.create_index("ix_device_updates_version_state", "device_updates", ["version", "state"])


def downgrade() -> None:
    op.drop_table("device_updates")
    op.drop_index("ix_rollouts_active", "rollouts")
    op.drop_table("rollouts")
    op.drop_table("releases")
    op.drop_table("release_keys")
