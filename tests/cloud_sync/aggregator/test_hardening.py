"""Issue 12 (aggregator side): reserved device ids, schedule times with offsets, oversized CSV
fields, the course report's first counted day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cloud_sync.aggregator.cli import app as cli
from tests.cloud_sync.aggregator.conftest import World, batch, give_faces, record


@pytest.fixture
def raw(world: World) -> TestClient:
    return TestClient(world.client.app, raise_server_exceptions=False)


def test_reserved_device_ids_refused(world: World, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("aggregator", "homeassistant", "HomeAssistant"):
        r = world.client.post("/api/v1/devices", json={"room_id": "LAB-301", "id": name},
                              headers=world.admin)
        assert r.status_code == 422, r.text
        assert "reserved" in r.text
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.delenv("AGGREGATOR_CONFIG", raising=False)
    runner = CliRunner()
    assert runner.invoke(cli, ["import", "rooms", str(_write(tmp_path / "r.csv",
                                                            "id\nLAB-1\n"))]).exit_code == 0
    result = runner.invoke(cli, ["devices", "add", "--room", "LAB-1", "--id", "aggregator"])
    assert result.exit_code == 1
    assert "reserved" in result.output and "Traceback" not in result.output
    assert runner.invoke(cli, ["devices", "add", "--room", "LAB-1", "--id", "pi-1"]).exit_code == 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_schedule_times_with_offsets_are_refused_with_a_reason(world: World, raw: TestClient
                                                               ) -> None:
    """Issue 12 #8: '08:00Z' was a 500 (naive vs aware comparison) and two offsets were
    silently dropped. Schedules are room-local wall-clock times: an offset is a 422."""
    slot = raw.get("/api/v1/schedules", headers=world.admin).json()[0]
    for body in ({"start_time": "08:00Z"}, {"start_time": "08:00+02:00"},
                 {"start_time": "08:00Z", "end_time": "09:00Z"}, {"end_time": "25:00"}):
        r = raw.patch(f"/api/v1/schedules/{slot['id']}", json=body, headers=world.admin)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert "offset" in r.text or "local time" in r.text
    new = {"course_id": "CS101", "room_id": "LAB-302", "weekday": "Tue"}
    for start, end in (("09:00Z", "10:00"), ("09:00", "10:00+01:00"),
                       ("09:00+01:00", "10:00+01:00")):
        r = raw.post("/api/v1/schedules", json={**new, "start_time": start, "end_time": end},
                     headers=world.admin)
        assert r.status_code == 422, (start, end, r.status_code, r.text)
    ok = raw.post("/api/v1/schedules", json={**new, "start_time": "10:00", "end_time": "11:15:30"},
                  headers=world.admin)
    assert ok.status_code == 201, ok.text
    assert (ok.json()["start_time"], ok.json()["end_time"]) == ("10:00:00", "11:15:30")
    moved = raw.patch(f"/api/v1/schedules/{ok.json()['id']}", json={"start_time": "10:30"},
                      headers=world.admin)
    assert moved.status_code == 200 and moved.json()["start_time"] == "10:30:00"


def test_huge_csv_header_field(world: World, raw: TestClient, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A header field over 128 KiB: a 400 with the reason (was a 500), and a clean CLI error
    (was a traceback)."""
    text = "id," + "n" * 200_000 + "\nS9,Ada\n"
    r = raw.post("/api/v1/import/students", content=text.encode(),
                 headers={**world.admin, "Content-Type": "text/csv"})
    assert r.status_code == 400, r.text
    assert "field larger than field limit" in r.json()["detail"]
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.delenv("AGGREGATOR_CONFIG", raising=False)
    result = CliRunner().invoke(cli, ["import", "students", str(_write(tmp_path / "s.csv", text))])
    assert result.exit_code == 2, result.output
    assert "malformed CSV header" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def _held(world: World, course: str) -> dict[str, Any]:
    r = world.client.get(f"/api/v1/attendance/course/{course}", headers=world.admin)
    assert r.status_code == 200, r.text
    return r.json()


