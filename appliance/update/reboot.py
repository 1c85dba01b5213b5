"""Reboot for a security update only outside class time (``appliance update reboot-if-needed``,
hourly from classroom-reboot.timer).

unattended-upgrades installs Debian's security updates on the device and leaves
``/run/reboot-required`` when one needs a reboot; it never reboots by itself (the image sets
``Unattended-Upgrade::Automatic-Reboot "false"``). The device's system clock is UTC and rooms
have time zones, so a fixed night-time reboot hour would land in class for some schools; this
asks the aggregator for the room's day instead and reboots when no class is in session or
starts within ``MARGIN``. Without an answer (offline) it waits: a reboot can wait, a class
cannot.
"""

from __future__ import annotations

import logging
import subprocess
from datetime import datetime, timedelta

import httpx

from appliance.config import ApplianceSettings
from cloud_sync.protocol import ScheduleResponse

_LOGGER = logging.getLogger(__name__)
MARGIN = timedelta(minutes=30)  # the reboot and the appliance's start fit in it


def class_time(schedule: ScheduleResponse, now: datetime) -> str | None:
    """The course in session at ``now`` or starting within MARGIN (None: free)."""
    for session in schedule.sessions:
        if session.starts_at - MARGIN <= now < session.ends_at:
            return session.course_id
    return None


def reboot_if_needed(settings: ApplianceSettings, now: datetime,
                     client: httpx.Client | None = None) -> str:
    """Reboot when needed and allowed; returns what was decided (for the log and tests)."""
    cfg = settings.update
    if not cfg.reboot_required_file.exists():
        return "no reboot needed"
    sync = settings.sync
    if not sync.aggregator_url or sync.api_key is None:
        return "reboot needed; no aggregator to ask for the room's classes: waiting"
    own = client is None
    client = client or httpx.Client(
        base_url=sync.aggregator_url.rstrip("/"), timeout=sync.request_timeout_s,
        headers={"Authorization": f"Bearer {sync.api_key.get_secret_value()}"})
    try:
        response = client.get("/api/v1/schedule", params={
            "room_id": settings.device.room_id, "at": now.isoformat()})
        if response.status_code != 200:
            return (f"reboot needed; the room's classes unknown (HTTP {response.status_code}):"
                    " waiting")
        schedule = ScheduleResponse.model_validate_json(response.content)
    except (httpx.HTTPError, ValueError) as err:
        return f"reboot needed; the room's classes unknown ({type(err).__name__}): waiting"
    finally:
        if own:
            client.close()
    course = class_time(schedule, now)
    if course is not None:
        return f"reboot needed; class {course} in session or about to start: waiting"
    done = subprocess.run(cfg.reboot_command, shell=True, capture_output=True, text=True,  # noqa: S602 (the operator's configured command)
                          check=False)
    if done.returncode != 0:
        return f"reboot failed: {done.stderr.strip()[-300:]}"
    return "rebooting for a security update"
