"""``python -m appliance.sync [--config FILE]``: the sync agent alone, on the device's store.

For tests, benchmarks and troubleshooting (``appliance run`` starts the same agent with the
pipeline). Stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from appliance import config as appliance_config
from appliance.logging_setup import setup_logging
from cloud_sync.settings import ConfigError

_LOGGER = logging.getLogger("appliance.sync")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.sync")
    parser.add_argument("--config", "-c", type=Path, default=None, help="appliance TOML")
    args = parser.parse_args(argv)
    try:
        settings = appliance_config.load(args.config)
    except ConfigError as err:
        print(err)
        return 2
    setup_logging(settings.log_level)
    from appliance.sync import SyncAgent
    from appliance.sync.store_key import open_store, unlock_store

    settings.paths.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    agent = SyncAgent(settings, store)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    if not unlock_store(settings, store, done):
        store.close()
        return 0
    agent.start()
    _LOGGER.info("sync agent running (outbox depth %d)", store.outbox_depth())
    done.wait()
    agent.stop()
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
