"""The store key kept on the card for an offline unlock (docs/PRIVACY.md, "Offline unlock").

One file, ``<data_dir>/store-key.wrapped`` (JSON, mode 0600), of one of two kinds:

- ``board-key``: the store key sealed with AES-256-GCM (the ``cryptography`` package) under a
  key derived (HKDF-SHA256, bound to the device id) from the board's OTP key
  (appliance/board_key.py). The header (kind, device id, last contact) is the AEAD's associated
  data, so it cannot be changed without the board key either. Only that board opens it: a copy
  of the card is noise without it.
- ``card-key``: the store key itself, for boards without an OTP key when the school chose
  ``store.offline_unlock_days > 0`` at flash time. Anyone holding a copy of the card taken
  while this file is on it can open the store: the window is enforced by the device (which
  deletes the file when the window ends or the aggregator refuses it), not by cryptography.
  That is why the default is 0 (PRIVACY.md says it in the threat model).

``last_contact`` is the time of the last answer of the aggregator; the device uses the file
for at most the policy's days after it (appliance/sync/store_key.py). Deleting the file
overwrites it with zeros first.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.store import KEY_BYTES, _fsync_dir, _shred

_LOGGER = logging.getLogger(__name__)

WRAPPED_FILE = "store-key.wrapped"
FORMAT = 1
NONCE_BYTES = 12
HKDF_SALT = b"classroom-attendance store key"
Kind = Literal["board-key", "card-key"]
KINDS: tuple[str, ...] = ("board-key", "card-key")


class WrappedKeyError(Exception):
    """The wrapped key cannot be used (the message says why, without any key material)."""


@dataclass(frozen=True, slots=True)
class WrappedHeader:
    """What the file says about itself (readable without the board key)."""

    kind: Kind
    device_id: str
    last_contact: datetime


def _wrapping_key(board_key: bytes, device_id: str) -> bytes:
    if len(board_key) != KEY_BYTES:
        raise ValueError(f"a board key is {KEY_BYTES} bytes, not {len(board_key)}")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT,
                info=b"store-key-wrap v1 " + device_id.encode()).derive(board_key)


def _aad(header: dict[str, object]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


class WrappedKeyFile:
    """``<data_dir>/store-key.wrapped`` of one device."""

    def __init__(self, data_dir: Path, device_id: str) -> None:
        self.path = Path(data_dir) / WRAPPED_FILE
        self.device_id = device_id

    def exists(self) -> bool:
        return self.path.exists()

    def _load(self) -> tuple[dict[str, object], dict[str, object]]:
        try:
            doc = json.loads(self.path.read_text())
            header = {k: doc[k] for k in ("format", "kind", "device_id", "last_contact")}
        except FileNotFoundError:
            raise WrappedKeyError("no wrapped key on the card") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WrappedKeyError(f"the wrapped key is unreadable ({type(err).__name__})") \
                from None
        if header["format"] != FORMAT or header["kind"] not in KINDS:
            raise WrappedKeyError("the wrapped key has an unknown format")
        return header, doc

    def header(self) -> WrappedHeader:
        """The file's header (no key is unwrapped); :class:`WrappedKeyError` without one."""
        header, _doc = self._load()
        try:
            last = datetime.fromisoformat(str(header["last_contact"]))
        except ValueError:
            raise WrappedKeyError("the wrapped key's last contact is unreadable") from None
        if last.tzinfo is None:
            raise WrappedKeyError("the wrapped key's last contact has no time zone")
        return WrappedHeader(header["kind"], str(header["device_id"]),  # type: ignore[arg-type]
                             last.astimezone(UTC))

    def seal(self, key: bytes, kind: Kind, last_contact: datetime,
             board_key: bytes | None = None) -> None:
        """Write ``key`` (atomically: a new file renamed over the old one, fsynced)."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"a store key is {KEY_BYTES} bytes, not {len(key)}")
        header: dict[str, object] = {
            "format": FORMAT, "kind": kind, "device_id": self.device_id,
            "last_contact": last_contact.astimezone(UTC).isoformat()}
        doc = dict(header)
        if kind == "board-key":
            if board_key is None:
                raise ValueError("a board-key seal needs the board key")
            nonce = os.urandom(NONCE_BYTES)
            sealed = AESGCM(_wrapping_key(board_key, self.device_id)).encrypt(
                nonce, key, _aad(header))
            doc["nonce"] = base64.b64encode(nonce).decode()
            doc["ciphertext"] = base64.b64encode(sealed).decode()
        else:
            doc["key"] = base64.b64encode(key).decode()
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(doc).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def open(self, board_key: bytes | None) -> tuple[bytes, WrappedHeader]:
        """The store key and the header; :class:`WrappedKeyError` when it cannot be had: no
        file, another device's, a board-key file without the board key or with another
        board's (the AEAD tag does not verify), a header that was changed."""
        header, doc = self._load()
        info = self.header()
        if info.device_id != self.device_id:
            raise WrappedKeyError(f"the wrapped key is device {info.device_id!r}'s")
        try:
            if info.kind == "card-key":
                key = base64.b64decode(str(doc["key"]), validate=True)
            else:
                if board_key is None:
                    raise WrappedKeyError("the wrapped key is sealed with a board key and this "
                                          "board has none")
                nonce = base64.b64decode(str(doc["nonce"]), validate=True)
                sealed = base64.b64decode(str(doc["ciphertext"]), validate=True)
                key = AESGCM(_wrapping_key(board_key, self.device_id)).decrypt(
                    nonce, sealed, _aad(header))
        except InvalidTag:
            raise WrappedKeyError("the wrapped key does not open with this board's key "
                                  "(another board's card, or the file was changed)") from None
        except (KeyError, ValueError, TypeError) as err:
            raise WrappedKeyError(f"the wrapped key is unreadable ({type(err).__name__})") \
                from None
        if len(key) != KEY_BYTES:
            raise WrappedKeyError("the wrapped key has the wrong length")
        return key, info

    def wipe(self, why: str) -> bool:
        """Overwrite the file with zeros and delete it; True if there was one."""
        if not self.path.exists():
            return False
        _shred(self.path)
        _shred(self.path.with_name(self.path.name + ".tmp"))
        _fsync_dir(self.path.parent)
        _LOGGER.warning("store: the wrapped store key was deleted from the card: %s", why)
        return True
