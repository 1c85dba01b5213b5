"""Issue 12 #9: schemathesis against the real server (`aggregator serve`), with every check
(`--checks all`: no 5xx, only declared status codes, content types and headers, response
bodies matching their schema, invalid input refused, valid input accepted, auth not ignored,
405s with a true `Allow`), as an admin and as a device, on SQLite and on PostgreSQL. A bounded
number of examples per operation (SCHEMATHESIS_EXAMPLES, default 6) keeps the four runs to
about two minutes; schemathesis.toml beside this file says which schema-valid refusals are
expected (rules a JSON schema cannot state)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import Aggregator

EXAMPLES = os.environ.get("SCHEMATHESIS_EXAMPLES", "6")
CONFIG = Path(__file__).with_name("schemathesis.toml")
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# Revoking the admin token the run uses would blind the rest of the run; the endpoint has its
# own test (test_hardening.py).
SKIPPED = "revoke_token_api_v1_admin_tokens__token_id__delete"


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[tuple[Aggregator, dict[str, str]]]:
    agg = Aggregator(tmp_path / "agg", db_url=db_url)
    keys = agg.seed()
    agg.start()
    yield agg, keys
    agg.stop()


def _operations(agg: Aggregator) -> int:
    import httpx

    spec = httpx.get(f"{agg.base_url}/openapi.json", timeout=30).json()
    return sum(len(item) for item in spec["paths"].values()) - 1  # SKIPPED


def _fuzz(agg: Aggregator, secret: str, report: Path) -> None:
    proc = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(CONFIG), "run", f"{agg.base_url}/openapi.json",
         "--checks", "all", "-H", f"Authorization: Bearer {secret}", "-n", EXAMPLES,
         "--generation-deterministic", "--exclude-operation-id", SKIPPED, "--no-color",
         "--report", "junit", "--report-junit-path", str(report)],
        capture_output=True, text=True, timeout=900, cwd=report.parent,  # its cache there
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert f"Tested: {_operations(agg)}" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow(seconds=120)
def test_schemathesis_admin_and_device(served: tuple[Aggregator, dict[str, str]],
                                       tmp_path: Path) -> None:
    agg, keys = served
    _fuzz(agg, keys["admin"], tmp_path / "admin.xml")
    _fuzz(agg, keys["pi-lab301"], tmp_path / "device.xml")
