"""GET /metrics: Prometheus exposition under attendance_, gauges fresh on every scrape."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import load
from appliance.web.app import create_app
from cloud_sync.protocol import AttendanceRecord


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = sample.value
    return out


def test_metrics_open_and_fresh(settings, pipeline, store, host) -> None:
    c = TestClient(create_app(settings, pipeline, store, system=host))
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = samples(r.text)
    assert values["attendance_fps"] == 7.5
    assert values["attendance_camera_up"] == 1.0
    assert values["attendance_cpu_temperature_celsius"] == 48.0
    assert values["attendance_outbox_depth"] == 0.0
    for family, kind in (("frames_processed_total", "counter"),
                         ("detection_seconds", "histogram"), ("embedding_seconds", "histogram"),
                         ("recognitions_total", "counter"), ("sync_total", "counter"),
                         ("outbox_depth", "gauge")):
        assert f"# TYPE attendance_{family} {kind}" in r.text, family
    assert "Ada Lovelace" not in r.text and "s-0042" not in r.text

    pipeline.set(fps=3.25, camera_state="failed")
    host.set(cpu_temp_c=66.5)
    store.add_record(AttendanceRecord(key=uuid.uuid4(), student_id="s-1", room_id="LAB-301",
                                      device_id="dev-appliance", seen_at=datetime.now(UTC),
                                      confidence=0.9))
    values = samples(c.get("/metrics").text)
    assert values["attendance_fps"] == 3.25
    assert values["attendance_camera_up"] == 0.0
    assert values["attendance_cpu_temperature_celsius"] == 66.5
    assert values["attendance_outbox_depth"] == 1.0


def test_login_results_are_counted(settings, pipeline, store, host) -> None:
    c = TestClient(create_app(settings, pipeline, store, system=host))
    key = 'attendance_web_logins_total{result="not_configured"}'

    def count() -> float:
        for line in c.get("/metrics").text.splitlines():
            if line.startswith(key):
                return float(line.split()[-1])
        return 0.0

    before = count()
    c.post("/login", data={"password": "whatever"})
    assert count() == before + 1


def test_metrics_can_require_auth(tmp_path, pipeline, store, host) -> None:
    settings = load(None, paths={"data_dir": tmp_path},
                    web={"metrics_public": False}, sync={"api_key": "k-0123456789"})
    c = TestClient(create_app(settings, pipeline, store, system=host))
    assert c.get("/metrics").status_code == 401
    ok = c.get("/metrics", headers={"Authorization": "Bearer k-0123456789"})
    assert ok.status_code == 200 and "attendance_fps" in ok.text
