"""One line about the appliance's health on the console, once per boot.

A technician with a screen (or a serial cable) on a Pi sees, without logging in, whether the
card was provisioned (classroom-firstboot.service prints its result there too) and whether the
appliance came up healthy; image-test's raspi4b boot, which has no network, reads the same line
on the emulated serial port. Run by classroom-console.service: waits for /health to answer, then
prints ``classroom-appliance /health: <status> ...`` and ends.

Run: ``python -m fleet.console [--url http://127.0.0.1:8080/health] [--wait 900]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080/health"


def fetch(url: str, timeout: float = 5.0) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (a local URL)
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as err:  # unhealthy answers 503 with the same body
        try:
            return dict(json.loads(err.read()))
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def summary(health: dict[str, object]) -> str:
    """``<status> | camera healthy (..) | detector ... | provisioning ...``."""
    parts = [str(health.get("status", "?"))]
    components = health.get("components")
    if isinstance(components, dict):
        for name in ("camera", "detector", "provisioning", "aggregator", "clock"):
            comp = components.get(name)
            if isinstance(comp, dict):
                parts.append(f"{name} {comp.get('status', '?')}: {comp.get('message', '')}")
    version = health.get("version") or health.get("software_version")
    if version:
        parts.append(f"version {version}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--wait", type=float, default=900.0, help="seconds to wait for it")
    parser.add_argument("--every", type=float, default=5.0)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        health = fetch(args.url)
        if health is not None:
            print(f"classroom-appliance /health: {summary(health)}", flush=True)
            return 0
        if time.monotonic() >= deadline:
            print(f"classroom-appliance /health: no answer from {args.url} within "
                  f"{args.wait:.0f} s", flush=True)
            return 1
        time.sleep(args.every)


if __name__ == "__main__":
    sys.exit(main())
