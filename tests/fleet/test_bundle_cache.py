"""The wheel cache's build lock: two processes that need one cache entry at once (the deploy
and rollout tests on two xdist workers) downloaded into the same ``.partial`` folder and broke
each other's wheels ("Wheel 'face-recognition-models' ... is invalid", CI at 3dffd0b)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

HOLD = """
import sys, time
from pathlib import Path
from fleet.bundle import _building
with _building(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_builder_waits_for_the_first(tmp_path: Path) -> None:
    entry = tmp_path / "cache" / "wheels-native-0123456789abcdef"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(entry), "2"], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "held"
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-c", HOLD, str(entry), "0"], cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=True)
        waited = time.monotonic() - started
    finally:
        first.wait(timeout=30)
    assert second.stdout.strip() == "held"
    assert waited >= 1.0, f"the second builder did not wait ({waited:.2f} s)"
