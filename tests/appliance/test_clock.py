"""The device's clock-trust rule (appliance/clock.py): NTP, the aggregator's time, this boot's
persisted anchor, a real-time clock, else untrusted with a floor.

The clock's time functions are parameters: a :class:`Machine` stands for the board (system
clock, monotonic clock, boot id, RTC), so a clock a year off, a reboot and a process restart
can be played through in microseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from appliance.clock import ANCHOR_FILE, DeviceClock
from appliance.config import ClockConfig
from appliance.health import DEGRADED, HEALTHY, check_clock

TRUE_NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
YEAR = timedelta(days=365)


@dataclass
class Machine:
    """A board: the true time moves with ``advance``; its system clock is ``skew`` off it."""

    true: datetime = TRUE_NOW
    skew: timedelta = timedelta(0)
    mono: float = 1000.0
    since_boot: float = 1000.0
    boot: str = "boot-1"
    ntp: bool = False
    rtc: float | None = None
    calls: list[str] = field(default_factory=list)

    def advance(self, seconds: float) -> None:
        self.true += timedelta(seconds=seconds)
        self.mono += seconds
        self.since_boot += seconds

    def reboot(self, off_for_s: float) -> None:
        self.true += timedelta(seconds=off_for_s + 20)
        self.mono = self.since_boot = 20.0
        self.boot = self.boot + "'"

    def clock(self, data_dir: Path | None = None, **config: object) -> DeviceClock:
        return DeviceClock(
            ClockConfig.model_validate(config), data_dir,
            wall=lambda: self.true + self.skew, mono=lambda: self.mono,
            boottime=lambda: self.since_boot, boot=lambda: self.boot, ntp=lambda: self.ntp,
            rtc=lambda: self.rtc)

    def date_header(self, offset_s: float = 0.0) -> str:
        """What the aggregator (with a right clock) sends: whole seconds."""
        server = (self.true + timedelta(seconds=offset_s)).replace(microsecond=0)
        return format_datetime(server, usegmt=True)


def _close(a: datetime, b: datetime, within_s: float = 1.6) -> bool:
    return abs((a - b).total_seconds()) <= within_s


def test_ntp_synchronised_is_trusted_as_it_is() -> None:
    board = Machine(ntp=True)
    clock = board.clock()
    read = clock.reading()
    assert read.trusted and read.source == "ntp" and read.at == TRUE_NOW
    assert read.boot_id == "boot-1" and read.monotonic_s == 1000.0
    assert check_clock(clock).status == HEALTHY


def test_a_clock_a_year_off_takes_the_aggregators_time_and_keeps_it_over_a_step() -> None:
    board = Machine(skew=-YEAR)
    clock = board.clock()
    assert not clock.trusted and clock.now() == TRUE_NOW - YEAR  # no floor: the system clock
    assert check_clock(clock).status == DEGRADED
    # an answer that took 4 s gives no time; one of 40 ms does
    assert not clock.offer_server_time(board.date_header(), board.mono - 4.0, board.mono)
    assert clock.offer_server_time(board.date_header(), board.mono - 0.04, board.mono)
    read = clock.reading()
    assert read.trusted and read.source == "aggregator" and _close(read.at, TRUE_NOW)
    state = clock.state()
    assert state.offset_s is not None and abs(state.offset_s - YEAR.total_seconds()) < 2
    assert "aggregator" in state.message and "system clock is off by" in state.message
    # an hour later the system clock is stepped (by hand, or a broken NTP): trusted time
    # follows the monotonic clock, not the step
    board.advance(3600)
    board.skew = timedelta(days=3)
    assert _close(clock.now(), TRUE_NOW + timedelta(hours=1))
    # NTP synchronises later: it wins
    board.skew, board.ntp = timedelta(0), True
    assert clock.reading().source == "ntp" and clock.now() == board.true


def test_the_aggregators_time_is_not_taken_when_ntp_has_the_time() -> None:
    board = Machine(ntp=True)
    clock = board.clock()
    clock.reading()
    # an aggregator 20 min off (its own NTP is broken): ignored, logged
    assert not clock.offer_server_time(board.date_header(1200), board.mono - 0.01, board.mono)
    assert clock.reading().source == "ntp" and clock.now() == board.true


def test_sources_can_be_switched_off() -> None:
    board = Machine(ntp=True)
    clock = board.clock(trust_ntp=False, trust_aggregator=False)
    assert not clock.trusted
    assert not clock.offer_server_time(board.date_header(), board.mono - 0.01, board.mono)
    assert "no source allowed" in clock.state().message


def test_a_process_restart_in_the_same_boot_keeps_the_time(tmp_path: Path) -> None:
    board = Machine(skew=-YEAR)
    clock = board.clock(tmp_path)
    assert clock.offer_server_time(board.date_header(), board.mono - 0.02, board.mono)
    assert (tmp_path / ANCHOR_FILE).exists()  # saved at once: a kill -9 next loses nothing
    board.advance(700)
    clock.tick()  # 10 min later: saved again
    saved = json.loads((tmp_path / ANCHOR_FILE).read_text())
    assert saved["boot_id"] == "boot-1" and saved["mono"] == board.mono
    # kill -9, restarted 30 s later without network: the same boot, the monotonic clock went on
    board.advance(30)
    again = board.clock(tmp_path)
    read = again.reading()
    assert read.trusted and read.source == "anchor"
    assert _close(read.at, board.true)
    assert "same boot" in again.state().message


def test_after_a_reboot_the_last_trusted_time_is_a_floor_not_a_time(tmp_path: Path) -> None:
    board = Machine(ntp=True)
    board.clock(tmp_path).save()
    # power cut: off for 2 h, then up again without network; the system clock restarts at
    # what it saved long before (behind the last trusted time)
    board.ntp = False
    board.reboot(off_for_s=7200)
    board.skew = -timedelta(hours=5)
    clock = board.clock(tmp_path)
    read = clock.reading()
    assert not read.trusted and read.source == "none"
    # the estimate is never before the last trusted time plus the time since boot
    assert read.at == TRUE_NOW + timedelta(seconds=20)
    assert clock.last_trusted() == TRUE_NOW
    state = clock.state()
    assert not state.trusted and state.last_trusted == TRUE_NOW
    assert "not trusted since the restart" in state.message
    assert "clock_synced=false" in state.message
    assert not clock.save()  # an untrusted time is never persisted
    assert json.loads((tmp_path / ANCHOR_FILE).read_text())["wall"] == TRUE_NOW.isoformat()
    # the aggregator answers: trusted, and the floor is no longer reported
    assert clock.offer_server_time(board.date_header(), board.mono - 0.01, board.mono)
    assert clock.trusted and clock.last_trusted() is None
    assert _close(clock.now(), board.true)


def test_a_real_time_clock_is_trusted_only_when_not_behind_the_last_trusted_time(
        tmp_path: Path) -> None:
    board = Machine(ntp=True)
    board.clock(tmp_path).save()
    board.ntp = False
    board.reboot(off_for_s=600)
    board.rtc = board.true.timestamp()  # a battery-backed RTC kept the time
    read = board.clock(tmp_path).reading()
    assert read.trusted and read.source == "rtc" and _close(read.at, board.true)
    board.rtc = datetime(2000, 1, 1, tzinfo=UTC).timestamp()  # no battery: reset at power loss
    assert not board.clock(tmp_path).trusted
    board.rtc = (TRUE_NOW - timedelta(hours=1)).timestamp()  # behind the last trusted time
    assert not board.clock(tmp_path).trusted
    board.rtc = board.true.timestamp()
    assert not board.clock(tmp_path, trust_rtc=False).trusted


def test_a_damaged_anchor_file_is_no_floor(tmp_path: Path) -> None:
    (tmp_path / ANCHOR_FILE).write_text("{not json")
    board = Machine()
    clock = board.clock(tmp_path)
    assert not clock.trusted and clock.last_trusted() is None
    assert "no trusted time was ever saved" in clock.state().message


@pytest.mark.parametrize("header", [None, "", "yesterday", "Mon, 01 Jan 1990 00:00:00 GMT"])
def test_unusable_date_headers_give_no_time(header: str | None) -> None:
    board = Machine()
    clock = board.clock()
    assert not clock.offer_server_time(header, board.mono - 0.01, board.mono)
    assert not clock.trusted
