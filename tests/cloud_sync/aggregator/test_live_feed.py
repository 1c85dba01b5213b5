"""/ws/events on the real aggregator (subprocess) with a real Mosquitto: a record ingested over
HTTP and an event bridged from MQTT reach a WebSocket client, filters apply, credentials are
required, unknown event schema versions become dead letters with a reason, and a client that
stops reading is dropped while a reading client keeps its feed."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import websocket

from cloud_sync.protocol import AttendanceBatch, Event, device_topic
from tests.support.harness import (
    DEVICE,
    ROOM,
    SITE,
    Aggregator,
    Broker,
    make_records,
    wait_until,
)
from tests.support.mqtt_client import TestClient

pytestmark = pytest.mark.mqtt


def ws_url(agg: Aggregator, query: str = "") -> str:
    return f"ws://127.0.0.1:{agg.port}/ws/events{query}"


def connect(agg: Aggregator, token: str, query: str = "", **kwargs: Any) -> websocket.WebSocket:
    return websocket.create_connection(ws_url(agg, query), timeout=20,
                                       header=[f"Authorization: Bearer {token}"], **kwargs)


def receive_until(ws: websocket.WebSocket, want: Any, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = json.loads(ws.recv())
        if want(message):
            return message
    raise AssertionError("message not received")


def occupancy_event(count: int, v: int = 2) -> Event:
    now = datetime.now(UTC)
    return Event(v=v, device_id=DEVICE, room_id=ROOM, kind="occupancy", severity="info",  # type: ignore[arg-type]
                 message=f"{count} people", at=now, session_id=f"CS101@{now.date()}",
                 data={"count": count, "faces": count, "turned_away": 0, "capacity": 30,
                       "free": 30 - count, "occupied_share": round(count / 30, 3),
                       "window_s": 10.0})


def test_live_feed_http_and_mqtt(broker: Broker,
                                 aggregator: tuple[Aggregator, dict[str, str]]) -> None:
    agg, keys = aggregator
    agg.start(mqtt_url=broker.url("aggregator"))
    # wrong credentials: refused; a device key is not enough
    refused = [["Authorization: Bearer adm_wrong"], [f"Authorization: Bearer {keys[DEVICE]}"]]
    for header in refused:
        with pytest.raises(websocket.WebSocketException):
            ws = websocket.create_connection(ws_url(agg), timeout=10, header=header)
            ws.recv()
    # no header: the first message must carry an admin token, else 1008
    ws = websocket.create_connection(ws_url(agg), timeout=10)
    ws.send(json.dumps({"token": keys[DEVICE]}))
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1008
    everything = connect(agg, keys["admin"], f"?room_id={ROOM}")
    # a browser's way: no header, the token as the first message (never in the URL)
    only_alerts = websocket.create_connection(ws_url(agg, "?type=unknown_face"), timeout=20)
    only_alerts.send(json.dumps({"token": keys["admin"]}))
    device = {"Authorization": f"Bearer {keys[DEVICE]}"}
    try:
        # a record over HTTP
        record = make_records(1)[0]
        batch = AttendanceBatch(device_id=DEVICE, records=[record])
        r = httpx.post(f"{agg.base_url}/api/v1/attendance", headers=device,
                       content=batch.model_dump_json(), timeout=20)
        assert r.status_code == 200 and r.json()["accepted"] == 1
        got = receive_until(everything, lambda m: m["type"] == "attendance")
        assert [r["key"] for r in got["records"]] == [str(record.key)]
        assert got["room_id"] == ROOM
        # an event from MQTT, through the bridge
        dev = TestClient(broker, DEVICE)
        assert not dev.wait_connected().is_failure
        event = occupancy_event(12)
        dev.publish(device_topic(SITE, ROOM, DEVICE, "events"), event.model_dump_json())
        got = receive_until(everything, lambda m: m["type"] == "occupancy")
        assert got["event"]["key"] == str(event.key)
        assert got["event"]["data"]["count"] == 12
        assert got["event"]["session_id"] == event.session_id
        # an unknown schema version: a dead letter with the reason, over MQTT and HTTP
        future = json.loads(occupancy_event(3).model_dump_json()) | {"v": 9}
        dev.publish(device_topic(SITE, ROOM, DEVICE, "events"), json.dumps(future))
        wait_until(lambda: agg.scalar("SELECT count(*) FROM dead_letters") == 1, 20,
                   "the MQTT dead letter")
        assert "event schema version 9 is not supported" in agg.scalar(
            "SELECT reason FROM dead_letters")
        r = httpx.post(f"{agg.base_url}/api/v1/events", headers=device,
                       content=json.dumps(future), timeout=20)
        assert r.status_code == 422 and "version 9" in r.json()["detail"]
        assert agg.scalar("SELECT count(*) FROM dead_letters") == 2
        # a v1 event (an older device) is still read; a v2 payload of the wrong shape is not
        old = Event(v=1, device_id=DEVICE, room_id=ROOM, kind="device_started",
                    severity="info", message="hi", at=datetime.now(UTC))
        r = httpx.post(f"{agg.base_url}/api/v1/events", headers=device,
                       content=old.model_dump_json(), timeout=20)
        assert r.status_code == 200 and r.json()["stored"]
        bad = json.loads(occupancy_event(3).model_dump_json())
        bad["data"] = {"count": -1}
        r = httpx.post(f"{agg.base_url}/api/v1/events", headers=device, content=json.dumps(bad),
                       timeout=20)
        assert r.status_code == 422 and "occupancy payload" in r.text
        # the filtered client got none of that
        only_alerts.settimeout(1.0)
        with pytest.raises(websocket.WebSocketTimeoutException):
            only_alerts.recv()
        # the session's timeline in the reports API
        r = httpx.get(f"{agg.base_url}/api/v1/reports/timeline",
                      params={"room_id": ROOM, "session_id": event.session_id},
                      headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=20)
        assert r.status_code == 200
        assert [p["count"] for p in r.json()["occupancy"]] == [12]
        dev.close()
    finally:
        everything.close()
        only_alerts.close()


def test_slow_client_is_dropped(aggregator: tuple[Aggregator, dict[str, str]]) -> None:
    agg, keys = aggregator
    agg.start(extra_env={"AGGREGATOR_WS_QUEUE_MESSAGES": "16"})
    # the slow client never reads: its small receive buffer fills at once
    slow = connect(agg, keys["admin"], sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    fast = connect(agg, keys["admin"])
    received: list[int] = []
    closed: list[str] = []

    def read_fast() -> None:
        try:
            while True:
                received.append(len(json.loads(fast.recv())["records"]))
        except (websocket.WebSocketException, OSError, ValueError) as err:
            closed.append(repr(err))

    reader = threading.Thread(target=read_fast, daemon=True)
    reader.start()
    device = {"Authorization": f"Bearer {keys[DEVICE]}"}

    def metric(name: str) -> float:
        text = httpx.get(f"{agg.base_url}/metrics", timeout=20).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name + " "))

    try:
        posted = 0
        for _ in range(100):
            batch = AttendanceBatch(device_id=DEVICE, records=make_records(500))
            r = httpx.post(f"{agg.base_url}/api/v1/attendance", headers=device,
                           content=batch.model_dump_json(), timeout=60)
            assert r.status_code == 200 and r.json()["accepted"] == 500
            posted += 1
            if metric("aggregator_ws_dropped_total") >= 1:
                break
        assert metric("aggregator_ws_dropped_total") == 1, f"not dropped after {posted} batches"
        assert metric("aggregator_ws_clients") == 1  # the reading client is still there
        wait_until(lambda: len(received) == posted, 30, "the reading client's messages")
        assert sum(received) == 500 * posted and closed == []
        # the slow client, reading at last, finds its connection closed after a backlog
        slow.settimeout(20)
        backlog = 0
        with pytest.raises(websocket.WebSocketConnectionClosedException):
            while True:
                if slow.recv() == "":
                    raise websocket.WebSocketConnectionClosedException("closed")
                backlog += 1
        assert backlog < posted
    finally:
        slow.close()
        fast.close()
