"""Issue 23, the second security pass, as the attacker tried it: each test does what the attack
did and fails without its fix. Most run against the real server (`aggregator serve`, one per
module, SQLite; started with unknown faces and recordings on, as attacked), the console
authorisation ones in process (TestClient, SQLite)."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from sqlalchemy import select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import Enrollment
from tests.support.harness import DEVICE, ROOM, Aggregator

from .conftest import TABLES, World
from .console_helpers import csrf_of, login

PW = "correct horse battery"
# A 34-byte lossless WebP declaring 16383x16383 pixels: 800 MB of BGR once decoded (made with
# Pillow from an all-black image of that size; the attack's file).
BOMB = bytes.fromhex("524946461a000000574542505650384c0e0000002ffebfff0f071011fd0f4444ff03")


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # in-process tests here: SQLite (authorisation, not SQL)
    return f"sqlite:///{tmp_path / 'aggregator.db'}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Aggregator, dict]]:
    """The real server as attacked: unknown faces and recordings on, INFO logs, console users
    `office` (admin) and `lee` (teacher of CS101)."""
    from cloud_sync.aggregator.db.session import make_engine, make_session_factory

    agg = Aggregator(tmp_path_factory.mktemp("attacks"))
    keys = agg.seed()
    engine = make_engine(agg.db_url)
    with make_session_factory(engine)() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
    engine.dispose()
    agg.start(extra_env={"AGGREGATOR_UNKNOWN_FACES_ENABLED": "true",
                         "AGGREGATOR_RECORDINGS_ENABLED": "true",
                         "AGGREGATOR_LOG_LEVEL": "INFO"})
    yield agg, keys
    agg.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def unknown_face(crop: bytes) -> dict[str, Any]:
    return {"key": str(uuid.uuid4()), "device_id": DEVICE, "room_id": ROOM,
            "at": datetime.now(UTC).isoformat(), "descriptor": [0.05] * 128,
            "embedder": "sface/sface-2021dec-int8bq",
            "crop_jpeg": base64.b64encode(crop).decode()}


# --- 1. a teacher enrolling a student they cannot see -------------------------------------------

def test_teacher_cannot_enrol_nor_tell_which_student_ids_exist(world: World,
                                                               sessions: Any) -> None:
    """The attack: lee (CS101) posted /students/S005/enrol with course_id=CS101 and got 303;
    S005's descriptors then went to the CS101 room's device. The office enrols (PRIVACY.md)."""
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
    c = world.client
    assert login(c, "lee", PW).status_code == 200
    token = csrf_of(c.get("/courses").text)
    hidden = c.post("/students/S005/enrol", data={"csrf": token, "course_id": "CS101"},
                    follow_redirects=False)
    unknown = c.post("/students/NOSUCH/enrol", data={"csrf": token, "course_id": "CS101"},
                     follow_redirects=False)
    own = c.post("/students/S001/enrol", data={"csrf": token, "course_id": "CS101"},
                 follow_redirects=False)
    assert hidden.status_code == unknown.status_code == own.status_code == 403
    assert hidden.text == unknown.text == own.text
    with sessions() as session:
        assert session.get(Enrollment, ("S005", "CS101")) is None
        assert session.scalars(select(Enrollment.course_id).where(
            Enrollment.student_id == "S005")).all() == ["PH1"]
    # reading: a student in none of lee's courses and an id that does not exist look the same
    for path in ("/students/{}", "/students/{}/attendance.csv"):
        seen = c.get(path.format("S005"))
        missing = c.get(path.format("NOSUCH"))
        assert seen.status_code == missing.status_code == 404
        assert seen.text.replace("S005", "X") == missing.text.replace("NOSUCH", "X")
    assert c.get("/students/S001").status_code == 200
    assert 'action="/students/S001/enrol"' not in c.get("/students/S001").text
    # the office still enrols
    c.post("/logout", data={"csrf": token})
    assert login(c, "office", PW).status_code == 200
    token = csrf_of(c.get("/courses").text)
    r = c.post("/students/S005/enrol", data={"csrf": token, "course_id": "CS101"},
               follow_redirects=False)
    assert r.status_code == 303
    with sessions() as session:
        assert session.get(Enrollment, ("S005", "CS101")) is not None


# --- 2. image bombs -------------------------------------------------------------------------------

def test_image_bombs_are_refused_before_any_pixel_is_decoded(
        served: tuple[Aggregator, dict]) -> None:
    """Four 34-byte WebP bombs at once on /api/v1/unknown-faces (device key), one as an admin
    photo, one through the console's photo upload: each refused as too large, and
    the server's peak memory does not move (it reached 6 GB before)."""
    agg, keys = served
    assert agg.proc is not None
    before = peak_rss_mb(agg.proc.pid)
    with httpx.Client(base_url=agg.base_url, timeout=60) as client:
        def post_bomb(_: int) -> httpx.Response:
            return client.post("/api/v1/unknown-faces", json=unknown_face(BOMB),
                               headers=bearer(keys[DEVICE]))

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post_bomb, range(4)))
        grown = peak_rss_mb(agg.proc.pid) - before
        assert grown < 100, f"the server's peak memory grew by {grown:.0f} MiB"
        for r in answers:
            assert r.status_code == 400, r.text
            assert "larger than 40000000 pixels" in r.json()["detail"]
        r = client.post("/api/v1/students/S001/faces", headers=bearer(keys["admin"]),
                        files={"photo": ("bomb.webp", BOMB, "image/webp")})
        assert r.status_code == 400 and "larger than" in r.json()["detail"], r.text
        assert login(client, "office", PW).status_code == 303
        token = csrf_of(client.get("/students/S001").text)
        r = client.post("/students/S001/photos", headers={"Accept": "application/json",
                                                          "X-CSRF-Token": token},
                        files={"photos": ("bomb.webp", BOMB, "image/webp")})
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert not result["ok"] and "larger than" in result["reason"]
        # a format nobody uploads a face in is refused by its header too (TIFF, OpenEXR, ...)
        ok, tiff = cv2.imencode(".tiff", np.zeros((8, 8, 3), np.uint8))
        r = client.post("/api/v1/unknown-faces", json=unknown_face(tiff.tobytes()),
                        headers=bearer(keys[DEVICE]))
        assert r.status_code == 400 and "accepted format" in r.json()["detail"]
        # a real small crop still goes in
        ok, jpeg = cv2.imencode(".jpg", np.full((96, 80, 3), 128, np.uint8))
        assert ok
        r = client.post("/api/v1/unknown-faces", json=unknown_face(jpeg.tobytes()),
                        headers=bearer(keys[DEVICE]))
        assert r.status_code == 200 and r.json()["stored"], r.text
    grown = peak_rss_mb(agg.proc.pid) - before
    assert grown < 100, f"the server's peak memory grew by {grown:.0f} MiB"


