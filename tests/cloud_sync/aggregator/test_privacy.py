"""Privacy (issue 18) on SQLite and PostgreSQL with real photos: consent gates enrolment and
rosters, withdrawal deletes the descriptors, erasure leaves no descriptor in the database files,
the subject access export, the retention purge, the audit log."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select, text

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.db.models import (
    Attendance,
    AttendanceKey,
    AuditLog,
    ConsoleSession,
    ConsoleUser,
    DeadLetter,
    EventRow,
    FaceEmbedding,
    FaceNegative,
    Heartbeat,
    RecordDescriptor,
    Student,
    UnknownFace,
)
from cloud_sync.aggregator.db.session import make_engine
from cloud_sync.aggregator.services.common import utcnow
from cloud_sync.aggregator.services.retention import purge
from cloud_sync.protocol import ScheduleResponse
from tests.cloud_sync.aggregator.conftest import World, batch, record

EXAMPLES = ("face_recognition", "examples")


def _photo(faces_dir: Path, name: str) -> bytes:
    return faces_dir.joinpath(*EXAMPLES, name).read_bytes()


@pytest.fixture
def client(world: World, settings: Any, model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    """An app that can enrol photos (face models), on the world's database."""
    configured = aggregator_config.load(None, database_url=settings.database_url,
                                        model_dir=model_dir, data_dir=tmp_path / "agg",
                                        keep_photos=True, rate_limit_per_min=100000)
    with TestClient(create_app(configured)) as c:
        yield c


def _enrol(client: TestClient, world: World, student: str, data: bytes) -> Any:
    return client.post(f"/api/v1/students/{student}/faces", headers=world.admin,
                       files={"photo": ("p.jpg", data, "image/jpeg")})


def _schedule(client: TestClient, world: World) -> Any:
    r = client.get("/api/v1/schedule", headers=world.device,
                   params={"room_id": "LAB-301", "at": world.at(0, 9, 30).isoformat()})
    assert r.status_code == 200, r.text
    return r


def _roster(client: TestClient, world: World) -> dict[str, Any]:
    schedule = ScheduleResponse.model_validate(_schedule(client, world).json())
    return {e.student_id: e for e in schedule.rosters["CS101"]}


def _consent(client: TestClient, world: World, student: str, state: str) -> Any:
    return client.post(f"/api/v1/students/{student}/consent", headers=world.admin,
                       json={"state": state, "note": "form 2026-17"})


def _vectors(sessions: Any, student: str) -> list[bytes]:
    with sessions() as session:
        return list(session.scalars(
            select(FaceEmbedding.vector).where(FaceEmbedding.student_id == student)))


def test_consent_gates_enrolment_and_rosters(world: World, client: TestClient, sessions: Any,
                                             faces_dir: Path) -> None:
    admin = world.admin
    assert client.post("/api/v1/students", json={"id": "S006", "name": "New"},
                       headers=admin).status_code == 201
    assert client.get("/api/v1/students/S006/consent", headers=admin).json()["state"] is None
    refused = _enrol(client, world, "S006", _photo(faces_dir, "obama.jpg"))
    assert refused.status_code == 409 and "consent" in refused.json()["detail"]
    assert _vectors(sessions, "S006") == []

    assert _enrol(client, world, "S001", _photo(faces_dir, "obama.jpg")).status_code == 201
    assert _enrol(client, world, "S001", _photo(faces_dir, "obama2.jpg")).status_code == 201
    assert _enrol(client, world, "S002", _photo(faces_dir, "biden.jpg")).status_code == 201
    before = _roster(client, world)
    assert set(before) == {"S001", "S002"} and len(before["S001"].embeddings) == 2
    etag = _schedule(client, world).headers["ETag"]
    photos = list((client.app.state.ctx.settings.data_dir / "photos" / "S001").iterdir())
    assert len(photos) == 2  # keep_photos: the photos are kept until withdrawal

    answer = _consent(client, world, "S001", "withdrawn")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["state"] == "withdrawn" and body["by"] == "token:tests"
    embedders = len(client.app.state.ctx.settings.embedders)  # a descriptor per photo and each
    assert embedders == 2 and body["descriptors_deleted"] == 2 * embedders
    assert _vectors(sessions, "S001") == []
    assert not any(p.exists() for p in photos)
    assert set(_roster(client, world)) == {"S002"}
    assert _schedule(client, world).headers["ETag"] != etag
    # Withdrawn: no new descriptor either, until consent is granted again.
    assert _enrol(client, world, "S001", _photo(faces_dir, "obama.jpg")).status_code == 409
    assert _consent(client, world, "S001", "granted").json()["state"] == "granted"
    assert _enrol(client, world, "S001", _photo(faces_dir, "obama.jpg")).status_code == 201
    student = client.get("/api/v1/students/S001", headers=admin).json()
    assert student["consent"] == "granted"
    log = client.get("/api/v1/audit", headers=admin, params={"subject": "student:S001"}).json()
    actions = [e["action"] for e in log]
    assert actions[:4] == ["student.view", "face.enrol", "consent.grant", "consent.withdraw"]
    assert f"descriptors_deleted={2 * embedders}" in log[3]["detail"]
    assert log[3]["actor"] == "token:tests"
    assert _consent(client, world, "NOPE", "granted").status_code == 404
    bad = client.post("/api/v1/students/S001/consent", headers=admin, json={"state": "maybe"})
    assert bad.status_code == 422
    assert client.post("/api/v1/students/S001/consent", json={"state": "granted"}
                       ).status_code == 401


