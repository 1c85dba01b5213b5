"""Which package may import which (docs/ARCHITECTURE.md, "What the two programs share"), read
from the source: every import statement, at module level or inside a function."""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache  # each package is parsed once for all the tests
def imports(package: str) -> dict[str, set[str]]:
    """module path -> the absolute module names it imports (``from x import y``: ``x.y``)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def offending(package: str, allowed: Callable[[str, str], bool], forbidden: str) -> list[str]:
    """``module: name`` for each import of ``forbidden`` (or below it) not ``allowed``."""
    return sorted(f"{module}: {name}" for module, names in imports(package).items()
                  for name in names
                  if (name == forbidden or name.startswith(forbidden + "."))
                  and not allowed(module, name))


def test_the_device_never_imports_the_aggregator() -> None:
    assert offending("appliance", lambda _m, _n: False, "cloud_sync.aggregator") == []


RECORDING_JOB = "cloud_sync/aggregator/services/recording_job.py"
CORRECTIONS = "cloud_sync/aggregator/console/corrections.py"


def test_the_aggregator_imports_only_the_devices_vision_code_and_pipeline() -> None:
    """Server-side enrolment computes descriptors with the device's own per-image code
    (appliance.vision); a recording job runs the device's pipeline; a correction's page
    shows which sightings the device's own matcher (appliance.recognition) would turn to
    "unknown" with the correction's faces; nothing else of the device is imported."""
    def allowed(module: str, name: str) -> bool:
        return (name.startswith("appliance.vision.") or module == RECORDING_JOB
                or (module == CORRECTIONS and name.startswith("appliance.recognition.")))

    assert offending("cloud_sync", allowed, "appliance") == []


def test_the_shared_modules_import_neither_side() -> None:
    for shared in ("cloud_sync/protocol.py", "cloud_sync/settings.py",
                   "cloud_sync/config_commands.py", "cloud_sync/release_manifest.py"):
        names = imports("cloud_sync")[shared]
        assert not [n for n in names if n.startswith(("appliance", "cloud_sync.aggregator"))]


def test_the_check_sees_imports_inside_functions() -> None:
    """The aggregator's one import of the device is inside a function: the walk finds it."""
    assert "appliance.vision.enroll" in imports("cloud_sync")[
        "cloud_sync/aggregator/services/faces.py"]
