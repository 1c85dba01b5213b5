"""The device's time and whether to trust it: one rule for the roster choice, the records and
the offline-unlock window (docs/ARCHITECTURE.md, "Time").

A Raspberry Pi 4 has no real-time clock: it boots with the time it saved last, which after a
power cut can be hours or days behind. The time is **trusted** when, in this order:

1. NTP has synchronised the system clock (``clock.trust_ntp``; timedatectl's
   ``NTPSynchronized``, see :func:`appliance.store.clock_synced`);
2. the aggregator answered an authenticated request (``clock.trust_aggregator``): its ``Date``
   header at the midpoint of a round trip of at most :data:`MAX_RTT_S`;
3. the anchor persisted in ``<data_dir>/clock.json`` comes from this boot (a process restart:
   kill -9, watchdog, update): the monotonic clock went on, so the anchor plus the monotonic
   time since is exact;
4. a real-time clock (``clock.trust_rtc``) reads no earlier than the last trusted time plus the
   time since boot.

A trusted time is kept as an *anchor* (wall time at a ``CLOCK_MONOTONIC`` reading) and read as
``anchor.wall + (monotonic() - anchor.mono)``, so a later step of the system clock does not move
it; the device never sets the system clock (it runs unprivileged). Otherwise the clock is
untrusted: :meth:`DeviceClock.now` is then an estimate, never before the last trusted time plus
the time since boot, and records made with it carry ``clock_synced = false`` with the boot id
and the monotonic reading, so the aggregator places them once a heartbeat of the same boot
carries a trusted time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

from appliance.config import ClockConfig
from appliance.store import boot_id, clock_synced

_LOGGER = logging.getLogger(__name__)

ANCHOR_FILE = "clock.json"
SAVE_EVERY_S = 600.0  # the persisted anchor is rewritten this often while trusted (SD wear)
MAX_RTT_S = 3.0  # an aggregator answer slower than this gives no time
AGGREGATOR_REFRESH_S = 600.0  # a newer sample replaces an older one after this long
DISAGREE_S = 5.0  # NTP and the aggregator's time further apart than this: log it
# No trusted time can be before this (an RTC reset at power loss reads 1970 or 2000).
EARLIEST = datetime(2025, 1, 1, tzinfo=UTC)
RTC_PATH = Path("/sys/class/rtc/rtc0/since_epoch")
RTC_TOLERANCE_S = 120.0

SOURCES = ("ntp", "aggregator", "anchor", "rtc", "none")


def _boottime() -> float:
    """Seconds since this boot began (CLOCK_BOOTTIME: counts suspend, unlike monotonic)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_rtc(path: Path = RTC_PATH) -> float | None:
    """The real-time clock's seconds since the epoch, or None without one."""
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Anchor:
    """A trusted wall time at a monotonic reading of one boot."""

    wall: datetime
    mono: float
    boot_id: str | None
    source: str  # what made it trusted: "ntp", "aggregator", "rtc" (persisted: as it was)
    rtt_s: float | None = None  # aggregator samples: the round trip

    def at(self, mono: float) -> datetime:
        return self.wall + timedelta(seconds=mono - self.mono)


@dataclass(frozen=True, slots=True)
class ClockReading:
    """One instant: what a record or a heartbeat carries."""

    at: datetime
    trusted: bool
    source: str  # one of SOURCES
    boot_id: str | None
    monotonic_s: float


@dataclass(frozen=True, slots=True)
class ClockState:
    """What /health, the status page and the heartbeat say about the clock."""

    trusted: bool
    source: str
    since: datetime | None  # trusted since (this process), or None
    offset_s: float | None  # trusted time minus the system clock
    last_trusted: datetime | None  # untrusted: the persisted last trusted time (a floor)
    message: str

    def as_dict(self) -> dict[str, object]:
        return {
            "trusted": self.trusted, "source": self.source,
            "since": None if self.since is None else _iso(self.since),
            "offset_s": None if self.offset_s is None else round(self.offset_s, 3),
            "last_trusted": None if self.last_trusted is None else _iso(self.last_trusted),
        }


