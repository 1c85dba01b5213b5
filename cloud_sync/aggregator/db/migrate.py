"""Alembic migrations, run programmatically (`aggregator db upgrade` and on `serve` start)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from cloud_sync.aggregator.db.session import make_engine

_LOGGER = logging.getLogger(__name__)
SCRIPT_LOCATION = Path(__file__).with_name("migrations")
MIGRATION_LOCK_ID = 4_242_002  # pg_advisory_xact_lock: one migrating process at a time


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    """Migrate to ``revision``. On PostgreSQL under a transaction-scoped advisory lock: of
    several processes or servers starting together one migrates, the others wait for it and
    then find nothing to do (DDL is transactional there)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    _LOGGER.info("database at revision %s", current_revision(engine))


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest revision (creates it on SQLite)."""
    engine = make_engine(url)
    try:
        upgrade_engine(engine)
    finally:
        engine.dispose()
