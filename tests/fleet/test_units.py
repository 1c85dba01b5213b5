"""`systemd-analyze verify` on every unit the image and the docs install."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fleet.image import ENABLED, UNITS
from tests.conftest import require

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"


@pytest.fixture(scope="module")
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "systemd-analyze missing (apt-get install systemd)")
    assert tool is not None
    return tool


def test_units_verify_clean(tmp_path: Path, analyze: str) -> None:
    """The units as shipped, with /opt paths moved under tmp_path so their commands exist: no
    warning at all (an unknown key or a bad value is only a warning for systemd, not here)."""
    units = tmp_path / "units"
    units.mkdir()
    for unit in sorted(u for u in UNIT_DIR.glob("classroom-*")
                       if u.suffix in (".service", ".timer", ".path")):
        text = unit.read_text().replace("/opt/", f"{tmp_path}/opt/")
        for command in re.findall(r"^Exec\w+=[-@!+]*(\S+)", text, flags=re.M):
            path = Path(command)
            if str(path).startswith(str(tmp_path)):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("#!/bin/sh\n")
                path.chmod(0o755)
        (units / unit.name).write_text(text)
    result = subprocess.run([analyze, "verify", *map(str, sorted(units.iterdir()))],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    # a broken unit is caught (the check can fail)
    (units / "classroom-sshkeys.service").write_text(
        (units / "classroom-sshkeys.service").read_text() + "Bogus=1\n")
    bad = subprocess.run([analyze, "verify", str(units / "classroom-sshkeys.service")],
                         capture_output=True, text=True, check=False)
    assert "Unknown key 'Bogus'" in bad.stderr


def test_image_units_exist_and_paths_agree() -> None:
    for unit in UNITS:
        assert (UNIT_DIR / unit).is_file()
        assert unit in ENABLED or "[Install]" not in (UNIT_DIR / unit).read_text(), unit
    appliance = (UNIT_DIR / "classroom-appliance.service").read_text()
    # code and models come from the `current` release; state stays under /var/lib
    assert "ExecStart=/opt/classroom-attendance/current/bin/appliance run" in appliance
    assert "APPLIANCE_PATHS__MODEL_DIR=/opt/classroom-attendance/current/models" in appliance
    assert "APPLIANCE_PATHS__DATA_DIR=/var/lib/classroom-attendance" in appliance
    assert "After=" in appliance and "classroom-firstboot.service" in appliance
