"""The frontend extension in a real browser: JupyterLab launcher tile, File > New, command
palette, the Notebook 7 "New" dropdown, the `openIn` setting, and the GUI they open.

Each test starts its own ``jupyter lab`` / ``jupyter notebook`` (base_url /user/alice/) with the
fake libertem-server as the backend; see conftest.py. The check that the GUI itself loads
through the proxy is always the last step.
"""

from __future__ import annotations

import json
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pytest

from ..helpers import save_screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]


COMMAND = "libertem:open"


def _version(dist: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version(dist).split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return (0, 0)


NOTEBOOK_VERSION = _version("notebook")
GUI_TIMEOUT = 60_000  # ms: the first request starts the (fake) backend


def _expect():
    from playwright.sync_api import expect

    return expect


def _extension_errors(console: Any) -> list[str]:
    """Errors and warnings that name this extension (its plugin id, files or command)."""
    return [e for e in console.errors + console.warnings if "libertem" in e.lower()]


def _assert_gui_page(page: Any, server: Any) -> None:
    """``page`` ends up on the LiberTEM GUI, served through the proxy at base_url/libertem/."""
    expect = _expect()
    # a loading page may come first while the backend starts: wait for the GUI's own root
    expect(page.locator("div#root")).to_be_attached(timeout=GUI_TIMEOUT)
    expect(page).to_have_title("LiberTEM")
    assert page.url == server.gui_url


def _open_notebook_new_menu(page: Any) -> Any:
    """Open the tree page's "New" dropdown; return the open menu."""
    page.locator(".jp-DropdownMenu .lm-MenuBar-item", has_text="New").click()
    menu = page.locator(".lm-Menu")
    menu.wait_for()
    return menu


def test_lab_launcher_tile_opens_gui_in_new_browser_tab(
    jupyter_server: Any, browser_context: Any, console: Any
) -> None:
    expect = _expect()
    server = jupyter_server("lab")
    page = browser_context.new_page()
    page.goto(server.url("lab"))

    tile = page.locator(".jp-LauncherCard", has_text="LiberTEM")
    tile.wait_for()
    expect(tile.locator("svg[data-icon='libertem-jupyter-proxy:libertem']")).to_be_visible()
    assert tile.get_attribute("data-category") == "Other"
    save_screenshot(page, "lab-launcher", clip={"x": 0, "y": 0, "width": 1100, "height": 640})

    # File > New > LiberTEM
    page.locator(".lm-MenuBar-item", has_text="File").click()
    new_label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^New$"))
    page.locator(".lm-Menu-item[data-type='submenu']", has=new_label).hover()
    expect(page.locator(f".lm-Menu-item[data-command='{COMMAND}']")).to_have_text("LiberTEM")
    page.keyboard.press("Escape")
    page.keyboard.press("Escape")

    # command palette
    page.keyboard.press("Control+Shift+C")
    page.locator(".lm-CommandPalette-input").fill("LiberTEM")
    expect(page.locator(f".lm-CommandPalette-item[data-command='{COMMAND}']")).to_be_visible()
    page.keyboard.press("Escape")

    assert console.errors == [], console.errors  # JupyterLab itself loads clean, so: none at all

    with browser_context.expect_page() as new_tab:
        tile.click()
    gui = new_tab.value
    assert page.url.startswith(server.base + "lab")  # the Jupyter tab stays where it was
    _assert_gui_page(gui, server)


def test_lab_open_in_jupyterlab_setting_from_admin_overrides(
    jupyter_server: Any, browser_context: Any, console: Any
) -> None:
    expect = _expect()
    server = jupyter_server(
        "lab", lab_overrides={"libertem-jupyter-proxy:plugin": {"openIn": "jupyterlab"}}
    )
    page = browser_context.new_page()
    page.goto(server.url("lab"))
    tile = page.locator(".jp-LauncherCard", has_text="LiberTEM")
    tile.wait_for()
    # the admin override replaced the schema default the plugin reads
    settings = server.api("GET", "lab/api/settings/libertem-jupyter-proxy:plugin")
    assert settings["schema"]["properties"]["openIn"]["default"] == "jupyterlab", settings

    pages_before = len(browser_context.pages)
    tile.click()
    tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="LiberTEM")
    expect(tab).to_be_visible()
    frame_el = page.locator("#libertem-gui iframe")
    expect(frame_el).to_have_attribute("src", server.gui_url)
    assert len(browser_context.pages) == pages_before  # no browser tab was opened
    assert _extension_errors(console) == []

    frame = frame_el.element_handle().content_frame()
    expect(frame.locator("div#root")).to_be_attached(timeout=GUI_TIMEOUT)
    assert frame.title() == "LiberTEM"
    assert frame.url == server.gui_url


