"""What every answer of the status page gets: the security headers, and the refusal of a
write (POST) that a page of another origin makes the browser send."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse, Response

_LOGGER = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin: no referrer to other sites, and the browser still names this page's origin
    # on its own form posts (with no-referrer it sends "Origin: null"); see same_origin()
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None]:
    parts = urlsplit(f"{scheme}://{netloc}")
    try:
        port = parts.port
    except ValueError:
        return "", None
    return (parts.hostname or "").lower(), port


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another page than this one's:
    ``Sec-Fetch-Site`` other than ``same-origin``/``none``, or (older browsers) an ``Origin``
    naming another host or port. Requests with neither header (curl, scripts with the Bearer
    key) do not come from a browser page."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:  # set by the browser itself (Chrome, Firefox, Safari 16.4+)
        return fetch_site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:  # "null", file://, junk
        return False
    o_host, o_port = _host_port(parts.netloc, parts.scheme)
    h_host, h_port = _host_port(request.headers.get("host", ""), request.url.scheme)
    if not h_host or o_host != h_host:
        return False
    if h_port is None:  # a default port (a TLS proxy may hide which scheme): so must Origin's
        return o_port is None
    return (o_port or _DEFAULT_PORTS[parts.scheme]) == h_port

Next = Callable[[Request], Awaitable[Response]]


async def same_origin_only(request: Request, call_next: Next) -> Response:
    """Middleware: a page elsewhere must not post forms here (log in as someone, log out): a
    browser names the page's origin on every POST; it must be this page's own."""
    if request.method not in SAFE_METHODS and not same_origin(request):
        _LOGGER.warning("cross-origin %s %s refused (Origin %r)", request.method,
                        request.url.path, request.headers.get("origin"))
        return JSONResponse({"detail": "cross-origin request refused"}, status_code=403,
                            headers=SECURITY_HEADERS)
    return await call_next(request)


async def security_headers(request: Request, call_next: Next) -> Response:
    """Middleware: the security headers on every answer; nothing but /static is cached."""
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.url.path.startswith("/static"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response
