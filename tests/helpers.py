"""Small pieces shared by the test suites (and the benchmark): no fixtures, no side effects."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

# Debian's Chromium, driven by playwright; never a browser that playwright downloads itself.
CHROMIUM = "/usr/bin/chromium"
# Headless, as root, with no background traffic: this machine reaches no host but itself.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Other server extensions that may be installed next to ours; tests and the benchmark turn
# them off so that only this extension's behaviour and cost are seen.
OTHER_EXTENSIONS = (
    "jupyterlab",
    "notebook",
    "notebook_shim",
    "jupyter_lsp",
    "jupyter_server_terminals",
    "nbclassic",
    "jupyter_server_proxy",
)


def missing(reason: str) -> None:
    """A tool a test needs is absent: skip on a developer's machine, fail in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def save_screenshot(page: Any, name: str, **kwargs: Any) -> None:
    """For the docs only: with ``LJP_SCREENSHOT_DIR`` set, save ``<name>.png`` there."""
    target = os.environ.get("LJP_SCREENSHOT_DIR")
    if target:
        os.makedirs(target, exist_ok=True)
        page.screenshot(path=os.path.join(target, f"{name}.png"), **kwargs)


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll a cheap probe (a /proc scan, a command, an HTTP GET) until it returns a truthy
    value, and return it; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def settled(supervisor: Any, timeout: float = 20.0) -> None:
    """Wait until the proxy's ``requests_in_flight`` is back to 0: a handler's end runs just
    after its answer, and a handler whose browser went away ends when the proxy notices."""
    import asyncio

    deadline = time.monotonic() + timeout
    while supervisor.requests_in_flight != 0:
        assert time.monotonic() < deadline, f"{supervisor.requests_in_flight} requests in flight"
        await asyncio.sleep(0.01)


def run_on_private_loop(coro_fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Run ``coro_fn()`` on a new event loop (for hypothesis tests, which are synchronous).

    Not ``asyncio.run``: it would unset the thread's current loop, which the next
    pytest-tornasync test (tornado 6.2) still expects."""
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), timeout))
    finally:
        loop.close()
