"""The key of the device's encrypted store: asked of the aggregator at start, kept in memory,
and (when the flash-time policy allows it) kept wrapped on the card for an offline unlock.

``store.encryption = "aggregator"`` (the default) with ``sync.aggregator_url`` set: the store
opens *locked* (appliance/store.py) and :meth:`KeyKeeper.unlock` asks ``POST
/api/v1/store-key`` (the device's API key authenticates it; the aggregator audits every
release) until the key arrives, with the sync agent's back-off.

**Offline unlock** (issue 26; docs/PRIVACY.md, "Offline unlock"). When the aggregator cannot
be reached (no answer at all: a refusal never unlocks), the store is opened with the key kept
on the card (appliance/wrapped_key.py), if the policy allows one and its window has not ended:

- a board with a key (the Raspberry Pi's OTP key, appliance/board_key.py): the store key
  sealed with it, usable ``store.board_unlock_days`` (7) after the last answer of the
  aggregator;
- a board without one: the store key itself, usable ``store.offline_unlock_days`` after the
  last answer, 0 by default (no key on the card).

The keeper then (:meth:`KeyKeeper.start`, a thread) asks the aggregator until it confirms the
key; every answer of the aggregator to the sync agent refreshes the wrapped key's last contact
(at most once an hour, for the SD card's sake); a refusal (the device's key rotated: a theft)
deletes the wrapped key at once, and so does the end of its window (a restart after that
waits for the aggregator). The device keeps running on the key in memory either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from appliance.board_key import BoardKeySource, board_key_source, read_board_key
from appliance.logging_setup import LogThrottle
from appliance.store import Store, StoreKeyError
from appliance.sync.backoff import Backoff
from appliance.sync.errors import CredentialsRefusedError, TransportError
from appliance.sync.http_transport import HttpTransport
from appliance.wrapped_key import Kind, WrappedHeader, WrappedKeyError, WrappedKeyFile

if TYPE_CHECKING:
    from appliance.clock import DeviceClock
    from appliance.config import ApplianceSettings

_LOGGER = logging.getLogger(__name__)

REFUSED_RETRY_S = 60.0  # a refused device does not fix itself in a second
LOG_EVERY_S = 300.0
RESEAL_EVERY_S = 3600.0  # the wrapped key's last contact is rewritten at most this often
CHECK_EVERY_S = 30.0  # the keeper looks at the window this often
WAITING = "waiting for the store key from the aggregator"
KIND_TEXT = {"board-key": "the board key", "card-key": "the key kept on the card"}
_USE_SETTINGS: Any = object()


def wants_key(settings: ApplianceSettings) -> bool:
    """Whether this device's store is encrypted with the aggregator's key."""
    return settings.store.encryption == "aggregator" and bool(settings.sync.aggregator_url)


def open_store(settings: ApplianceSettings) -> Store:
    """The device's store: locked until :meth:`KeyKeeper.unlock` when it is encrypted, else
    open (unencrypted: said once in the log, and in /health's ``database`` details)."""
    if wants_key(settings):
        return Store(settings.paths.data_dir, locked=WAITING)
    if settings.store.encryption == "aggregator":
        _LOGGER.warning("store not encrypted: no sync.aggregator_url to hand out its key "
                        "(a copy of the SD card would show the outbox and rosters)")
    return Store(settings.paths.data_dir)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class KeyKeeper:
    """The store key of one device: unlock (online or offline), the wrapped copy on the card,
    and what /health, the status page and the heartbeat say about it (:meth:`describe`).

    ``board``: the board key source (default: the settings' ``store.board_key`` /
    ``store.board_key_file``; None: no board key). The board key is read once, here."""

    def __init__(self, settings: ApplianceSettings, store: Store,
                 clock: DeviceClock | None = None, board: BoardKeySource | None = _USE_SETTINGS,
                 ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        cfg = settings.store
        source = board_key_source(cfg.board_key, cfg.board_key_file) \
            if board is _USE_SETTINGS else board
        self._board_key, self.board_line = read_board_key(source)
        self.kind: Kind | None = None
        self.days = 0.0
        if self._board_key is not None:
            if cfg.board_unlock_days > 0:
                self.kind, self.days = "board-key", cfg.board_unlock_days
        elif cfg.offline_unlock_days > 0:
            self.kind, self.days = "card-key", cfg.offline_unlock_days
        self.file = WrappedKeyFile(settings.paths.data_dir, settings.device.device_id)
        self._key: bytes | None = None
        self.unlocked_by: str | None = None  # "aggregator", "board-key", "card-key"
        self.unlocked_at: datetime | None = None
        self.confirmed_at: datetime | None = None  # the aggregator's key is the one in use
        self.mismatch = False  # the aggregator holds another key than the one in use
        self.note: str | None = None  # the latest thing that happened to the wrapped key
        self._header: WrappedHeader | None = None
        self._sealed_mono: float | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._why_not = ""  # why the last offline unlock did not happen
        try:
            self._header = self.file.header()
        except WrappedKeyError:
            self._header = None
        board_allowed = (cfg.board_key != "off" or cfg.board_key_file is not None) \
            and cfg.board_unlock_days > 0
        if not board_allowed and cfg.offline_unlock_days == 0 and self.file.exists():
            # the settings allow no offline unlock at all (a board key that cannot be read
            # now, e.g. a firmware error, deletes nothing: the next contact re-seals)
            self._wipe("no offline unlock is allowed on this device (" + self.policy_line() + ")")
        store.unlock_info = self.describe
        _LOGGER.info("store key: %s; %s", self.board_line, self.policy_line())

    # -- policy and time ---------------------------------------------------------------------
    def policy_line(self) -> str:
        cfg = self.settings.store
        if self.kind == "board-key":
            return (f"offline unlock with the board key for {self.days:g} days after the last "
                    "answer of the aggregator (store.board_unlock_days)")
        if self.kind == "card-key":
            return (f"offline unlock with the key kept on the card for {self.days:g} days after "
                    "the last answer of the aggregator (store.offline_unlock_days; a copy of "
                    "the card opens the store meanwhile)")
        if self._board_key is not None and cfg.board_unlock_days == 0:
            return "no offline unlock (store.board_unlock_days = 0)"
        return "no offline unlock (no board key, and store.offline_unlock_days = 0)"

    def _now(self) -> datetime:
        return self.clock.now() if self.clock is not None else datetime.now(UTC)

    def _until(self, header: WrappedHeader | None) -> datetime | None:
        return None if header is None else header.last_contact + timedelta(days=self.days)

    # -- the wrapped key -----------------------------------------------------------------------
    def _wipe(self, why: str) -> bool:
        with self._lock:
            try:
                gone = self.file.wipe(why)
            except OSError as err:
                _LOGGER.error("store: could not delete the wrapped key: %s", err)
                return False
            if gone:
                self.note = f"wrapped key deleted {self._now():%Y-%m-%d %H:%M} UTC: {why}"
            self._header = None
            self._sealed_mono = None
            return gone

    def _seal(self) -> None:
        """Keep the key in use on the card, with now as the last contact (policy allowing)."""
        with self._lock:
            if self._key is None or self.kind is None or self.mismatch:
                return
            now = self._now()
            try:
                self.file.seal(self._key, self.kind, now, self._board_key)
            except OSError as err:
                _LOGGER.warning("store: could not write the wrapped key: %s", err)
                return
            self._header = WrappedHeader(self.kind, self.settings.device.device_id, now)
            self._sealed_mono = time.monotonic()
            self.note = None

    def _try_offline(self) -> tuple[bytes | None, str]:
        """The wrapped key if it may be used now, else None and why not."""
        if self.kind is None:
            return None, self.policy_line()
        try:
            key, header = self.file.open(self._board_key)
        except WrappedKeyError as err:
            return None, str(err) + (f" ({self.note})" if self.note else "")
        if header.kind != self.kind:
            return None, (f"the card holds {KIND_TEXT[header.kind]}, this board's policy is "
                          f"{KIND_TEXT[self.kind]}: not used")
        until = self._until(header)
        assert until is not None
        if self._now() > until:
            self._wipe(f"its window ended at {until:%Y-%m-%d %H:%M} UTC ({self.days:g} days "
                       "after the last answer of the aggregator)")
            return None, (f"the wrapped key's window ended at {until:%Y-%m-%d %H:%M} UTC "
                          f"({self.days:g} days after the last answer of the aggregator)")
        return key, header.kind

    # -- unlock ----------------------------------------------------------------------------------
    def unlock(self, stop: threading.Event, tick: Callable[[], None] | None = None) -> bool:
        """Ask the aggregator for the store key until it answers (True), or the wrapped key
        opens the store while the aggregator cannot be reached (True), or ``stop`` is set
        (False). ``tick`` runs at least once a second while waiting (the systemd watchdog).
        ``store.lock_reason`` says what the wait is about (shown by /health: no URL, no error
        text, nothing secret)."""
        if not self.store.locked:
            return True
        sync = self.settings.sync
        assert sync.aggregator_url is not None
        backoff = Backoff(sync.backoff_initial_s, sync.backoff_max_s)
        throttle = LogThrottle(LOG_EVERY_S)
        transport = HttpTransport(sync.aggregator_url, sync.api_key, sync.request_timeout_s,
                                  clock=self.clock)
        attempts = 0
        try:
            while not stop.is_set():
                attempts += 1
                try:
                    key = transport.fetch_store_key(self.settings.device.device_id)
                except CredentialsRefusedError as err:
                    self._wipe("the aggregator refuses this device (its key was rotated or it "
                               "was deregistered)")
                    self.store.lock_reason = (
                        "the aggregator refuses this device (deregistered, or a wrong "
                        f"sync.api_key): its store cannot be opened ({attempts} attempts)")
                    throttle.log(_LOGGER, logging.ERROR, "refused", "store key refused: %s; "
                                 "the store stays locked (register the device again, or fix "
                                 "sync.api_key)", err)
                    delay = backoff.next_delay(min(REFUSED_RETRY_S, sync.backoff_max_s))
                except TransportError as err:
                    if self._unlock_offline():
                        return True
                    self.store.lock_reason = (f"{WAITING}: it does not answer ({attempts} "
                                              f"attempts); offline unlock: {self._why_not}")
                    throttle.log(_LOGGER, logging.WARNING, "unreachable", "store key: the "
                                 "aggregator does not answer (%s); nothing is recorded until "
                                 "it does (offline unlock: %s)", err, self._why_not)
                    delay = backoff.next_delay()
                else:
                    self.store.unlock(key)
                    with self._lock:
                        self._key = key
                        self.unlocked_by = "aggregator"
                        self.unlocked_at = self.confirmed_at = self._now()
                    self._seal()
                    _LOGGER.info("store unlocked with the aggregator's key after %d "
                                 "attempt(s)%s", attempts,
                                 f"; an unreadable store was moved aside as "
                                 f"{self.store.set_aside.name}" if self.store.set_aside else "")
                    return True
                _wait(stop, delay, tick)
            return False
        finally:
            transport.close()

    def _unlock_offline(self) -> bool:
        key, why = self._try_offline()
        if key is None:
            self._why_not = why
            return False
        try:
            self.store.unlock(key, set_aside=False)
        except StoreKeyError:
            self._wipe("it does not open the store")
            self._why_not = "the wrapped key does not open the store: deleted"
            return False
        with self._lock:
            self._key = key
            self.unlocked_by = why  # the kind
            self.unlocked_at = self._now()
        _LOGGER.warning("store unlocked OFFLINE with %s (the aggregator does not answer): %s",
                        KIND_TEXT[why], self._left_text())
        return True

    # -- while running ---------------------------------------------------------------------------
    def on_contact(self, accepted: bool) -> None:
        """Every answer of the aggregator to the sync agent: ``accepted`` (this device's key
        was taken) or a refusal (401/403: the key was rotated or the device deleted)."""
        if not accepted:
            if self._wipe("the aggregator refuses this device (its key was rotated or it was "
                          "deregistered)"):
                _LOGGER.warning("the aggregator refuses this device: the wrapped store key was "
                                "deleted; a restart waits for the aggregator")
            return
        if self._key is None:
            return
        if self.confirmed_at is None:
            self._wake.set()  # the keeper's thread asks for the key now
            return
        sealed = self._sealed_mono
        if sealed is None or time.monotonic() - sealed >= RESEAL_EVERY_S:
            self._seal()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="store-key", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        sync = self.settings.sync
        backoff = Backoff(sync.backoff_initial_s, sync.backoff_max_s)
        transport: HttpTransport | None = None
        next_ask = 0.0
        try:
            while not self._stop.is_set():
                if self._key is not None and self.confirmed_at is None and not self.mismatch \
                        and sync.aggregator_url and time.monotonic() >= next_ask:
                    if transport is None:
                        transport = HttpTransport(sync.aggregator_url, sync.api_key,
                                                  sync.request_timeout_s, clock=self.clock)
                    delay = self._confirm(transport, backoff)
                    next_ask = time.monotonic() + delay if delay else 0.0
                self.check_window()
                wait = CHECK_EVERY_S
                if next_ask:
                    wait = min(wait, max(0.1, next_ask - time.monotonic()))
                if self._wake.wait(wait):
                    self._wake.clear()
                    next_ask = 0.0 if not self.mismatch else next_ask
        finally:
            if transport is not None:
                transport.close()

    def _confirm(self, transport: HttpTransport, backoff: Backoff) -> float:
        """Ask for the key after an offline unlock: the wait before the next try (0: done)."""
        try:
            key = transport.fetch_store_key(self.settings.device.device_id)
        except CredentialsRefusedError:
            self.on_contact(False)
            return backoff.next_delay(min(REFUSED_RETRY_S, self.settings.sync.backoff_max_s))
        except TransportError:
            return backoff.next_delay()
        if key != self._key:
            self.mismatch = True
            self._wipe("the aggregator holds another key for this device (deleted and "
                       "registered again): the store opened offline is moved aside at the next "
                       "restart")
            return 0.0
        with self._lock:
            self.confirmed_at = self._now()
        self._seal()
        _LOGGER.info("store key confirmed by the aggregator after an offline unlock")
        return 0.0

    def check_window(self) -> None:
        """Delete the wrapped key once its window has ended (a restart then waits)."""
        header = self._header
        until = self._until(header)
        if until is not None and self._now() > until:
            self._wipe(f"its window ended at {until:%Y-%m-%d %H:%M} UTC ({self.days:g} days "
                       "after the last answer of the aggregator)")

    # -- what is said about it -------------------------------------------------------------------
    def _left_text(self) -> str:
        until = self._until(self._header)
        if until is None:
            return "no wrapped key on the card"
        left = (until - self._now()).total_seconds() / 86400
        return f"{max(0.0, left):.1f} days left (until {until:%Y-%m-%d %H:%M} UTC)"

    def mode(self) -> str:
        if self.store.locked:
            return "locked"
        if not self.store.encrypted:
            return "unencrypted"
        return "online" if self.confirmed_at is not None else "offline"

    def describe(self) -> dict[str, Any]:
        """The mode (``locked``, ``online``, ``offline``, ``unencrypted``), how and when the
        store was unlocked, the wrapped key's window, and one line for a person."""
        mode = self.mode()
        header = self._header
        until = self._until(header)
        left = None if until is None else max(
            0.0, round((until - self._now()).total_seconds() / 86400, 2))
        if mode == "locked":
            message = f"locked: {self.store.lock_reason or 'no key'}"
        elif mode == "unencrypted":
            message = "not encrypted"
        elif mode == "offline":
            message = (f"unlocked OFFLINE with {KIND_TEXT.get(self.unlocked_by or '', '?')} at "
                       f"{self.unlocked_at:%Y-%m-%d %H:%M} UTC: {self._left_text()}; the "
                       "aggregator has not confirmed the key yet")
        else:
            message = "unlocked online (the aggregator's key)"
            if self.unlocked_by in KIND_TEXT and self.unlocked_at is not None:
                message += (f"; restarted offline: unlocked with {KIND_TEXT[self.unlocked_by]} "
                            f"at {self.unlocked_at:%Y-%m-%d %H:%M} UTC")
            message += ("; offline unlock: " + self._left_text() if self.kind is not None
                        else "; " + self.policy_line())
        if self.note and mode != "unencrypted":
            message += f"; {self.note}"
        return {
            "mode": mode, "unlocked_by": self.unlocked_by,
            "unlocked_at": _iso(self.unlocked_at), "confirmed_at": _iso(self.confirmed_at),
            "offline_unlock": self.kind, "offline_unlock_days": self.days,
            "board_key": self._board_key is not None,
            "wrapped": None if header is None else header.kind,
            "wrapped_until": _iso(until), "days_left": left,
            "message": message,
        }


def unlock_store(settings: ApplianceSettings, store: Store, stop: threading.Event,
                 tick: Callable[[], None] | None = None,
                 clock: DeviceClock | None = None) -> bool:
    """:meth:`KeyKeeper.unlock` with the settings' board key (for callers that keep no
    keeper: the key is then neither confirmed nor refreshed while running)."""
    return KeyKeeper(settings, store, clock).unlock(stop, tick)


def _wait(stop: threading.Event, seconds: float, tick: Callable[[], None] | None) -> None:
    end = time.monotonic() + seconds
    while not stop.is_set():
        if tick is not None:
            tick()
        left = end - time.monotonic()
        if left <= 0:
            return
        stop.wait(min(1.0, left))

