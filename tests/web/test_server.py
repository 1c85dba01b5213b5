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
