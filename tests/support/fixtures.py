"""Fixtures of the sync tests: a Mosquitto of our own and the real aggregator."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.support.harness import (
    DEVICE,
    MOSQUITTO,
    MOSQUITTO_PASSWD,
    OTHER_DEVICE,
    Aggregator,
    Broker,
    run_bridge,
)


def _aggregator_ready() -> bool:
    return all(
        importlib.util.find_spec(mod) is not None
        for mod in ("cloud_sync.aggregator.app", "cloud_sync.aggregator.services.ingest")
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    require(MOSQUITTO.exists() and MOSQUITTO_PASSWD.exists(), "mosquitto is not installed")
    b = Broker(tmp_path / "broker", ["aggregator", "homeassistant", DEVICE, OTHER_DEVICE])
    b.start()
    yield b
    b.stop()


@pytest.fixture
def aggregator_db(tmp_path: Path) -> tuple[Aggregator, dict[str, str]]:
    """The aggregator's database, migrated and seeded; the server is not started."""
    require(importlib.util.find_spec("cloud_sync.aggregator.services.ingest") is not None,
            "aggregator services not available")
    agg = Aggregator(tmp_path / "aggregator")
    return agg, agg.seed()


@pytest.fixture
def aggregator(aggregator_db: tuple[Aggregator, dict[str, str]]) -> Iterator[
    tuple[Aggregator, dict[str, str]]
]:
    """As aggregator_db; the test starts the server (agg.start(...)); stopped at the end."""
    require(_aggregator_ready(), "aggregator app not available")
    agg, keys = aggregator_db
    yield agg, keys
    agg.stop()


@pytest.fixture
def bridge(broker: Broker, aggregator_db: tuple[Aggregator, dict[str, str]]) -> Iterator[object]:
    """The aggregator's MQTT bridge, in this process, connected to ``broker``."""
    with run_bridge(broker, aggregator_db[0]) as b:
        yield b
