"""Host figures for the status page, /health, /metrics and alerts: CPU, memory, disk, temperature.

psutil for load, memory and disk (of the file system holding the data directory). The CPU
temperature comes from ``psutil.sensors_temperatures()`` (``cpu_thermal`` on a Raspberry Pi,
``coretemp``/``k10temp`` on a PC) or, failing that, from the kernel's thermal zones
(``/sys/class/thermal/thermal_zone*/temp``, millidegrees); ``None`` where neither exists (a VM).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

_LOGGER = logging.getLogger(__name__)

THERMAL_ROOT = Path("/sys/class/thermal")
# Sensor names in order of preference: Raspberry Pi first, then common PC drivers.
_PREFERRED_SENSORS = ("cpu_thermal", "cpu-thermal", "soc_thermal", "coretemp", "k10temp",
                      "zenpower", "acpitz")
# Plausible range for a CPU reading; outside it a sensor is broken or disconnected.
_MIN_C, _MAX_C = -40.0, 150.0


@dataclass(frozen=True, slots=True)
class SystemSnapshot:
    """One reading of the host's state."""

    cpu_percent: float            # all cores, since the previous reading
    load_1m: float                # load average, 1 minute
    cpu_count: int
    memory_percent: float
    memory_available_mb: float
    disk_percent: float           # file system of the data directory
    disk_free_gb: float
    cpu_temp_c: float | None      # None: no sensor

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plausible(value: float) -> bool:
    return _MIN_C < value < _MAX_C


def _psutil_temperature() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:  # not provided on every platform
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError) as err:
        _LOGGER.debug("psutil temperature sensors unreadable: %s", err)
        return None
    for name in (*_PREFERRED_SENSORS, *sorted(sensors)):
        readings = [e.current for e in sensors.get(name, []) if _plausible(e.current)]
        if readings:
            return float(max(readings))
    return None


def thermal_zone_temperature(root: Path = THERMAL_ROOT) -> float | None:
    """Highest plausible reading of ``root/thermal_zone*/temp`` (millidegrees C), or None.

    On a Raspberry Pi, thermal_zone0 is the SoC (``cpu-thermal``).
    """
    best: float | None = None
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            raw = (zone / "temp").read_text().strip()
            value = int(raw) / 1000.0
        except (OSError, ValueError):
            continue
        if _plausible(value) and (best is None or value > best):
            best = value
    return best


def cpu_temperature(thermal_root: Path = THERMAL_ROOT) -> float | None:
    """The CPU temperature in degrees Celsius, or None when the host has no sensor."""
    value = _psutil_temperature()
    if value is None:
        value = thermal_zone_temperature(thermal_root)
    return None if value is None else round(value, 1)


def _existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest existing parent (the data dir may not exist yet)."""
    current = path.resolve()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def read_system(data_dir: Path, thermal_root: Path = THERMAL_ROOT) -> SystemSnapshot:
    """Read CPU load, memory, disk usage of ``data_dir``'s file system and temperature."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing_ancestor(data_dir)))
    try:
        load_1m = os.getloadavg()[0]
    except OSError:  # not available on every platform
        load_1m = 0.0
    return SystemSnapshot(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        load_1m=round(load_1m, 2),
        cpu_count=psutil.cpu_count() or 1,
        memory_percent=float(memory.percent),
        memory_available_mb=round(memory.available / 2**20, 1),
        disk_percent=float(disk.percent),
        disk_free_gb=round(disk.free / 2**30, 2),
        cpu_temp_c=cpu_temperature(thermal_root),
    )
