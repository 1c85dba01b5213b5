"""Alembic environment: run programmatically by db/migrate.py with a live connection."""

from __future__ import annotations

from alembic import context

from cloud_sync.aggregator.db.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via the alembic command line
    raise RuntimeError("run migrations with `aggregator db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
