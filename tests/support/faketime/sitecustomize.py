"""Loaded (PYTHONPATH) only by the processes a test runs under libfaketime with
FAKETIME_DONT_FAKE_MONOTONIC=1 (tests/appliance/sync/test_offline_restart_e2e.py).

libfaketime 0.9.10 (Debian bookworm) fails clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) with
EINVAL when the monotonic clock is not faked, and Python's time.sleep() uses exactly that call;
every other wait (threading, select, asyncio) works. So time.sleep becomes a wait on an event
that is never set: the same duration on the real monotonic clock.
"""

from __future__ import annotations

import os
import threading
import time

if os.environ.get("FAKETIME") and os.environ.get("FAKETIME_DONT_FAKE_MONOTONIC") == "1":
    _never = threading.Event()

    def _sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        _never.wait(seconds)

    time.sleep = _sleep
