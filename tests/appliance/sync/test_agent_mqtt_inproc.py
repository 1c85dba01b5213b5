"""The sync agent over MQTT against the bridge run in-process (real broker, real ingest):
drain with application-level acks, Last Will, roster notice -> pull."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cloud_sync.protocol import device_topic
from tests.support.harness import (
    DEVICE,
    ROOM,
    SITE,
    Aggregator,
    Broker,
    appliance_settings,
    fill_store,
    make_records,
    wait_until,
)
from tests.support.mqtt_client import TestClient

pytestmark = pytest.mark.mqtt


def test_agent_drains_over_mqtt_and_announces_status(
    broker: Broker, bridge: object, aggregator_db: tuple[Aggregator, dict[str, str]],
    tmp_path: Path,
) -> None:
    from appliance.store import Store
    from appliance.sync import SyncAgent

    agg, _ = aggregator_db
    store = Store(tmp_path / "dev" / "appliance.db")
    records = make_records(1000)
    fill_store(store, records)
    watcher = TestClient(broker, "homeassistant")
    watcher.wait_connected()
    status_topic = device_topic(SITE, ROOM, DEVICE, "status")
    watcher.subscribe(status_topic)
    settings = appliance_settings(tmp_path / "dev", aggregator_url=None, api_key=None,
                                  mqtt_url=broker.url(DEVICE))
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: store.outbox_depth() == 0, 60, "the outbox to drain")
        assert sorted(agg.attendance_keys()) == sorted(str(r.key) for r in records)
        assert agent.status().mqtt_connected is True
        assert agent.status().transport == "mqtt"
        wait_until(lambda: watcher.received(status_topic), 10, "online status")
        assert watcher.received(status_topic)[-1] == b"online"
        # Heartbeat over MQTT reaches the aggregator.
        wait_until(lambda: agg.scalar("SELECT count(*) FROM heartbeats") >= 1, 20, "heartbeat")
    finally:
        agent.stop()
        store.close()
    wait_until(lambda: watcher.received(status_topic)[-1] == b"offline", 10, "offline status")
    watcher.close()


def test_poison_record_is_parked_and_does_not_block(
    broker: Broker, bridge: object, aggregator_db: tuple[Aggregator, dict[str, str]],
    tmp_path: Path,
) -> None:
    from appliance.store import Store
    from appliance.sync import SyncAgent

    agg, _ = aggregator_db
    store = Store(tmp_path / "dev" / "appliance.db")
    good = make_records(30)
    poison = make_records(1, students=["S999"])  # not a student of the school
    fill_store(store, good[:10] + poison + good[10:])
    settings = appliance_settings(tmp_path / "dev", aggregator_url=None, api_key=None,
                                  mqtt_url=broker.url(DEVICE), batch_size=7)
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: store.outbox_depth() == 0, 60, "the outbox to drain")
    finally:
        agent.stop()
    assert sorted(agg.attendance_keys()) == sorted(str(r.key) for r in good)
    parked = dict(store.parked())
    assert list(parked) == [str(poison[0].key)]
    assert "unknown student" in parked[str(poison[0].key)]
    assert agent.stats.parked == 1
    store.close()
    time.sleep(0.1)


def test_stop_does_not_wait_for_an_ack_and_keeps_the_batch(broker: Broker, tmp_path: Path) -> None:
    """Nobody acks (no bridge): the agent waits for its batch's ack for up to ack_timeout_s.
    A device that is stopping ends that wait at once; the batch stays in the outbox."""
    from appliance.store import Store
    from appliance.sync import SyncAgent

    store = Store(tmp_path / "dev" / "appliance.db")
    records = make_records(20)
    fill_store(store, records)
    watcher = TestClient(broker, "aggregator")  # sees what the device publishes
    watcher.wait_connected()
    attendance = device_topic(SITE, ROOM, DEVICE, "attendance")
    watcher.subscribe(attendance)
    settings = appliance_settings(tmp_path / "dev", aggregator_url=None, api_key=None,
                                  mqtt_url=broker.url(DEVICE), ack_timeout_s=120)
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: watcher.received(attendance), 30, "the batch to be published")
        time.sleep(0.5)  # the agent is now waiting for the ack
    finally:
        t0 = time.monotonic()
        agent.stop()
        took = time.monotonic() - t0
        depth = store.outbox_depth()
        store.close()
        watcher.close()
    assert took < 8, f"stop took {took:.1f} s while a batch waited for its ack"
    assert depth == len(records)  # nothing acked, nothing lost
