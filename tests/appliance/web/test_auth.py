"""Status page access: no default password, hashing, login, cookies, rate limit, no leaks."""

from __future__ import annotations

import logging
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from limits import RateLimitItemPerHour, RateLimitItemPerMinute, RateLimitItemPerSecond

from appliance.config import load
from appliance.web import auth as web_auth
from appliance.web.app import create_app
from appliance.web.auth import (
    COOKIE_NAME,
    LoginLimiter,
    PasswordError,
    client_key,
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
    assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back


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


def test_right_password_from_another_address_is_not_locked_out(
        settings, pipeline, store, host, with_password) -> None:
    app = create_app(settings, pipeline, store, system=host)
    attacker = TestClient(app, client=("10.0.0.66", 4000))
    for _ in range(settings.web.login_max_failures + 3):
        attacker.post("/login", data={"password": "guess"})
    assert attacker.post("/login", data={"password": PASSWORD}).status_code == 429
    teacher = TestClient(app, client=("10.0.0.7", 4000))
    r = teacher.post("/login", data={"password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303 and COOKIE_NAME in r.headers["set-cookie"]


def test_global_ceiling_stops_guessing_from_many_addresses(
        tmp_path, pipeline, store, host, with_password, settings) -> None:
    settings = settings.model_copy(update={"web": settings.web.model_copy(
        update={"login_max_failures_global": 12})})
    app = create_app(settings, pipeline, store, system=host)
    codes = [TestClient(app, client=(f"10.1.0.{n}", 4000))
             .post("/login", data={"password": "guess"}).status_code for n in range(30)]
    assert codes.count(401) == 12 and codes.count(429) == 18  # 12 checks, not 30
    r = TestClient(app, client=("10.2.0.1", 4000)).post("/login", data={"password": PASSWORD})
    assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 60  # for a minute


def test_login_limiter_back_off_forgive_and_window() -> None:
    limiter = LoginLimiter([RateLimitItemPerSecond(3, 2), RateLimitItemPerHour(5)],
                           [RateLimitItemPerMinute(100)])
    assert [limiter.reserve("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert 1.0 <= limiter.reserve("a") <= 2.0  # first step: the 2-second window
    assert limiter.reserve("b") == 0.0  # per client
    limiter.forgive("a")  # a correct password: the address starts afresh
    assert limiter.reserve("a") == 0.0
    time.sleep(2.1)
    assert limiter.reserve("a") == 0.0 and limiter.reserve("a") == 0.0
    time.sleep(2.1)
    assert limiter.reserve("a") == 0.0  # 6th in the hour, but the hour limit was forgiven ...
    limiter2 = LoginLimiter([RateLimitItemPerSecond(3, 2), RateLimitItemPerHour(4)], [])
    for _ in range(3):
        assert limiter2.reserve("a") == 0.0
    time.sleep(2.1)
    assert limiter2.reserve("a") == 0.0
    assert limiter2.reserve("a") > 3000  # ... without a correct one: the hour step


def test_login_limiter_reserve_is_atomic() -> None:
    limiter = LoginLimiter([RateLimitItemPerMinute(5)], [RateLimitItemPerMinute(1000)])
    barrier = threading.Barrier(50)

    def attempt(_: int) -> float:
        barrier.wait()
        return limiter.reserve("10.0.0.1")

    with ThreadPoolExecutor(50) as pool:
        waits = list(pool.map(attempt, range(300)))
    assert waits.count(0.0) == 5


def test_client_key_groups_ipv6_by_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") \
        == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key(None) == "unknown"


def test_logout_revokes_the_session_on_the_server(settings, pipeline, store, host,
                                                  with_password) -> None:
    c = make_client(settings, pipeline, store, host)
    assert c.post("/login", data={"password": PASSWORD}).status_code == 200
    old = c.cookies.get(COOKIE_NAME)
    assert old and c.get("/api/status").status_code == 200
    other = c.post("/login", data={"password": PASSWORD}, follow_redirects=False)
    second = other.cookies.get(COOKIE_NAME)
    c.cookies.delete(COOKIE_NAME)  # the jar holds the second session's cookie for the host
    c.cookies.set(COOKIE_NAME, old)
    assert c.post("/logout", follow_redirects=False).status_code == 303
    replay = make_client(settings, pipeline, store, host)
    replay.cookies.set(COOKIE_NAME, old)  # the stolen or kept cookie
    assert replay.get("/api/status").status_code == 401
    assert replay.get("/", follow_redirects=False).headers["location"] == "/login"
    # ... also after a restart; another session is not affected
    restarted = make_client(settings, pipeline, store, host)
    restarted.cookies.set(COOKIE_NAME, old)
    assert restarted.get("/api/status").status_code == 401
    restarted.cookies.set(COOKIE_NAME, second)
    assert restarted.get("/api/status").status_code == 200


def test_cookie_is_secure_over_tls(settings, pipeline, store, host, with_password) -> None:
    app = create_app(settings, pipeline, store, system=host)
    c = TestClient(app, base_url="https://device.example")
    r = c.post("/login", data={"password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
    r = c.post("/logout", follow_redirects=False)
    assert "Secure" in r.headers["set-cookie"]


@pytest.mark.parametrize(("headers", "allowed"), [
    ({"Origin": "http://testserver"}, True),
    ({}, True),  # curl, scripts
    ({"Sec-Fetch-Site": "same-origin", "Origin": "null"}, True),
    ({"Sec-Fetch-Site": "none"}, True),  # typed into the address bar
    ({"Origin": "http://evil.example"}, False),
    ({"Origin": "http://testserver:8081"}, False),
    ({"Origin": "null"}, False),
    ({"Sec-Fetch-Site": "cross-site"}, False),
    ({"Sec-Fetch-Site": "same-site", "Origin": "http://testserver"}, False),
])
def test_cross_origin_posts_are_refused(settings, pipeline, store, host, with_password,
                                        headers, allowed) -> None:
    c = make_client(settings, pipeline, store, host)
    r = c.post("/login", data={"password": PASSWORD}, headers=headers, follow_redirects=False)
    if allowed:
        assert r.status_code == 303
    else:
        assert r.status_code == 403 and "cross-origin" in r.text
        assert "set-cookie" not in r.headers
    c2 = make_client(settings, pipeline, store, host)
    c2.post("/login", data={"password": PASSWORD})
    r = c2.post("/logout", headers=headers, follow_redirects=False)
    assert (r.status_code == 303) is allowed
    assert (c2.get("/api/status").status_code == 401) is allowed


def test_tampered_expired_and_stale_sessions(settings, pipeline, store, host,
                                             with_password) -> None:
    app = create_app(settings, pipeline, store, system=host)
    authn = app.state.web.auth
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
