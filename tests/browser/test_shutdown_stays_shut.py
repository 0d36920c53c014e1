"""Issue 13, case 1, with the real LiberTEM GUI: its Shutdown button stops LiberTEM for good.

The GUI tab stays open after Shutdown, and its websocket keeps trying to reconnect; before
issue 13 each attempt started libertem-server again within 1-2 s, so Shutdown never freed the
memory while a tab was open. Now only a person (reloading the page) brings it back.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import psutil
import pytest

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("libertem-server") is None, reason="LiberTEM not installed"),
]

WATCH_SECONDS = 30  # how long the open tab is watched after Shutdown (the rule)


def _libertem_processes(jupyter_pid: int) -> list[int]:
    found = []
    for child in psutil.Process(jupyter_pid).children(recursive=True):
        try:
            if any("libertem-server" in part for part in child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _wait_for_state(server: Any, state: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = server.api("GET", "libertem-proxy/api/status")
        if status["state"] == state:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)  # a status probe's polling interval


def test_gui_shutdown_stays_shut_with_the_tab_open(jupyter_server: Any, browser_context: Any):
    from playwright.sync_api import expect

    server = jupyter_server("lab", command=[shutil.which("libertem-server")])
    page = browser_context.new_page()
    page.goto(server.url("api/status"))  # log in
    page.goto(server.gui_url)
    shutdown = page.locator("button:has-text('Shutdown')").first
    expect(shutdown).to_be_visible(timeout=180_000)
    first = _wait_for_state(server, "running", 60)
    assert first["starts"] == 1

    reconnects: list[str] = []  # the GUI's own websocket attempts, for the record
    page.on("websocket", lambda ws: reconnects.append(ws.url))
    shutdown.click()
    page.locator(".modal button:has-text('Shutdown')").click()
    stopped = _wait_for_state(server, "stopped", 60)
    assert "GUI" in stopped["stop_reason"]

    # the tab stays open (its websocket keeps trying): nothing starts LiberTEM again
    deadline = time.monotonic() + WATCH_SECONDS
    while time.monotonic() < deadline:
        status = server.api("GET", "libertem-proxy/api/status")
        assert status["state"] == "stopped", status
        assert status["starts"] == 1, status
        assert _libertem_processes(server.proc.pid) == []
        time.sleep(1.0)  # sampling the 30 s window
    # whether or not the GUI retries by itself after Shutdown, what it would do from this tab
    # (an API call, its events websocket) is refused cheaply and starts nothing
    tried = page.evaluate(
        """async () => {
            const api = await fetch(new URL("api/config/", location.href));
            const url = new URL("api/events/", location.href);
            url.protocol = url.protocol.replace("http", "ws");
            const ws = await new Promise((resolve) => {
                const socket = new WebSocket(url);
                socket.onopen = () => resolve("open");
                socket.onerror = () => resolve("refused");
            });
            return [api.status, ws];
        }"""
    )
    assert tried == [503, "refused"], (tried, reconnects)
    status = server.api("GET", "libertem-proxy/api/status")
    assert status["state"] == "stopped" and status["starts"] == 1, status

    # a person reloading the page brings the GUI back
    page.reload()
    expect(page.locator("button:has-text('Shutdown')").first).to_be_visible(timeout=180_000)
    again = _wait_for_state(server, "running", 60)
    assert again["starts"] == 2
    assert again["stop_reason"] is None
