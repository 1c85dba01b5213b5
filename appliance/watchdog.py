"""systemd notification (sd_notify) with the standard library: READY=1, WATCHDOG=1, STOPPING=1.

Without ``NOTIFY_SOCKET`` (not started by systemd with Type=notify) every call is a no-op.
``WATCHDOG_USEC`` (set by systemd from WatchdogSec=) gives the ping interval: half of it.
"""

from __future__ import annotations

import logging
import os
import socket

_LOGGER = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0


class Notifier:
    """Sends datagrams to systemd's notification socket (path or abstract ``@name``)."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, state: str) -> bool:
        """Send one notification; False (logged) when there is no socket or sending fails."""
        if self._sock is None or not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            self._sock.sendto(state.encode(), addr)
        except OSError as err:
            _LOGGER.warning("sd_notify %s failed: %s", state.split("=")[0], err)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def ping(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s(default: float = DEFAULT_INTERVAL_S) -> float:
    """Half of systemd's WatchdogSec (from WATCHDOG_USEC), else ``default``."""
    raw = os.environ.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return default
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return default
    return max(0.5, usec / 2e6) if usec > 0 else default
