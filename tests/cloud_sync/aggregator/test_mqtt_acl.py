"""The repo's Mosquitto ACL (config/mosquitto/acl) on a real broker: a device can publish only
under its own device id and read only its own ack topic."""

from __future__ import annotations

import time

import pytest

from cloud_sync.protocol import device_topic, roster_topic
from tests.support.harness import DEVICE, OTHER_DEVICE, OTHER_ROOM, ROOM, SITE, Broker
from tests.support.mqtt_client import TestClient

pytestmark = pytest.mark.mqtt


def test_device_limited_to_its_own_topics(broker: Broker) -> None:
    watcher = TestClient(broker, "aggregator")
    dev_a = TestClient(broker, DEVICE)
    try:
        assert not watcher.wait_connected().is_failure
        assert not dev_a.wait_connected().is_failure
        assert not any(r.is_failure for r in watcher.subscribe("classroom/+/+/+/attendance"))

        own = device_topic(SITE, ROOM, DEVICE, "attendance")
        other = device_topic(SITE, OTHER_ROOM, OTHER_DEVICE, "attendance")
        other_same_room = device_topic(SITE, ROOM, OTHER_DEVICE, "attendance")
        assert not dev_a.publish(own, b"mine").is_failure
        # MQTT 5: the broker answers "not authorized" in the PUBACK and drops the message.
        assert dev_a.publish(other, b"forged").is_failure
        assert dev_a.publish(other_same_room, b"forged").is_failure
        assert dev_a.publish(device_topic(SITE, ROOM, OTHER_DEVICE, "status"),
                             b"offline").is_failure
        # Nor may it pretend to be the aggregator.
        assert dev_a.publish(device_topic(SITE, ROOM, DEVICE, "ack"), b"{}").is_failure
        assert dev_a.publish(roster_topic(SITE, ROOM), b"{}").is_failure

        # Reading: its own ack and the room's roster notice, never another device's ack.
        assert not dev_a.subscribe(device_topic(SITE, ROOM, DEVICE, "ack"))[0].is_failure
        assert not dev_a.subscribe(roster_topic(SITE, ROOM))[0].is_failure
        # Mosquitto grants a SUBACK but checks read access per message on delivery.
        other_ack = device_topic(SITE, OTHER_ROOM, OTHER_DEVICE, "ack")
        dev_a.subscribe(other_ack)
        dev_a.subscribe("classroom/#")
        own_ack = device_topic(SITE, ROOM, DEVICE, "ack")
        assert not watcher.publish(other_ack, b"not yours").is_failure
        assert not watcher.publish(own_ack, b"yours").is_failure
        time.sleep(0.5)
        assert dev_a.received(other_ack) == []
        assert set(dev_a.received(own_ack)) == {b"yours"}
        assert dev_a.received(own) == []  # '#' does not let it read its peers' uploads either
        assert watcher.received(own) == [b"mine"]
        assert watcher.received(other) == []
        assert watcher.received(other_same_room) == []
    finally:
        watcher.close()
        dev_a.close()


def test_client_id_cannot_hijack_another_device(broker: Broker) -> None:
    """use_username_as_clientid: a device connecting with another device's client id gets its
    own (username) id, so it cannot take over or kick off the other device's session."""
    victim = TestClient(broker, OTHER_DEVICE)
    intruder = TestClient(broker, DEVICE, client_id=OTHER_DEVICE)
    try:
        victim.wait_connected()
        intruder.wait_connected()
        time.sleep(0.5)
        assert victim.client.is_connected()
        assert intruder.client.is_connected()
    finally:
        victim.close()
        intruder.close()


def test_no_anonymous_or_wrong_password(broker: Broker) -> None:
    stranger = TestClient(broker, "nobody")
    try:
        assert stranger.wait_connected().is_failure
    finally:
        stranger.close()