def test_opencv_decoder_limit_is_set_before_cv2_loads(tmp_path: Path) -> None:
    """The fence behind the header check: in a fresh aggregator process OpenCV itself refuses
    to decode the bomb (OPENCV_IO_MAX_IMAGE_PIXELS is read once, when cv2 loads)."""
    import subprocess
    import sys

    # The peak is VmHWM, the new process image's own high-water mark: getrusage's ru_maxrss
    # carries over the forking parent's (a pytest worker that loaded dlib: 2 GB) across exec.
    code = ("import cloud_sync.aggregator.cli, cv2, numpy as np, re\n"
            f"data = bytes.fromhex({BOMB.hex()!r})\n"
            "try:\n"
            "    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)\n"
            "except cv2.error:\n"
            "    out = None\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())\n"
            "print(out is None, int(hwm.group(1)) // 1024)\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, env=env)
    refused, peak_mb = done.stdout.split()
    assert refused == "True" and int(peak_mb) < 600, done.stdout


# --- 3, 4. the live feed's credentials ------------------------------------------------------------

def ws_connect(agg: Aggregator, query: str = "", token: str | None = None,
               first_message: str | None = None) -> Any:
    import websocket

    header = [f"Authorization: Bearer {token}"] if token else []
    ws = websocket.create_connection(f"ws://127.0.0.1:{agg.port}/ws/events{query}",
                                     timeout=20, header=header)
    if first_message is not None:
        ws.send(json.dumps({"token": first_message}))
    return ws


def closed_with(ws: Any, timeout_s: float) -> tuple[int, str, float]:
    """(close code, reason, seconds it took) of the server's close frame."""
    import websocket

    start = time.monotonic()
    ws.settimeout(timeout_s)
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return (int.from_bytes(data[:2], "big"), data[2:].decode(errors="replace"),
                    time.monotonic() - start)


def new_token(agg: Aggregator, keys: dict, name: str) -> tuple[int, str]:
    r = httpx.post(f"{agg.base_url}/api/v1/admin/tokens", json={"name": name},
                   headers=bearer(keys["admin"]), timeout=20)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["token"]


def test_no_token_in_the_server_log(served: tuple[Aggregator, dict]) -> None:
    """The attack: `/ws/events?token=<admin token>` appeared in uvicorn's INFO line. Now a
    token in the URL is refused and masked; the header and the first message work."""
    import websocket

    agg, keys = served
    _, token = new_token(agg, keys, "log-check")
    with pytest.raises(websocket.WebSocketBadStatusException):  # refused at the handshake
        ws_connect(agg, f"?token={token}&room_id={ROOM}")
    for ws in (ws_connect(agg, f"?room_id={ROOM}", token=token),
               ws_connect(agg, f"?room_id={ROOM}", first_message=token)):
        ws.settimeout(0.5)
        with pytest.raises(websocket.WebSocketTimeoutException):  # open, nothing to read
            ws.recv()
        ws.close()
    bad = ws_connect(agg, first_message="at_not-a-token-at-all-xxxxxxxx")
    assert closed_with(bad, 10)[0] == 1008
    time.sleep(0.5)  # the log lines are written
    log = agg.log.read_text()
    assert "WebSocket /ws/events?" in log  # uvicorn's handshake lines are there ...
    assert token not in log and token[3:] not in log  # ... with nothing of the token
    assert "at_not-a-token" not in log
    assert keys["admin"] not in log and keys[DEVICE] not in log


def test_revoked_token_loses_its_live_feed_within_seconds(
        served: tuple[Aggregator, dict]) -> None:
    """The attack: a revoked admin token kept streaming on an open socket. Revoked over the
    API (this process hears it at once) or in the database by another process (the CLI): the
    socket is closed with 1008 within seconds; a token that stays valid keeps its feed."""
    agg, keys = served
    by_api_id, by_api = new_token(agg, keys, "revoked-by-api")
    by_cli_id, by_cli = new_token(agg, keys, "revoked-by-cli")
    _, kept = new_token(agg, keys, "kept")
    sockets = {name: ws_connect(agg, token=secret) for name, secret in
               (("api", by_api), ("cli", by_cli), ("kept", kept))}
    time.sleep(0.3)
    r = httpx.delete(f"{agg.base_url}/api/v1/admin/tokens/{by_api_id}",
                     headers=bearer(keys["admin"]), timeout=20)
    assert r.status_code == 204
    code, reason, took = closed_with(sockets["api"], 10)
    assert code == 1008 and "revoked" in reason and took < 3, (code, reason, took)
    # as `aggregator admin revoke-token` does from another process: nobody tells the server
    agg.execute("DELETE FROM admin_tokens WHERE id = ?", by_cli_id)
    code, reason, took = closed_with(sockets["cli"], 15)
    assert code == 1008 and took < 8, (code, reason, took)
    sockets["kept"].settimeout(1.0)
    import websocket

    with pytest.raises(websocket.WebSocketTimeoutException):
        sockets["kept"].recv()
    for ws in sockets.values():
        ws.close()
    # a browser's socket (token in the first message) goes the same way
    _, browser_token = new_token(agg, keys, "browser")
    browser = ws_connect(agg, first_message=browser_token)
    time.sleep(0.3)
    agg.execute("DELETE FROM admin_tokens WHERE name = 'browser'")
    assert closed_with(browser, 15)[0] == 1008


# --- 5. behind a reverse proxy; the login limit across processes -------------------------------

def _proxied_login(client: Any, name: str, password: str, **headers: str) -> Any:
    page = client.get("/login")  # (over https its login cookie would be Secure: the test
    # client, on http, would not send it back)
    return client.post("/login", headers=headers, follow_redirects=False, data={
        "name": name, "password": password, "csrf": csrf_of(page.text), "next": "/"})


def test_behind_a_trusted_proxy_logins_count_per_real_client_and_cookies_are_secure(
        settings: Any) -> None:
    """The attack: behind a proxy that is not 127.0.0.1, five strangers' failed logins locked
    the admin out (the limit keyed on the proxy's address) and the session cookie lacked
    Secure under X-Forwarded-Proto: https. With trusted_proxies the real client counts; an
    address that is not a trusted proxy cannot pick its address with X-Forwarded-For."""
    from fastapi.testclient import TestClient

    from cloud_sync.aggregator.app import create_app

    settings = settings.model_copy(update={"trusted_proxies": "10.0.0.0/24",
                                           "console_login_max_per_address": 5})
    app = create_app(settings)
    with TestClient(app, client=("10.0.0.2", 40000)) as proxy:
        with app.state.ctx.sessions() as session:
            accounts.add_user(session, "office", "admin", PW)
        for i in range(5):  # five strangers (own names, own addresses) get it wrong
            r = _proxied_login(proxy, f"stranger{i}", "wrong password",
                               **{"X-Forwarded-For": f"198.51.100.{i + 1}"})
            assert r.status_code == 401
        r = _proxied_login(proxy, "office", PW, **{"X-Forwarded-For": "198.51.100.50",
                                                     "X-Forwarded-Proto": "https"})
        assert r.status_code == 303, r.text
        cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie"
                      and v.startswith("console_session="))
        assert "secure" in cookie.lower(), cookie
    with TestClient(app, client=("192.0.2.9", 40000)) as direct:  # not a proxy: not believed
        codes = [_proxied_login(direct, f"guess{i}", "wrong password",
                                **{"X-Forwarded-For": f"203.0.113.{i + 1}"}).status_code
                 for i in range(6)]
        assert codes == [401] * 5 + [429]
        r = _proxied_login(direct, "office", PW, **{"X-Forwarded-Proto": "https"})
        assert r.status_code == 429  # and its X-Forwarded-Proto would not have counted


