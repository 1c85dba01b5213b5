"""Offline unlock (issue 26 item 1): the store key kept on the card, sealed with the board key.

With the REAL aggregator (subprocess) and a real board-key file in rpi-otp-private-key's format:

- unlocked online, the device keeps the store key sealed on the card (no byte of the key on it);
  restarted while the aggregator is down it unlocks OFFLINE (mode, days left), and once the
  aggregator answers the key is confirmed (mode online) and the wrapped key's contact renewed;
- a copy of the card on another board (another key, or none) stays locked and reads as noise;
  a header moved forward (a longer window) does not open either;
- past the window (store.board_unlock_days after the last answer) the device stays locked and
  deletes the wrapped key; with policy 0 and no board key nothing is kept on the card;
- without a board key, store.offline_unlock_days > 0 keeps the key on the card (the risk
  PRIVACY.md states: a copy opens while it is there);
- the device's key rotated at the aggregator (a theft): the first answer (a refusal) deletes
  the wrapped key, to the running device's sync agent and to a restarting one alike.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from appliance.clock import DeviceClock
from appliance.config import ClockConfig
from appliance.store import SQLITE_HEADER, Store
from appliance.sync import SyncAgent
from appliance.sync.store_key import KeyKeeper, open_store
from appliance.wrapped_key import WRAPPED_FILE
from tests.support.harness import (
    DEVICE,
    Aggregator,
    appliance_settings,
    device_store_key,
    make_records,
    wait_until,
)


def _board(path: Path) -> Path:
    path.write_text(secrets.token_hex(32) + "\n")  # as `rpi-otp-private-key` prints it
    return path


def _settings(data: Path, agg: Aggregator, api_key: str, **store: Any) -> Any:
    settings = appliance_settings(data, aggregator_url=agg.base_url, api_key=api_key)
    return settings.model_copy(update={"store": settings.store.model_copy(update=store)})


def _later(days: float) -> DeviceClock:
    """A trusted clock ``days`` ahead (NTP synchronised on a later day)."""
    return DeviceClock(ClockConfig(), wall=lambda: datetime.now(UTC) + timedelta(days=days),
                       ntp=lambda: True)


def _start(settings: Any, clock: DeviceClock | None = None) -> tuple[Store, KeyKeeper, bool]:
    """A restart: a locked store and its keeper; whether it unlocked at the first attempt
    (the aggregator's key; or, when it does not answer, the wrapped key or not)."""
    store = open_store(settings)
    keeper = KeyKeeper(settings, store, clock)
    stop = threading.Event()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(keeper.unlock(stop)))
    waiter.start()
    try:
        wait_until(lambda: bool(result) or any(
            why in (store.lock_reason or "") for why in ("does not answer", "refuses")), 30,
            "the first attempt")
    finally:
        stop.set()
        waiter.join(10)
    return store, keeper, bool(result and result[0])


def _noise(card: Path, key: bytes, needles: list[bytes]) -> None:
    for path in card.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not data.startswith(SQLITE_HEADER), path
            for needle in [key, key.hex().encode(), *needles]:
                assert needle not in data, (path, needle[:20])


def test_board_key_unlocks_offline_and_only_on_its_board(
        aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path) -> None:
    agg, keys = aggregator
    data = tmp_path / "dev"
    settings = _settings(data, agg, keys[DEVICE], board_key_file=_board(tmp_path / "otp"))
    records = make_records(5)
    agg.start()
    store, keeper, unlocked = _start(settings)
    assert unlocked and keeper.describe()["mode"] == "online"
    store.add_records(records)
    info = keeper.describe()
    assert info["wrapped"] == "board-key" and 6.9 < info["days_left"] <= 7, info
    store.close()
    key = device_store_key(agg, keys[DEVICE])
    agg.stop()
    wrapped = json.loads((data / WRAPPED_FILE).read_text())
    assert wrapped["kind"] == "board-key" and "key" not in wrapped
    _noise(data, key, [str(records[0].key).encode()])

    # a copy of the card on another board, and on a board without a key: locked, noise
    for other in (_board(tmp_path / "other-otp"), None):
        card = tmp_path / f"card-{other is None}"
        shutil.copytree(data, card)
        copy = _settings(card, agg, keys[DEVICE], board_key_file=other, board_key="off"
                         if other is None else "otp")
        copy_store, _, unlocked = _start(copy)
        assert not unlocked and copy_store.locked
        assert ("another board" in copy_store.lock_reason if other else
                "no offline unlock" in copy_store.lock_reason), copy_store.lock_reason
        copy_store.close()
    # a header changed to look more recent (a longer window) does not open
    card = tmp_path / "card-tampered"
    shutil.copytree(data, card)
    doc = json.loads((card / WRAPPED_FILE).read_text())
    doc["last_contact"] = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    (card / WRAPPED_FILE).write_text(json.dumps(doc))
    tampered, _, unlocked = _start(_settings(card, agg, keys[DEVICE],
                                             board_key_file=tmp_path / "otp"))
    assert not unlocked and "does not open" in (tampered.lock_reason or "")
    tampered.close()

    # the device itself, restarted while the aggregator is down: unlocked offline
    store, keeper, unlocked = _start(settings)
    assert unlocked and not store.locked and store.outbox_depth() == 5
    info = keeper.describe()
    assert info["mode"] == "offline" and info["unlocked_by"] == "board-key", info
    assert "unlocked OFFLINE with the board key" in info["message"] and "days left" in \
        info["message"]
    before = json.loads((data / WRAPPED_FILE).read_text())["last_contact"]
    # the aggregator returns: the keeper confirms the key, the contact is renewed
    agg.start()
    keeper.start()
    try:
        wait_until(lambda: keeper.describe()["mode"] == "online", 30, "the confirmation")
    finally:
        keeper.stop()
    assert json.loads((data / WRAPPED_FILE).read_text())["last_contact"] > before
    assert "restarted offline: unlocked with the board key" in keeper.describe()["message"]
    store.close()

    # past the window: locked, and the wrapped key deleted
    agg.stop()
    store, keeper, unlocked = _start(settings, _later(7.1))
    assert not unlocked and "window ended" in (store.lock_reason or ""), store.lock_reason
    assert not (data / WRAPPED_FILE).exists()
    store.close()