def _database_bytes(sessions: Any, url: str) -> bytes:
    """The bytes of the database files that hold face descriptors (SQLite: the file and its
    WAL; PostgreSQL: the face table's relation files, after a checkpoint)."""
    engine = sessions.kw["bind"]
    if engine.dialect.name == "sqlite":
        path = Path(engine.url.database)
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    admin_engine = make_engine(url)
    try:
        with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("CHECKPOINT"))
            base = Path(conn.scalar(text("SELECT current_setting('data_directory')")))
            relation = conn.scalar(text("SELECT pg_relation_filepath('face_embeddings')"))
    finally:
        admin_engine.dispose()
    files = sorted((base / relation).parent.glob(Path(relation).name + "*"))
    assert files, f"no relation file at {base / relation}"
    return b"".join(p.read_bytes() for p in files)


@pytest.mark.parametrize("policy", ["delete", "pseudonymise"])
def test_erasure_leaves_no_descriptor_in_the_database_files(
        world: World, settings: Any, sessions: Any, faces_dir: Path, model_dir: Path,
        tmp_path: Path, policy: str) -> None:
    configured = aggregator_config.load(None, database_url=settings.database_url,
                                        model_dir=model_dir, data_dir=tmp_path / "agg",
                                        erasure_policy=policy, rate_limit_per_min=100000)
    with TestClient(create_app(configured)) as client:
        assert _enrol(client, world, "S001", _photo(faces_dir, "obama.jpg")).status_code == 201
        assert _enrol(client, world, "S002", _photo(faces_dir, "biden.jpg")).status_code == 201
        recs = [record(world, "S001", world.at(0, 9, 5)), record(world, "S002", world.at(0, 9, 6))]
        assert client.post("/api/v1/attendance", json=batch(world, recs),
                           headers=world.device).status_code == 200
        with sessions() as session:
            session.add(EventRow(
                key=uuid.uuid4(), device_id=world.device_id, room_id="LAB-301",
                kind="attention", severity="info", message="attention", at=world.at(0, 9, 10),
                received_at=utcnow(), data={"share": 0.5, "students": {"S001": True,
                                                                      "S002": False}}))
            session.commit()
        with sessions() as session:  # console feedback: face data about S001 in two more tables
            session.add(RecordDescriptor(key=uuid.UUID(recs[0]["key"]), vector=b"\x01" * 512,
                                         embedder="dlib/dlib-resnet-v1",
                                         received_at=utcnow()))
            session.add(FaceNegative(student_id="S001", vector=b"\x02" * 512, source="test",
                                     embedder="dlib/dlib-resnet-v1",
                                     created_at=utcnow()))
            session.commit()
        secret = _vectors(sessions, "S001")  # one per embedder (SFace and dlib)
        kept = _vectors(sessions, "S002")
        assert len(secret) == len(kept) == len(configured.embedders) == 2
        url = configured.database_url.get_secret_value()
        files = _database_bytes(sessions, url)
        assert all(v in files for v in secret + kept)  # the search finds what is there

        answer = client.post("/api/v1/students/S001/erase", headers=world.admin)
        assert answer.status_code == 200, answer.text
        out = answer.json()
        assert out["policy"] == policy and out["descriptors_deleted"] == 2
        assert out["events_scrubbed"] == 1
        scrubber = client.app.state.ctx.scrubber  # type: ignore[attr-defined]
        assert scrubber.wait(40), "the scrub after the erasure did not finish"
        files = _database_bytes(sessions, url)
        assert not any(v in files for v in secret), "an erased descriptor is still in the files"
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(RecordDescriptor)) == 0
            assert session.scalar(select(func.count()).select_from(FaceNegative)) == 0
        assert all(v in files for v in kept)
        assert client.get("/api/v1/students/S001", headers=world.admin).status_code == 404
        with sessions() as session:
            assert session.get(Student, "S001") is None
            owners = list(session.scalars(select(Attendance.student_id)))
            data = session.scalar(select(EventRow.data).where(EventRow.kind == "attention"))
        assert "S001" not in data["students"] and data["students"]["S002"] is False
        if policy == "delete":
            assert owners == ["S002"] and out["attendance_deleted"] == 1
        else:
            pseudonym = out["pseudonym"]
            assert sorted(owners) == sorted(["S002", pseudonym]) and pseudonym.startswith("erased-")
            assert data["students"][pseudonym] is True
        log = client.get("/api/v1/audit", headers=world.admin,
                         params={"subject": "student:S001"}).json()
        assert log[0]["action"] == "student.erase" and f"policy={policy}" in log[0]["detail"]
        assert client.post("/api/v1/students/S001/erase", headers=world.admin).status_code == 404