def test_login_limit_is_shared_by_every_api_process(pg_url: str | None,
                                                    tmp_path: Path) -> None:
    """The attack: the console's limit was per process, so `--workers 2` doubled the
    guesses. Two apps (two processes' worth) on one PostgreSQL database: five guesses in all
    for one name, then 429 from either."""
    from fastapi.testclient import TestClient

    from cloud_sync.aggregator import config as aggregator_config
    from cloud_sync.aggregator.app import create_app
    from tests.conftest import require

    require(pg_url is not None, "PostgreSQL not reachable on 127.0.0.1:5432")
    settings = aggregator_config.load(None, database_url=pg_url, data_dir=tmp_path / "data")
    name = f"office-{uuid.uuid4().hex[:8]}"  # this session's database is shared by tests
    first, second = create_app(settings), create_app(settings)
    address = ("10.9.8.7", 40000)  # not the other tests' "testclient" (its count is shared)
    with TestClient(first, client=address) as a, TestClient(second, client=address) as b:
        with first.state.ctx.sessions() as session:
            accounts.add_user(session, name, "admin", PW)
        try:
            codes = [_proxied_login(client, name, f"guess {i}").status_code
                     for i, client in enumerate((a, b, a, b, a, b, a, b))]
        finally:  # the session's database is shared: leave it empty, as db_url does
            with first.state.ctx.engine.begin() as conn:
                conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    assert codes == [401] * settings.console_login_max_attempts + [429] * (
        8 - settings.console_login_max_attempts), codes


# --- 7. what /health tells anyone ---------------------------------------------------------------

def test_health_names_no_instance_without_an_admin_token(
        served: tuple[Aggregator, dict]) -> None:
    """The bridge's MQTT client id was `<mqtt_client_id>-<instance>-<pid>`, and /health gave
    `<instance>:<pid>` to anyone: the id to take over on the broker. Now /health says an
    opaque process id unless an admin token asks, and the client id has a random part."""
    import socket

    from cloud_sync.aggregator import config as aggregator_config
    from cloud_sync.aggregator.mqtt_bridge import client_id

    agg, keys = served
    assert agg.proc is not None
    anyone = httpx.get(f"{agg.base_url}/health", timeout=20).json()["instance"]
    host = socket.gethostname().split(".")[0]
    assert host not in anyone and str(agg.proc.pid) not in anyone, anyone
    admin = httpx.get(f"{agg.base_url}/health", headers=bearer(keys["admin"]),
                      timeout=20).json()["instance"]
    assert admin == f"{host}:{agg.proc.pid}"
    assert httpx.get(f"{agg.base_url}/health", timeout=20).json()["instance"] == anyone
    settings = aggregator_config.load(None)
    assert client_id(settings, host, 4242) != client_id(settings, host, 4242)
