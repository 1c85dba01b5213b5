"""Helpers for the console tests: a real aggregator (uvicorn in a thread) and form posts."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.config import AggregatorSettings
from tests.support.chromium import Chromium


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_aggregator(settings: AggregatorSettings) -> Iterator[tuple[str, FastAPI]]:
    """The real app served by uvicorn on a free port; yields (base URL, app)."""
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="aggregator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("aggregator did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def login(client: httpx.Client | object, name: str, password: str) -> httpx.Response:
    page = client.get("/login")  # type: ignore[attr-defined]
    return client.post("/login", data={  # type: ignore[attr-defined]
        "name": name, "password": password, "csrf": csrf_of(page.text), "next": "/"})


def submit(browser: Chromium, form_selector: str, values: dict[str, str]) -> None:
    """Fill a form's fields and submit it like a click would; wait for the next page."""
    browser.events.clear()
    script = f"""(() => {{
      const form = document.querySelector({json.dumps(form_selector)});
      const values = {json.dumps(values)};
      for (const [name, value] of Object.entries(values)) {{
        const field = form.querySelector(`[name="${{name}}"]`);
        if (field.tagName === "DETAILS") continue;
        field.value = value;
      }}
      form.requestSubmit();
      return true;
    }})()"""
    browser.evaluate(script)
    browser.wait_event("Page.loadEventFired", 60)


def shoot(browser: Chromium, out: Path, name: str) -> None:
    browser.emulate(1280, 900, mobile=False)
    browser.screenshot(out / f"{name}-1280.png")
    browser.emulate(390, 844, mobile=True, scale=1)
    browser.wait_for("document.documentElement.clientWidth <= 390")
    browser.screenshot(out / f"{name}-390.png")
    overflow = browser.evaluate("document.documentElement.scrollWidth")
    assert overflow <= 392, f"{name}: the page is {overflow} px wide at phone width"
    browser.emulate(1280, 900, mobile=False)


DESKTOP, PHONE = (1280, 900, False), (390, 844, True)


def check_page(browser: Chromium, out: Path, name: str,
               then: tuple[int, int, bool] = DESKTOP) -> None:
    """Screenshots at 1280 and 390 px into ``out``; at each width the page is no wider than
    the viewport (no horizontal scroll). Leaves the browser at ``then`` (desktop, or PHONE
    for a walk on a phone)."""
    for width, height, mobile in (DESKTOP, PHONE):
        browser.emulate(width, height, mobile=mobile)
        browser.wait_for(f"document.documentElement.clientWidth === {width}")
        wide = browser.evaluate("Math.max(document.documentElement.scrollWidth, "
                                "document.body.scrollWidth)")
        browser.screenshot(out / f"{name}-{width}.png")
        assert wide <= width, f"{name}: {wide} px wide in a {width} px viewport"
    browser.emulate(then[0], then[1], mobile=then[2])
    browser.wait_for(f"document.documentElement.clientWidth === {then[0]}")


def set_files(browser: Chromium, selector: str, paths: list[Path]) -> None:
    found = browser.send("Runtime.evaluate", {
        "expression": f"document.querySelector({json.dumps(selector)})"})
    browser.send("DOM.getDocument")
    browser.send("DOM.setFileInputFiles", {"objectId": found["result"]["objectId"],
                                           "files": [str(p) for p in paths]})
