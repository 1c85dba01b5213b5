"""Zero loss, zero double counting, against the REAL aggregator (`aggregator serve`, temp SQLite)
and, for MQTT, a REAL Mosquitto of our own:

1. the aggregator is down for the whole capture, then comes up;
2. the sync agent process is SIGKILLed in the middle of draining and restarted;
3. the broker is killed and restarted mid-stream (MQTT transport);
4. the same batch delivered twice (an HTTP retry after a lost response) counts once.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from cloud_sync.protocol import AttendanceBatch, BatchResult
from tests.support.harness import (
    DEVICE,
    Aggregator,
    Broker,
    appliance_overrides,
    appliance_settings,
    device_store_key,
    fill_store,
    make_records,
    start_agent_process,
    wait_until,
    write_appliance_toml,
)
from tests.support.lossy_proxy import LossyProxy

pytestmark = pytest.mark.slow


def assert_exactly_once(agg: Aggregator, records: list) -> None:
    keys = agg.attendance_keys()
    counts = Counter(keys)
    doubled = [k for k, n in counts.items() if n > 1]
    assert not doubled, f"{len(doubled)} records counted twice"
    expected = {str(r.key) for r in records}
    missing = expected - set(keys)
    assert not missing, f"{len(missing)} of {len(expected)} records lost"
    assert len(keys) == len(expected)


def test_aggregator_down_for_the_whole_capture(
    aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path
) -> None:
    from appliance.store import Store
    from appliance.sync import SyncAgent

    agg, keys = aggregator
    store = Store(tmp_path / "dev" / "appliance.db")
    settings = appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                                  api_key=keys[DEVICE])
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        records = make_records(3000)
        for i, record in enumerate(records):  # the capture, with nobody to send to
            store.add_record(record)
            if i % 1000 == 0:
                time.sleep(0.3)
        assert store.outbox_depth() == len(records)
        assert agent.stats.failures > 0 and agent.stats.accepted == 0
        assert agent.status().aggregator_reachable is False
        agg.start()
        wait_until(lambda: store.outbox_depth() == 0, 120, "the backlog to drain")
        assert agent.status().aggregator_reachable is True
    finally:
        agent.stop()
        store.close()
    assert_exactly_once(agg, records)
    assert agent.stats.accepted == len(records)


def test_refused_key_keeps_records_and_shows_in_status(
    aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path
) -> None:
    from appliance.store import Store
    from appliance.sync import SyncAgent

    agg, keys = aggregator
    agg.start()
    store = Store(tmp_path / "dev" / "appliance.db")
    records = make_records(50)
    fill_store(store, records)
    wrong = appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                               api_key="dk_" + "0" * 43)
    agent = SyncAgent(wrong, store)
    agent.start()
    try:
        wait_until(lambda: agent.stats.failures > 0, 30, "the refused upload")
        status = agent.status()
        assert status.credentials_refused and status.aggregator_reachable
        assert store.outbox_depth() == len(records)  # nothing marked sent, nothing parked
        assert store.parked() == []
    finally:
        agent.stop()
    agent = SyncAgent(appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                                         api_key=keys[DEVICE]), store)
    agent.start()
    try:
        wait_until(lambda: store.outbox_depth() == 0, 60, "the backlog to drain")
        assert agent.status().credentials_refused is False
    finally:
        agent.stop()
        store.close()
    assert_exactly_once(agg, records)


def test_agent_killed_mid_drain_and_restarted(
    aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path
) -> None:
    from appliance.store import Store

    agg, keys = aggregator
    agg.start()
    data_dir = tmp_path / "dev"
    store = Store(data_dir / "appliance.db")
    records = make_records(6000)
    fill_store(store, records)
    store.close()
    config = tmp_path / "appliance.toml"
    write_appliance_toml(config, appliance_overrides(
        data_dir, aggregator_url=agg.base_url, api_key=keys[DEVICE], batch_size=100))
    log = tmp_path / "agent.log"
    kills = 0
    for threshold in (1000, 3000):  # kill it twice, at different points of the drain
        proc = start_agent_process(config, log)
        try:
            wait_until(lambda t=threshold, p=proc: len(agg.attendance_keys()) >= t
                       or p.poll() is not None, 120, "the drain to get going")
            assert proc.poll() is None, log.read_text()[-2000:]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        kills += 1
        assert len(agg.attendance_keys()) < len(records), "killed too late to prove anything"
    proc = start_agent_process(config, log)
    try:
        # the agent converted the store to an encrypted one at its first start
        store = Store(data_dir / "appliance.db", device_store_key(agg, keys[DEVICE]))
        wait_until(lambda: store.outbox_depth() == 0, 120, "the rest to drain")
        store.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert kills == 2
    assert_exactly_once(agg, records)


@pytest.mark.mqtt
def test_broker_restarted_mid_stream(
    broker: Broker, aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path
) -> None:
    from appliance.store import Store
    from appliance.sync import SyncAgent

    agg, keys = aggregator
    agg.start(mqtt_url=broker.url("aggregator"))
    store = Store(tmp_path / "dev" / "appliance.db")
    records = make_records(4000)
    fill_store(store, records)
    settings = appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                                  api_key=keys[DEVICE], mqtt_url=broker.url(DEVICE),
                                  batch_size=100, ack_timeout_s=3)
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: len(agg.attendance_keys()) >= 500, 60, "the drain to get going")
        broker.stop(kill=True)  # SIGKILL: in-flight messages and unsaved state are lost
        sent_before = len(agg.attendance_keys())
        assert sent_before < len(records), "drained before the broker went down"
        time.sleep(1.5)
        assert not agent.status().mqtt_connected
        broker.start()
        wait_until(lambda: store.outbox_depth() == 0, 120, "the rest to drain")
    finally:
        agent.stop()
        store.close()
    assert_exactly_once(agg, records)


def test_same_batch_twice_counts_once(aggregator: tuple[Aggregator, dict[str, str]]) -> None:
    agg, keys = aggregator
    agg.start()
    batch = AttendanceBatch(device_id=DEVICE, records=make_records(500))
    headers = {"Authorization": f"Bearer {keys[DEVICE]}", "Content-Type": "application/json"}
    with httpx.Client(base_url=agg.base_url, headers=headers, timeout=30) as client:
        first = BatchResult.model_validate_json(
            client.post("/api/v1/attendance", content=batch.model_dump_json()).content)
        second = BatchResult.model_validate_json(
            client.post("/api/v1/attendance", content=batch.model_dump_json()).content)
    assert (first.accepted, first.duplicate, first.rejected) == (500, 0, [])
    assert (second.accepted, second.duplicate, second.rejected) == (0, 500, [])
    assert_exactly_once(agg, batch.records)


def test_agent_retry_after_lost_response_counts_once(
    aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path
) -> None:
    """The aggregator stores a batch but the answer is lost on the way back: the agent keeps
    the records, sends them again, gets 'duplicate' and only then marks them sent."""
    from appliance.store import Store
    from appliance.sync import SyncAgent

    agg, keys = aggregator
    agg.start()
    proxy = LossyProxy(agg.port, drop_attendance_responses=2)
    store = Store(tmp_path / "dev" / "appliance.db")
    records = make_records(450)
    fill_store(store, records)
    settings = appliance_settings(tmp_path / "dev",
                                  aggregator_url=f"http://127.0.0.1:{proxy.port}",
                                  api_key=keys[DEVICE], batch_size=200)
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: store.outbox_depth() == 0, 60, "the outbox to drain")
    finally:
        agent.stop()
        store.close()
        proxy.close()
    assert proxy.dropped == 2
    assert agent.stats.duplicate >= 200  # the re-sent, already stored batch(es)
    assert agent.stats.accepted + agent.stats.duplicate >= len(records)
    assert_exactly_once(agg, records)


def test_http_poison_record_parked_with_reason_and_events_sent(
    aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from appliance.store import Store
    from appliance.sync import SyncAgent
    from cloud_sync.protocol import Event

    agg, keys = aggregator
    agg.start()
    store = Store(tmp_path / "dev" / "appliance.db")
    good = make_records(40)
    poison = make_records(1, students=["S999"])
    fill_store(store, good[:20] + poison + good[20:])
    event = Event(device_id=DEVICE, room_id="LAB-301", kind="camera_offline",
                  message="camera unplugged", at=datetime.now(UTC),
                  data={"alert_level": "CRITICAL", "alert_message": "camera unplugged"})
    store.add_event(event)
    settings = appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                                  api_key=keys[DEVICE], batch_size=16)
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: store.outbox_depth() == 0, 60, "the outbox to drain")
    finally:
        agent.stop()
    assert_exactly_once(agg, good)
    assert [(k, "unknown student" in r) for k, r in store.parked()] == [(str(poison[0].key), True)]
    assert agg.scalar("SELECT count(*) FROM events WHERE kind = 'camera_offline'") == 1
    store.close()