def test_export_json_and_csv(world: World, client: TestClient, faces_dir: Path) -> None:
    assert _enrol(client, world, "S003", _photo(faces_dir, "biden.jpg")).status_code == 201
    recs = [record(world, "S003", world.at(0, 9, 5))]
    assert client.post("/api/v1/attendance", json=batch(world, recs),
                       headers=world.device).status_code == 200
    data = client.get("/api/v1/students/S003/export", headers=world.admin).json()
    assert data["student"]["id"] == "S003" and data["consent"]["state"] == "granted"
    assert data["enrollments"] == ["CS101"]
    descriptors = data["face_descriptors"]  # one photo: a descriptor per embedder
    assert sorted(d["embedder"].split("/")[0] for d in descriptors) == ["dlib", "sface"]
    assert all(len(d["descriptor"]) == 128 for d in descriptors)
    assert [a["key"] for a in data["attendance"]] == [recs[0]["key"]]
    assert data["attendance"][0]["course_id"] == "CS101"
    assert "consent.grant" in [e["action"] for e in data["audit"]]
    r = client.get("/api/v1/students/S003/export", headers=world.admin, params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    sections = [row["section"] for row in rows]
    assert sections[:5] == ["student", "consent", "enrollment", "face_descriptor",
                            "face_descriptor"]
    attendance = [row for row in rows if row["section"] == "attendance"]
    assert [row["key"] for row in attendance] == [recs[0]["key"]]
    assert len(rows[3]["detail"].split("descriptor=")[1].split()) == 128
    log = client.get("/api/v1/audit", headers=world.admin,
                     params={"subject": "student:S003"}).json()
    assert [e["detail"] for e in log if e["action"] == "student.export"] == ["format=csv",
                                                                              "format=json"]
    assert client.get("/api/v1/students/S009/export", headers=world.admin).status_code == 404
    assert client.get("/api/v1/students/S003/export", headers=world.admin,
                      params={"format": "xml"}).status_code == 422
    assert client.get("/api/v1/students/S003/export").status_code == 401


def test_retention_purge_deletes_old_data_and_records_counts(
        world: World, settings: Any, sessions: Any) -> None:
    recent, old = world.at(0, 9, 5), world.at(0, 9, 6) - timedelta(days=500)
    recs = [record(world, "S001", recent), record(world, "S002", old)]
    with sessions() as session:  # ingest refuses records this old: put them in directly
        for rec, at in zip(recs, (recent, old), strict=True):
            key = uuid.UUID(rec["key"])
            if session.get_bind().dialect.name == "postgresql":
                session.add(AttendanceKey(key=key))
            session.add(Attendance(
                key=key, student_id=rec["student_id"], course_id="CS101", room_id="LAB-301",
                device_id=world.device_id, at=at, seen_at=at, received_at=at, confidence=0.9,
                clock_synced=True, correction="none"))
        for days in (1, 200):
            session.add(EventRow(key=uuid.uuid4(), device_id=world.device_id, room_id="LAB-301",
                                 kind="occupancy", severity="info", message="o",
                                 at=utcnow() - timedelta(days=days), received_at=utcnow(),
                                 data={}))
        for days in (1, 31):
            session.add(DeadLetter(source="classroom/x", payload=b"{", reason="bad JSON",
                                   received_at=utcnow() - timedelta(days=days)))
        session.add(AuditLog(at=utcnow() - timedelta(days=800), actor="token:old",
                             action="student.view", subject="student:S001", detail=""))
        # heartbeats: boot A 40 and 35 days ago (the newer one stays: it places late records
        # of boot A in time), boot B 35 days ago synchronised and 2 days ago not (both stay:
        # the newest synchronised one is the exact reference),
        # boot C 450 days ago (older than attendance_keep_days: goes)
        for boot, days, synced in (("A", 40, False), ("A", 35, False), ("B", 35, True),
                                   ("B", 2, False), ("C", 450, False)):
            at = utcnow() - timedelta(days=days)
            session.add(Heartbeat(device_id=world.device_id, received_at=at, sent_at=at,
                                  clock_synced=synced, boot_id=boot, monotonic_s=1.0,
                                  software_version="t", uptime_s=1.0, outbox_depth=0))
        for days in (1, 20):  # record descriptors: kept record_descriptor_days (14)
            session.add(RecordDescriptor(key=uuid.uuid4(), vector=b"\1" * 512, embedder="e",
                                         received_at=utcnow() - timedelta(days=days)))
        for hours in (1, 100):  # unknown faces: kept unknown_face_keep_hours (72)
            at = utcnow() - timedelta(hours=hours)
            session.add(UnknownFace(key=uuid.uuid4(), device_id=world.device_id,
                                    room_id="LAB-301", at=at, received_at=at,
                                    vector=b"\2" * 512, embedder="e", crop=b"jpeg"))
        user = ConsoleUser(name="u", role="admin", password_hash="x", created_at=utcnow())
        session.add(user)
        session.flush()
        for hours in (-1, 1):  # one session still valid, one expired an hour ago
            session.add(ConsoleSession(token_hash=f"{hours:+}".ljust(64, "0"), user_id=user.id,
                                       csrf_token="c", created_at=utcnow(),
                                       expires_at=utcnow() - timedelta(hours=hours)))
        session.commit()
    with sessions() as session:
        counts = purge(session, settings)
    assert counts == {"attendance": 1, "events": 1, "dead_letters": 1, "heartbeats": 2,
                      "record_descriptors": 1, "unknown_faces": 1, "console_sessions": 1,
                      "audit": 1, "recording_files": 0, "abandoned_uploads": 0}
    with sessions() as session:
        assert list(session.scalars(select(Attendance.student_id))) == ["S001"]
        if session.get_bind().dialect.name == "postgresql":
            assert session.scalar(select(func.count()).select_from(AttendanceKey)) == 1
        assert session.scalar(select(func.count()).select_from(EventRow)) == 1
        entry = session.scalars(select(AuditLog).where(
            AuditLog.action == "retention.purge")).one()
        assert entry.detail == ("attendance=1 events=1 dead_letters=1 heartbeats=2 "
                                "record_descriptors=1 unknown_faces=1 console_sessions=1 "
                                "audit=1 recording_files=0 abandoned_uploads=0")
        assert sorted(tuple(r) for r in session.execute(
            select(Heartbeat.boot_id, Heartbeat.clock_synced))) == [("A", False), ("B", False),
                                                                    ("B", True)]
        for model in (RecordDescriptor, UnknownFace, ConsoleSession):
            assert session.scalar(select(func.count()).select_from(model)) == 1
        assert entry.actor == "system"
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1
        assert session.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.actor == "token:old")) == 0
    with sessions() as session:  # nothing left to purge: no entry
        assert set(purge(session, settings).values()) == {0}
        assert session.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == "retention.purge")) == 1



