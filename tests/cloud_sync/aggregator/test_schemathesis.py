"""Issue 12 #9: schemathesis against the real server (`aggregator serve`), with every check
(`--checks all`: no 5xx, only declared status codes, content types and headers, response
bodies matching their schema, invalid input refused, valid input accepted, auth not ignored,
405s with a true `Allow`), as an admin and as a device, on SQLite and on PostgreSQL. The server
runs with recorded sessions and unknown faces switched on (issue 23), so the recording
endpoints (admin token) and `POST /api/v1/unknown-faces` (device key) are exercised past their
"switched off" 403; and a teacher's console session fuzzes the console's recording endpoints
(`/recordings/new`, the chunk PUT, the upload status: described by an OpenAPI document built
from those routes; no 5xx). A bounded number of examples per operation (SCHEMATHESIS_EXAMPLES,
default 6) keeps the runs to a few minutes; schemathesis.toml beside this file says which
schema-valid refusals are expected (rules a JSON schema cannot state)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.harness import Aggregator

EXAMPLES = os.environ.get("SCHEMATHESIS_EXAMPLES", "6")
CONFIG = Path(__file__).with_name("schemathesis.toml")
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# Revoking the admin token the run uses would blind the rest of the run; the endpoint has its
# own test (test_hardening.py).
SKIPPED = "revoke_token_api_v1_admin_tokens__token_id__delete"
TEACHER, PW = "teacher-fuzz", "correct horse battery"
CONSOLE_PATHS = ("/recordings/new", "/recordings/{recording_id}/content",
                 "/recordings/{recording_id}/status")


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[tuple[Aggregator, dict[str, str]]]:
    from cloud_sync.aggregator.console import accounts
    from cloud_sync.aggregator.db.session import make_engine, make_session_factory

    agg = Aggregator(tmp_path / "agg", db_url=db_url)
    keys = agg.seed()
    engine = make_engine(db_url)
    with make_session_factory(engine)() as session:
        accounts.add_user(session, TEACHER, "teacher", PW, ["CS101"])
    engine.dispose()
    agg.start(extra_env={"AGGREGATOR_RECORDINGS_ENABLED": "true",
                         "AGGREGATOR_UNKNOWN_FACES_ENABLED": "true",
                         "AGGREGATOR_RECORDING_TRANSCODE": "false"})
    yield agg, keys
    agg.stop()


def _operations(spec: dict[str, Any]) -> int:
    return sum(len(item) for item in spec["paths"].values())


def _fuzz(location: str, base_url: str, headers: list[str], report: Path, expected_ops: int,
          checks: str = "all", exclude: tuple[str, ...] = ()) -> None:
    args = [str(SCHEMATHESIS), "--config-file", str(CONFIG), "run", location, "--url",
            base_url, "--checks", checks, "-n", EXAMPLES, "--generation-deterministic",
            "--no-color", "--report", "junit", "--report-junit-path", str(report)]
    for header in headers:
        args += ["-H", header]
    for operation in exclude:
        args += ["--exclude-operation-id", operation]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900,
                          cwd=report.parent)  # its cache there
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert f"Tested: {expected_ops}" in proc.stdout, proc.stdout[-3000:]


def console_schema(path: Path) -> Path:
    """An OpenAPI document of the console's recording endpoints (they are not in the API's:
    cookie sessions, HTML errors), built from the routes themselves."""
    from fastapi.openapi.utils import get_openapi

    from cloud_sync.aggregator.console import recordings

    routes = []
    for route in recordings.router.routes:
        if getattr(route, "path", None) in CONSOLE_PATHS:
            shown = copy.copy(route)
            shown.include_in_schema = True  # type: ignore[attr-defined]
            routes.append(shown)
    spec = get_openapi(title="console recordings", version="1", routes=routes)
    put = spec["paths"]["/recordings/{recording_id}/content"]["put"]
    put["requestBody"] = {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}  # read as a stream by the route
    path.write_text(json.dumps(spec))
    return path


def _teacher_headers(agg: Aggregator) -> list[str]:
    import re

    with httpx.Client(base_url=agg.base_url, timeout=30) as client:
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf
        r = client.post("/login", data={"name": TEACHER, "password": PW,
                                        "csrf": csrf.group(1), "next": "/recordings"})
        assert r.status_code == 303, r.text
        cookie = client.cookies["console_session"]
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/recordings").text)
        assert token
    return [f"Cookie: console_session={cookie}", f"X-CSRF-Token: {token.group(1)}"]


def test_schemathesis_admin_device_and_teacher(served: tuple[Aggregator, dict[str, str]],
                                               tmp_path: Path) -> None:
    agg, keys = served
    spec = httpx.get(f"{agg.base_url}/openapi.json", timeout=30).json()
    location = f"{agg.base_url}/openapi.json"
    for who in ("admin", "pi-lab301"):  # the recording endpoints, and the unknown-face one
        _fuzz(location, agg.base_url, [f"Authorization: Bearer {keys[who]}"],
              tmp_path / f"{who}.xml", _operations(spec) - 1, exclude=(SKIPPED,))
    # a teacher's session on the console's recording endpoints: no 5xx whatever comes
    schema = console_schema(tmp_path / "console.json")
    _fuzz(str(schema), agg.base_url, _teacher_headers(agg), tmp_path / "teacher.xml",
          len(CONSOLE_PATHS), checks="not_a_server_error")
