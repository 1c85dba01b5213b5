"""make image-test's clock-a-year-behind check near UTC midnight: the class it schedules
``--now`` must cover the whole wait for the record (up to ~50 minutes), so the room gets a zone in
which it is midday (fleet.imagetest.midday_zone) before the class is scheduled."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx

from fleet.imagetest import aggregator_env, free_port, midday_zone, start_aggregator


def test_midday_zone_puts_every_utc_time_at_noon_same_day() -> None:
    for minute in range(0, 24 * 60, 7):
        now = datetime(2026, 12, 7, tzinfo=UTC) + timedelta(minutes=minute, seconds=59)
        local = now.astimezone(ZoneInfo(midday_zone(now)))
        assert (local.hour, local.minute) == (12, now.minute), now
        assert local.date() == now.date(), now
        # a 180-minute class started 5 minutes ago fits in the room's day (no 23:59 cut)
        assert (local + timedelta(minutes=180)).date() == local.date(), now


def test_midday_zone_extremes() -> None:
    assert midday_zone(datetime(2026, 12, 7, 23, 58, tzinfo=UTC)) == "Etc/GMT+11"
    assert midday_zone(datetime(2026, 12, 8, 0, 2, tzinfo=UTC)) == "Etc/GMT-12"
    assert midday_zone(datetime(2026, 12, 8, 12, 0, tzinfo=UTC)) == "Etc/GMT"


def test_room_in_midday_zone_gets_the_whole_class_now(tmp_path: Path) -> None:
    """The aggregator image-test runs: the room's zone patched as check_stale_clock does, then
    `aggregator schedules add --now --minutes 180` makes a 185-minute class (5 minutes already
    running) in that zone, not one cut at 23:59."""
    port = free_port()
    proc, token = start_aggregator(tmp_path, port)
    try:
        zone = midday_zone(datetime.now(UTC))
        httpx.patch(f"http://127.0.0.1:{port}/api/v1/rooms/LAB-301", json={"timezone": zone},
                    headers={"Authorization": f"Bearer {token}"}).raise_for_status()
        agg = str(Path(sys.executable).with_name("aggregator"))
        out = subprocess.run([agg, "schedules", "add", "--room", "LAB-301", "--course", "CLOCK",
                              "--now", "--minutes", "180"], env=aggregator_env(tmp_path),
                             check=True, capture_output=True, text=True).stdout
    finally:
        proc.terminate()
        proc.wait(30)
    match = re.search(r"(\d\d):(\d\d)-(\d\d):(\d\d) \(room time\)", out)
    assert match, out
    start_h, start_m, end_h, end_m = map(int, match.groups())
    assert (end_h * 60 + end_m) - (start_h * 60 + start_m) == 185, out
    assert 11 <= start_h <= 12, out