@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite zeroes at the delete
def test_scrub_waits_for_a_transaction_older_than_the_erasure(sessions: Any, db_url: str) -> None:
    """PostgreSQL's VACUUM FULL copies a deleted row that an older, still open transaction may
    see: the scrub waits for such transactions (bounded), so the descriptor leaves the files."""
    import threading

    from cloud_sync.aggregator.services import privacy

    secret = b"\x5a\xa5" * 256
    with sessions() as session:
        session.add(Student(id="S900", name="Erased", created_at=utcnow()))
        session.flush()
        session.add(FaceEmbedding(student_id="S900", vector=secret, embedder="sface/test",
                                  source="test", created_at=utcnow()))
        session.commit()
    reader = make_engine(db_url)
    older = reader.connect()
    older.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
    # its snapshot sees the row; it holds no lock on the face table (which VACUUM would wait for)
    older.exec_driver_sql("SELECT count(*) FROM students")
    try:
        with sessions() as session:
            session.execute(delete(FaceEmbedding).where(FaceEmbedding.student_id == "S900"))
            session.commit()
        closer = threading.Timer(1.5, older.rollback)
        closer.start()
        privacy.scrub(sessions.kw["bind"])
        closer.join()
    finally:
        older.close()
        reader.dispose()
    assert secret not in _database_bytes(sessions, db_url)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_scrub_does_not_hold_writers_behind_a_reader(sessions: Any, db_url: str) -> None:
    """SQLite's WAL checkpoint holds the write lock while it waits for readers. A request that
    read and then writes (a second withdrawal right after the first's scrub) waited for that
    lock while the checkpoint waited for its read: both sat out the 10 s busy timeout. The
    scrub now tries in short attempts: the writer goes through at once, and the WAL is still
    truncated once the reader is gone."""
    import threading
    import time

    from sqlalchemy.engine import make_url

    from cloud_sync.aggregator.db.session import WRITE
    from cloud_sync.aggregator.services import privacy

    engine = sessions.kw["bind"]
    with sessions() as session:
        session.add(Student(id="S901", name="Reader", created_at=utcnow()))
        session.commit()
    wal = Path(make_url(db_url).database + "-wal")
    reader = engine.connect()
    reader.begin()  # BEGIN (the engine's hook)
    reader.exec_driver_sql("SELECT count(*) FROM students").all()  # a snapshot of the WAL
    scrubber = threading.Thread(target=privacy.scrub, args=(engine,))
    scrubber.start()
    time.sleep(0.5)  # the checkpoint is waiting for the reader
    started = time.monotonic()
    with engine.connect().execution_options(**WRITE) as writer, writer.begin():
        writer.exec_driver_sql("UPDATE students SET name = 'Writer' WHERE id = 'S901'")
    waited = time.monotonic() - started
    reader.rollback()
    reader.close()
    scrubber.join(timeout=20)
    assert not scrubber.is_alive()
    assert waited < 2.0, f"a writer waited {waited:.1f} s behind the scrub"
    assert wal.stat().st_size == 0  # the writer's frames too: checkpointed once the reader left


