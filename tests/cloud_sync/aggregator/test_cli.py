"""`aggregator` CLI: db upgrade, devices add, admin create-token, import."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cloud_sync.aggregator.cli import app as cli
from cloud_sync.aggregator.db.migrate import current_revision, head_revision
from cloud_sync.aggregator.db.models import AdminToken, Device, Student
from cloud_sync.aggregator.db.session import make_engine, make_session_factory
from cloud_sync.aggregator.services.devices import authenticate_admin, authenticate_device


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli' / 'agg.db'}"
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", url)
    monkeypatch.delenv("AGGREGATOR_CONFIG", raising=False)
    return url


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_cli_end_to_end(db: str, tmp_path: Path) -> None:
    code, out = _run("db", "upgrade")
    assert code == 0 and head_revision() in out
    rooms = tmp_path / "rooms.csv"
    rooms.write_text("id,name,site,timezone\nLAB-301,Lab,north,Europe/Berlin\n,x,y,UTC\n")
    code, out = _run("import", "rooms", str(rooms))
    assert code == 1 and "1 created" in out and "line 3" in out
    students = tmp_path / "students.csv"
    students.write_text("id,name\nS001,Ada\nS002,Alan\n")
    assert _run("import", "students", str(students))[0] == 0
    assert _run("import", "teachers", str(students))[0] == 2
    code, out = _run("devices", "add", "--room", "LAB-301", "--id", "pi-301")
    assert code == 0, out
    key = next(line.split(": ", 1)[1] for line in out.splitlines()
               if line.startswith("api_key: "))
    assert _run("devices", "add", "--room", "NOPE")[0] == 1
    code, out = _run("admin", "create-token", "--name", "ops")
    assert code == 0
    token = out.splitlines()[0].strip()
    engine = make_engine(db)
    with make_session_factory(engine)() as session:
        device = authenticate_device(session, key)
        assert device is not None and device.id == "pi-301"
        assert key not in session.scalars(select(Device.key_hash)).one()
        assert authenticate_admin(session, token) is not None
        assert token not in session.scalars(select(AdminToken.token_hash)).one()
        assert authenticate_device(session, key[:-1] + "x") is None
        assert session.scalars(select(Student.id).order_by(Student.id)).all() == ["S001", "S002"]
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_config_describe_lists_new_settings() -> None:
    code, out = _run("config", "describe")
    assert code == 0
    for name in ("late_after_min", "early_arrival_min", "rate_limit_per_min", "keep_photos"):
        assert name in out


def _stdout(*args: str) -> tuple[int, str]:
    """As _run, with standard output only (the commands print notes on stderr)."""
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout


def test_students_consent_erase_export_purge(db: str, tmp_path: Path) -> None:
    import json

    import numpy as np

    from cloud_sync.aggregator.config import load
    from cloud_sync.aggregator.db.models import AuditLog, FaceEmbedding
    from cloud_sync.aggregator.services.common import ConflictError
    from cloud_sync.aggregator.services.faces import store_embedding

    assert _stdout("db", "upgrade")[0] == 0
    students = tmp_path / "students.csv"
    students.write_text("id,name\nS001,Ada\nS002,Alan\n")
    assert _stdout("import", "students", str(students))[0] == 0
    code, out = _stdout("students", "consent", "S001", "show")
    assert code == 0 and json.loads(out)["state"] is None
    engine = make_engine(db)
    sessions = make_session_factory(engine)
    settings = load(None)
    vec = np.linspace(-1, 1, 128, dtype=np.float32)
    try:
        with sessions() as session, pytest.raises(ConflictError, match="no consent"):
            store_embedding(session, settings, "S001", vec, 0.9, "test")
        code, out = _stdout("students", "consent", "S001", "grant", "--note", "form 17")
        assert code == 0 and json.loads(out)["state"] == "granted"
        assert json.loads(out)["by"].startswith("cli:")
        with sessions() as session:
            store_embedding(session, settings, "S001", vec, 0.9, "test")
        code, out = _stdout("students", "export", "S001")
        assert code == 0 and json.loads(out)["face_descriptors"][0]["descriptor"][0] == -1.0
        csv_file = tmp_path / "s001.csv"
        assert _stdout("students", "export", "S001", "--format", "csv", "--out",
                    str(csv_file))[0] == 0
        assert csv_file.read_text().startswith("section,at,key,")
        code, out = _stdout("students", "consent", "S001", "withdraw")
        assert code == 0 and json.loads(out)["descriptors_deleted"] == 1
        with sessions() as session:
            assert session.scalars(select(FaceEmbedding)).all() == []
        assert _stdout("students", "consent", "S001", "maybe")[0] == 2
        assert _stdout("students", "consent", "S404", "grant")[0] == 1
        assert _stdout("students", "erase", "S002")[0] != 0  # no --yes, no confirmation
        code, out = _stdout("students", "erase", "S002", "--yes")
        assert code == 0 and json.loads(out)["policy"] == "pseudonymise"
        with sessions() as session:
            assert session.get(Student, "S002") is None
            actions = [a for (a,) in session.execute(select(AuditLog.action)
                                                      .order_by(AuditLog.id))]
        assert actions == ["consent.grant", "student.export", "student.export",
                           "consent.withdraw", "student.erase"]
        code, out = _stdout("students", "purge")
        assert code == 0 and out.strip() == ("attendance=0 events=0 dead_letters=0 heartbeats=0 "
                                             "record_descriptors=0 unknown_faces=0 "
                                             "console_sessions=0 audit=0 recording_files=0 "
                                             "abandoned_uploads=0")
    finally:
        engine.dispose()


def test_first_class_without_csv(db: str, tmp_path: Path, faces_dir: Path) -> None:
    """`students add` and `schedules add --now`: a class running now, with its roster, as the
    device pulls it (what `make run`'s banner suggests for a first try)."""
    from datetime import UTC, datetime

    from cloud_sync.aggregator.services.schedule import build_schedule

    rooms = tmp_path / "rooms.csv"
    rooms.write_text("id,name,site,timezone\nLAB-301,Lab,north,Europe/Berlin\n")
    assert _run("import", "rooms", str(rooms))[0] == 0
    code, out = _run("schedules", "add", "--room", "LAB-301", "--course", "TRY",
                     "--course-name", "First try", "--now", "--minutes", "90")
    assert code == 0 and "course TRY added" in out and "schedule 1: TRY in LAB-301 on" in out
    code, out = _run("students", "add", "S001", "--name", "Lin-Manuel Miranda", "--course",
                     "TRY")
    assert code == 0 and "enrolled in TRY" in out, out
    assert _run("students", "add", "S001", "--name", "Lin-Manuel Miranda", "--course",
                "TRY")[0] == 0  # again: nothing new, no error
    code, out = _run("students", "consent", "S001", "grant", "--note", "first try")
    assert code == 0, out  # consent before any face data (docs/PRIVACY.md)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "S001.png").write_bytes(
        (faces_dir / "face_recognition" / "examples" / "lin-manuel-miranda.png").read_bytes())
    # what macOS leaves beside a copied photo: a hidden file, ignored as `roster build` does
    (photos / "._S001.png").write_bytes(b"\x00\x05\x16\x07")
    code, out = _run("faces", "encode", "--batch", str(photos))
    assert code == 0 and "1 of 1 photos enrolled" in out, out
    engine = make_engine(db)
    with make_session_factory(engine)() as session:
        schedule = build_schedule(session, "LAB-301", datetime.now(UTC))
    engine.dispose()
    session_now = [s for s in schedule.sessions if s.course_id == "TRY"]
    assert len(session_now) == 1 and session_now[0].course_name == "First try"
    assert [r.student_id for r in schedule.rosters["TRY"]] == ["S001"]
    # wrong use: one clear line each
    code, out = _run("schedules", "add", "--room", "LAB-301", "--course", "TRY")
    assert code == 2 and "--now" in out
    code, out = _run("schedules", "add", "--room", "NOPE", "--course", "TRY", "--now")
    assert code == 1 and "room 'NOPE' does not exist" in out
    code, out = _run("schedules", "add", "--room", "LAB-301", "--course", "TRY",
                     "--weekday", "Mon", "--start", "10:00", "--end", "09:00")
    assert code == 1 and "end_time must be after start_time" in out
    assert _run("students", "add", "S002", "--name", "X", "--course", "NOPE")[0] == 1


def test_serve_refuses_several_workers_on_sqlite(tmp_path: Path) -> None:
    """SQLite takes one writing process: --workers 2 is refused before anything starts,
    with the reason and the fix; a worker count out of bounds is refused too."""
    db = f"sqlite:///{tmp_path / 'agg.db'}"
    result = CliRunner().invoke(cli, ["serve", "--workers", "2"],
                                env={"AGGREGATOR_DATABASE_URL": db})
    assert result.exit_code == 2, result.output
    assert "--workers 2 needs PostgreSQL" in result.output
    assert not (tmp_path / "agg.db").exists()  # refused before migrating
    result = CliRunner().invoke(cli, ["serve", "--workers", "0"],
                                env={"AGGREGATOR_DATABASE_URL": db})
    assert result.exit_code == 2 and "--workers" in result.output
