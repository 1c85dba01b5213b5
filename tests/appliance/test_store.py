"""The SQLite outbox: API, thread safety, and durability under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from appliance.store import Store, boot_id, clock_synced
from cloud_sync.protocol import (
    AttendanceRecord,
    ClassSession,
    Event,
    RosterEntry,
    ScheduleResponse,
)

REPO = Path(__file__).resolve().parents[2]


def _record(student: str = "S001", seen_at: datetime | None = None) -> AttendanceRecord:
    return AttendanceRecord(
        key=uuid.uuid4(), student_id=student, course_id="C1", room_id="R1", device_id="D1",
        seen_at=seen_at or datetime.now(UTC), confidence=0.9, distance=0.3,
        clock_synced=True, boot_id=boot_id(), monotonic_s=time.monotonic(),
    )


def _event() -> Event:
    return Event(device_id="D1", room_id="R1", kind="camera_offline", message="gone",
                 at=datetime.now(UTC),
                 data={"alert_level": "CRITICAL", "alert_message": "gone"})


def test_outbox_roundtrip(tmp_path: Path) -> None:
    store = Store(tmp_path / "appliance.db")
    records = [_record(f"S{i:03d}") for i in range(5)]
    for r in records:
        store.add_record(r)
    store.add_record(records[0])  # same key again: ignored, not duplicated
    event = _event()
    store.add_event(event)
    assert store.outbox_depth() == 6
    assert [r.key for r in store.unsent_records(3)] == [r.key for r in records[:3]]
    assert store.unsent_records(100)[0] == records[0]
    assert store.unsent_events(10) == [event]
    age = store.oldest_unsent_age_s()
    assert age is not None and 0 <= age < 60
    assert store.mark_sent([records[0].key, str(records[1].key), event.key]) == 3
    assert store.mark_sent([records[0].key]) == 0  # already sent
    store.park(records[2].key, "room mismatch")
    assert store.outbox_depth() == 2
    assert [r.key for r in store.unsent_records(10)] == [records[3].key, records[4].key]
    assert store.unsent_events(10) == []
    assert store.parked() == [(str(records[2].key), "room mismatch")]
    store.mark_sent([records[3].key, records[4].key])
    assert store.outbox_depth() == 0 and store.oldest_unsent_age_s() is None
    # sent or not, records stay for records_since
    assert len(store.records_since(datetime.now(UTC) - timedelta(minutes=1))) == 5


def test_add_records_in_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "appliance.db")
    first = _record("S001")
    store.add_record(first)
    batch = [_record(f"S{i:03d}") for i in range(2, 1202)] + [first]  # one key already there
    store.add_records(batch)
    assert store.outbox_depth() == 1201
    assert [r.key for r in store.unsent_records(3)] == [first.key, batch[0].key, batch[1].key]
    store.close()
    assert Store(tmp_path / "appliance.db").outbox_depth() == 1201


def test_prune_deletes_only_old_sent_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "appliance.db")
    sent, unsent, parked = _record("S001"), _record("S002"), _record("S003")
    for r in (sent, unsent, parked):
        store.add_record(r)
    event = _event()
    store.add_event(event)
    store.mark_sent([sent.key, event.key])
    store.park(parked.key, "bad")
    today = datetime.now(UTC)
    assert store.prune(today - timedelta(days=1)) == 0  # sent just now: kept
    assert store.prune(today + timedelta(seconds=1)) == 2  # the sent record and event
    assert store.outbox_depth() == 1 and store.parked() == [(str(parked.key), "bad")]
    assert {r.key for r in store.records_since(today - timedelta(hours=1))} == {
        unsent.key, parked.key}
    # parked rows (refused, never sent) have their own lifetime; unsent ones never go
    assert store.prune(today, parked_before=today - timedelta(days=1)) == 0
    assert store.prune(today, parked_before=today + timedelta(seconds=1)) == 1
    assert store.parked() == [] and store.outbox_depth() == 1


def test_records_since_and_last_seen(tmp_path: Path) -> None:
    store = Store(tmp_path)
    t0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    store.add_record(_record("S001", t0))
    store.add_record(_record("S001", t0 + timedelta(seconds=40)))
    store.add_record(_record("S002", t0 + timedelta(seconds=10)))
    since = store.records_since(t0 + timedelta(seconds=5))
    assert [(r.student_id, r.seen_at) for r in since] == [
        ("S002", t0 + timedelta(seconds=10)), ("S001", t0 + timedelta(seconds=40))]
    assert store.last_seen_by_student(t0) == {
        "S001": t0 + timedelta(seconds=40), "S002": t0 + timedelta(seconds=10)}


def test_schedule_cache_and_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    assert store.load_schedule() is None
    start = datetime(2026, 3, 2, 8, tzinfo=UTC)
    sched = ScheduleResponse(
        room_id="R1", date=date(2026, 3, 2), timezone="UTC", generated_at=start,
        current_course_id="C1",
        sessions=[ClassSession(course_id="C1", course_name="Maths", starts_at=start,
                               ends_at=start + timedelta(hours=1))],
        rosters={"C1": [RosterEntry(student_id="S001", name="Ada", embeddings=[[0.1] * 128])]},
    )
    store.save_schedule(sched, 'W/"abc"')
    assert store.load_schedule() == (sched, 'W/"abc"')
    assert store.load_schedule(date(2026, 3, 2)) == (sched, 'W/"abc"')
    assert store.load_schedule(date(2026, 3, 3)) is None
    store.save_schedule(sched, "v2")
    assert store.load_schedule()[1] == "v2"
    assert store.get_state("x") is None
    store.set_state("x", "1")
    store.set_state("x", "2")
    assert store.get_state("x") == "2"
    store.close()
    assert Store(tmp_path / "a.db").get_state("x") == "2"  # persisted


def test_thread_safe_writers(tmp_path: Path) -> None:
    store = Store(tmp_path)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(50):
                store.add_record(_record())
                store.outbox_depth()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.outbox_depth() == 200


def test_clock_helpers() -> None:
    assert isinstance(clock_synced(), bool)
    if Path("/proc/sys/kernel/random/boot_id").exists():
        assert len(boot_id() or "") == 36


_WRITER = """
import sys, time, uuid
from datetime import UTC, datetime
from pathlib import Path
from appliance.store import Store
from cloud_sync.protocol import AttendanceRecord
store = Store(Path(sys.argv[1]))
while True:
    key = uuid.uuid4()
    store.add_record(AttendanceRecord(key=key, student_id="S001", room_id="R1", device_id="D1",
                                      seen_at=datetime.now(UTC), confidence=0.5))
    print(key, flush=True)
"""


def test_outbox_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "appliance.db"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    reported: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while len(reported) < 200 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        reported.append(line.strip())
    proc.send_signal(signal.SIGKILL)  # mid-write: it is looping on add_record
    rest, _ = proc.communicate(timeout=10)
    reported += [line for line in rest.split() if len(line) == 36]  # whole lines only
    assert proc.returncode == -signal.SIGKILL
    assert len(reported) >= 200
    store = Store(db)
    stored = {str(r.key) for r in store.unsent_records(100_000)}
    missing = [k for k in reported if k not in stored]
    assert not missing, f"{len(missing)} committed records lost"
