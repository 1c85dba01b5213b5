"""No secret in any log line: a logging filter that masks device keys, admin tokens, Bearer
credentials and secret-looking query parameters in every record it sees.

uvicorn writes the path *with its query string* of every WebSocket handshake at INFO
(``"WebSocket /ws/events?..." [accepted]``), whatever the access log setting, before the
application sees the request: a token a client put in the URL would be in the server's log.
``/ws/events`` no longer takes one there (api/ws.py), and this filter masks one that a client
sends anyway. :func:`install` puts it on uvicorn's loggers and on the root logger's handlers
(idempotent; called by ``create_app`` and again at start, after uvicorn configured logging).
"""

from __future__ import annotations

import logging
import re

from cloud_sync.aggregator.services.security import ADMIN_PREFIX, DEVICE_PREFIX

MASK = "***"
_SECRET = re.compile(rf"\b({re.escape(ADMIN_PREFIX)}|{re.escape(DEVICE_PREFIX)})"
                     r"[A-Za-z0-9_\-]{8,}")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
_QUERY = re.compile(r"(?i)([?&](?:token|access_token|api_key|key|password|secret)=)[^&\s\"']*")


def redact(text: str) -> str:
    """``text`` with every credential replaced by ``***``."""
    text = _QUERY.sub(rf"\1{MASK}", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    return _SECRET.sub(rf"\1{MASK}", text)


class RedactSecrets(logging.Filter):
    """Masks credentials in the formatted message of every record (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = RedactSecrets()
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def install() -> None:
    """Put the filter on uvicorn's loggers and on every handler of the root logger and of
    uvicorn's loggers (a record is filtered where it is logged, and again by a handler)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
