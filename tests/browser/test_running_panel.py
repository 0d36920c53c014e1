"""LiberTEM in JupyterLab's Running panel and Notebook 7's Running tab, in a real browser.

The run-and-stop tests drive the REAL libertem-server (``pip install libertem``): the point is
the memory of its process group, its dask workers, and what its GUI does after a shutdown (it
reconnects its websocket every second). The failed-state test uses the fake backend, which can
be told to crash. See conftest.py for the Jupyter and Chromium fixtures.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..helpers import missing, save_screenshot
from .conftest import TOKEN

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ITEM = ".jp-RunningSessions-item.jp-LiberTEM-runningItem"
# what the item's detail shows: a memory figure in binary units, then the worker count
MEMORY = re.compile(r"\d+(\.\d+)? (KiB|MiB|GiB)")
GUI_TIMEOUT = 90_000  # ms: a cold start of the real libertem-server on a busy CI machine
PANEL_TIMEOUT = 30_000  # ms: longer than the panel's poll interval (10 s)
STAYS_STOPPED = 10.0  # s
# no "get notified about Jupyter news?" toast over the screenshots
QUIET = {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false"}}
LAB_PANEL_CLIP = {"x": 0, "y": 0, "width": 660, "height": 560}


def _expect():
    from playwright.sync_api import expect

    return expect


def _real_libertem() -> list[str]:
    """The real libertem-server, as a two-item command (the fixture passes one flag per item,
    and traitlets only builds a list from two or more)."""
    path = shutil.which("libertem-server")
    if path is None:
        missing("libertem-server not installed (pip install libertem)")
    return [sys.executable, path]


def _slow_api(server: Any, method: str, path: str, body: Any, timeout: float) -> Any:
    """Like ``server.api`` with a longer timeout: a dask cluster takes its time to start."""
    req = urllib.request.Request(
        server.base + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _extension_errors(console: Any, server: Any) -> list[str]:
    """Console errors of this extension; the stopped GUI's own failed requests (its tab stays
    open on purpose) are not ours."""
    return [e for e in console.errors if "libertem" in e.lower() and server.gui_url not in e]


def _state(server: Any) -> str:
    return server.api("GET", "libertem-proxy/api/status")["state"]


def _wait_state(server: Any, state: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll the status API (a probe of another process: no event to await) until ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        status = server.api("GET", "libertem-proxy/api/status")
        if status["state"] == state:
            return status
        assert time.monotonic() < deadline, f"not {state} after {timeout}s: {status}"
        time.sleep(0.2)


def _assert_gui(page: Any, server: Any) -> None:
    expect = _expect()
    expect(page.locator("div#root")).to_be_attached(timeout=GUI_TIMEOUT)
    expect(page).to_have_title("LiberTEM")
    assert page.url == server.gui_url


def _open_lab_running_panel(page: Any) -> Any:
    """Click the Running sidebar tab; return the LiberTEM section of the panel."""
    page.locator(".jp-SideBar .lm-TabBar-tab[data-id='jp-running-sessions']").click()
    panel = page.locator("#jp-running-sessions")
    panel.wait_for()
    return panel


def _open_notebook_running_tab(page: Any) -> Any:
    page.locator(".lm-TabBar-tab", has_text=re.compile(r"^Running$")).click()
    panel = page.locator(".jp-RunningSessions").first
    panel.wait_for()
    return panel


def _run_and_stop(
    server: Any, browser_context: Any, page: Any, panel: Any, shot: str, clip: dict[str, int]
) -> None:
    """The shared scenario: the item shows LiberTEM's figures, opens the GUI, shuts it down."""
    expect = _expect()
    status = _wait_state(server, "running")
    item = panel.locator(ITEM)
    expect(item).to_be_visible(timeout=PANEL_TIMEOUT)
    expect(item.locator(".jp-LiberTEM-state")).to_contain_text("running")
    resources = status["resources"]
    detail = item.locator(".jp-LiberTEM-figures")
    expect(detail).to_have_text(MEMORY, timeout=PANEL_TIMEOUT)
    workers = resources["workers"]
    expect(detail).to_contain_text(f"{workers} worker", timeout=PANEL_TIMEOUT)
    title = item.locator(".jp-RunningSessions-itemLabel").get_attribute("title") or ""
    assert "RSS" in title and "CPU time" in title, title
    item.hover()  # shows the shut-down button
    box = item.bounding_box()
    bottom = int(box["y"] + box["height"]) + 24 if box else clip["height"]
    save_screenshot(page, shot, clip={**clip, "height": max(clip["height"], bottom)})

    # a click on the item opens the GUI in a new browser tab (the launcher's default)
    with browser_context.expect_page() as new_tab:
        item.locator(".jp-RunningSessions-itemLabel").click()
    gui = new_tab.value
    _assert_gui(gui, server)

    # the item's shut-down button stops LiberTEM and its workers
    pid = status["pid"]
    with page.expect_response(lambda r: "libertem-proxy/api/stop" in r.url) as stop:
        item.locator(".jp-RunningSessions-itemShutdown").click()
    assert stop.value.status == 200
    stopped = stop.value.json()
    assert stopped["state"] == "stopped", stopped
    assert not Path(f"/proc/{pid}").exists(), "libertem-server still runs"

    # ... and it stays stopped although the GUI tab is still open: the GUI reconnects its
    # websocket every second, and that must not start LiberTEM again (a deliberate stop)
    deadline = time.monotonic() + STAYS_STOPPED
    while time.monotonic() < deadline:
        now = server.api("GET", "libertem-proxy/api/status")
        assert now["state"] == "stopped" and now["starts"] == stopped["starts"], (
            f"LiberTEM was started again after a deliberate stop, with the GUI tab open: {now}"
        )
        time.sleep(0.5)
    assert not gui.is_closed()
    expect(item).to_have_count(0)  # the section is empty, as for kernels


