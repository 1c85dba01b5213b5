"""Issue 12 #12: /docs works offline (Swagger UI's files served by the aggregator itself, from
the fastapi-offline package) and / (the web console's login page) links them instead of a 404.
Screenshots go to test-output/aggregator/."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from fastapi.testclient import TestClient

from tests.conftest import REPO, require
from tests.support.chromium import Chromium, chromium_binary
from tests.support.harness import Aggregator

OUT = REPO / "test-output" / "aggregator"


def _assets(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", html) + re.findall(
        r"""url:\s*['"]([^'"]+)['"]""", html)


def test_docs_and_index_need_nothing_from_outside(app_client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        r = app_client.get(page)
        assert r.status_code == 200
        assets = _assets(r.text)
        assert assets, page
        for url in assets:
            assert not urlsplit(url).netloc, f"{page} loads {url} from another host"
            assert app_client.get(url).status_code == 200, url
    index = app_client.get("/")  # the web console: its login page links the API's pages
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert index.url.path == "/login"
    links = re.findall(r'href="([^"]+)"', index.text)
    assert {"/docs", "/openapi.json", "/health", "/metrics"} <= set(links)
    for link in links:
        assert app_client.get(link).status_code == 200, link


def test_docs_render_in_chromium_without_internet(tmp_path: Path) -> None:
    """The real server, the real browser: Swagger UI draws every operation, and no request
    leaves 127.0.0.1 (there is no internet here: a CDN asset would leave a blank page)."""
    binary = chromium_binary()
    require(binary is not None, "chromium is not installed")
    agg = Aggregator(tmp_path / "agg")
    agg.seed()
    agg.start()
    try:
        hosts: set[str | None] = set()
        with Chromium(binary, 1280, 900) as browser:

            def seen() -> None:  # navigate() clears the events: collect them before
                hosts.update(urlsplit(e["params"]["request"]["url"]).hostname
                             for e in browser.events
                             if e["method"] == "Network.requestWillBeSent")

            for width, height, mobile, name in ((1280, 900, False, "desktop"),
                                                (390, 844, True, "phone")):
                browser.emulate(width, height, mobile=mobile)
                browser.navigate(f"{agg.base_url}/docs")
                count = browser.wait_for(
                    "document.querySelectorAll('.opblock').length", timeout=60)
                assert count >= 30, count
                assert "Classroom attendance aggregator" in browser.evaluate(
                    "document.body.innerText")
                browser.screenshot(OUT / f"docs-{name}.png", full_page=False)
                seen()
                browser.navigate(f"{agg.base_url}/")
                assert "API documentation" in browser.evaluate("document.body.innerText")
                browser.screenshot(OUT / f"index-{name}.png")
                seen()
        assert "127.0.0.1" in hosts
        assert hosts <= {"127.0.0.1"}, hosts
    finally:
        agg.stop()
