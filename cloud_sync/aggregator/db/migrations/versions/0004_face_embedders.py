"""Face descriptors per embedder

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

- ``face_embeddings.embedder``: ``name/model_version`` that made the vector. Every row before
  this revision was made by dlib, so existing rows get ``dlib/dlib-resnet-v1``.
- ``face_embeddings.photo_of``: rows computed from the same photo by another embedder point to
  the row that stands for the photo (deleted with it).

Rows of the new default embedder (SFace) for students enrolled before: `aggregator faces
reencode` computes them from the kept photos (``keep_photos``); students without a kept photo
are listed there and must be enrolled again (docs/RECOGNITION.md, "Migrating").
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LEGACY_EMBEDDER = "dlib/dlib-resnet-v1"


def upgrade() -> None:
    with op.batch_alter_table("face_embeddings") as batch:
        batch.add_column(sa.Column("embedder", sa.String(100), nullable=False,
                                   server_default=LEGACY_EMBEDDER))
        batch.add_column(sa.Column("photo_of", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_face_embeddings_photo_of", "face_embeddings",
                                 ["photo_of"], ["id"], ondelete="CASCADE")
        batch.create_index("ix_face_embeddings_photo_of", ["photo_of"])


def downgrade() -> None:
    with op.batch_alter_table("face_embeddings") as batch:
        batch.drop_index("ix_face_embeddings_photo_of")
        batch.drop_constraint("fk_face_embeddings_photo_of", type_="foreignkey")
        batch.drop_column("photo_of")
        batch.drop_column("embedder")