def test_lab_running_panel_shows_opens_and_stops_libertem(
    jupyter_server: Any, browser_context: Any, console: Any
) -> None:
    server = jupyter_server("lab", command=_real_libertem(), lab_overrides=QUIET)
    # LiberTEM with a local dask cluster of two workers, as the GUI's "Connect" makes it
    server.api("POST", "libertem-proxy/api/start")
    answer = _slow_api(
        server,
        "PUT",
        "libertem/api/config/connection/",
        {"connection": {"type": "LOCAL", "numWorkers": 2, "cudas": {}}},
        timeout=180,
    )
    assert answer["status"] == "ok", answer
    status = server.api("GET", "libertem-proxy/api/status")
    # two compute workers and LiberTEM's service worker
    assert status["resources"]["workers"] == 3, status

    page = browser_context.new_page()
    page.goto(server.url("lab"))
    page.locator(".jp-LauncherCard").first.wait_for()  # the page is complete (screenshot)
    panel = _open_lab_running_panel(page)
    _expect()(panel.locator(".jp-AccordionPanel-title", has_text="LiberTEM")).to_be_visible()
    _run_and_stop(server, browser_context, page, panel, "lab-running-panel", LAB_PANEL_CLIP)
    assert _extension_errors(console, server) == []


def test_notebook_running_tab_shows_opens_and_stops_libertem(
    jupyter_server: Any, browser_context: Any, console: Any
) -> None:
    server = jupyter_server("notebook", command=_real_libertem())
    page = browser_context.new_page()
    page.goto(server.url("tree"))
    panel = _open_notebook_running_tab(page)
    # stopped: the section is there, with no item
    _expect()(panel.locator(".jp-AccordionPanel-title", has_text="LiberTEM")).to_be_visible()
    assert panel.locator(ITEM).count() == 0
    server.api("POST", "libertem-proxy/api/start")
    # the panel's own refresh button shows it at once (no need to wait for the poll)
    page.locator(
        ".jp-RunningSessions .jp-ToolbarButtonComponent[title='Refresh List']"
    ).first.click()
    _run_and_stop(
        server,
        browser_context,
        page,
        panel,
        "notebook-running-tab",
        {"x": 0, "y": 0, "width": 1280, "height": 300},
    )
    assert _extension_errors(console, server) == []


def test_lab_running_panel_failed_state_shows_reason_and_retry(
    jupyter_server: Any, browser_context: Any, tmp_path: Path
) -> None:
    expect = _expect()
    marker = tmp_path / "crash-marker"
    marker.write_text("")
    server = jupyter_server(
        "lab", lab_overrides=QUIET, env_overrides={"LIBERTEM_FAKE_CRASH_MARKER": str(marker)}
    )
    page = browser_context.new_page()
    page.goto(server.url("lab"))
    panel = _open_lab_running_panel(page)
    try:
        server.api("POST", "libertem-proxy/api/start")
    except Exception:  # 502: the start failed, as intended
        pass
    _wait_state(server, "failed")
    item = panel.locator(ITEM)
    expect(item).to_be_visible(timeout=PANEL_TIMEOUT)
    expect(item.locator(".jp-LiberTEM-state")).to_have_text("failed")
    expect(item.locator(".jp-LiberTEM-reason")).to_contain_text("exited")
    assert item.locator(".jp-RunningSessions-itemShutdown").count() == 0  # nothing runs
    save_screenshot(page, "lab-running-panel-failed", clip=LAB_PANEL_CLIP)

    marker.unlink()  # the cause is fixed: Retry starts it
    item.locator(".jp-LiberTEM-retry").click()
    expect(item.locator(".jp-LiberTEM-state")).to_contain_text("running", timeout=PANEL_TIMEOUT)
    assert _state(server) == "running"
