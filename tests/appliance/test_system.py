"""Host readings: psutil figures and the kernel's thermal zones."""

from __future__ import annotations

from pathlib import Path

from appliance.system import read_system, thermal_zone_temperature


def zone(root: Path, index: int, text: str) -> None:
    path = root / f"thermal_zone{index}"
    path.mkdir(parents=True)
    (path / "temp").write_text(text)


def test_thermal_zones(tmp_path: Path) -> None:
    assert thermal_zone_temperature(tmp_path) is None          # no zone (a VM)
    zone(tmp_path, 0, "48312\n")                                # a Pi: millidegrees
    assert thermal_zone_temperature(tmp_path) == 48.312
    zone(tmp_path, 1, "garbage")
    zone(tmp_path, 2, "-273000")                                # broken sensor: ignored
    zone(tmp_path, 3, "51000")
    assert thermal_zone_temperature(tmp_path) == 51.0


def test_read_system(tmp_path: Path) -> None:
    snap = read_system(tmp_path / "not" / "yet" / "created", thermal_root=tmp_path)
    assert 0 <= snap.cpu_percent <= 100 and snap.cpu_count >= 1
    assert 0 < snap.memory_percent < 100 and snap.memory_available_mb > 0
    assert 0 < snap.disk_percent <= 100 and snap.disk_free_gb >= 0
    assert snap.cpu_temp_c is None or -40 < snap.cpu_temp_c < 150
    assert set(snap.as_dict()) >= {"cpu_temp_c", "disk_percent", "memory_percent"}