def test_notebook_new_menu_opens_gui_in_new_browser_tab(
    jupyter_server: Any, browser_context: Any, console: Any
) -> None:
    expect = _expect()
    server = jupyter_server("notebook")
    page = browser_context.new_page()
    page.goto(server.url("tree"))

    menu = _open_notebook_new_menu(page)
    entry = menu.locator(f".lm-Menu-item[data-command='{COMMAND}']")
    expect(entry).to_have_text("LiberTEM")
    expect(entry.locator("svg[data-icon='libertem-jupyter-proxy:libertem']")).to_be_visible()
    save_screenshot(
        page, "notebook-new-menu", clip={"x": 860, "y": 100, "width": 420, "height": 240}
    )
    # Notebook 7.6 itself logs one unrelated settings error on the tree page: only ours count.
    assert _extension_errors(console) == [], console.errors

    with browser_context.expect_page() as new_tab:
        entry.click()
    _assert_gui_page(new_tab.value, server)


def test_notebook_new_menu_entry_survives_kernelspec_change(
    jupyter_server: Any, browser_context: Any, console: Any
) -> None:
    """Notebook 7 clears and refills the "New" menu when the kernelspecs change."""
    expect = _expect()
    server = jupyter_server("notebook")
    page = browser_context.new_page()
    page.goto(server.url("tree"))
    menu = _open_notebook_new_menu(page)
    expect(menu.locator(f".lm-Menu-item[data-command='{COMMAND}']")).to_have_count(1)
    page.keyboard.press("Escape")

    # A real change: install a second kernelspec, then make the page fetch the specs
    # (the same call its 61 s poll makes). The server reads kernel dirs on each request.
    kernel_dir = server.dirs["data"] / "kernels" / "added-later"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Kernel added later",
                "language": "python",
            }
        )
    )
    assert "added-later" in server.api("GET", "api/kernelspecs")["kernelspecs"]
    fired = page.evaluate(
        """async () => {
            const specs = window.jupyterapp.serviceManager.kernelspecs;
            let fired = false;
            const seen = () => { fired = true; };
            specs.specsChanged.connect(seen);
            await specs.refreshSpecs();
            specs.specsChanged.disconnect(seen);
            return fired;
        }"""
    )
    assert fired, "the kernelspecs change did not reach the page"

    menu = _open_notebook_new_menu(page)
    if NOTEBOOK_VERSION >= (7, 6):
        # Notebook rebuilt the menu (the new kernel is in it); 7.0 does not rebuild it
        expect(menu.locator(".lm-Menu-item", has_text="Kernel added later")).to_have_count(1)
    # the LiberTEM entry is there, once, still last
    entry = menu.locator(f".lm-Menu-item[data-command='{COMMAND}']")
    expect(entry).to_have_count(1)
    commands = menu.locator(".lm-Menu-item").evaluate_all(
        "items => items.map(i => i.dataset.command || i.dataset.type)"
    )
    assert commands[-1] == COMMAND, commands
    assert _extension_errors(console) == [], console.errors

    with browser_context.expect_page() as new_tab:
        entry.click()
    _assert_gui_page(new_tab.value, server)
