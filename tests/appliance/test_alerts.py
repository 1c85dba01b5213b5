"""AlertMonitor with a real Store: each alert once per episode, hysteresis, restart-safe."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from appliance.alerts import AlertMonitor
from appliance.config import load
from appliance.store import Store
from cloud_sync.protocol import AttendanceRecord

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def kinds(store: Store) -> list[str]:
    return [e.kind for e in store.unsent_events(100)]


def monitor(settings, pipeline, store, host) -> AlertMonitor:
    return AlertMonitor(settings, pipeline, store, system=host)


def test_camera_offline_once_then_online(settings, pipeline, store, host) -> None:
    mon = monitor(settings, pipeline, store, host)
    limit = settings.alerts.camera_offline_s
    assert mon.check(T0) == []
    pipeline.set(camera_state="reopening")
    assert mon.check(T0 + timedelta(seconds=1)) == []           # episode starts
    assert mon.check(T0 + timedelta(seconds=limit)) == []       # not yet over the limit
    events = mon.check(T0 + timedelta(seconds=limit + 2))
    assert [e.kind for e in events] == ["camera_offline"]
    assert events[0].severity == "critical" and events[0].device_id == "dev-appliance"
    pipeline.set(camera_state="failed")
    for k in range(10):                                          # still down: no repeat
        assert mon.check(T0 + timedelta(seconds=limit + 10 + k * 10)) == []
    pipeline.set(camera_state="ok")
    online = mon.check(T0 + timedelta(seconds=500))
    assert [e.kind for e in online] == ["camera_online"]
    # the alert.triggered shape: the recovery names the offline alert it closes
    assert online[0].data["alert_level"] == "INFO"
    assert online[0].data["associated_events"] == [str(events[0].key)]
    assert mon.check(T0 + timedelta(seconds=510)) == []
    assert kinds(store) == ["camera_offline", "camera_online"]


def test_short_camera_glitch_is_not_an_alert(settings, pipeline, store, host) -> None:
    mon = monitor(settings, pipeline, store, host)
    pipeline.set(camera_state="reopening")
    mon.check(T0)
    pipeline.set(camera_state="ok")
    mon.check(T0 + timedelta(seconds=5))
    pipeline.set(camera_state="reopening")                      # a new, short episode
    mon.check(T0 + timedelta(seconds=settings.alerts.camera_offline_s))
    assert kinds(store) == []


def test_temperature_hysteresis(settings, pipeline, store, host) -> None:
    mon = monitor(settings, pipeline, store, host)
    readings = [60, 71, 75, 69, 68, 71, 64, 72, 73]
    raised = []
    for i, temp in enumerate(readings):
        host.set(cpu_temp_c=float(temp))
        raised += [e.kind for e in mon.check(T0 + timedelta(seconds=10 * i))]
    # 71 raises; 69/68/71 stay inside the 5-degree band; 64 re-arms; 72 raises again
    assert raised == ["cpu_temperature_high", "cpu_temperature_high"]
    first = store.unsent_events(10)[0]
    assert first.data["details"]["cpu_temp_c"] == 71.0 and first.data["details"]["limit_c"] == 70.0
    assert first.data["alert_level"] == "WARNING" and first.v == 2


def test_no_sensor_no_temperature_alert(settings, pipeline, store, host) -> None:
    host.set(cpu_temp_c=None)
    assert monitor(settings, pipeline, store, host).check(T0) == []


def test_disk_hysteresis(settings, pipeline, store, host) -> None:
    mon = monitor(settings, pipeline, store, host)
    raised = []
    for i, used in enumerate([85, 91, 95, 89, 91, 87, 92]):
        host.set(disk_percent=float(used))
        raised += [e.kind for e in mon.check(T0 + timedelta(seconds=i))]
    assert raised == ["disk_almost_full", "disk_almost_full"]  # re-armed at 87 (< 90 - 2)


def test_outbox_stale(settings, pipeline, store, host) -> None:
    mon = monitor(settings, pipeline, store, host)
    now = datetime.now(UTC)
    record = AttendanceRecord(key=uuid.uuid4(), student_id="s-1", room_id="LAB-301",
                              device_id="dev-appliance", seen_at=now, confidence=0.9)
    store.add_record(record)
    assert mon.check(now + timedelta(minutes=5)) == []
    events = mon.check(now + timedelta(minutes=11))
    assert [e.kind for e in events] == ["outbox_stale"]
    assert events[0].data["details"]["outbox_depth"] >= 1
    assert mon.check(now + timedelta(minutes=20)) == []         # same episode
    # the sync agent delivers everything: re-armed
    store.mark_sent([record.key, events[0].key])
    assert mon.check(now + timedelta(minutes=21)) == []
    late = AttendanceRecord(key=uuid.uuid4(), student_id="s-2", room_id="LAB-301",
                            device_id="dev-appliance", seen_at=now, confidence=0.9)
    store.add_record(late)
    assert [e.kind for e in mon.check(now + timedelta(minutes=40))] == ["outbox_stale"]


def test_state_survives_a_restart(settings, pipeline, store, host) -> None:
    pipeline.set(camera_state="failed")
    host.set(cpu_temp_c=80.0)
    first = monitor(settings, pipeline, store, host)
    first.check(T0)
    first.check(T0 + timedelta(seconds=settings.alerts.camera_offline_s + 1))
    assert sorted(kinds(store)) == ["camera_offline", "cpu_temperature_high"]
    store.close()
    reopened = Store(settings.paths.data_dir)
    try:
        second = monitor(settings, pipeline, reopened, host)   # the device restarted
        later = T0 + timedelta(minutes=10)
        assert second.check(later) == []
        assert second.check(later + timedelta(minutes=5)) == []  # still the same episodes
        pipeline.set(camera_state="ok")
        assert [e.kind for e in second.check(later + timedelta(minutes=6))] == ["camera_online"]
    finally:
        reopened.close()


def test_thread_runs_periodically(tmp_path, pipeline, host) -> None:
    settings = load(None, paths={"data_dir": tmp_path}, alerts={"period_s": 0.05})
    store = Store(tmp_path)
    try:
        host.set(disk_percent=97.0)
        mon = AlertMonitor(settings, pipeline, store, system=host)
        mon.start()
        deadline = time.monotonic() + 10
        while not kinds(store) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # several more periods
        mon.stop()
        assert kinds(store) == ["disk_almost_full"]
    finally:
        store.close()


def test_disabled_monitor_does_not_run(tmp_path, pipeline, host) -> None:
    settings = load(None, paths={"data_dir": tmp_path},
                    alerts={"enabled": False, "period_s": 0.05})
    store = Store(tmp_path)
    try:
        host.set(disk_percent=99.0)
        mon = AlertMonitor(settings, pipeline, store, system=host)
        mon.start()
        time.sleep(0.3)
        mon.stop()
        assert kinds(store) == []
    finally:
        store.close()
