"""WebServer: uvicorn in a thread, real sockets, SSE stream, MJPEG, clean stop."""

from __future__ import annotations

import json

import httpx

from appliance.web.auth import hash_password, store_password_hash
from appliance.web.server import WebServer

PASSWORD = "a long enough password"


def test_server_serves_and_stops(settings, pipeline, store) -> None:
    store_password_hash(settings.paths.data_dir, hash_password(PASSWORD))
    server = WebServer(settings, pipeline, store)
    server.start()
    try:
        assert server.port == settings.web.port
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/health").status_code == 200
            assert c.post("/login", data={"password": PASSWORD}).status_code == 303
            assert c.cookies.get("appliance_session")
            with c.stream("GET", "/api/status/stream") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                seen: list[dict] = []
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        seen.append(json.loads(line[6:]))
                        if len(seen) == 2:
                            break
            assert seen[0]["present"][0]["name"] == "Ada Lovelace"
            with c.stream("GET", "/preview.mjpg") as stream:
                assert stream.headers["content-type"].startswith("multipart/x-mixed-replace")
                head = b""
                for chunk in stream.iter_bytes():
                    head += chunk
                    if b"\xff\xd8" in head:
                        break
            assert b"--frame\r\nContent-Type: image/jpeg" in head
    finally:
        server.stop()
    try:
        httpx.get(f"{server.url}/health", timeout=2)
        raise AssertionError("server still answering after stop()")
    except httpx.TransportError:
        pass


def test_open_stream_does_not_block_stop(settings, pipeline, store) -> None:
    settings = settings.model_copy(update={"sync": settings.sync.model_copy(
        update={"api_key": __import__("pydantic").SecretStr("key-abcdefgh")})})
    server = WebServer(settings, pipeline, store)
    server.start()
    client = httpx.Client(base_url=server.url, timeout=10,
                          headers={"Authorization": "Bearer key-abcdefgh"})
    stream = client.stream("GET", "/api/status/stream")
    response = stream.__enter__()
    assert response.status_code == 200
    server.stop()  # must return although a client still listens
    client.close()


def test_port_in_use_does_not_raise(settings, pipeline, store, caplog) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind((settings.web.host, settings.web.port))
        taken.listen()
        server = WebServer(settings, pipeline, store)
        server.start()  # logs, does not raise: attendance goes on without the page
        assert not server.running
        assert "could not start" in caplog.text
        server.stop()


def test_concurrent_wrong_passwords_get_only_the_limit_checked(settings, pipeline,
                                                                store) -> None:
    """200 wrong passwords at once: 5 are checked (401), the rest refused before the check."""
    import asyncio

    store_password_hash(settings.paths.data_dir, hash_password(PASSWORD))
    server = WebServer(settings, pipeline, store)
    server.start()

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            answers = await asyncio.gather(*(
                c.post("/login", data={"password": f"guess {n}"}) for n in range(200)))
        return [r.status_code for r in answers]

    try:
        codes = asyncio.run(burst())
    finally:
        server.stop()
    assert codes.count(401) == settings.web.login_max_failures
    assert codes.count(429) == 200 - settings.web.login_max_failures


def test_forwarded_for_is_ignored_unless_from_a_trusted_proxy(settings, pipeline,
                                                              store) -> None:
    store_password_hash(settings.paths.data_dir, hash_password(PASSWORD))
    server = WebServer(settings, pipeline, store)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            codes = [c.post("/login", data={"password": "guess"},
                            headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code
                     for n in range(settings.web.login_max_failures + 3)]
    finally:
        server.stop()
    assert codes.count(401) == settings.web.login_max_failures  # one client: 127.0.0.1
    assert codes[-1] == 429


def test_trusted_proxy_names_the_client_and_the_scheme(settings, pipeline, store) -> None:
    store_password_hash(settings.paths.data_dir, hash_password(PASSWORD))
    settings = settings.model_copy(update={"web": settings.web.model_copy(
        update={"trusted_proxies": "127.0.0.1"})})
    server = WebServer(settings, pipeline, store)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for _ in range(settings.web.login_max_failures):
                c.post("/login", data={"password": "guess"},
                       headers={"X-Forwarded-For": "198.51.100.1"})
            blocked = c.post("/login", data={"password": PASSWORD},
                             headers={"X-Forwarded-For": "198.51.100.1"})
            other = c.post("/login", data={"password": PASSWORD},
                           headers={"X-Forwarded-For": "198.51.100.2",
                                    "X-Forwarded-Proto": "https"})
    finally:
        server.stop()
    assert blocked.status_code == 429
    assert other.status_code == 303 and "Secure" in other.headers["set-cookie"]
