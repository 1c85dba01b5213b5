"""GET /: a short page of links (API docs, OpenAPI, health, metrics) instead of a 404.

Its own module on purpose: the web console takes ``/`` over later by not including this
router (``app.py``).
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)

LINKS = (
    ("/docs", "API documentation", "Swagger UI: every endpoint, try it with a token"),
    ("/redoc", "API reference", "the same description as one readable page"),
    ("/openapi.json", "OpenAPI description", "for client generators"),
    ("/health", "Health", "database, writes, disk space, MQTT bridge (JSON)"),
    ("/metrics", "Metrics", "Prometheus text"),
)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 44rem;
       padding: 1.5rem 1rem; color: #1d2733; }}
h1 {{ font-size: 1.4rem; margin: 0 0 .25rem; }}
p {{ margin: .25rem 0 1rem; color: #4a5866; }}
ul {{ list-style: none; padding: 0; }}
li {{ border: 1px solid #d6dde4; border-radius: 6px; margin: .5rem 0; }}
a {{ display: block; padding: .6rem .8rem; text-decoration: none; color: inherit; }}
a:hover, a:focus {{ background: #f1f5f9; }}
a strong {{ color: #0b5cad; }}
code {{ font-size: .9em; background: #f1f5f9; padding: 0 .25em; border-radius: 3px; }}
</style></head>
<body><h1>{title}</h1>
<p>Version {version}. The API is under <code>/api/v1</code>; every endpoint there needs
<code>Authorization: Bearer &lt;device key | admin token&gt;</code>
(<code>aggregator admin create-token</code>).</p>
<ul>{items}</ul>
</body></html>
"""


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    items = "".join(
        f'<li><a href="{escape(root + path)}"><strong>{escape(name)}</strong> '
        f"<code>{escape(path)}</code><br>{escape(text)}</a></li>"
        for path, name, text in LINKS
    )
    app = request.app
    return HTMLResponse(PAGE.format(title=escape(app.title), version=escape(app.version),
                                    items=items))
