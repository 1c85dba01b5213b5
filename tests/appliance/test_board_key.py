"""The board key (appliance/board_key.py): the Raspberry Pi's customer OTP private key.

- a key file in rpi-otp-private-key's format (what the technician's `rpi-otp-private-key`
  prints: 64 hex digits and a newline; `-b`: 32 raw bytes) reads as the key; an OTP never
  programmed (all zeros) and a missing file are "no key"; anything else is an error;
- the firmware mailbox request is the one `vcmailbox 0x00030081 40 40 0 8 0 0 0 0 0 0 0 0`
  sends, and the key is read from the answer in the row order rpi-otp-private-key prints;
  a refused request is an error; on a machine without /dev/vcio, or on a file that is not the
  mailbox (the ioctl fails with ENOTTY), the board has no key.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path

import pytest

from appliance.board_key import (
    IOCTL_MBOX_PROPERTY,
    RESPONSE_ERROR,
    RESPONSE_OK,
    BoardKeyError,
    FileOtpKey,
    MailboxOtpKey,
    board_key_source,
    mailbox_request,
    parse_mailbox_answer,
    read_board_key,
)


def test_a_key_file_in_rpi_otp_private_key_format(tmp_path: Path) -> None:
    hex_key = secrets.token_hex(32)  # what `openssl rand -hex 32` makes for `-w`
    path = tmp_path / "otp.key"
    path.write_text(hex_key + "\n")  # what `rpi-otp-private-key` prints
    assert FileOtpKey(path).read() == bytes.fromhex(hex_key)
    path.write_bytes(bytes.fromhex(hex_key))  # `rpi-otp-private-key -b`
    assert FileOtpKey(path).read() == bytes.fromhex(hex_key)
    path.write_text("0" * 64 + "\n")  # an OTP never programmed reads as zeros
    assert FileOtpKey(path).read() is None
    key, line = read_board_key(FileOtpKey(path))
    assert key is None and "not programmed" in line
    for bad in (hex_key[:62], hex_key + "00", "zz" + hex_key[2:], ""):
        path.write_text(bad + "\n")
        with pytest.raises(BoardKeyError, match="64 hex digits"):
            FileOtpKey(path).read()
    assert FileOtpKey(tmp_path / "missing").read() is None
    assert isinstance(board_key_source("otp", path), FileOtpKey)
    assert isinstance(board_key_source("otp", None), MailboxOtpKey)
    assert board_key_source("off", None) is None


def test_the_firmware_mailbox_request_and_answer() -> None:
    request = mailbox_request()
    words = struct.unpack("<16I", request)
    # buffer size, request, tag, value size 40, request length 40, row 0, 8 rows, 8 words, end
    assert words == (64, 0, 0x00030081, 40, 40, 0, 8, *([0] * 8), 0)
    assert (0xC0086400 if struct.calcsize("P") == 8 else 0xC0046400) == IOCTL_MBOX_PROPERTY

    rows = [0x01234567, 0x89ABCDEF, 0xDEADBEEF, 0x00000001, 0x10203040, 0x55AA55AA,
            0xFFFFFFFF, 0x0BADF00D]
    answer = struct.pack("<16I", 64, RESPONSE_OK, 0x00030081, 40, 0x80000028, 0, 8, *rows, 0)
    # rpi-otp-private-key prints the rows as 8 hex digits each, row 0 first
    printed = "".join(f"{r:08x}" for r in rows)
    assert parse_mailbox_answer(answer) == bytes.fromhex(printed)
    zeros = struct.pack("<16I", 64, RESPONSE_OK, 0x00030081, 40, 0x80000028, 0, 8, *[0] * 8, 0)
    assert parse_mailbox_answer(zeros) is None
    refused = struct.pack("<16I", 64, RESPONSE_ERROR, 0x00030081, 40, 40, 0, 8, *[0] * 8, 0)
    with pytest.raises(BoardKeyError, match="refused"):
        parse_mailbox_answer(refused)
    with pytest.raises(BoardKeyError, match="64"):
        parse_mailbox_answer(answer[:32])


def test_a_machine_without_the_mailbox_has_no_board_key(tmp_path: Path) -> None:
    assert MailboxOtpKey(tmp_path / "vcio").read() is None  # not a Raspberry Pi
    not_a_mailbox = tmp_path / "file"
    not_a_mailbox.write_bytes(b"\0" * 64)
    assert MailboxOtpKey(not_a_mailbox).read() is None  # the ioctl: ENOTTY
    if os.path.exists("/dev/vcio"):  # on a Pi: the real call answers (a key or none)
        MailboxOtpKey().read()
    else:
        key, line = read_board_key(MailboxOtpKey())
        assert key is None and "/dev/vcio" in line
