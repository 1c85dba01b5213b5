"""MQTT Last Will: a device that dies (SIGKILL) is shown offline at once (retained)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from cloud_sync.protocol import device_topic
from tests.support.harness import (
    DEVICE,
    ROOM,
    SITE,
    Broker,
    appliance_overrides,
    start_agent_process,
    wait_until,
    write_appliance_toml,
)
from tests.support.mqtt_client import TestClient

pytestmark = pytest.mark.mqtt


def test_sigkilled_device_goes_offline_at_once(broker: Broker, tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    write_appliance_toml(config, appliance_overrides(
        tmp_path / "dev", aggregator_url=None, api_key=None, mqtt_url=broker.url(DEVICE)))
    status = device_topic(SITE, ROOM, DEVICE, "status")
    watcher = TestClient(broker, "homeassistant")
    watcher.wait_connected()
    watcher.subscribe(status)
    proc = start_agent_process(config, tmp_path / "agent.log")
    try:
        wait_until(lambda: watcher.received(status)[-1:] == [b"online"], 30, "online")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    killed = time.monotonic()
    wait_until(lambda: watcher.received(status)[-1:] == [b"offline"], 5, "offline (Last Will)")
    assert time.monotonic() - killed < 5  # keepalive is 30 s: this was the Will, not a timeout
    watcher.close()
    # Retained: whoever looks later sees it too.
    late = TestClient(broker, "homeassistant")
    late.wait_connected()
    late.subscribe(status)
    wait_until(lambda: late.received(status) == [b"offline"], 5, "retained offline")
    late.close()