def test_course_report_counts_from_creation(world: World) -> None:
    """Issue 12 #16: a course created today with no effective_from showed 'held 18' (counted
    120 days back). It counts from its creation and says so."""
    c = world.client
    assert c.post("/api/v1/courses", json={"id": "NEW1", "name": "New"},
                  headers=world.admin).status_code == 201
    assert c.post("/api/v1/enrollments", json={"student_id": "S001", "course_id": "NEW1"},
                  headers=world.admin).status_code == 201
    for day in range(7):  # a class every day at 00:00-00:01 UTC: today's has started
        assert c.post("/api/v1/schedules", json={
            "course_id": "NEW1", "room_id": "LAB-302", "weekday": day,
            "start_time": "00:00", "end_time": "00:01"}, headers=world.admin).status_code == 201
    report = _held(world, "NEW1")
    today = datetime.now(UTC).date().isoformat()
    assert report["date_from"] == today
    # today's class ended before S001 was enrolled (issue 25): it is not theirs
    assert [(p["held"], p["no_data"]) for p in report["students"]] == [(0, 0)]
    assert "creation" in report["counted_from"] and today in report["counted_from"]
    student = c.get("/api/v1/attendance/student/S001", headers=world.admin).json()
    assert {p["course_id"]: p["held"] for p in student["courses"]}["NEW1"] == 0
    assert student["counted_from"]


def test_course_report_counts_from_first_recorded_session(world: World, sessions: Any) -> None:
    """A course whose records are older than its row (e.g. imported later) counts from its
    first recorded session."""
    give_faces(sessions, ["S001", "S002", "S003", "S004"])
    r = world.client.post("/api/v1/attendance", json=batch(world, [
        record(world, "S001", world.at(0, 9, 1))]), headers=world.device)
    assert r.json()["accepted"] == 1
    report = _held(world, "CS101")
    assert report["date_from"] == world.monday.date().isoformat()
    this_monday_class = world.monday + timedelta(days=7, hours=9)
    # this Monday's class (if over) had no device online: no data, not held (issue 25)
    over = this_monday_class + timedelta(minutes=90) <= datetime.now(UTC)
    assert {(p["held"], p["no_data"]) for p in report["students"]} == {(1, int(over))}
    assert "first recorded session" in report["counted_from"]


