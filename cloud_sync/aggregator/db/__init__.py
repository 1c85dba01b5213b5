"""Database layer: ORM models, engine/session factories, Alembic migrations, partitions."""
