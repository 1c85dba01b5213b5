"""Schedule and roster pull from the REAL aggregator: ETag/304, kept in the store, served with
the network down, switched at class boundaries; a change pushed over MQTT is pulled at once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from appliance.sync import ScheduleRosterProvider, pick_session
from cloud_sync.protocol import ClassSession
from tests.support.harness import (
    DEVICE,
    ENROLLED,
    ROOM,
    ROOM_TZ,
    STUDENTS,
    Aggregator,
    Broker,
    appliance_settings,
    start_pushed_agent,
    wait_until,
)


def _session(course: str, start: datetime, minutes: int) -> ClassSession:
    return ClassSession(course_id=course, course_name=course, starts_at=start,
                        ends_at=start + timedelta(minutes=minutes))


def test_pick_session_switches_at_class_boundaries() -> None:
    t0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    day = [_session("MATH", t0, 60), _session("PHYS", t0 + timedelta(hours=1), 60),
           _session("CHEM", t0 + timedelta(hours=3), 60)]
    early = 600.0
    assert pick_session(day, t0 - timedelta(minutes=11), early) is None
    assert pick_session(day, t0 - timedelta(minutes=9), early).course_id == "MATH"
    # MATH runs until 09:00 even though PHYS's early window opened at 08:50.
    assert pick_session(day, t0 + timedelta(minutes=59), early).course_id == "MATH"
    assert pick_session(day, t0 + timedelta(minutes=60), early).course_id == "PHYS"
    assert pick_session(day, t0 + timedelta(minutes=125), early) is None
    assert pick_session(day, t0 + timedelta(minutes=175), early).course_id == "CHEM"
    assert pick_session(day, t0 + timedelta(hours=4), early) is None


def test_schedule_pulled_with_etag_and_kept_for_offline(
    aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path
) -> None:
    from appliance.store import Store
    from appliance.sync import SyncAgent

    agg, keys = aggregator
    agg.start()
    store = Store(tmp_path / "dev" / "appliance.db")
    settings = appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                                  api_key=keys[DEVICE])
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: agent.stats.schedule_updates >= 1, 30, "the first schedule pull")
        cached = store.load_schedule()
        assert cached is not None
        schedule, etag = cached
        assert etag and schedule.room_id == ROOM
        assert [s.course_id for s in schedule.sessions] == ["CS101"]
        assert sorted(e.student_id for e in schedule.rosters["CS101"]) == ENROLLED
        agent.request_roster_refresh()
        wait_until(lambda: agent.stats.schedule_unchanged >= 1, 30, "a 304 on If-None-Match")
        assert agent.stats.schedule_updates == 1
        course, name, roster = agent.roster_provider.current(datetime.now(UTC))
        assert (course, name) == ("CS101", "Intro to CS")
        assert sorted(roster.student_ids) == ENROLLED
    finally:
        agent.stop()
    agg.stop()
    # Network down, device restarted: the cached day still gives the class and its roster.
    provider = ScheduleRosterProvider(store, timezone=ROOM_TZ, device_id=DEVICE, room_id=ROOM)
    now = datetime.now(UTC)
    course, _, roster = provider.current(now)
    assert course == "CS101" and sorted(roster.student_ids) == ENROLLED
    assert roster.embeddings.shape == (len(ENROLLED), 128)
    # After the class (by the device's own clock): no class, empty roster.
    course, _, roster = provider.current(schedule.sessions[0].ends_at + timedelta(seconds=1))
    assert course is None and roster.student_ids == []
    kinds = [e.kind for e in store.unsent_events(100)]
    assert "roster_switched" in kinds
    store.close()


@pytest.mark.mqtt
def test_roster_change_pushed_over_mqtt_is_pulled_at_once(
    broker: Broker, aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path
) -> None:
    agg, keys = aggregator
    agg.start(mqtt_url=broker.url("aggregator"))
    store, _, agent = start_pushed_agent(agg, broker, keys, tmp_path / "dev")
    try:
        time.sleep(0.5)
        newcomer = STUDENTS[20]
        started = time.monotonic()
        with httpx.Client(base_url=agg.base_url, timeout=10,
                          headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
            answer = admin.post("/api/v1/enrollments",
                                json={"student_id": newcomer, "course_id": "CS101"})
            assert answer.status_code == 201, answer.text

        def has_newcomer() -> bool:
            cached = store.load_schedule()
            return cached is not None and newcomer in {
                e.student_id for e in cached[0].rosters.get("CS101", [])}

        wait_until(has_newcomer, 20, "the new roster (pushed, not polled: refresh is 1 h)")
        assert time.monotonic() - started < 20
        _, _, roster = agent.roster_provider.current(datetime.now(UTC))
        assert newcomer in roster.student_ids
    finally:
        agent.stop()
        store.close()
