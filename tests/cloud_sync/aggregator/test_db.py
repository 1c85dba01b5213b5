"""Migrations, health, metrics, and PostgreSQL monthly partitions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.db import partitions
from cloud_sync.aggregator.db.migrate import current_revision, head_revision, upgrade
from cloud_sync.aggregator.db.models import Attendance
from cloud_sync.aggregator.db.session import make_engine
from tests.cloud_sync.aggregator.conftest import World, batch, record


def test_health_and_metrics(world: World) -> None:
    r = world.client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["migrations"] == "current" and body["revision"] == head_revision()
    assert body["mqtt"] == "disabled"
    world.client.post("/api/v1/attendance",
                      json=batch(world, [record(world, "S001", world.at(0, 9))]),
                      headers=world.device)
    metrics = world.client.get("/metrics")
    assert metrics.status_code == 200
    assert 'aggregator_attendance_records_total{result="accepted"}' in metrics.text
    assert "aggregator_http_request_seconds_bucket" in metrics.text
    assert world.client.get("/docs").status_code == 200
    paths = world.client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/schedule", "/api/v1/attendance", "/api/v1/heartbeat", "/api/v1/events",
                 "/api/v1/attendance/student/{student_id}", "/api/v1/attendance/course/{course_id}",
                 "/api/v1/students/{student_id}/faces", "/api/v1/import/{kind}"):
        assert path in paths, path


def test_health_reports_mqtt_bridge(settings: Any) -> None:
    configured = aggregator_config.load(None, database_url=settings.database_url,
                                        mqtt_url="mqtt://127.0.0.1:1")
    try:
        import cloud_sync.aggregator.mqtt_bridge  # noqa: F401
        have_bridge = True
    except ImportError:
        have_bridge = False
    with TestClient(create_app(configured)) as client:
        body = client.get("/health").json()
    if have_bridge:
        assert body["mqtt"] in {"connected", "disconnected"}
    else:
        assert body["mqtt"] == "unavailable" and body["status"] == "degraded"


def test_sqlite_pragmas_and_upgrade_is_idempotent(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'a.db'}"
    upgrade(url)
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        indexes = {row[1]: row[2] for row in conn.execute(text("PRAGMA index_list(attendance)"))}
    assert indexes["ix_attendance_key"] == 1  # unique
    assert "ix_attendance_unsynced" in indexes
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_migration_0004_labels_existing_faces_as_dlib(db_url: str) -> None:
    """Descriptors stored before 0004 were dlib's: after the upgrade they say so, stand for
    their photo, and a down- and re-upgrade keeps them."""
    from cloud_sync.aggregator.db.migrate import upgrade_engine

    engine = make_engine(db_url)
    try:
        upgrade_engine(engine, "0003")
        now = datetime.now(UTC)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO students (id, name, created_at) "
                              "VALUES ('S1', 'one', :now)"), {"now": now})
            conn.execute(text("INSERT INTO face_embeddings (student_id, vector, source, "
                              "created_at) VALUES ('S1', :v, 'old', :now)"),
                         {"v": b"\0" * 512, "now": now})
        upgrade_engine(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT embedder, photo_of FROM face_embeddings")).all()
        assert rows == [("dlib/dlib-resnet-v1", None)]
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_postgres_partitions(world: World, sessions: Any, db_url: str) -> None:
    assert db_url.startswith("postgresql")
    engine = make_engine(db_url)
    with engine.connect() as conn:
        strategy = conn.execute(text(
            "SELECT partstrat FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid"
            " WHERE c.relname = 'attendance'")).scalar()
        assert strategy == "r"
        months = partitions.existing_months(conn)
    now = partitions.month_start(datetime.now(UTC))
    assert {partitions.add_months(now, i) for i in range(-1, 4)} <= months
    # A record 14 months back lands in a partition created on insert.
    old_month = partitions.add_months(now, -14)
    when = datetime(old_month.year, old_month.month, 3, 9, 0, tzinfo=UTC)
    # Put a row of that month in the default partition first (as if the partition were
    # missing when it arrived): creating the partition must move it.
    key = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO attendance (key, student_id, room_id, device_id, at, seen_at, "
            "received_at, confidence, clock_synced, time_uncertain, correction) VALUES "
            "(:k, 'S001', 'LAB-301', 'pi-301', :at, :at, :at, 0.9, true, false, 'none')"),
            {"k": key, "at": when})
        conn.execute(text("INSERT INTO attendance_keys (key) VALUES (:k)"), {"k": key})
    rec = record(world, "S002", when)
    r = world.client.post("/api/v1/attendance", json=batch(world, [rec]), headers=world.device)
    assert r.json()["accepted"] == 1
    with engine.connect() as conn:
        assert old_month in partitions.existing_months(conn)
        name = partitions.partition_name(old_month)
        assert conn.execute(text(f"SELECT count(*) FROM {name}")).scalar() == 2
        assert conn.execute(text("SELECT count(*) FROM attendance_default")).scalar() == 0
    # The key stays unique across partitions: the same key in another month is a duplicate.
    moved = {**rec, "seen_at": world.at(0, 9).isoformat()}
    again = world.client.post("/api/v1/attendance", json=batch(world, [moved]),
                              headers=world.device).json()
    assert (again["accepted"], again["duplicate"]) == (0, 1)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Attendance)) == 2
    # Far-off months (a clock stuck in 1970) go to the default partition, no new partition.
    ancient = record(world, "S003", datetime(1971, 1, 1, tzinfo=UTC), clock_synced=False)
    assert world.client.post("/api/v1/attendance", json=batch(world, [ancient]),
                             headers=world.device).json()["accepted"] == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM attendance_default")).scalar() == 1
    engine.dispose()


def test_migration_0009_moves_console_audit_into_audit_log(db_url: str) -> None:
    """The console's own audit rows become audit_log entries (actor, action and subject
    typed like the API's), a consent row the privacy service had already logged is not
    doubled, and console_audit is gone."""
    from alembic import command
    from sqlalchemy import inspect

    from cloud_sync.aggregator.db.migrate import alembic_config, upgrade_engine

    engine = make_engine(db_url)
    try:
        upgrade_engine(engine)  # the session's PostgreSQL database is at head already:
        cfg = alembic_config()  # down to 0008 (console_audit back, empty) on both
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0008")
        now = datetime.now(UTC)
        if engine.dialect.name == "sqlite":  # UtcDateTime stores naive UTC there
            now = now.replace(tzinfo=None)
        rows = [("office", "login", "office", ""), ("cli", "user_add", "lee", "role teacher"),
                ("lee", "mark_present", "CS101/S001", "at 9:00: late bus"),
                ("office", "consent_granted", "S002", "form 3"),
                ("office", "class_now", "CS101@LAB-301", "09:00-10:00")]
        with engine.begin() as conn:
            for user, action, target, detail in rows:
                conn.execute(text("INSERT INTO console_audit (at, user_name, action, target, "
                                  "detail) VALUES (:at, :u, :a, :t, :d)"),
                             {"at": now, "u": user, "a": action, "t": target, "d": detail})
            conn.execute(text("INSERT INTO audit_log (at, actor, action, subject, detail) "
                              "VALUES (:at, 'console:office', 'consent.grant', 'student:S002', "
                              "'form 3')"), {"at": now})
        upgrade_engine(engine)
        with engine.connect() as conn:
            moved = conn.execute(text("SELECT actor, action, subject, detail FROM audit_log "
                                      "ORDER BY id")).all()
        assert [tuple(r) for r in moved] == [
            ("console:office", "consent.grant", "student:S002", "form 3"),
            ("console:office", "user.login", "user:office", ""),
            ("cli:unknown", "user.add", "user:lee", "role teacher"),
            ("console:lee", "attendance.mark_present", "student:S001",
             "course CS101 at 9:00: late bus"),
            ("console:office", "schedule.class_now", "course:CS101", "room LAB-301 09:00-10:00"),
        ]
        assert "console_audit" not in inspect(engine).get_table_names()
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
