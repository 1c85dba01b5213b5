"""Issue 12 #13: database problems are one line that says what is wrong and how to fix it; the
configuration refuses an unsupported database_url scheme and an unknown time zone when it is
loaded, and an error from an environment variable names the variable."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance import config as appliance_config
from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.cli import app as cli
from cloud_sync.settings import ConfigError
from tests.conftest import require
from tests.support.harness import free_port

AGGREGATOR = Path(sys.executable).parent / "aggregator"


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    env.update(values)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    proc = subprocess.run([str(AGGREGATOR), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd="/tmp")
    return proc.returncode, proc.stdout, proc.stderr


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def test_missing_postgres_database(pg_url: str | None) -> None:
    require(pg_url is not None, "PostgreSQL not reachable")
    assert pg_url is not None
    base = pg_url.rsplit("/", 1)[0]
    name = f"missing_{secrets.token_hex(4)}"
    code, _, err = _run(["db", "upgrade"], _env(AGGREGATOR_DATABASE_URL=f"{base}/{name}"))
    line = _one_line_error(err)
    assert code == 1
    assert f"database '{name}' does not exist" in line and "createdb" in line and name in line


def test_unreachable_postgres_at_serve() -> None:
    """Was ~140 lines and 'Application startup failed'."""
    port = free_port()
    url = f"postgresql+psycopg://attendance:pw@127.0.0.1:{port}/attendance"
    code, _, err = _run(["serve", "--port", str(free_port())],
                        _env(AGGREGATOR_DATABASE_URL=url))
    line = _one_line_error(err)
    assert code == 1
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}" in line
    assert "pw" not in line.replace("password", "")


def test_unsupported_scheme_and_unknown_zone_refused_at_load(tmp_path: Path) -> None:
    code, _, err = _run(["config", "check"],
                        _env(AGGREGATOR_DATABASE_URL="postgres://u:hunter2@db/attendance"))
    assert code == 2
    assert "postgresql+psycopg://" in err and "AGGREGATOR_DATABASE_URL" in err
    assert "hunter2" not in err and "Traceback" not in err
    code, _, err = _run(["config", "check"], _env(AGGREGATOR_TIMEZONE="Mars/Base"))
    assert code == 2
    assert "unknown time zone 'Mars/Base'" in err
    assert "environment variable AGGREGATOR_TIMEZONE" in err
    assert "(defaults)" not in err
    path = tmp_path / "agg.toml"
    path.write_text('timezone = "Mars/Base"\n')
    with pytest.raises(ConfigError) as info:
        aggregator_config.load(path)
    assert "unknown time zone" in str(info.value) and str(path) in str(info.value)
    assert "environment variable" not in str(info.value)
    assert _run(["config", "check"], _env(AGGREGATOR_TIMEZONE="Europe/Berlin"))[0] == 0


def test_appliance_names_the_variable_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader is shared: the device's settings say which variable was wrong."""
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setenv("APPLIANCE_DEVICE__TIMEZONE", "Mars/Base")
    with pytest.raises(ConfigError) as info:
        appliance_config.load(None)
    assert "device.timezone" in str(info.value)
    assert "environment variable APPLIANCE_DEVICE__TIMEZONE" in str(info.value)


def test_postgresql_scheme_means_psycopg3() -> None:
    settings = aggregator_config.load(None, database_url="postgresql://u@db/attendance")
    assert aggregator_config.database_url(settings) == "postgresql+psycopg://u@db/attendance"
    with pytest.raises(ConfigError):
        aggregator_config.load(None, database_url="mysql://u@db/attendance")


def test_cli_sqlite_directory_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", f"sqlite:///{blocker}/sub/agg.db")
    monkeypatch.delenv("AGGREGATOR_CONFIG", raising=False)
    result = CliRunner().invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 1
    assert "SQLite database" in result.output and "Traceback" not in result.output
