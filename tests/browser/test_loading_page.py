"""The loading page in a real browser: a slow start shows it, and it becomes the GUI alone.

(The docs' pictures of these pages come from test_docs_screenshots.py, with the real
libertem-server.)"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_loading_page_turns_into_gui(jupyter_server: Any, browser_context: Any, console: Any):
    from playwright.sync_api import expect

    server = jupyter_server("lab", env_overrides={"LIBERTEM_FAKE_START_DELAY": "4"})
    page = browser_context.new_page()
    page.goto(server.url("api/status"))  # log in (the token becomes a cookie)

    page.goto(server.gui_url)
    # at once: the loading page, with the elapsed time and the log lines as they come
    expect(page.locator("#title")).to_contain_text("Starting LiberTEM", timeout=10_000)
    expect(page.locator("#log")).to_contain_text("still starting up", timeout=15_000)
    expect(page.locator("#elapsed")).not_to_have_text("0", timeout=15_000)
    page.screenshot(path=str(server.dirs["home"] / "loading-page.png"))

    # then, with no user action, the GUI (its root element, its websocket open)
    expect(page.locator("div#root")).to_be_attached(timeout=60_000)
    expect(page).to_have_title("LiberTEM")
    expect(page.locator("body")).to_have_attribute("data-ws", "open", timeout=30_000)
    assert page.url == server.gui_url
    assert [e for e in console.errors if "libertem-proxy" in e] == []


def test_error_page_in_browser_has_retry(jupyter_server: Any, browser_context: Any):
    from playwright.sync_api import expect

    server = jupyter_server("lab", env_overrides={"LIBERTEM_FAKE_CRASH": "3"})
    page = browser_context.new_page()
    page.goto(server.url("api/status"))
    page.goto(server.gui_url)
    # the loading page notices the failure and reloads into the error page by itself
    expect(page.locator("#title")).to_contain_text(
        "LiberTEM stopped while starting", timeout=60_000
    )
    expect(page.locator("#exit-code")).to_have_text("3")
    expect(page.locator("#log")).to_contain_text("SimulatedCrash")
    expect(page.locator("#retry")).to_be_visible()
    # Retry posts (with Jupyter's XSRF token) and comes back to the GUI URL: still crashing
    page.locator("#retry").click()
    expect(page.locator("#title")).to_contain_text("LiberTEM", timeout=60_000)
    assert page.url.startswith(server.gui_url)


def test_stop_while_the_loading_page_waits_stays_stopped(jupyter_server: Any, browser_context: Any):
    """Red-team finding: the loading page reloaded itself when the state became "stopped",
    and a reload is a navigation, so a Shutdown from the Running panel (or another tab) during a
    slow start was undone at once. Now the page turns into the "stopped" page, whose Start
    button is the person's way back."""
    from playwright.sync_api import expect

    server = jupyter_server("lab", env_overrides={"LIBERTEM_FAKE_START_DELAY": "30"})
    page = browser_context.new_page()
    page.goto(server.url("api/status"))
    page.goto(server.gui_url)
    expect(page.locator("#title")).to_contain_text("Starting LiberTEM", timeout=10_000)
    stopped = server.api("POST", "libertem-proxy/api/stop")
    assert stopped["state"] == "stopped"
    # the page notices the stop on its next poll and shows the stopped page in place
    expect(page.locator("body")).to_contain_text("Start LiberTEM", timeout=20_000)
    status = server.api("GET", "libertem-proxy/api/status")
    assert status["state"] == "stopped" and status["starts"] == 1, status
    # the person's way back: the Start button
    page.get_by_role("button", name="Start LiberTEM").click()
    expect(page.locator("body")).not_to_contain_text("Start LiberTEM", timeout=60_000)
    assert server.api("GET", "libertem-proxy/api/status")["starts"] == 2
