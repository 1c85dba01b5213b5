"""GET /health: shape, per-component status, overall status and HTTP codes; no personal data."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from appliance.config import load
from appliance.health import COMPONENTS, check_health
from appliance.web.app import create_app
from cloud_sync.protocol import AttendanceRecord

from .conftest import snapshot


@dataclass
class Sync:
    transport: str = "http"
    connected: bool = True
    last_success_at: datetime | None = None
    last_error: str | None = None
    aggregator_reachable: bool = True
    mqtt_connected: bool | None = None
    credentials_refused: bool = False
    room_mismatch: str | None = None


def client(settings, pipeline, store, host, sync=None) -> TestClient:
    return TestClient(create_app(settings, pipeline, store, sync, system=host))


def test_shape_and_healthy(settings, pipeline, store, host) -> None:
    r = client(settings, pipeline, store, host).get("/health")
    assert r.status_code == 200
    body = r.json()
    assert set(body) >= {"status", "timestamp", "components"}
    assert body["status"] == "healthy"
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    assert list(body["components"]) == list(COMPONENTS)
    for item in body["components"].values():
        assert item["status"] in {"healthy", "degraded", "unhealthy", "not_configured"}
        assert isinstance(item["healthy"], bool) and item["message"]
    # not configured here: they do not count against the overall status
    assert body["components"]["aggregator"]["status"] == "not_configured"
    assert body["components"]["mqtt"]["status"] == "not_configured"


def test_no_personal_data_and_no_credentials(settings, pipeline, store, host) -> None:
    text = client(settings, pipeline, store, host).get("/health").text
    assert "Ada Lovelace" not in text and "s-0042" not in text
    assert "hunter2" not in text and "rtsp://" not in text  # camera URL may carry a password


@pytest.mark.parametrize(("state", "component", "code"), [
    ("failed", "unhealthy", 503), ("ended", "unhealthy", 503),
    ("reopening", "degraded", 200), ("starting", "degraded", 200),
])
def test_camera_states(settings, pipeline, store, host, state, component, code) -> None:
    pipeline.set(camera_state=state)
    r = client(settings, pipeline, store, host).get("/health")
    assert r.status_code == code
    assert r.json()["components"]["camera"]["status"] == component
    assert r.json()["status"] == component


def test_stale_frames_degrade_camera(settings, pipeline, store, host) -> None:
    pipeline.set(last_frame_at=datetime.now(UTC) - timedelta(minutes=10))
    body = client(settings, pipeline, store, host).get("/health").json()
    assert body["components"]["camera"]["status"] == "degraded"


def test_slow_detector_is_degraded(settings, pipeline, store, host) -> None:
    pipeline.set(stage_ms={"detect": 5000.0, "embed": 10.0})
    body = client(settings, pipeline, store, host).get("/health").json()
    assert body["components"]["detector"]["status"] == "degraded"
    assert body["components"]["recogniser"]["status"] == "healthy"


@pytest.mark.parametrize(("temp", "expected", "code"), [
    (None, "not_configured", 200), (55.0, "healthy", 200), (72.0, "degraded", 200),
    (85.0, "unhealthy", 503),
])
def test_temperature(settings, pipeline, store, host, temp, expected, code) -> None:
    host.set(cpu_temp_c=temp)
    r = client(settings, pipeline, store, host).get("/health")
    assert r.json()["components"]["temperature"]["status"] == expected
    assert r.status_code == code


@pytest.mark.parametrize(("used", "expected", "code"), [
    (50.0, "healthy", 200), (93.0, "degraded", 200), (99.0, "unhealthy", 503),
])
def test_disk(settings, pipeline, store, host, used, expected, code) -> None:
    host.set(disk_percent=used)
    r = client(settings, pipeline, store, host).get("/health")
    assert r.json()["components"]["disk"]["status"] == expected
    assert r.status_code == code


def test_aggregator_and_mqtt(tmp_path, pipeline, store, host) -> None:
    settings = load(None, paths={"data_dir": tmp_path},
                    sync={"aggregator_url": "http://127.0.0.1:9", "mqtt_url": "mqtt://127.0.0.1:9"})
    sync = Sync(aggregator_reachable=False, mqtt_connected=False, last_error="secret-ish text")
    r = client(settings, pipeline, store, host, lambda: sync).get("/health")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "degraded"
    assert body["components"]["aggregator"]["status"] == "degraded"
    assert body["components"]["mqtt"]["status"] == "degraded"
    assert "secret-ish" not in r.text
    sync.aggregator_reachable, sync.mqtt_connected = True, True
    body = client(settings, pipeline, store, host, lambda: sync).get("/health").json()
    assert body["status"] == "healthy"
    sync.credentials_refused = True  # reachable, but the key is refused: not healthy
    body = client(settings, pipeline, store, host, lambda: sync).get("/health").json()
    assert body["components"]["aggregator"]["status"] == "degraded"
    assert "refuses this device's key" in body["components"]["aggregator"]["message"]
    sync.credentials_refused = False
    # configured but no sync agent at all: degraded, never a crash
    body = client(settings, pipeline, store, host, None).get("/health").json()
    assert body["components"]["aggregator"]["status"] == "degraded"


def test_stale_outbox_degrades_database(settings, pipeline, store) -> None:
    store.add_record(AttendanceRecord(
        key="6f1c1f4e-5d5b-4b53-8a55-0a4e0c1f0001", student_id="s-1", room_id="LAB-301",
        device_id="dev-appliance", seen_at=datetime.now(UTC), confidence=0.9))
    later = datetime.now(UTC) + timedelta(minutes=30)
    doc = check_health(settings, pipeline, store, snapshot(), None, now=later)
    assert doc["components"]["database"]["status"] == "degraded"
    assert doc["components"]["database"]["outbox_depth"] == 1
    doc = check_health(settings, pipeline, store, snapshot(), None)
    assert doc["components"]["database"]["status"] == "healthy"


def test_broken_pipeline_reports_unhealthy(settings, store, host) -> None:
    class Broken:
        def status(self):
            raise RuntimeError("boom")

        def latest_preview_jpeg(self):
            return None

    r = client(settings, Broken(), store, host).get("/health")
    assert r.status_code == 503
    assert r.json()["components"]["camera"]["status"] == "unhealthy"


def test_status_page_survives_a_broken_pipeline(settings, store, host) -> None:
    from appliance.web.auth import hash_password, store_password_hash

    class Broken:
        def status(self):
            raise RuntimeError("boom")

        def latest_preview_jpeg(self):
            return None

    store_password_hash(settings.paths.data_dir, hash_password("long enough pw"))
    c = client(settings, Broken(), store, host)
    c.post("/login", data={"password": "long enough pw"})
    r = c.get("/")
    assert r.status_code == 503 and "unavailable" in r.text
    assert c.get("/api/status").status_code == 503
    assert c.get("/preview.jpg").status_code == 204


def test_full_disk_outbox_write_failure_is_unhealthy(settings, pipeline, store, host) -> None:
    """SQLite's own "database or disk is full" (the file may not grow past its current size):
    /health says the outbox cannot be written, and recovers with the next good write."""
    import uuid

    from appliance.store import STORE_ERRORS

    def record() -> AttendanceRecord:
        return AttendanceRecord(key=uuid.uuid4(), student_id="s-1", room_id="LAB-301",
                                device_id="dev-appliance", seen_at=datetime.now(UTC),
                                confidence=0.9)

    c = client(settings, pipeline, store, host)
    body = c.get("/health").json()["components"]["database"]
    assert body["write_ok"] is True and body["disk_free_mb"] == 10 * 1024
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(STORE_ERRORS, match="full"):  # SQLCipher's sqlite3 (the store's driver)
        for _ in range(10_000):
            store.add_record(record())
    r = c.get("/health")
    db = r.json()["components"]["database"]
    assert r.status_code == 503 and r.json()["status"] == "unhealthy"
    assert db["status"] == "unhealthy" and db["write_ok"] is False and db["disk_full"] is True
    assert "outbox writes failing" in db["message"] and "the disk is full" in db["message"]
    store._conn.execute(f"PRAGMA max_page_count = {pages * 100}")  # space again
    store.add_record(record())
    r = c.get("/health")
    assert r.status_code == 200 and r.json()["components"]["database"]["write_ok"] is True


def test_little_free_space_is_unhealthy_whatever_the_percentage(settings, pipeline, store,
                                                                host) -> None:
    host.set(disk_percent=60.0, disk_free_gb=0.1)  # a small card: 100 MB left
    r = client(settings, pipeline, store, host).get("/health")
    disk = r.json()["components"]["disk"]
    assert r.status_code == 503 and disk["status"] == "unhealthy"
    assert disk["disk_free_mb"] == 102 and "below 200 MB" in disk["message"]
