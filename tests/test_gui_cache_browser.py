"""A warm load of the real LiberTEM GUI in Chromium asks the proxy for no asset (issue 17).

The real ``libertem-server`` behind the in-process Jupyter, Debian's Chromium driven by
playwright. The proxy marks LiberTEM's content-hashed assets ``immutable`` (``asset_cache``), so
after a first load, neither a second visit nor a reload (F5) sends a request for them; only the
index and the API are asked again. Which requests reached the proxy is observed on the server
side (every proxied request passes ``HttpProxyHandler._proxy``).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from libertem_jupyter_proxy.http_proxy import HttpProxyHandler

from .conftest import TOKEN
from .helpers import CHROMIUM, CHROMIUM_ARGS, missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which("libertem-server") is None, reason="LiberTEM not installed"),
    pytest.mark.proxy_config(command=[], start_timeout=120.0, stop_timeout=10.0),
]
GUI_TIMEOUT = 120_000  # ms: the first visit starts libertem-server


async def test_warm_gui_load_requests_no_assets(client, base_url, monkeypatch):
    if not os.path.exists(CHROMIUM):
        missing(f"{CHROMIUM} not installed (apt-get install chromium)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing("playwright not installed (pip install playwright)")

    proxied: list[str] = []
    original = HttpProxyHandler._proxy

    async def observed(self: HttpProxyHandler) -> None:
        proxied.append(self.request.path)
        await original(self)

    monkeypatch.setattr(HttpProxyHandler, "_proxy", observed)
    origin = f"http://127.0.0.1:{client.port}"
    gui = f"{origin}{base_url}libertem/"
    asset_headers: dict[str, str] = {}

    def on_response(response: Any) -> None:
        if "/libertem/assets/" in response.url:
            asset_headers[response.url] = response.headers.get("cache-control", "")

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            page.on("response", on_response)
            await page.goto(f"{origin}{base_url}api/status?token={TOKEN}")  # log in (cookie)
            await page.goto(gui, timeout=GUI_TIMEOUT)
            await page.get_by_role("button", name="Connect").wait_for(timeout=GUI_TIMEOUT)
            cold = [p for p in proxied if "/assets/" in p]
            assert len(cold) >= 3, proxied  # JS, CSS, images/fonts went through the proxy
            assert asset_headers and all(
                v == "private, max-age=31536000, immutable" for v in asset_headers.values()
            ), asset_headers

            proxied.clear()
            await page.goto("about:blank")
            await page.goto(gui, timeout=GUI_TIMEOUT)
            await page.get_by_role("button", name="Connect").wait_for(timeout=GUI_TIMEOUT)
            await page.reload(timeout=GUI_TIMEOUT)
            await page.get_by_role("button", name="Connect").wait_for(timeout=GUI_TIMEOUT)
            assert f"{base_url}libertem/" in proxied  # the index is asked again (new versions)
            assert not [p for p in proxied if "/assets/" in p], proxied
        finally:
            await browser.close()
