"""The board's secret: the Raspberry Pi 4/5 customer one-time-programmable (OTP) private key.

A Raspberry Pi 4 or 5 has 256 bits of OTP ("customer private key") that the technician
programs once, at flash time, with ``rpi-otp-private-key -w $(openssl rand -hex 32)``
(docs/OPERATIONS.md). They live in the SoC, not on the SD card, and read back through the
VideoCore firmware mailbox (``/dev/vcio``, property tag ``0x00030081``: what ``vcmailbox`` and
``rpi-otp-private-key`` use). The store key is wrapped with a key derived from it
(appliance/wrapped_key.py), so only that board unwraps the copy kept on the card.

One small interface, :class:`BoardKeySource` (``read()``: the 32 bytes, or None when the board
has none), two implementations:

- :class:`MailboxOtpKey`: the firmware mailbox ioctl (the real one, on a Pi);
- :class:`FileOtpKey`: a file in ``rpi-otp-private-key``'s output format (64 hex digits, or the
  32 raw bytes of ``-b``): for tests and for boards whose secret lives off the card.

A key of all zeros is an OTP that was never programmed: no key. Boards without a mailbox (not a
Pi, qemu) have none: :func:`board_key_source` says so and the store policy for boards without a
key applies (``store.offline_unlock_days``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
from pathlib import Path
from typing import Protocol

_LOGGER = logging.getLogger(__name__)

KEY_BYTES = 32
VCIO_PATH = Path("/dev/vcio")
# the firmware's property interface (include/soc/bcm2835/raspberrypi-firmware.h)
TAG_GET_CUSTOMER_PRIVATE_KEY = 0x00030081
REQUEST = 0x00000000
RESPONSE_OK = 0x80000000
RESPONSE_ERROR = 0x80000001
ROWS = 8  # 8 rows of 32 bits
# IOCTL_MBOX_PROPERTY = _IOWR(100, 0, char *): read-write, a pointer argument
_IOC_WRITE, _IOC_READ = 1, 2
IOCTL_MBOX_PROPERTY = ((_IOC_READ | _IOC_WRITE) << 30) | (struct.calcsize("P") << 16) | \
    (100 << 8) | 0
_HEX = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


class BoardKeyError(RuntimeError):
    """The board key source exists but could not be read (the message says why)."""


class BoardKeySource(Protocol):
    """Where the board's secret comes from."""

    description: str

    def read(self) -> bytes | None:
        """The board's 32-byte key; None when the board has none (not programmed, not a Pi).
        Raises :class:`BoardKeyError` when it should have one but the read failed."""
        ...


def parse_key_text(data: bytes) -> bytes | None:
    """A key as ``rpi-otp-private-key`` prints it (64 hex digits; with ``-b``: 32 raw bytes).
    All zeros (never programmed): None. Anything else: :class:`BoardKeyError`."""
    if len(data) == KEY_BYTES:
        key = bytes(data)
    else:
        text = data.decode("ascii", errors="replace").strip()
        if not _HEX.match(text):
            raise BoardKeyError("not a board key: expected 64 hex digits (rpi-otp-private-key's "
                                f"output) or 32 raw bytes, got {len(data)} bytes")
        key = bytes.fromhex(text.removeprefix("0x"))
    return None if key == bytes(KEY_BYTES) else key


def mailbox_request() -> bytearray:
    """The property-interface buffer asking for the customer private key (what
    ``vcmailbox 0x00030081 40 40 0 8 0 0 0 0 0 0 0 0`` sends): buffer size, request code, the
    tag, its value buffer size (40), request length (40), row offset 0, row count 8, 8 words
    for the answer, the end tag."""
    words = [16 * 4, REQUEST, TAG_GET_CUSTOMER_PRIVATE_KEY, 40, 40, 0, ROWS, *([0] * ROWS), 0]
    return bytearray(struct.pack(f"<{len(words)}I", *words))


def parse_mailbox_answer(buf: bytes) -> bytes | None:
    """The key in the firmware's answer to :func:`mailbox_request` (rows as
    ``rpi-otp-private-key`` prints them: each 32-bit row big-endian, row 0 first); None when
    all zeros. :class:`BoardKeyError` when the firmware refused."""
    words = struct.unpack(f"<{len(buf) // 4}I", buf[: len(buf) // 4 * 4])
    if len(words) < 16:
        raise BoardKeyError(f"mailbox answer of {len(buf)} bytes, expected 64")
    if words[1] != RESPONSE_OK:
        raise BoardKeyError(f"the firmware refused the request (code {words[1]:#010x}): "
                            "firmware too old for the customer private key?")
    if words[2] != TAG_GET_CUSTOMER_PRIVATE_KEY or not words[4] & 0x80000000:
        raise BoardKeyError("the firmware did not answer the private-key tag")
    key = b"".join(struct.pack(">I", w) for w in words[7:7 + ROWS])
    return None if key == bytes(KEY_BYTES) else key


class MailboxOtpKey:
    """The Raspberry Pi's customer OTP private key through the firmware mailbox (``/dev/vcio``;
    the service user must be in the ``video`` group, as for the camera)."""

    def __init__(self, device: Path = VCIO_PATH) -> None:
        self.device = Path(device)
        self.description = f"Raspberry Pi OTP private key ({self.device})"

    def read(self) -> bytes | None:
        try:
            fd = os.open(self.device, os.O_RDONLY)
        except FileNotFoundError:
            return None  # not a Raspberry Pi (or no firmware driver): no board key
        except OSError as err:
            raise BoardKeyError(f"cannot open {self.device}: {err.strerror} (is the service "
                                "user in the 'video' group?)") from err
        try:
            buf = mailbox_request()
            try:
                fcntl.ioctl(fd, IOCTL_MBOX_PROPERTY, buf, True)
            except OSError as err:
                if err.errno in (errno.ENOTTY, errno.EINVAL):
                    return None  # not the firmware's mailbox
                raise BoardKeyError(f"mailbox call on {self.device} failed: "
                                    f"{err.strerror}") from err
            return parse_mailbox_answer(bytes(buf))
        finally:
            os.close(fd)


class FileOtpKey:
    """A board key kept in a file, in ``rpi-otp-private-key``'s format (never on the SD card
    itself: a key beside the wrapped key protects nothing)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.description = f"board key file {self.path}"

    def read(self) -> bytes | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise BoardKeyError(f"cannot read {self.path}: {err.strerror}") from err
        return parse_key_text(data)


def board_key_source(mode: str, key_file: Path | None) -> BoardKeySource | None:
    """The source ``store.board_key`` / ``store.board_key_file`` ask for (None: 'off')."""
    if key_file is not None:
        return FileOtpKey(key_file)
    if mode == "otp":
        return MailboxOtpKey()
    return None


def read_board_key(source: BoardKeySource | None) -> tuple[bytes | None, str]:
    """The board key and a line saying where it came from or why there is none (for the log,
    /health and the status page; never the key)."""
    if source is None:
        return None, "no board key (store.board_key = 'off')"
    try:
        key = source.read()
    except BoardKeyError as err:
        _LOGGER.warning("board key: %s", err)
        return None, f"no board key: {err}"
    if key is None:
        return None, f"no board key: the {source.description} is not there or not programmed"
    return key, source.description