def test_admin_tokens_listed_with_last_use_and_revoked(world: World, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12 #7: list and revoke admin tokens (API and CLI), with last-used times."""
    c = world.client
    made = c.post("/api/v1/admin/tokens", json={"name": "laptop"}, headers=world.admin)
    assert made.status_code == 201, made.text
    laptop = {"Authorization": f"Bearer {made.json()['token']}"}
    listed = c.get("/api/v1/admin/tokens", headers=world.admin).json()
    assert [t["name"] for t in listed] == ["tests", "laptop"]
    assert listed[0]["last_used_at"] is not None  # the fixture's token made these requests
    assert listed[1]["last_used_at"] is None
    assert all("token" not in t and "token_hash" not in t for t in listed)
    assert c.get("/api/v1/rooms", headers=laptop).status_code == 200
    used = {t["name"]: t for t in c.get("/api/v1/admin/tokens", headers=world.admin).json()}
    assert used["laptop"]["last_used_at"] is not None
    assert c.get("/api/v1/admin/tokens", headers=world.device).status_code == 403
    assert c.delete(f"/api/v1/admin/tokens/{made.json()['id']}",
                    headers=world.admin).status_code == 204
    assert c.get("/api/v1/rooms", headers=laptop).status_code == 401  # at once (cache cleared)
    assert c.delete("/api/v1/admin/tokens/999999", headers=world.admin).status_code == 404

    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.delenv("AGGREGATOR_CONFIG", raising=False)
    runner = CliRunner()
    created = runner.invoke(cli, ["admin", "create-token", "--name", "ops"])
    assert created.exit_code == 0
    listing = runner.invoke(cli, ["admin", "list-tokens"])
    assert listing.exit_code == 0 and "ops" in listing.output and "never" in listing.output
    assert created.output.splitlines()[0] not in listing.output
    revoked = runner.invoke(cli, ["admin", "revoke-token", "1"])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert "ops" not in runner.invoke(cli, ["admin", "list-tokens"]).output
    missing = runner.invoke(cli, ["admin", "revoke-token", "1"])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_health_reports_failing_writes_and_disk_space(tmp_path: Path) -> None:
    """Issue 12 #11: with the database full (SQLite's own SQLITE_FULL, what a full disk
    gives), writes answer 503 and /health says so (it said `ok` while reads still worked);
    free disk space is reported, and below min_free_disk_mb the status is degraded."""
    from sqlalchemy import event

    from cloud_sync.aggregator import config as aggregator_config
    from cloud_sync.aggregator.app import create_app
    from cloud_sync.aggregator.services.devices import create_admin_token

    settings = aggregator_config.load(None, database_url=f"sqlite:///{tmp_path / 'full.db'}",
                                      data_dir=tmp_path / "data")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ctx = client.app.state.ctx  # type: ignore[attr-defined]
        with ctx.sessions() as session:
            _, token = create_admin_token(session)
        admin = {"Authorization": f"Bearer {token}"}
        healthy = client.get("/health").json()
        assert (healthy["status"], healthy["writes"], healthy["disk"]) == ("ok", "ok", "ok")
        assert healthy["disk_free_mb"] > 0

        def cap(dbapi_conn: Any, _record: Any) -> None:
            pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

        event.listen(ctx.engine, "connect", cap)
        ctx.engine.dispose()
        codes = []
        for i in range(200):
            r = client.post("/api/v1/students", json={"id": f"S{i}", "name": "n" * 200},
                            headers=admin)
            codes.append(r.status_code)
            if r.status_code == 503:
                break
        assert codes[-1] == 503, codes
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error"
        assert health.json()["database"] == "ok"  # reads still work: that was the trap
        assert "full" in health.json()["writes"], health.json()

        event.remove(ctx.engine, "connect", cap)
        ctx.engine.dispose()
        assert client.post("/api/v1/students", json={"id": "S-ok", "name": "n"},
                           headers=admin).status_code == 201
        assert client.get("/health").json()["writes"] == "ok"

    low = aggregator_config.load(None, database_url=f"sqlite:///{tmp_path / 'full.db'}",
                                 data_dir=tmp_path / "data", min_free_disk_mb=10_000_000)
    with TestClient(create_app(low)) as client:
        body = client.get("/health").json()
        assert (body["status"], body["disk"]) == ("degraded", "low")


def test_mqtt_acl_command_writes_a_block_per_device(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.delenv("AGGREGATOR_CONFIG", raising=False)
    runner = CliRunner()
    rooms = _write(tmp_path / "r.csv", "id,site\nLAB-1,north\nLAB-2,south\n")
    assert runner.invoke(cli, ["import", "rooms", str(rooms)]).exit_code == 0
    for room, dev in (("LAB-1", "pi-1"), ("LAB-2", "pi-2")):
        assert runner.invoke(cli, ["devices", "add", "--room", room, "--id", dev]).exit_code == 0
    out = tmp_path / "classroom.acl"
    assert runner.invoke(cli, ["mqtt", "acl", "-o", str(out)]).exit_code == 0
    text = out.read_text()
    assert "user pi-1\ntopic write classroom/north/LAB-1/pi-1/attendance\n" in text
    assert "topic write classroom/south/LAB-2/pi-2/status\n" in text
    assert "classroom/+/+/%u/" not in text.replace("pattern read classroom/+/+/%u/ack", "")


def test_openapi_tells_the_truth(world: World, raw: TestClient) -> None:
    """Issue 12 #9 in small: error answers declared, times documented as they are sent, a
    number where a time is expected refused, a 405 listing every method of the path."""
    spec = raw.get("/openapi.json").json()
    post = spec["paths"]["/api/v1/students"]["post"]["responses"]
    assert {"400", "401", "403", "404", "409", "413", "422", "503"} <= set(post)
    assert "429" in spec["paths"]["/api/v1/attendance"]["post"]["responses"]
    assert "429" not in post  # admins are not rate limited
    out = spec["components"]["schemas"]["ScheduleOut"]["properties"]["start_time"]
    assert "format" not in out and out["pattern"].startswith("^([01]")
    slot = raw.get("/api/v1/schedules", headers=world.admin).json()[0]
    assert slot["start_time"] == "09:00:00"
    for since in ("0.5", "1700000000", "yesterday"):
        r = raw.get("/api/v1/events", params={"since": since}, headers=world.admin)
        assert r.status_code == 422, (since, r.text)
    assert raw.get("/api/v1/events", params={"since": "2026-01-01T00:00:00Z"},
                   headers=world.admin).status_code == 200
    assert raw.get("/api/v1/attendance/course/CS101", params={"from": "0.5"},
                   headers=world.admin).status_code == 422
    r = raw.put("/api/v1/courses/CS101", headers=world.admin)
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE, GET, PATCH"


def test_allow_header_lists_only_the_paths_methods(world: World, raw: TestClient) -> None:
    """`/faces/video` is not a face id: DELETE there is not routed, so Allow is POST only."""
    r = raw.request("OPTIONS", "/api/v1/students/S001/faces/video", headers=world.admin)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert raw.delete("/api/v1/students/S001/faces/999", headers=world.admin).status_code == 404


def test_device_hanging_up_mid_body_gets_a_quiet_400(world: World) -> None:
    """The endpoints that read their bodies themselves: a client gone before its body arrived
    is answered (to nobody) instead of raising out of the app (a traceback in the log)."""
    import asyncio

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for path in ("/api/v1/heartbeat", "/api/v1/events", "/api/v1/attendance"):
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "headers": [(b"authorization", world.device["Authorization"].encode()),
                        (b"content-type", b"application/json"), (b"content-length", b"300")],
        }
        sent.clear()
        asyncio.run(world.client.app(scope, receive, send))  # type: ignore[arg-type]
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400, path