def test_device_cannot_publish_under_another_room_or_site(broker: Broker) -> None:
    """Issue 12 #4: with `%u` patterns a device could publish a retained `status` (shown by
    Home Assistant) under its own id in ANY site and room. Its ACL block now names its own
    site and room."""
    ha = TestClient(broker, "homeassistant")
    dev_a = TestClient(broker, DEVICE)
    try:
        assert not ha.wait_connected().is_failure
        assert not dev_a.wait_connected().is_failure
        ha.subscribe("classroom/+/+/+/status")
        own = device_topic(SITE, ROOM, DEVICE, "status")
        forged = [device_topic(SITE, OTHER_ROOM, DEVICE, "status"),
                  device_topic("other-site", ROOM, DEVICE, "status"),
                  device_topic(SITE, OTHER_ROOM, DEVICE, "attendance")]
        assert not dev_a.publish(own, b"online", retain=True).is_failure
        for topic in forged:
            assert dev_a.publish(topic, b"online", retain=True).is_failure, topic
        time.sleep(0.5)
        assert ha.received(own) == [b"online"]
        assert all(ha.received(t) == [] for t in forged)
    finally:
        ha.close()
        dev_a.close()


def test_broker_refuses_oversized_messages(broker: Broker) -> None:
    """The shipped config caps a message at 1 MiB: 50 MB on a device's own heartbeat topic
    never reaches the bridge (it used to become a 50 MB dead letter)."""
    watcher = TestClient(broker, "aggregator")
    dev_a = TestClient(broker, DEVICE)
    try:
        watcher.wait_connected()
        dev_a.wait_connected()
        watcher.subscribe("classroom/+/+/+/heartbeat")
        topic = device_topic(SITE, ROOM, DEVICE, "heartbeat")
        assert not dev_a.publish(topic, b"y" * 500_000).is_failure
        # Mosquitto answers PUBACK 149 and drops it; paho then drops the connection and
        # offers it again on reconnect, dropped again: it never reaches a subscriber.
        dev_a.client.publish(topic, b"x" * 2_000_000, qos=1)
        time.sleep(2)
        assert watcher.received(topic) == [b"y" * 500_000]
        assert "Dropped too large PUBLISH" in (broker.dir / "mosquitto.log").read_text()
    finally:
        watcher.close()
        dev_a.close()


def test_shipped_acl_is_the_generated_one() -> None:
    from cloud_sync.aggregator.mqtt_acl import render
    from tests.conftest import REPO

    assert (REPO / "config/mosquitto/acl").read_text() == render([])


def test_bridges_listener_is_the_bridges_alone(broker: Broker) -> None:
    """Issue 23 #7: with `per_listener_settings false` and 1884 on every interface, a device's
    credentials on 1884 with client id `devB` threw devB off, and with a bridge's client id
    (its suffix was in /health's `instance`) made the bridge flap. The shipped config gives
    1884 its own users (the aggregator only) and binds it to the loopback address."""
    from tests.conftest import REPO

    bridge_id = "aggregator-bridge-host-4242-a1b2c3"
    victim = TestClient(broker, OTHER_DEVICE)
    bridge = TestClient(broker, "aggregator", client_id=bridge_id)
    others = []
    try:
        assert not victim.wait_connected().is_failure
        assert not bridge.wait_connected().is_failure
        for client_id in (OTHER_DEVICE, bridge_id):  # a device's login on the bridges' port
            intruder = TestClient(broker, DEVICE, client_id=client_id, port=broker.bridge_port)
            others.append(intruder)
            assert intruder.wait_connected().is_failure, client_id
        # on the devices' port the client id is the user name: the bridge's id is not taken
        intruder = TestClient(broker, DEVICE, client_id=bridge_id)
        others.append(intruder)
        assert not intruder.wait_connected().is_failure
        # nor does the aggregator's login open the devices' port
        stray = TestClient(broker, "aggregator", port=broker.port)
        others.append(stray)
        assert stray.wait_connected().is_failure
        time.sleep(1.0)
        assert victim.client.is_connected() and bridge.client.is_connected()
    finally:
        for client in (victim, bridge, *others):
            client.close()
    conf = (REPO / "config/mosquitto/mosquitto.conf").read_text()
    assert "\nper_listener_settings true\n" in conf and "\nlistener 1884 127.0.0.1\n" in conf


def test_shipped_bridge_acl_is_the_bridges_block() -> None:
    from cloud_sync.aggregator.mqtt_acl import BRIDGE
    from tests.conftest import REPO

    assert (REPO / "config/mosquitto/bridge.acl").read_text() == BRIDGE
