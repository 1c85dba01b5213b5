"""Is a release healthy? Read from the appliance's own /health on the device.

A release on trial is confirmed when /health reports its version with the camera delivering
frames, the detector processing them, the store open (the encrypted store got its key) and the
aggregator reached (when one is configured). ``make deploy`` and the pulled update use this one
rule.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def release_healthy(doc: dict[str, Any], version: str) -> str | None:
    """None when /health says ``version`` runs healthily, else the reason it does not."""
    if "error" in doc:
        return f"/health not answering ({doc['error']})"
    if doc.get("version") != version:
        return f"/health reports version {doc.get('version')}, not {version}"
    components = doc.get("components")
    if not isinstance(components, dict):
        return "/health has no components"
    camera = components.get("camera") or {}
    detector = components.get("detector") or {}
    database = components.get("database") or {}
    aggregator = components.get("aggregator") or {}
    if camera.get("status") != "healthy":
        return f"camera {camera.get('status')}: {camera.get('message')}"
    if not detector.get("frames"):  # /health flattens a component's details
        return f"detector: {detector.get('message')}"
    if database.get("status") == "unhealthy":
        return f"store: {database.get('message')}"
    if aggregator.get("status") not in ("healthy", "not_configured", None):
        return f"aggregator: {aggregator.get('message')}"
    return None


def read_health(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """/health's JSON (also on HTTP 503), or ``{"error": ...}``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (local URL)
            body = response.read()
    except urllib.error.HTTPError as err:
        body = err.read()
    except (OSError, ValueError) as err:
        return {"error": type(err).__name__}
    try:
        doc = json.loads(body)
    except ValueError:
        return {"error": "not JSON"}
    return doc if isinstance(doc, dict) else {"error": "not an object"}
