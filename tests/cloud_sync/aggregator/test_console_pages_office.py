"""Issue 25, in headless Chromium at 1280 and 390 px (screenshots in
test-output/console/pages/, no horizontal scroll; the pattern of test_console_pages.py):

- item 8: a device registered to LAB-301 but configured for RM-14 is shown on the dashboard and
  the Devices page as "registered to LAB-301, configured for RM-14: change config or
  re-register", not "last heartbeat never"."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.services.devices import add_device, create_admin_token
from tests.conftest import require
from tests.support.chromium import Chromium, chromium_binary

from .console_helpers import live_aggregator, submit
from .test_console_pages import check_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ADMIN_PW = "office password 1"
SAYS = "registered to LAB-301, configured for RM-14: change config or re-register"


def _login(browser: Chromium, url: str) -> None:
    browser.navigate(f"{url}/login")
    submit(browser, "form[action='/login']", {"name": "office", "password": ADMIN_PW})
    assert browser.evaluate("location.pathname") == "/"


def test_room_mismatch_on_the_dashboard_and_devices_page(tmp_path: Path) -> None:
    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    settings = aggregator_config.load(
        None, database_url=f"sqlite:///{tmp_path / 'agg.db'}", data_dir=tmp_path / "data",
        rate_limit_per_min=100000)
    with live_aggregator(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        ctx = app.state.ctx
        with ctx.sessions() as session:
            _, token = create_admin_token(session, "tests")
            accounts.add_user(session, "office", "admin", ADMIN_PW)
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        assert api.post("/api/v1/rooms", json={"id": "LAB-301", "name": "Science lab",
                                               "site": "north"}).status_code == 201
        with ctx.sessions() as session:
            _, key = add_device(session, "LAB-301", "pi-lab301-entrance")
            add_device(session, "LAB-301", "pi-lab301-back")  # never heard of: "never"
        device = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                              timeout=30)
        r = device.post("/api/v1/heartbeat", json={
            "v": 1, "device_id": "pi-lab301-entrance", "room_id": "RM-14",
            "software_version": "1.4.0", "sent_at": datetime.now(UTC).isoformat(),
            "uptime_s": 30.0, "outbox_depth": 12})
        assert r.status_code == 403 and r.json()["code"] == "room_mismatch"
        _login(browser, url)
        text = browser.evaluate("document.body.innerText")
        assert SAYS in text
        check_page(browser, "admin-dashboard-room-mismatch")
        browser.navigate(f"{url}/devices")
        text = browser.evaluate("document.body.innerText")
        assert "Devices refused (1)" in text and SAYS in text
        check_page(browser, "admin-devices-room-mismatch")
