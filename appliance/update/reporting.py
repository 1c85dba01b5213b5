"""Tell the aggregator what the updater did, at once (the heartbeat repeats the last report)."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from appliance.config import ApplianceSettings
from cloud_sync.protocol import UpdateReport

REPORT_PATH = "/api/v1/releases/report"


def reporter_for(settings: ApplianceSettings) -> Callable[[UpdateReport], None] | None:
    """A function that POSTs a report with the device key, or None without an aggregator."""
    sync = settings.sync
    if not sync.aggregator_url or sync.api_key is None:
        return None
    url = sync.aggregator_url.rstrip("/") + REPORT_PATH
    headers = {"Authorization": f"Bearer {sync.api_key.get_secret_value()}",
               "Content-Type": "application/json",
               "User-Agent": "classroom-attendance-updater"}

    def send(report: UpdateReport) -> None:
        response = httpx.post(url, content=report.model_dump_json(), headers=headers,
                              timeout=sync.request_timeout_s)
        response.raise_for_status()

    return send
