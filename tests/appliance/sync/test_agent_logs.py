"""The sync agent's log against the REAL aggregator: a refused key or an unreachable aggregator
is one line that says what to do, not a line per retry; library loggers stay quiet."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from appliance.logging_setup import QUIET_LOGGERS, setup_logging
from tests.support.harness import (
    DEVICE,
    Aggregator,
    appliance_settings,
    fill_store,
    make_records,
    wait_until,
)

pytestmark = pytest.mark.slow


def run_agent(tmp_path: Path, agg: Aggregator, key: str, *, failures: int,
              then_s: float) -> None:
    """A real SyncAgent with 5 records to send, until ``failures`` uploads failed, then a
    little longer (the retries that must not be logged)."""
    from appliance.store import Store
    from appliance.sync import SyncAgent

    store = Store(tmp_path / "dev" / "appliance.db")
    fill_store(store, make_records(5))
    agent = SyncAgent(appliance_settings(tmp_path / "dev", aggregator_url=agg.base_url,
                                         api_key=key), store)
    agent.start()
    try:
        wait_until(lambda: agent.stats.failures >= failures, 30, f"{failures} failed uploads")
        time.sleep(then_s)
    finally:
        agent.stop()
        store.close()


def agent_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name.startswith("appliance.sync") and r.levelno >= logging.INFO]


def test_refused_key_is_one_warning_that_says_what_to_do(
        aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    agg, _keys = aggregator
    agg.start()
    caplog.set_level(logging.DEBUG)
    run_agent(tmp_path, agg, "dk_" + "0" * 43, failures=3, then_s=2)
    lines = [r for r in agent_lines(caplog) if "sync over HTTP" not in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING
    assert "HTTP 401" in lines[0].getMessage() and "sync.api_key" in lines[0].getMessage()
    assert DEVICE in lines[0].getMessage()
    assert "using the cached one" not in caplog.text


def test_unreachable_aggregator_without_a_cached_schedule(
        aggregator: tuple[Aggregator, dict[str, str]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    agg, keys = aggregator  # not started: nobody listens
    caplog.set_level(logging.DEBUG)
    run_agent(tmp_path, agg, keys[DEVICE], failures=5, then_s=1)
    text = [r.getMessage() for r in agent_lines(caplog)]
    schedule = [t for t in text if t.startswith("schedule pull failed")]
    assert len(schedule) == 1, text
    assert "no schedule cached yet" in schedule[0] and "every face is unknown" in schedule[0]
    assert "using the cached one" not in caplog.text
    assert sum(t.startswith("upload failed") for t in text) == 1, text


def test_library_loggers_are_quiet_at_info() -> None:
    root = logging.getLogger()
    saved = root.level, list(root.handlers), {n: logging.getLogger(n).level
                                              for n in QUIET_LOGGERS}
    try:
        setup_logging("INFO")
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("appliance.sync").isEnabledFor(logging.INFO)
        setup_logging("DEBUG")  # asked for everything: everything
        assert logging.getLogger("httpx").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