class DeviceClock:
    """The device's clock (see the module docstring). Thread-safe.

    ``data_dir`` None: nothing persisted (a recording job on the aggregator, unit tests). The
    time functions are parameters so that the rule can be tested with a clock a year off.
    """

    def __init__(
        self,
        config: ClockConfig | None = None,
        data_dir: Path | None = None,
        *,
        wall: Callable[[], datetime] = _utcnow,
        mono: Callable[[], float] = time.monotonic,
        boottime: Callable[[], float] = _boottime,
        boot: Callable[[], str | None] = boot_id,
        ntp: Callable[[], bool] = clock_synced,
        rtc: Callable[[], float | None] = read_rtc,
    ) -> None:
        self.config = config or ClockConfig()
        self.path = None if data_dir is None else Path(data_dir) / ANCHOR_FILE
        self._wall, self._mono, self._boottime = wall, mono, boottime
        self._ntp, self._rtc = ntp, rtc
        self._boot = boot()
        self._lock = threading.Lock()
        self._anchor: Anchor | None = None  # trusted, of this boot
        self._floor: datetime | None = None  # the last trusted time of an earlier boot
        self._since: datetime | None = None
        self._saved_mono: float | None = None
        self._ntp_now = False
        self._warned_disagree = -1e9
        self._restore()

    # -- start: the persisted anchor, the RTC ------------------------------------------------------
    def _restore(self) -> None:
        saved = self._load()
        mono = self._mono()
        if saved is not None and saved.boot_id is not None and saved.boot_id == self._boot \
                and saved.mono <= mono + 1.0:
            self._anchor = Anchor(saved.wall, saved.mono, self._boot, "anchor")
            self._since = self._anchor.at(mono)
            _LOGGER.info("clock: trusted from the anchor saved by this boot (%s, by %s)",
                         _iso(saved.wall), saved.source)
            return
        if saved is not None:
            self._floor = saved.wall
        if self.config.trust_rtc:
            seconds = self._rtc()
            if seconds is not None:
                rtc_at = datetime.fromtimestamp(seconds, UTC)
                floor = self._lower_bound()
                if rtc_at >= EARLIEST and (floor is None or rtc_at >= floor - timedelta(
                        seconds=RTC_TOLERANCE_S)):
                    self._anchor = Anchor(rtc_at, mono, self._boot, "rtc")
                    self._since = rtc_at
                    _LOGGER.info("clock: trusted from the real-time clock (%s)", _iso(rtc_at))
                    return
                _LOGGER.warning("clock: the real-time clock reads %s, before the last trusted "
                                "time %s: not trusted", _iso(rtc_at),
                                _iso(floor) if floor else _iso(EARLIEST))
        if saved is not None:
            _LOGGER.info("clock: last trusted time %s (an earlier boot)", _iso(saved.wall))

    def _load(self) -> Anchor | None:
        if self.path is None:
            return None
        try:
            doc = json.loads(self.path.read_text())
            return Anchor(datetime.fromisoformat(doc["wall"]), float(doc["mono"]),
                          doc.get("boot_id"), str(doc.get("source", "?")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            _LOGGER.warning("clock: %s unreadable (%s): no last trusted time", self.path, err)
            return None

    def _lower_bound(self) -> datetime | None:
        """The earliest the time can be now: the last trusted time of an earlier boot plus
        the time since this boot began."""
        if self._floor is None:
            return None
        return self._floor + timedelta(seconds=max(0.0, self._boottime()))

    # -- reading -------------------------------------------------------------------------------
    def reading(self) -> ClockReading:
        mono = self._mono()
        with self._lock:
            if self.config.trust_ntp and self._ntp():
                wall = self._wall()
                if not self._ntp_now or self._anchor is None:
                    _LOGGER.info("clock: synchronised by NTP")
                    self._since = self._since or wall
                self._ntp_now = True
                self._anchor = Anchor(wall, mono, self._boot, "ntp")
                return ClockReading(wall, True, "ntp", self._boot, mono)
            self._ntp_now = False
            if self._anchor is not None:
                return ClockReading(self._anchor.at(mono), True, self._anchor.source,
                                    self._boot, mono)
            wall = self._wall()
            floor = self._lower_bound()
            at = max(wall, floor) if floor is not None else wall
            return ClockReading(at, False, "none", self._boot, mono)

    def now(self) -> datetime:
        """The best time there is (trusted or not: see :meth:`reading`)."""
        return self.reading().at

    @property
    def trusted(self) -> bool:
        return self.reading().trusted

    def last_trusted(self) -> datetime | None:
        """The last trusted time of an earlier boot (None when trusted now or never known)."""
        with self._lock:
            return None if self._anchor is not None else self._floor

    def state(self) -> ClockState:
        read = self.reading()
        offset = (read.at - self._wall()).total_seconds() if read.trusted else None
        with self._lock:
            anchor, since, floor = self._anchor, self._since, self._floor
        if read.trusted:
            text = {
                "ntp": "synchronised by NTP",
                "aggregator": "NTP not synchronised: the aggregator's time",
                "anchor": "carried over from before the restart (same boot)",
                "rtc": "the real-time clock (not behind the last trusted time)",
            }.get(read.source, read.source)
            if read.source == "aggregator" and anchor is not None and anchor.rtt_s is not None:
                text += f" (round trip {anchor.rtt_s * 1000:.0f} ms)"
            if offset is not None and abs(offset) >= 2.0:
                text += f"; the system clock is off by {offset:+.0f} s"
            return ClockState(True, read.source, since, offset, None, text)
        why = []
        if self.config.trust_ntp:
            why.append("NTP has not synchronised")
        if self.config.trust_aggregator:
            why.append("the aggregator has not answered yet")
        text = "not trusted since the restart: " + (" and ".join(why) or "no source allowed")
        text += (f"; last trusted time {floor:%Y-%m-%d %H:%M} UTC (before the restart)"
                 if floor is not None else "; no trusted time was ever saved")
        text += ("; recording nothing until the time is trusted"
                 if self.config.untrusted == "record-nothing" else
                 "; records are not counted for a class and carry clock_synced=false, for "
                 "the aggregator to place in time")
        return ClockState(False, "none", None, None, floor, text)

    # -- the aggregator's time -------------------------------------------------------------------
    def offer_server_time(self, date_header: str | None, sent_mono: float,
                          received_mono: float) -> bool:
        """An authenticated answer of the aggregator with its ``Date`` header, sent and
        received at these monotonic readings. True when it became the clock's anchor."""
        if not self.config.trust_aggregator or not date_header:
            return False
        rtt = received_mono - sent_mono
        if rtt < 0 or rtt > MAX_RTT_S:
            return False
        try:
            server = parsedate_to_datetime(date_header)
        except (TypeError, ValueError):
            return False
        if server.tzinfo is None or server < EARLIEST:
            return False
        # Date has whole seconds: the answer was made within the second after it
        sample = Anchor(server.astimezone(UTC) + timedelta(seconds=0.5),
                        (sent_mono + received_mono) / 2, self._boot, "aggregator", rtt)
        with self._lock:
            if self._ntp_now and self._anchor is not None:
                gap = (sample.at(self._anchor.mono) - self._anchor.wall).total_seconds()
                if abs(gap) > DISAGREE_S + rtt and received_mono - self._warned_disagree > 3600:
                    self._warned_disagree = received_mono
                    _LOGGER.warning("clock: the aggregator's time is %+.0f s off NTP's "
                                    "(check the aggregator's NTP)", gap)
                return False
            current = self._anchor
            better = (current is None or current.source != "aggregator"
                      or current.rtt_s is None or rtt <= current.rtt_s
                      or received_mono - current.mono > AGGREGATOR_REFRESH_S)
            if not better:
                return False
            first = current is None or current.source != "aggregator"
            self._anchor = sample
            if first:
                self._since = sample.at(received_mono)
        if first:
            offset = (sample.at(received_mono) - self._wall()).total_seconds()
            _LOGGER.info("clock: trusted from the aggregator's time (system clock off by "
                         "%+.1f s, round trip %.0f ms)", offset, rtt * 1000)
            self.save()
        return True

    # -- persisting ------------------------------------------------------------------------------
    def tick(self) -> None:
        """Persist the anchor when it is due (call it every few seconds)."""
        read = self.reading()
        if not read.trusted or self.path is None:
            return
        if self._saved_mono is None or read.monotonic_s - self._saved_mono >= SAVE_EVERY_S:
            self.save()

    def save(self) -> bool:
        """Write the current trusted time as the anchor (atomically); False when untrusted."""
        if self.path is None:
            return False
        read = self.reading()
        if not read.trusted:
            return False
        with self._lock:
            source = self._anchor.source if self._anchor is not None else read.source
        doc = {"wall": read.at.isoformat(), "mono": read.monotonic_s, "boot_id": read.boot_id,
               "source": source}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("w") as fh:
                json.dump(doc, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            _LOGGER.warning("clock: could not save %s: %s", self.path, err)
            return False
        self._saved_mono = read.monotonic_s
        return True
