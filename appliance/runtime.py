"""`appliance run`: start every component of the device and keep them running."""

from __future__ import annotations

import logging

from appliance.config import ApplianceSettings
from models import load_manifest, model_path

_LOGGER = logging.getLogger(__name__)


def run_appliance(settings: ApplianceSettings) -> None:
    for spec in load_manifest():
        model_path(spec.name, settings.paths.model_dir)
    _LOGGER.info("models verified in %s", settings.paths.model_dir)
