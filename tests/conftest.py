"""Shared fixtures: the real-face data set, and the rule that CI skips nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# broker, aggregator_db, aggregator, bridge: the real components (tests/support)
pytest_plugins = ["tests.support.fixtures"]

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip when a real component or data set is missing; under CI=true, fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The real-face data directory (env FACES_DIR, default ../shared/faces from the repo)."""
    path = Path(os.environ.get("FACES_DIR", REPO.parent / "shared" / "faces"))
    require(path.is_dir(), f"real-face data set not found at {path} (set FACES_DIR)")
    return path


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The verified model directory `make setup` filled."""
    from models import DEFAULT_MODEL_DIR, load_manifest, verify

    directory = Path(os.environ.get("APPLIANCE_PATHS__MODEL_DIR", DEFAULT_MODEL_DIR))
    for spec in load_manifest():
        path = directory / spec.file
        require(path.is_file(), f"model {spec.name} missing in {directory}: run `make setup`")
        verify(spec, path)
    return directory
