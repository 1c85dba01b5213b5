"""Aggregator fixtures: every test runs on SQLite and on the real PostgreSQL server.

PostgreSQL: one uniquely named database per test session (created with psycopg on
127.0.0.1:5432 as user postgres, env AGGREGATOR_TEST_PG to override), migrated once, emptied
after each test and dropped at the end. A missing server skips locally and fails under CI.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text, update

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.migrate import upgrade_engine
from cloud_sync.aggregator.db.models import Enrollment, FaceEmbedding, Student
from cloud_sync.aggregator.db.session import make_engine
from cloud_sync.aggregator.services.devices import add_device, create_admin_token
from cloud_sync.protocol import EMBEDDER_IDS
from tests.conftest import require

PG_ADMIN = os.environ.get("AGGREGATOR_TEST_PG", "host=127.0.0.1 port=5432 user=postgres")
TABLES = ("attendance", "attendance_keys", "heartbeats", "events", "face_embeddings",
          "enrollments", "schedules", "devices", "students", "courses", "rooms",
          "admin_tokens", "dead_letters", "audit_log", "console_users", "console_sessions",
          "course_teachers", "attendance_corrections", "face_negatives",
          "record_descriptors", "unknown_faces", "recording_jobs", "recordings",
          "rate_buckets", "device_updates", "rollouts", "releases", "release_keys", "job_workers")


def _pg_connect(dbname: str = "postgres") -> Any:
    import psycopg

    return psycopg.connect(f"{PG_ADMIN} dbname={dbname} connect_timeout=3", autocommit=True)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str | None]:
    """URL of a fresh database for this test session, or None if the server is missing."""
    try:
        conn = _pg_connect()
    except Exception:
        yield None
        return
    name = f"agg_test_{os.getpid()}_{secrets.token_hex(4)}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in PG_ADMIN.split())
    url = (f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host')}:"
           f"{params.get('port', '5432')}/{name}")
    engine = make_engine(url)
    upgrade_engine(engine)
    engine.dispose()
    yield url
    with _pg_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'aggregator.db'}"
        return
    url = request.getfixturevalue("pg_url")
    require(url is not None, "PostgreSQL not reachable on 127.0.0.1:5432")
    yield url
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> AggregatorSettings:
    return aggregator_config.load(
        None, database_url=db_url, data_dir=tmp_path / "data", rate_limit_per_min=100000
    )


@pytest.fixture
def app_client(settings: AggregatorSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def sessions(settings: AggregatorSettings, app_client: TestClient) -> Any:
    """A session factory on the same database (after the app migrated it)."""
    return app_client.app.state.ctx.sessions  # type: ignore[attr-defined]


@dataclass
class World:
    client: TestClient
    admin: dict[str, str]
    device_id: str
    device: dict[str, str]
    other_device_id: str
    other: dict[str, str]
    monday: datetime  # last week's Monday 00:00 UTC: every class of that day is over

    def at(self, day_offset: int, hh: int, mm: int = 0, ss: int = 0) -> datetime:
        return self.monday + timedelta(days=day_offset, hours=hh, minutes=mm, seconds=ss)


def last_monday() -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=today.weekday() + 7)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def world(app_client: TestClient, sessions: Any) -> World:
    """Two rooms (UTC), CS101 Mon 09:00-10:30 and MA201 Mon 11:00-12:00 in LAB-301, PH1 Mon
    09:00-10:00 in LAB-302; students S001-S004 in CS101 (S004 also MA201); one device a room."""
    with sessions() as session:
        _, token = create_admin_token(session, "tests")
    admin = auth(token)
    c = app_client
    for room in ("LAB-301", "LAB-302"):
        assert c.post("/api/v1/rooms", json={"id": room, "site": "north"},
                      headers=admin).status_code == 201
    for course, name in (("CS101", "Intro CS"), ("MA201", "Algebra"), ("PH1", "Physics")):
        assert c.post("/api/v1/courses", json={"id": course, "name": name},
                      headers=admin).status_code == 201
    for i in range(1, 6):
        assert c.post("/api/v1/students", json={"id": f"S00{i}", "name": f"Student {i}"},
                      headers=admin).status_code == 201
        assert c.post(f"/api/v1/students/S00{i}/consent", json={"state": "granted"},
                      headers=admin).status_code == 200
    for sid, course in (("S001", "CS101"), ("S002", "CS101"), ("S003", "CS101"),
                        ("S004", "CS101"), ("S004", "MA201"), ("S005", "PH1")):
        assert c.post("/api/v1/enrollments", json={"student_id": sid, "course_id": course},
                      headers=admin).status_code == 201
    for course, room, start, end in (("CS101", "LAB-301", "09:00", "10:30"),
                                     ("MA201", "LAB-301", "11:00", "12:00"),
                                     ("PH1", "LAB-302", "09:00", "10:00")):
        r = c.post("/api/v1/schedules", json={"course_id": course, "room_id": room,
                                              "weekday": 0, "start_time": start,
                                              "end_time": end}, headers=admin)
        assert r.status_code == 201, r.text
    with sessions() as session:
        _, key = add_device(session, "LAB-301", "pi-301")
        _, other = add_device(session, "LAB-302", "pi-302")
        # the term was set up a while ago: enrolments and consents count from then (reports
        # count a class for a student only from their enrolment and consent)
        term = last_monday() - timedelta(days=28)
        session.execute(update(Enrollment).values(created_at=term))
        session.execute(update(Student).values(consent_at=term))
        session.commit()
    return World(c, admin, "pi-301", auth(key), "pi-302", auth(other), last_monday())


def give_faces(sessions: Any, students: list[str], since: datetime | None = None) -> None:
    """A face descriptor for each student (random: for reports, not recognition), stored
    ``since`` (default: four weeks before last Monday), so reports count them as recognisable."""
    import numpy as np

    rng = np.random.default_rng(7)
    when = since or last_monday() - timedelta(days=28)
    with sessions() as session:
        for sid in students:
            session.add(FaceEmbedding(
                student_id=sid, vector=rng.normal(size=128).astype("<f4").tobytes(),
                embedder=EMBEDDER_IDS["sface"], source="test", quality=0.9, created_at=when))
        session.commit()


def record(world: World, student: str, seen_at: datetime, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "key": str(uuid.uuid4()), "student_id": student, "room_id": "LAB-301",
        "device_id": world.device_id, "seen_at": seen_at.isoformat(), "confidence": 0.9,
    }
    body.update(extra)
    return body


def batch(world: World, records: list[dict[str, Any]], device_id: str | None = None) -> dict:
    return {"v": 1, "device_id": device_id or world.device_id, "records": records}
