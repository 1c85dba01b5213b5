"""The request guard (api/guard.py): credentials checked before a body is read, body limits on
the bytes received (chunked too), metrics labelled only with known methods and routes."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from cloud_sync.aggregator import metrics
from cloud_sync.aggregator.api.guard import flat_routes
from cloud_sync.aggregator.app import MAX_JSON_BYTES
from tests.cloud_sync.aggregator.conftest import World
from tests.support.harness import Aggregator


def _rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def _chunked_post(port: int, path: str, headers: dict[str, str], total: int,
                  chunk: int = 256 * 1024) -> tuple[int, int]:
    """POST ``total`` bytes of spaces as a chunked body (no Content-Length), sending from a
    thread while the answer is read; returns (status, bytes sent when the answer came)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
                 f"Content-Type: application/json\r\n{head}\r\n".encode())
    sent = 0
    answered = threading.Event()
    block = f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n"

    def pump() -> None:
        nonlocal sent
        try:
            while sent < total and not answered.is_set():
                sock.sendall(block)
                sent += chunk
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: exactly what we want

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    status_line = b""
    while b"\r\n" not in status_line:
        data = sock.recv(4096)
        if not data:
            break
        status_line += data
    answered.set()
    at_answer = sent
    sock.close()
    sender.join(30)
    return int(status_line.split()[1]), at_answer


def test_chunked_flood_is_refused_early_without_growing_the_server(tmp_path: Path) -> None:
    """Issue 12 #1: 200 MB of chunked JSON. Without credentials: 401 after the headers (the
    body is never read); with an admin token: 413 once 4 MB have arrived. The server's memory
    does not grow by the body's size."""
    agg = Aggregator(tmp_path / "agg")
    keys = agg.seed()
    agg.start()
    try:
        assert agg.proc is not None
        before = _rss_kib(agg.proc.pid)
        status, sent = _chunked_post(agg.port, "/api/v1/students", {}, 200_000_000)
        assert status == 401
        assert sent < 50_000_000, sent  # answered long before the body was sent
        status, sent = _chunked_post(
            agg.port, "/api/v1/students", {"Authorization": f"Bearer {keys['admin']}"},
            200_000_000)
        assert status == 413
        assert sent < 50_000_000, sent
        # a device key on an admin route: 403 before the body, too
        status, _ = _chunked_post(
            agg.port, "/api/v1/students", {"Authorization": f"Bearer {keys['pi-lab301']}"},
            20_000_000)
        assert status == 403
        grown_mib = (_rss_kib(agg.proc.pid) - before) / 1024
        assert grown_mib < 60, f"server grew by {grown_mib:.0f} MiB"
    finally:
        agg.stop()


def test_documented_json_limit(world: World) -> None:
    """4 MB of JSON is the documented limit (it was applied as 10.1 MB)."""
    raw = TestClient(world.client.app, raise_server_exceptions=False)
    headers = {**world.admin, "Content-Type": "application/json"}
    under = json.dumps({"id": "S9", "name": "x" * (MAX_JSON_BYTES - 100)}).encode()
    over = json.dumps({"id": "S9", "name": "x" * (MAX_JSON_BYTES + 10)}).encode()
    assert raw.post("/api/v1/students", content=under, headers=headers).status_code == 422
    assert raw.post("/api/v1/students", content=over, headers=headers).status_code == 413

    def stream() -> Any:  # no Content-Length: the limit counts the bytes received
        for _ in range(5):
            yield b" " * 1_000_000

    assert raw.post("/api/v1/students", content=stream(), headers=headers).status_code == 413
    # Without credentials the body is not even looked at.
    assert raw.post("/api/v1/students", content=over,
                    headers={"Content-Type": "application/json"}).status_code == 401
    assert raw.post("/api/v1/students", content=b"{oops",
                    headers={"Content-Type": "application/json"}).status_code == 401


def _series() -> set[tuple[str, str]]:
    return {(s.labels["method"], s.labels["route"])
            for family in metrics.REQUESTS.collect() for s in family.samples
            if s.name.endswith("_total")}


def test_metrics_labels_are_bounded(world: World) -> None:
    """Issue 12 #5: random methods and paths add no label series."""
    raw = TestClient(world.client.app, raise_server_exceptions=False)
    raw.get("/health")
    raw.request("BREW", "/health")
    raw.get("/no/such/path")
    before = _series()
    for i in range(50):
        raw.request(f"M{i}{time.monotonic_ns()}", "/health")
        raw.get(f"/random/{i}/{time.monotonic_ns()}")
        raw.request(f"X{i}", f"/api/v1/students/S{i}")
    after = _series()
    methods = {m for m, _ in after}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    routes = flat_routes(world.client.app.routes)
    templates = {getattr(r, "path_format", None) or getattr(r, "path", None)
                 for r in routes} | {"unmatched"}
    assert {r for _, r in after} <= templates
    assert len(after - before) <= 1  # at most ("other", "/api/v1/students/{key}")
