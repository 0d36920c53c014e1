"""The loading page and an error page with the real libertem-server, as the docs show them.

With ``LJP_SCREENSHOT_DIR=docs/_static/screenshots`` these tests write ``loading-page.png`` and
``error-page.png`` there (``make screenshots``); without it they only check the pages. What a
reader sees must be what a user sees: the real ``libertem-server`` (started by its name, found on
PATH), its own log lines, and no name or path of this repository or of the test machine.

- Loading page: the real server starts in one to a few seconds, and the page turns into the GUI
  as soon as the status API says "running". So that the picture is always of the loading page,
  the browser holds back the status answers that say "running" (everything else passes
  unchanged) until LiberTEM is ready and the picture taken, then lets them through, and the page
  must turn into the GUI.
- Error page: a real failure. The site's ``command`` setting gives libertem-server an option
  value it refuses (``--snooze-timeout=30min``; the option takes minutes as a plain number), and
  libertem-server exits with its own usage error, code 2.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from ..helpers import missing, save_screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CLIP_LOADING = {"x": 140, "y": 0, "width": 1000, "height": 270}
CLIP_ERROR = {"x": 140, "y": 0, "width": 1000, "height": 390}


def _real_server() -> list[str]:
    if shutil.which("libertem-server") is None:
        missing("LiberTEM is not installed (make install-demo)")
    return ["libertem-server"]


def _assert_nothing_private(text: str, tmp_path: Path) -> None:
    """No stand-in name and no path of the repository, the venv or the test's temp dir."""
    for private in (str(REPO), sys.prefix, str(tmp_path), os.environ.get("HOME", "/root")):
        assert private not in text, f"{private!r} is visible on the page:\n{text}"
    for word in ("fake", "Fake", "FAKE", "Simulated", "test"):
        assert word not in text, f"{word!r} is visible on the page:\n{text}"


def test_loading_page_real_libertem(
    jupyter_server: Any, browser_context: Any, tmp_path: Path, console: Any
):
    from playwright.sync_api import expect

    server = jupyter_server("lab", command=_real_server())
    page = browser_context.new_page()
    page.goto(server.url("api/status"))  # log in (the token becomes a cookie)

    held: list[tuple[Any, Any]] = []
    photographed = False

    def hold_running(route: Any) -> None:
        response = route.fetch()
        if photographed or response.json().get("state") == "starting":
            route.fulfill(response=response)
        else:
            held.append((route, response))

    page.route("**/libertem-proxy/api/status", hold_running)
    page.goto(server.gui_url)
    expect(page.locator("#title")).to_contain_text("Starting LiberTEM", timeout=30_000)
    # the picture: the page as a user sees it one second in (a real start prints nothing
    # to its log until it is ready, so the log box is still empty then)
    expect(page.locator("#elapsed")).not_to_have_text("0", timeout=30_000)
    _assert_nothing_private(page.locator("body").inner_text(), tmp_path)
    save_screenshot(page, "loading-page", clip=CLIP_LOADING)
    photographed_at = page.locator("#elapsed").inner_text()
    for _ in range(1200):  # until LiberTEM is ready (at most 120 s); polls, does not wait blind
        if held:
            break
        page.wait_for_timeout(100)
    assert held, "LiberTEM did not become ready"
    assert photographed_at != "0"

    # let the "running" answers through: the page turns into the real GUI by itself
    photographed = True
    for route, response in held:
        route.fulfill(response=response)
    expect(page.locator("div#root")).to_be_attached(timeout=60_000)
    expect(page).to_have_title("LiberTEM")
    assert page.url == server.gui_url
    assert [e for e in console.errors if "libertem-proxy" in e] == []


def test_error_page_real_libertem(jupyter_server: Any, browser_context: Any, tmp_path: Path):
    from playwright.sync_api import expect

    # c.LiberTEMProxy.command = ["libertem-server", "--snooze-timeout=30min"]
    server = jupyter_server("lab", command=[*_real_server(), "--snooze-timeout=30min"])
    page = browser_context.new_page()
    page.goto(server.url("api/status"))
    page.goto(server.gui_url)
    # the loading page notices the failure and reloads into the error page by itself
    expect(page.locator("#title")).to_contain_text(
        "LiberTEM stopped while starting", timeout=120_000
    )
    expect(page.locator("#exit-code")).to_have_text("2")
    expect(page.locator("#log")).to_contain_text(
        "Invalid value for '--snooze-timeout': '30min' is not a valid float"
    )
    expect(page.locator("#retry")).to_be_visible()
    _assert_nothing_private(page.locator("body").inner_text(), tmp_path)
    save_screenshot(page, "error-page", clip=CLIP_ERROR)