def test_without_a_board_key_the_policy_decides(
        aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path) -> None:
    agg, keys = aggregator
    agg.start()
    # policy 0 (the default): nothing on the card, a restart offline waits
    data = tmp_path / "dev0"
    settings = _settings(data, agg, keys[DEVICE], board_key="off")
    store, keeper, unlocked = _start(settings)
    assert unlocked and not (data / WRAPPED_FILE).exists()
    assert "no offline unlock (no board key, and store.offline_unlock_days = 0)" in \
        keeper.describe()["message"]
    store.close()
    agg.stop()
    store, _, unlocked = _start(settings)
    assert not unlocked and "no offline unlock" in (store.lock_reason or "")
    store.close()

    # offline_unlock_days = 2: the key is on the card (in the clear: the stated risk)
    agg.start()
    data = tmp_path / "dev2"
    settings = _settings(data, agg, keys[DEVICE], board_key="off", offline_unlock_days=2)
    store, _, unlocked = _start(settings)
    assert unlocked
    store.close()
    agg.stop()
    assert json.loads((data / WRAPPED_FILE).read_text())["kind"] == "card-key"
    store, keeper, unlocked = _start(settings, _later(1.5))
    assert unlocked and keeper.describe()["mode"] == "offline"
    assert 0.4 < keeper.describe()["days_left"] < 0.6
    # the window ends while it runs: the wrapped key goes, the device keeps its key in memory
    keeper.clock = _later(2.1)
    keeper.check_window()
    assert not (data / WRAPPED_FILE).exists() and not store.locked
    assert "window ended" in keeper.describe()["message"]
    store.close()
    store, _, unlocked = _start(settings, _later(2.1))
    assert not unlocked
    store.close()


def test_a_rotated_key_deletes_the_wrapped_key_at_first_contact(
        aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path) -> None:
    agg, keys = aggregator
    data = tmp_path / "dev"
    settings = _settings(data, agg, keys[DEVICE], board_key_file=_board(tmp_path / "otp"))
    agg.start()
    store, keeper, unlocked = _start(settings)
    assert unlocked and (data / WRAPPED_FILE).exists()
    keeper.start()
    agent = SyncAgent(settings, store, on_contact=keeper.on_contact)
    agent.start()
    try:
        wait_until(lambda: agent.stats.heartbeats >= 1, 30, "a heartbeat")
        with httpx.Client(base_url=agg.base_url, timeout=10,
                          headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
            assert admin.post(f"/api/v1/devices/{DEVICE}/rotate-key").status_code == 200
        agent.request_roster_refresh()  # the next contact
        wait_until(lambda: not (data / WRAPPED_FILE).exists(), 30, "the wrapped key deleted")
    finally:
        agent.stop()
        keeper.stop()
    assert "the aggregator refuses this device" in keeper.describe()["message"]
    assert not store.locked  # it keeps running on the key in memory
    store.close()
    # restarted: refused, no wrapped key, locked (and with the aggregator down: locked too)
    store, _, unlocked = _start(settings)
    assert not unlocked and "refuses" in (store.lock_reason or "")
    store.close()
    agg.stop()
    store, _, unlocked = _start(settings)
    assert not unlocked
    store.close()

    # a restart that meets the refusal first deletes the wrapped key before anything opens
    data2 = tmp_path / "dev2"
    agg.start()
    new_key = _rotated_key(agg, keys)
    settings2 = _settings(data2, agg, new_key, board_key_file=tmp_path / "otp")
    store, _, unlocked = _start(settings2)
    assert unlocked and (data2 / WRAPPED_FILE).exists()
    store.close()
    _rotated_key(agg, keys)
    store, _, unlocked = _start(settings2)
    assert not unlocked and not (data2 / WRAPPED_FILE).exists()
    store.close()


def _rotated_key(agg: Aggregator, keys: dict[str, str]) -> str:
    with httpx.Client(base_url=agg.base_url, timeout=10,
                      headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
        answer = admin.post(f"/api/v1/devices/{DEVICE}/rotate-key")
        assert answer.status_code == 200
        return str(answer.json()["api_key"])
