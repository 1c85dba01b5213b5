"""Logging to stdout in a journald-friendly format (no timestamps when journald adds them),
library loggers kept quiet, and :class:`LogThrottle` for messages that would repeat."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

# Libraries that log every request or connection at INFO (httpx: one line per HTTP request,
# 21 of 83 lines of a `make run`). Their warnings and errors still show.
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "paho", "multipart", "PIL", "asyncio")


def setup_logging(level: str = "INFO") -> None:
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journald else (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level, format=fmt, stream=sys.stdout, force=True)
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG  # DEBUG: everything
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)


class LogThrottle:
    """At most one log line per key every ``every_s`` seconds; the lines held back in between
    go to DEBUG and are counted in the next line that is logged ("... (12 more since ...)")."""

    def __init__(self, every_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, held back since)
        self._lock = threading.Lock()

    def log(self, logger: logging.Logger, level: int, key: str, msg: str,
            *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` was logged less than ``every_s`` ago
        (then at DEBUG). Returns whether it was logged at ``level``."""
        with self._lock:
            now = self._clock()
            last = self._last.get(key)
            if last is not None and now - last[0] < self.every_s:
                self._last[key] = (last[0], last[1] + 1)
                held = True
            else:
                self._last[key] = (now, 0)
                held = False
                if len(self._last) > 1000:  # keys are kinds of messages, but stay bounded
                    self._last = {key: self._last[key]}
        if held:
            logger.debug(msg, *args)
            return False
        if last is not None and last[1]:
            msg += " (%d more like it in the last %.0f s)"
            args = (*args, last[1], now - last[0])
        logger.log(level, msg, *args)
        return True

    def reset(self, key: str) -> None:
        """The condition is over: the next line for ``key`` is logged at once."""
        with self._lock:
            self._last.pop(key, None)
