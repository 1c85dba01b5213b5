"""`appliance web set-password`: reads stdin or prompts twice, stores a scrypt hash (0600)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli import app
from appliance.web.auth import PASSWORD_FILE, verify_password


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.delenv("APPLIANCE_WEB__PASSWORD_HASH", raising=False)
    monkeypatch.setenv("APPLIANCE_PATHS__DATA_DIR", str(tmp_path))
    return tmp_path


def test_set_password_into_a_given_data_dir(env: Path, tmp_path: Path) -> None:
    service_dir = tmp_path / "var-lib"  # what the login page names: sudo drops the unit's env
    result = CliRunner().invoke(app, ["web", "set-password", "--stdin", "--data-dir",
                                      str(service_dir)], input="another secret 123\n")
    assert result.exit_code == 0, result.output
    assert verify_password("another secret 123", (service_dir / PASSWORD_FILE).read_text().strip())
    assert not (env / PASSWORD_FILE).exists()


def test_set_password_from_stdin(env: Path) -> None:
    result = CliRunner().invoke(app, ["web", "set-password", "--stdin"],
                                input="my classroom secret\n")
    assert result.exit_code == 0, result.output
    stored = (env / PASSWORD_FILE).read_text().strip()
    assert "my classroom secret" not in stored and "my classroom secret" not in result.output
    assert verify_password("my classroom secret", stored)
    assert stat.S_IMODE((env / PASSWORD_FILE).stat().st_mode) == 0o600


def test_too_short_is_refused(env: Path) -> None:
    result = CliRunner().invoke(app, ["web", "set-password", "--stdin"], input="short\n")
    assert result.exit_code == 2
    assert not (env / PASSWORD_FILE).exists()


def test_print_hash_only(env: Path) -> None:
    result = CliRunner().invoke(app, ["web", "set-password", "--stdin", "--print-hash"],
                                input="for the config file\n")
    assert result.exit_code == 0
    assert verify_password("for the config file", result.output.strip())
    assert not (env / PASSWORD_FILE).exists()


def test_root_gives_the_file_to_the_service_user(env: Path) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("only meaningful as root (sudo appliance web set-password)")
    os.chown(env, 65534, 65534)  # the data dir belongs to the service user
    result = CliRunner().invoke(app, ["web", "set-password", "--stdin"],
                                input="readable by the service\n")
    assert result.exit_code == 0, result.output
    st = (env / PASSWORD_FILE).stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert stat.S_IMODE(st.st_mode) == 0o600
