"""fleet.console: the health line a Pi prints on its screen/serial console once per boot."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

HEALTH = {"status": "degraded", "version": "0.1.0+gabc",
          "components": {"camera": {"status": "healthy", "message": "delivering frames at 2.0 fps"},
                         "detector": {"status": "degraded", "message": "detection slow: 900 ms"},
                         "provisioning": {"status": "healthy", "message": "provisioned"}}}


@pytest.fixture
def server() -> Iterator[str]:
    calls = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            calls["n"] += 1
            if calls["n"] < 3:  # the appliance is still starting
                self.send_response(502)
                self.end_headers()
                return
            body = json.dumps(HEALTH).encode()
            self.send_response(503)  # unhealthy/degraded answers 503 with the same JSON
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/health"
    httpd.shutdown()


def test_prints_one_line_once_health_answers(server: str) -> None:
    out = subprocess.run([sys.executable, "-m", "fleet.console", "--url", server, "--every",
                          "0.1", "--wait", "20"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("classroom-appliance /health: degraded | camera healthy: ")
    assert "provisioning healthy: provisioned" in lines[0] and "version 0.1.0+gabc" in lines[0]


def test_says_so_when_nothing_answers() -> None:
    out = subprocess.run([sys.executable, "-m", "fleet.console", "--url",
                          "http://127.0.0.1:9/health", "--every", "0.1", "--wait", "0.5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no answer from http://127.0.0.1:9/health" in out.stdout