def test_a_withdrawal_answers_at_once_and_is_scrubbed_promptly(
        world: World, client: TestClient, faces_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The scrub ran as the request's background task, before FastAPI closed the request's
    session; that session had read after its commit (the answer), so the scrub waited
    SCRUB_WAIT_S (30 s) for its own request's snapshot while the request kept its connection,
    its thread and the client's connection: the answer came after 30 s, and a burst of
    withdrawals exhausted the pool (the next login got 503). Now a scrubber thread does it
    once the request is done: the answer is immediate and the files are scrubbed within
    seconds, with no "reader kept the WAL busy" / "transaction older" warning."""
    import time

    assert _enrol(client, world, "S001", _photo(faces_dir, "obama.jpg")).status_code == 201
    scrubber = client.app.state.ctx.scrubber  # type: ignore[attr-defined]
    started = time.monotonic()
    for _ in range(3):  # a burst: the scrubs coalesce
        answer = _consent(client, world, "S001", "withdrawn")
        assert answer.status_code == 200, answer.text
        assert _consent(client, world, "S001", "granted").status_code == 200
    answered = time.monotonic() - started
    assert scrubber.wait(20)
    scrubbed = time.monotonic() - started
    assert answered < 5.0, f"three withdrawals took {answered:.1f} s to answer"
    assert scrubbed < 10.0, f"the scrub finished {scrubbed:.1f} s after the first withdrawal"
    assert 1 <= scrubber.runs <= 3
    warned = [r.getMessage() for r in caplog.records if r.name.endswith("privacy")
              and r.levelname == "WARNING"]
    assert not warned, warned
