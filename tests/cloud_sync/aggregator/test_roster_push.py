"""Admin changes reach the rooms' devices: a retained MQTT roster notice with the new ETag
(real Mosquitto of our own, real MqttBridge started by the app's lifespan)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.protocol import roster_topic
from tests.cloud_sync.aggregator.conftest import World
from tests.conftest import require


def test_enrollment_change_pushes_roster_notice(world: World, settings: Any,
                                                tmp_path: Path) -> None:
    from tests.support.harness import MOSQUITTO, MOSQUITTO_PASSWD, Broker, wait_until
    from tests.support.mqtt_client import TestClient as MqttClient

    require(MOSQUITTO.exists() and MOSQUITTO_PASSWD.exists(), "mosquitto is not installed")
    broker = Broker(tmp_path / "broker", ["aggregator", "watcher"])
    broker.start()
    topic = roster_topic("north", "LAB-301")
    try:
        configured = aggregator_config.load(None, database_url=settings.database_url,
                                            mqtt_url=broker.url("aggregator"))
        with TestClient(create_app(configured)) as client:
            wait_until(lambda: client.get("/health").json()["mqtt"] == "connected", 15,
                       "bridge connected")
            assert client.get("/health").json()["status"] == "ok"
            watcher = MqttClient(broker, "watcher")
            watcher.wait_connected()
            watcher.subscribe(topic)
            r = client.post("/api/v1/enrollments",
                            json={"student_id": "S005", "course_id": "CS101"},
                            headers=world.admin)
            assert r.status_code == 201

            def notices() -> list[bytes]:
                return [p for t, p, _ in watcher.messages if t == topic]

            wait_until(lambda: bool(notices()), 15, "roster notice")
            etag = json.loads(notices()[-1])["etag"]
            current = client.get("/api/v1/schedule", params={"room_id": "LAB-301"},
                                 headers=world.device).headers["etag"]
            assert etag == current
            watcher.client.loop_stop()
            watcher.client.disconnect()
    finally:
        broker.stop()
