"""Console accounts and corrections over HTTP (TestClient on SQLite and PostgreSQL, and a live
uvicorn server for the concurrent login limit): hashed passwords, no default account, the
login limit under parallel guesses, CSRF, logout revoking the session, teacher scoping, and
reports (API and console) reading through the corrections."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.cli import app as cli_app
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import AuditLog, ConsoleUser
from cloud_sync.aggregator.services.common import ServiceError

from .conftest import World, batch, give_faces, record
from .console_helpers import csrf_of, live_aggregator, login

PW = "correct horse battery"


def _users(sessions: Any) -> None:
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
        accounts.add_user(session, "kim", "teacher", PW, ["MA201"])


def test_no_default_account_and_hashed_password(app_client: TestClient, sessions: Any) -> None:
    r = login(app_client, "admin", "admin")
    assert r.status_code == 401
    with sessions() as session:
        with pytest.raises(ServiceError, match="at least"):
            accounts.add_user(session, "office", "admin", "short")
        accounts.add_user(session, "office", "admin", PW)
        stored = session.scalars(select(ConsoleUser.password_hash)).one()
    assert stored.startswith("$argon2id$") and PW not in stored
    assert login(app_client, "office", PW).status_code == 200
    assert app_client.get("/").status_code == 200


def test_cli_users_add_reads_the_password(settings: AggregatorSettings, sessions: Any,
                                          world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", aggregator_config.database_url(settings))
    monkeypatch.setenv("AGGREGATOR_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    r = runner.invoke(cli_app, ["users", "add", "lee", "--role", "teacher", "--course", "CS101",
                                "--password-stdin"], input=PW + "\n")
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli_app, ["users", "add", "x", "--role", "boss", "--password-stdin"],
                      input=PW + "\n")
    assert r.exit_code == 2 and "role must be" in r.output
    # a wrong role is refused before the password prompt (no input given at all)
    r = runner.invoke(cli_app, ["users", "add", "x", "--role", "boss"])
    assert r.exit_code == 2 and "role must be" in r.output and "Password" not in r.output
    with sessions() as session:
        user = accounts.check_credentials(session, "lee", PW)
        assert user is not None and user.role == "teacher"


def test_login_limit_holds_under_concurrency(settings: AggregatorSettings) -> None:
    """20 parallel wrong guesses with a limit of 5: exactly 5 are checked, the rest get 429,
    and then even the right password waits (the limit is per name, before the check)."""
    with live_aggregator(settings) as (url, app):
        with app.state.ctx.sessions() as session:
            accounts.add_user(session, "office", "admin", PW)
        codes: list[int] = []
        lock = threading.Lock()
        start = threading.Barrier(20)

        def guess(i: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                page = client.get("/login")
                start.wait()
                r = client.post("/login", data={"name": "office", "password": f"guess {i}xxxxx",
                                                "csrf": csrf_of(page.text)})
                with lock:
                    codes.append(r.status_code)

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [401] * settings.console_login_max_attempts + [429] * (
            20 - settings.console_login_max_attempts)
        with httpx.Client(base_url=url, timeout=60) as client:
            r = login(client, "office", PW)
            assert r.status_code == 429 and "Retry-After" in r.headers


def test_csrf_and_logout(world: World, sessions: Any) -> None:
    _users(sessions)
    c = world.client
    page = c.get("/login")
    r = c.post("/login", data={"name": "office", "password": PW, "csrf": "forged"})
    assert r.status_code == 403
    r = c.post("/login", data={"name": "office", "password": PW, "csrf": csrf_of(page.text)},
               headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert login(c, "office", PW).status_code == 200
    cookie = c.cookies.get("console_session")
    assert cookie
    # a write without the token, or from another site, is refused
    r = c.post("/timetable/rooms", data={"room_id": "X1"})
    assert r.status_code == 403
    token = csrf_of(c.get("/timetable").text)
    r = c.post("/timetable/rooms", data={"room_id": "X1", "csrf": token},
               headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    r = c.post("/timetable/rooms", data={"room_id": "X1", "csrf": token},
               follow_redirects=False)
    assert r.status_code == 303
    # logout ends the session on the server: the old cookie no longer opens a page
    assert c.post("/logout", data={"csrf": token}, follow_redirects=False).status_code == 303
    c.cookies.set("console_session", cookie)
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    with sessions() as session:
        entries = {tuple(r) for r in session.execute(
            select(AuditLog.actor, AuditLog.action, AuditLog.subject))}
    # the console writes the one audit log (services/audit.py), typed like the API's entries
    assert {("console:office", "user.login", "user:office"),
            ("console:office", "user.logout", "user:office"),
            ("console:office", "room.add", "room:X1")} <= entries


def test_teacher_sees_only_own_courses(world: World, sessions: Any) -> None:
    _users(sessions)
    c = world.client
    login(c, "kim", PW)
    day = world.monday.date().isoformat()
    assert "MA201" in c.get("/courses").text
    assert "CS101" not in c.get("/courses").text
    assert c.get(f"/courses/CS101?date={day}").status_code == 403
    assert c.get(f"/courses/CS101/day.csv?date={day}").status_code == 403
    assert c.get(f"/courses/MA201?date={day}").status_code == 200
    assert c.get("/students/S001").status_code == 404  # in CS101 only: as if it did not exist
    assert c.get("/students/S004").status_code == 200  # also in MA201
    assert c.get("/timetable").status_code == 403
    assert c.get("/devices").status_code == 403
    token = csrf_of(c.get("/courses").text)
    r = c.post("/courses/CS101/present", data={
        "csrf": token, "student_id": "S001", "reason": "sneaky",
        "starts_at": world.at(0, 9).isoformat()})
    assert r.status_code == 403


def test_corrections_change_the_api_report(world: World, sessions: Any) -> None:
    """Not this student: the record stops counting; marked present by hand: counts from the
    session start. The admin API's JSON and CSV and the console's CSV all agree."""
    _users(sessions)
    give_faces(sessions, ["S001", "S002", "S003", "S004"])
    c = world.client
    recs = [record(world, "S001", world.at(0, 9, 2), confidence=0.8),
            record(world, "S002", world.at(0, 9, 20), confidence=0.7)]
    assert c.post("/api/v1/attendance", json=batch(world, recs),
                  headers=world.device).json()["accepted"] == 2
    day = world.monday.date().isoformat()
    api = f"/api/v1/attendance/course/CS101?date={day}"
    before = {s["student_id"]: s for s in c.get(api, headers=world.admin).json()
              ["sessions"][0]["students"]}
    assert before["S001"]["status"] == "present" and before["S001"]["confidence"] == 0.8
    assert before["S002"]["status"] == "late" and before["S003"]["status"] == "absent"
    login(c, "lee", PW)
    token = csrf_of(c.get(f"/courses/CS101?date={day}").text)
    r = c.post("/courses/CS101/wrong", data={"csrf": token, "record_key": recs[0]["key"],
                                              "date": day, "reason": ""})
    assert r.status_code == 400  # a reason is required
    r = c.post("/courses/CS101/wrong", data={"csrf": token, "record_key": recs[0]["key"],
                                              "date": day, "reason": "his twin"})
    assert r.status_code == 200
    r = c.post("/courses/CS101/present", data={
        "csrf": token, "student_id": "S003", "reason": "seen in class, camera missed",
        "starts_at": world.at(0, 9).isoformat()})
    assert r.status_code == 200
    after = {s["student_id"]: s for s in c.get(api, headers=world.admin).json()
             ["sessions"][0]["students"]}
    assert after["S001"]["status"] == "absent"
    assert after["S003"]["status"] == "present" and after["S003"]["source"] == "manual"
    assert after["S002"] == before["S002"]
    console_csv = c.get(f"/courses/CS101/day.csv?date={day}").text
    assert console_csv == c.get(api + "&format=csv", headers=world.admin).text
    summary = c.get("/api/v1/attendance/student/S001", headers=world.admin,
                    params={"from": day, "to": day}).json()
    assert summary["records"] == []  # the wrong record no longer shows
    r = c.post("/courses/CS101/wrong", data={"csrf": token, "record_key": recs[0]["key"],
                                              "date": day, "reason": "again"})
    assert r.status_code == 409
    with sessions() as session:
        trail = session.scalars(select(AuditLog).where(AuditLog.action.in_(
            ["attendance.not_student", "attendance.mark_present"]))).all()
    assert {(a.actor, a.action, a.subject) for a in trail} == {
        ("console:lee", "attendance.not_student", "student:S001"),
        ("console:lee", "attendance.mark_present", "student:S003")}


def test_dashboard_fragment_needs_a_session(app_client: TestClient, tmp_path: Path) -> None:
    r = app_client.get("/console/fragments/dashboard", follow_redirects=False)
    assert r.status_code == 401
    r = app_client.get("/", follow_redirects=False)
    assert r.status_code == 303
    assert app_client.get("/console/static/console.js").status_code == 200


def test_timetable_and_device_forms(world: World, sessions: Any) -> None:
    """Edit and delete a weekly slot, start a class now, move a device, rotate its key (the
    old key stops working, the new one works), all from the forms."""
    _users(sessions)
    c = world.client
    login(c, "office", PW)
    token = csrf_of(c.get("/timetable").text)
    slots = c.get("/api/v1/schedules", headers=world.admin).json()
    cs = next(s for s in slots if s["course_id"] == "CS101")
    r = c.post(f"/timetable/schedules/{cs['id']}", data={
        "csrf": token, "course_id": "CS101", "room_id": "LAB-302", "weekday": 2,
        "start_time": "13:00", "end_time": "14:00", "effective_from": "", "effective_to": ""})
    assert r.status_code == 200, r.text
    edited = c.get(f"/api/v1/schedules/{cs['id']}", headers=world.admin).json()
    assert (edited["room_id"], edited["weekday"], edited["start_time"]) == (
        "LAB-302", 2, "13:00:00")
    r = c.post(f"/timetable/schedules/{cs['id']}", data={
        "csrf": token, "course_id": "CS101", "room_id": "LAB-302", "weekday": 2,
        "start_time": "14:00", "end_time": "13:00"})
    # a clear reason beside the field, the edit kept as typed (issue 25 item 5)
    assert r.status_code == 422 and f'id="err-schedule-{cs["id"]}-end_time"' in r.text
    assert c.post(f"/timetable/schedules/{cs['id']}/delete",
                  data={"csrf": token}).status_code == 200
    assert c.get(f"/api/v1/schedules/{cs['id']}", headers=world.admin).status_code == 404
    # replace: whatever the world's timetable has in LAB-301 at this hour (MA201 on Mondays
    # 10:30-12:00) would otherwise refuse the class as an overlap, depending on the time of day
    r = c.post("/timetable/now", data={"csrf": token, "course_id": "PH1", "room_id": "LAB-301",
                                       "minutes": 30, "replace": "true"})
    assert r.status_code == 200 and "PH1 in LAB-301 from" in r.text
    r = c.post(f"/devices/{world.device_id}/move", data={"csrf": token, "room_id": "LAB-302"})
    assert r.status_code == 200
    assert c.get(f"/api/v1/devices/{world.device_id}",
                 headers=world.admin).json()["room_id"] == "LAB-302"
    r = c.post(f"/devices/{world.other_device_id}/rotate", data={"csrf": token})
    assert r.status_code == 200
    import re

    new_key = re.search(r'id="api-key">(dk_[^<]+)<', r.text).group(1)  # type: ignore[union-attr]
    beat = {"v": 1, "device_id": world.other_device_id, "room_id": "LAB-302",
            "software_version": "1", "sent_at": world.at(0, 9).isoformat(), "uptime_s": 1,
            "outbox_depth": 0}
    assert c.post("/api/v1/heartbeat", json=beat, headers=world.other).status_code == 401
    assert c.post("/api/v1/heartbeat", json=beat,
                  headers={"Authorization": f"Bearer {new_key}"}).status_code == 200


def test_login_next_stays_on_this_site(world: World, sessions: Any) -> None:
    from cloud_sync.aggregator.console.core import _safe_next

    for target in ("//evil.example/x", "/\\evil.example", "https://evil.example",
                   "/x\n", "", None):
        assert _safe_next(target) == "/", target
    assert _safe_next("/courses/CS101?date=2026-11-16") == "/courses/CS101?date=2026-11-16"
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
    c = world.client
    page = c.get("/login", params={"next": "/courses"})
    r = c.post("/login", follow_redirects=False, data={
        "name": "office", "password": PW, "csrf": csrf_of(page.text), "next": "/courses"})
    assert r.status_code == 303 and r.headers["location"] == "/courses"


def test_console_post_without_session_is_refused_before_the_body(world: World,
                                                                  sessions: Any) -> None:
    """No session: 401 at once, even for a body far over any limit (it is never read)."""
    c = world.client
    big = b"x" * (30 * 1024 * 1024)
    r = c.post("/students/S001/photos", content=big,
               headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 401
    _users(sessions)
    login(c, "office", PW)
    r = c.post("/students/S001/photos", content=big,
               headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 413  # logged in: the route's upload limit applies
