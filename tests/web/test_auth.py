"""Status page access: no default password, hashing, login, cookies, rate limit, no leaks."""

from __future__ import annotations

import logging
import stat

import pytest
from fastapi.testclient import TestClient

from appliance.config import load
from appliance.web import auth as web_auth
from appliance.web.app import create_app
from appliance.web.auth import (
    COOKIE_NAME,
    PasswordError,
    RateLimiter,
    hash_password,
    store_password_hash,
    verify_password,
)

PASSWORD = "correct horse battery"


def make_client(settings, pipeline, store, host) -> TestClient:
    return TestClient(create_app(settings, pipeline, store, system=host))


@pytest.fixture
def with_password(settings) -> None:
    store_password_hash(settings.paths.data_dir, hash_password(PASSWORD))


def test_hash_roundtrip_and_format() -> None:
    hashed = hash_password(PASSWORD)
    assert hashed.startswith("scrypt$") and PASSWORD not in hashed
    assert verify_password(PASSWORD, hashed)
    assert not verify_password(PASSWORD + "x", hashed)
    assert hash_password(PASSWORD) != hashed  # fresh salt each time
    assert not verify_password(PASSWORD, "not-a-hash")
    assert not verify_password(PASSWORD, "pbkdf2$1$2$3$abc$def")
    with pytest.raises(PasswordError):
        hash_password("short")


def test_no_password_set_refuses_logins(settings, pipeline, store, host) -> None:
    c = make_client(settings, pipeline, store, host)
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    r = c.get("/login")
    assert r.status_code == 403
    assert "appliance web set-password" in r.text and "No password is set" in r.text
    assert f"--data-dir {settings.paths.data_dir.resolve()}" in r.text  # this device's dir
    assert 'type="password"' not in r.text  # no form to try
    for guess in ("", "admin", "password", "raspberry"):
        r = c.post("/login", data={"password": guess}, follow_redirects=False)
        assert r.status_code == 403 and COOKIE_NAME not in r.headers.get("set-cookie", "")
    assert c.get("/api/status").status_code == 401
    assert c.get("/preview.jpg").status_code == 401


def test_wrong_password_is_refused(settings, pipeline, store, host, with_password) -> None:
    c = make_client(settings, pipeline, store, host)
    r = c.post("/login", data={"password": "wrong password"}, follow_redirects=False)
    assert r.status_code == 401 and "Wrong password" in r.text
    assert "set-cookie" not in r.headers
    assert c.get("/", follow_redirects=False).status_code == 303


def test_login_sets_a_safe_cookie_and_shows_the_page(settings, pipeline, store, host,
                                                      with_password) -> None:
    c = make_client(settings, pipeline, store, host)
    r = c.post("/login", data={"password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    page = c.get("/")
    assert page.status_code == 200
    assert "Ada Lovelace" in page.text and "Intro to Computing" in page.text
    assert "hunter2" not in page.text  # camera URL credentials masked
    assert 'name="viewport"' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert c.get("/api/status").json()["present"][0]["name"] == "Ada Lovelace"
    preview = c.get("/preview.jpg")
    assert preview.status_code == 200 and preview.content[:2] == b"\xff\xd8"
    # logout clears the cookie
    c.post("/logout", follow_redirects=False)
    assert c.get("/", follow_redirects=False).status_code == 303


def test_api_key_is_accepted(tmp_path, pipeline, store, host) -> None:
    settings = load(None, paths={"data_dir": tmp_path}, sync={"api_key": "device-key-123456"})
    c = make_client(settings, pipeline, store, host)
    assert c.get("/login").status_code == 200  # a credential exists: the form is offered
    assert c.get("/api/status", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = c.get("/api/status", headers={"Authorization": "Bearer device-key-123456"})
    assert r.status_code == 200
    r = c.post("/login", data={"password": "device-key-123456"}, follow_redirects=False)
    assert r.status_code == 303 and COOKIE_NAME in r.headers["set-cookie"]


def test_config_hash_takes_precedence(tmp_path, pipeline, store, host) -> None:
    settings = load(None, paths={"data_dir": tmp_path},
                    web={"password_hash": hash_password("from the config")})
    store_password_hash(tmp_path, hash_password(PASSWORD))
    c = make_client(settings, pipeline, store, host)
    assert c.post("/login", data={"password": PASSWORD}).status_code == 401
    r = c.post("/login", data={"password": "from the config"}, follow_redirects=False)
    assert r.status_code == 303


def test_rate_limit(settings, pipeline, store, host, with_password) -> None:
    c = make_client(settings, pipeline, store, host)
    for _ in range(settings.web.login_max_failures):
        assert c.post("/login", data={"password": "guess"}).status_code == 401
    r = c.post("/login", data={"password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 429  # even the right password waits out the window
    assert 0 < int(r.headers["retry-after"]) <= 60
    assert "set-cookie" not in r.headers


def test_rate_limiter_window() -> None:
    now = [1000.0]
    limiter = RateLimiter(3, 60.0, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("a") == 0
        limiter.failure("a")
    assert limiter.retry_after("a") == pytest.approx(60.0)
    assert limiter.retry_after("b") == 0  # per client
    now[0] += 30
    assert limiter.retry_after("a") == pytest.approx(30.0)
    now[0] += 30.5
    assert limiter.retry_after("a") == 0


def test_tampered_expired_and_stale_sessions(settings, pipeline, store, host,
                                             with_password) -> None:
    app = create_app(settings, pipeline, store, system=host)
    authn = app.state.auth
    good = authn.issue_session()
    assert authn.valid_session(good)
    issued, nonce, mac = good.split(".")
    assert not authn.valid_session(f"{int(issued) + 1}.{nonce}.{mac}")
    assert not authn.valid_session(f"{issued}.{nonce}.{mac[:-2]}AA")
    assert not authn.valid_session("garbage")
    assert not authn.valid_session(None)
    expired = authn.issue_session()
    authn._clock = lambda: float(int(issued) + settings.web.session_ttl_s + 1)
    assert not authn.valid_session(expired)
    authn._clock = __import__("time").time
    # a new password ends every session
    store_password_hash(settings.paths.data_dir, hash_password("another password"))
    assert not authn.valid_session(good)


def test_secret_files_are_private(settings, pipeline, store, host, with_password) -> None:
    create_app(settings, pipeline, store, system=host)
    for name in (web_auth.SECRET_FILE, web_auth.PASSWORD_FILE):
        mode = stat.S_IMODE((settings.paths.data_dir / name).stat().st_mode)
        assert mode == 0o600, name
    secret = (settings.paths.data_dir / web_auth.SECRET_FILE).read_bytes()
    create_app(settings, pipeline, store, system=host)  # kept across restarts
    assert (settings.paths.data_dir / web_auth.SECRET_FILE).read_bytes() == secret


def test_password_never_logged(settings, pipeline, store, host, with_password,
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    c = make_client(settings, pipeline, store, host)
    c.post("/login", data={"password": "typo " + PASSWORD})
    c.post("/login", data={"password": PASSWORD})
    assert caplog.records  # logins are logged ...
    assert PASSWORD not in caplog.text  # ... the password is not


def test_unreadable_password_file_keeps_the_page_locked(settings, pipeline, store, host) -> None:
    path = settings.paths.data_dir / web_auth.PASSWORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()  # reading it fails with an OSError other than "not found"
    c = make_client(settings, pipeline, store, host)
    assert c.get("/login").status_code == 403
    assert c.post("/login", data={"password": PASSWORD}).status_code == 403
