"""Rosters for the coming school days (issue 26, item 2) and the roster of an untrusted clock.

- from the REAL aggregator: the device caches today and the next school days (days with a
  class in the room), recognises tomorrow's class from the cache with the aggregator gone, and
  a student whose consent is withdrawn is dropped from every cached day at the next contact;
- a cached day the aggregator made longer than ``sync.roster_valid_days`` ago is not used;
- with an untrusted clock (a reboot without network) no class is chosen: the device recognises
  the students of every cached class from the last trusted time to the horizon after it
  ("record-flagged"), or nobody ("record-nothing").
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import numpy as np

from appliance.clock import DeviceClock
from appliance.store import Store
from appliance.sync import ScheduleRosterProvider, SyncAgent
from cloud_sync.protocol import ClassSession, RosterEntry, ScheduleResponse
from tests.appliance.test_clock import Machine
from tests.support.harness import (
    DEVICE,
    ENROLLED,
    ROOM,
    ROOM_TZ,
    STUDENTS,
    Aggregator,
    appliance_settings,
    wait_until,
)

TZ = ZoneInfo(ROOM_TZ)


def test_next_school_days_are_cached_used_offline_and_erased_at_next_contact(
        aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path) -> None:
    agg, keys = aggregator
    agg.start()
    today = datetime.now(TZ).date()
    tomorrow = today + timedelta(days=1)
    newcomers = STUDENTS[20:23]
    with httpx.Client(base_url=agg.base_url, timeout=10,
                      headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
        assert admin.post("/api/v1/courses", json={"id": "MA201", "name": "Algebra"}
                          ).status_code == 201
        for sid in newcomers:
            assert admin.post("/api/v1/enrollments", json={"student_id": sid,
                                                           "course_id": "MA201"}
                              ).status_code == 201
        answer = admin.post("/api/v1/schedules", json={
            "course_id": "MA201", "room_id": ROOM, "weekday": tomorrow.weekday(),
            "start_time": "08:00", "end_time": "09:00"})
        assert answer.status_code == 201, answer.text
        # the window itself: today, then the next 2 school days (tomorrow; CS101 in a week)
        window = admin.get("/api/v1/schedule/days", params={"room_id": ROOM, "days": 2})
        assert window.status_code == 200, window.text
        assert [d["date"] for d in window.json()["days"]] == [
            str(today), str(tomorrow), str(today + timedelta(days=7))]
        assert admin.get("/api/v1/schedule/days", params={"room_id": ROOM, "days": 99}
                         ).status_code == 422

    data = tmp_path / "dev"
    store = Store(data / "appliance.db")
    settings = appliance_settings(data, aggregator_url=agg.base_url, api_key=keys[DEVICE])
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: agent.stats.schedule_updates >= 1, 30, "the first pull")
    finally:
        agent.stop()
    agg.stop()
    assert store.cached_days() == [today, tomorrow, today + timedelta(days=7)]

    # the aggregator is gone; tomorrow 08:30 in the room the device recognises MA201's class
    provider = ScheduleRosterProvider.for_device(settings, store)
    course, _, roster = provider.current(datetime.now(UTC))
    assert course == "CS101" and sorted(roster.student_ids) == ENROLLED
    at = datetime.combine(tomorrow, datetime.min.time(), TZ) + timedelta(hours=8, minutes=30)
    course, name, roster = provider.current(at)
    assert (course, name) == ("MA201", "Algebra") and sorted(roster.student_ids) == newcomers

    # back: the withdrawal of one of them reaches every cached day at the next contact
    agg.start()
    with httpx.Client(base_url=agg.base_url, timeout=10,
                      headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
        assert admin.post(f"/api/v1/students/{newcomers[0]}/consent",
                          json={"state": "withdrawn"}).status_code == 200
    agent = SyncAgent(settings, store)
    agent.start()
    try:
        wait_until(lambda: agent.stats.schedule_updates >= 1, 30, "the pull after withdrawal")
    finally:
        agent.stop()
    for day in store.cached_days():
        cached = store.load_schedule(day)
        assert cached is not None
        held = {e.student_id for r in cached[0].rosters.values() for e in r}
        assert newcomers[0] not in held, day
    _, _, roster = ScheduleRosterProvider.for_device(settings, store).current(at)
    assert sorted(roster.student_ids) == newcomers[1:]
    store.close()


def _entry(sid: str, rng: np.random.Generator) -> RosterEntry:
    vec = rng.normal(size=128)
    return RosterEntry(student_id=sid, name=f"Student {sid}",
                       embeddings=[(vec / np.linalg.norm(vec)).tolist()])


def _day(day: date, classes: dict[str, tuple[int, list[str]]], generated_at: datetime,
         rng: np.random.Generator) -> ScheduleResponse:
    """``classes``: course -> (start hour, students); each class lasts an hour."""
    sessions = []
    for course, (hour, _) in classes.items():
        start = datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=hour)
        sessions.append(ClassSession(course_id=course, course_name=course, starts_at=start,
                                     ends_at=start + timedelta(hours=1)))
    return ScheduleResponse(
        room_id=ROOM, date=day, timezone="UTC", generated_at=generated_at,
        current_course_id=None, sessions=sessions, embedder="sface/sface-2021dec-int8bq",
        rosters={c: [_entry(s, rng) for s in students]
                 for c, (_, students) in classes.items()})


def _provider(store: Store, clock: DeviceClock | None = None,
              **kwargs: object) -> ScheduleRosterProvider:
    return ScheduleRosterProvider(store, timezone="UTC", device_id=DEVICE, room_id=ROOM,
                                  early_arrival_s=600, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_a_roster_older_than_its_validity_is_not_used(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    monday = date(2026, 3, 2)
    pulled = datetime(2026, 2, 27, 15, 0, tzinfo=UTC)  # a Friday afternoon
    store = Store(tmp_path / "appliance.db")
    store.save_schedules([_day(monday + timedelta(days=d), {"CS101": (9, ["S001", "S002"])},
                               pulled, rng) for d in (0, 7)], '"w"')
    provider = _provider(store, valid_days=7)
    at = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    assert provider.current(at)[0] == "CS101"  # 3 days after the pull
    course, _, roster = provider.current(at + timedelta(days=7))  # 10 days after: not used
    assert course is None and roster.student_ids == []
    assert provider.error is not None and "older than sync.roster_valid_days" in provider.error
    store.close()


def test_an_untrusted_clock_recognises_every_class_that_may_be_running_without_a_class(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    monday = date(2026, 3, 2)
    pulled = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
    store = Store(tmp_path / "appliance.db")
    store.save_schedules([
        _day(monday, {"EARLY": (7, ["S001"]), "CS101": (9, ["S002", "S003"]),
                      "MA201": (14, ["S003", "S004"])}, pulled, rng),
        _day(monday + timedelta(days=1), {"PH301": (8, ["S005"]), "LATE": (16, ["S006"])},
             pulled, rng),
    ], '"w"')
    # trusted at 08:50 on Monday and saved; a power cut; rebooted without network
    board = Machine(true=datetime(2026, 3, 2, 8, 50, tzinfo=UTC), ntp=True)
    board.clock(tmp_path).save()
    board.ntp = False
    board.reboot(off_for_s=1800)
    board.skew = -timedelta(hours=3)  # the system clock restarted from an old saved time
    clock = board.clock(tmp_path)
    assert not clock.trusted
    provider = _provider(store, clock, untrusted_horizon_h=24)
    course, name, roster = provider.current(clock.now())
    # every class ending after 08:50 Monday and starting (minus the early window) before
    # 08:50 Tuesday: CS101, MA201, PH301; not EARLY (over) nor LATE (after the horizon)
    assert course is None and name is None
    assert sorted(roster.student_ids) == ["S002", "S003", "S004", "S005"]
    assert roster.embedder == "sface/sface-2021dec-int8bq"
    assert provider.current(clock.now())[2] is roster  # the same object: no matcher rebuild
    events = [e for e in store.unsent_events(10) if e.kind == "roster_switched"]
    assert events and "clock not trusted" in events[-1].message
    # record-nothing: nobody
    strict = _provider(store, clock, untrusted="record-nothing")
    assert strict.current(clock.now())[2].student_ids == []
    assert strict.error is not None and "not trusted" in strict.error
    # the aggregator answers: trusted again, and the class is chosen by the time
    assert clock.offer_server_time(board.date_header(), board.mono - 0.01, board.mono)
    assert provider.current(clock.now())[0] == "CS101"
    store.close()
