"""Shared fixtures: the real-face data set, the rule that CI skips nothing, and the order in
which test files are handed to the two pytest-xdist workers (`make test` runs `-n 2 --dist
loadfile --no-loadscope-reorder`): the longest files first, so that no long file starts last
and runs alone at the end."""

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


# What a test marked `slow` without an estimate is taken to cost, in seconds; an unmarked test
# costs about one. `@pytest.mark.slow(seconds=N)` gives an estimate (quiet 2-core machine).
SLOW_DEFAULT_S = 20.0


def _cost(item: pytest.Item) -> float:
    marker = item.get_closest_marker("slow")
    if marker is None:
        return 1.0
    return float(marker.kwargs.get("seconds", SLOW_DEFAULT_S))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Files with the largest estimated cost first (a stable sort: within a file, and between
    files of equal cost, the collection order stays)."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    cost: dict[str, float] = {}
    for item in items:
        cost[module(item)] = cost.get(module(item), 0.0) + _cost(item)
    items.sort(key=lambda item: -cost[module(item)])


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
