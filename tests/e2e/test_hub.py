"""The whole path with real parts: browser -> nginx -> JupyterHub -> user server -> libertem-server.

Two users at the same time, through nginx: log in through the hub's form, open JupyterLab, click
the LiberTEM launcher tile, use the real LiberTEM GUI (local cluster with one worker, a generated
.npy dataset, one analysis whose result image arrives over the websocket), shut LiberTEM down
from the GUI and get it back by reloading. Plus: the two users have separate libertem-server
processes, bob cannot reach alice's GUI (HTTP or websocket), an anonymous browser lands on the
hub's login, and stopping the hub leaves no process and no token directory behind.

Screenshots of every step, the logs and ``timings.json`` go to ``e2e-artifacts/`` (the path is
printed at the end of the run). Everything waits on events (pages, selectors, websocket frames,
HTTP responses, process exits), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ..helpers import CHROMIUM_ARGS
from .conftest import (
    CHROMIUM,
    JUPYTER_VENV,
    LIBERTEM_VENV,
    LOADING_PAGE_USER,
    PASSWORD,
    USERS,
    Proc,
    Stack,
    Timings,
    alive,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Upper bounds for one step on a slow, busy machine (ms); the steps wait for events and
# normally take a fraction of this (see timings.json).
SPAWN_TIMEOUT = 180_000  # log in -> user server spawned -> JupyterLab's launcher
GUI_TIMEOUT = 120_000  # libertem-server start, cluster start, dataset load, one job
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCAN, FRAME = (16, 16), (32, 32)


# ---------------------------------------------------------------------------- helpers


def write_npy(path: Path) -> None:
    """A 16x16 scan of 32x32 float32 frames: a disk whose size and brightness vary with the
    scan position (so the results are not flat). Written by hand: the test env needs no numpy."""
    ny, nx = SCAN
    fy, fx = FRAME
    values = []
    for iy in range(ny):
        for ix in range(nx):
            r2 = (4 + iy / 2) ** 2
            for y in range(fy):
                for x in range(fx):
                    inside = (y - fy / 2) ** 2 + (x - fx / 2) ** 2 < r2
                    values.append(float(1 + ix) if inside else 0.0)
    shape = f"({ny}, {nx}, {fy}, {fx})"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }"
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(struct.pack(f"<{len(values)}f", *values))


@dataclass
class Events:
    """What arrived on a page's LiberTEM events websocket(s): JSON text and binary PNG frames."""

    who: str
    frames: list[str | bytes] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    status_polls: list[int] = field(default_factory=list)  # the loading page's, if shown

    def watch(self, page: Any) -> None:
        page.on("websocket", self._on_websocket)
        page.on("response", self._on_response)

    def _on_response(self, response: Any) -> None:
        if response.url.endswith("/libertem-proxy/api/status"):
            self.status_polls.append(response.status)

    def _on_websocket(self, ws: Any) -> None:
        if not ws.url.endswith("/libertem/api/events/"):
            return
        self.urls.append(ws.url)
        ws.on("framereceived", self._on_frame)
        self._notify()

    def _on_frame(self, payload: str | bytes) -> None:
        self.frames.append(payload)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def mark(self) -> int:
        return len(self.frames)

    def messages(self, start: int = 0) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for i, f in enumerate(self.frames[start:], start):
            if isinstance(f, str):
                try:
                    out.append((i, json.loads(f)))
                except ValueError:
                    pass
        return out

    async def wait(self, find: Callable[[], Any], what: str, timeout_ms: int = GUI_TIMEOUT) -> Any:
        """Wait until ``find()`` returns something truthy, re-checking on every frame."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            found = find()
            if found:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [m.get("messageType") for _, m in self.messages()]
                raise AssertionError(f"{self.who}: no {what} on the websocket; got {kinds}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def message(
        self, kind: str, start: int, timeout_ms: int = GUI_TIMEOUT, **match: Any
    ) -> tuple[int, dict[str, Any]]:
        def find() -> tuple[int, dict[str, Any]] | None:
            for i, m in self.messages(start):
                if m.get("messageType") == kind and all(m.get(k) == v for k, v in match.items()):
                    return i, m
            return None

        return await self.wait(find, f"{kind} {match or ''}".strip(), timeout_ms)

    async def png(self, start: int) -> bytes:
        def find() -> bytes | None:
            for f in self.frames[start:]:
                if isinstance(f, bytes) and f.startswith(PNG_MAGIC):
                    return f
            return None

        return await self.wait(find, "binary PNG result frame")


@dataclass
class User:
    """One person in front of one browser profile."""

    name: str
    stack: Stack
    context: Any
    timings: Timings
    shots: Path
    events: Events
    page: Any = None  # JupyterLab
    gui: Any = None  # the LiberTEM tab
    pids: list[int] = field(default_factory=list)
    _shot: int = 0

    @property
    def base(self) -> str:
        return self.stack.url(f"/user/{self.name}/")

    @property
    def gui_url(self) -> str:
        return self.base + "libertem/"

    async def shot(self, page: Any, step: str) -> None:
        self._shot += 1
        await page.screenshot(path=str(self.shots / f"{self.name}-{self._shot:02d}-{step}.png"))

    async def step(self, name: str, coro: Any) -> Any:
        t = time.monotonic()
        result = await coro
        self.timings.add(self.name, name, t, time.monotonic())
        return result

    async def status(self) -> dict[str, Any]:
        """The proxy's status API, with the user's own browser cookies."""
        resp = await self.context.request.get(self.base + "libertem-proxy/api/status")
        assert resp.status == 200, (resp.status, await resp.text())
        return await resp.json()


def _expect() -> Any:
    from playwright.async_api import expect

    return expect


# ---------------------------------------------------------------------------- the steps


async def log_in_and_open_lab(u: User) -> None:
    expect = _expect()
    page = u.page = await u.context.new_page()

    async def login() -> None:
        await page.goto(u.stack.url("/"))
        await expect(page).to_have_url(re.compile(r"/hub/login"))
        await page.get_by_label("Username:").fill(u.name)
        await page.get_by_label("Password:", exact=True).fill(PASSWORD)
        await u.shot(page, "hub-login")
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(re.compile(r"/(hub/spawn|hub/spawn-pending|user/)"))

    await u.step("log in through the hub form", login())

    async def lab() -> None:
        await page.wait_for_url(re.compile(rf"/user/{u.name}/lab"), timeout=SPAWN_TIMEOUT)
        tile = page.locator(".jp-LauncherCard", has_text="LiberTEM")
        await tile.wait_for(timeout=SPAWN_TIMEOUT)

    await u.step("spawn + JupyterLab launcher shown", lab())
    await u.shot(page, "jupyterlab")


async def open_gui_from_tile(u: User) -> None:
    expect = _expect()

    async def open_tab() -> None:
        async with u.context.expect_page() as new_tab:
            await u.page.locator(".jp-LauncherCard", has_text="LiberTEM").click()
        gui = u.gui = await new_tab.value
        await gui.wait_for_url(u.gui_url, timeout=GUI_TIMEOUT)
        await expect(gui).to_have_title("LiberTEM", timeout=GUI_TIMEOUT)
        # the real GUI: the cluster dialog it shows before anything else
        await gui.locator("input[name=numWorkers]").wait_for(timeout=GUI_TIMEOUT)
        await gui.get_by_role("button", name="Connect").wait_for()

    await u.step("tile -> GUI rendered in new tab (starts LiberTEM)", open_tab())
    assert u.page.url.startswith(u.base + "lab")  # the Jupyter tab stayed
    # if the loading page was shown on the way (LiberTEM takes seconds to start), its status
    # polls were answered: under JupyterHub they need the XSRF token
    assert all(code == 200 for code in u.events.status_polls), u.events.status_polls
    await u.shot(u.gui, "gui-cluster-dialog")
    status = await u.status()
    assert status["state"] == "running" and status["pid"], status
    u.pids.append(status["pid"])


async def connect_cluster(u: User, label: str) -> None:
    gui = u.gui
    start = u.events.mark()

    async def connect() -> None:
        await gui.locator("input[name=numWorkers]").fill("1")
        async with gui.expect_response(
            lambda r: (
                r.url.endswith("/libertem/api/config/connection/") and r.request.method == "PUT"
            )
        ) as put:
            await gui.get_by_role("button", name="Connect").click()
        resp = await put.value
        assert resp.status == 200, (resp.status, await resp.text())
        body = json.loads(resp.request.post_data or "{}")
        assert body["connection"]["numWorkers"] == 1, body
        await u.events.message("INITIAL_STATE", start)
        # the GUI itself says so
        await gui.locator(".ui.label", has_text=re.compile(r"^connected$")).wait_for()
        await gui.get_by_role("button", name="Browse").wait_for()

    await u.step(label, connect())
    await u.shot(gui, "cluster-connected" if len(u.pids) < 2 else "reconnected")


async def load_dataset_and_analyse(u: User, npy: Path) -> None:
    gui = u.gui

    async def load() -> None:
        start = u.events.mark()

        def listing(r: Any) -> bool:
            return "/libertem/api/browse/localfs/" in r.url and r.request.method == "GET"

        # one listing at a time: the GUI shows whichever answer comes last, so typing a path
        # while the first listing is still on its way can leave the home directory on screen
        # (CI saw the two answers come back in the other order once)
        async with gui.expect_response(listing):
            await gui.get_by_role("button", name="Browse").click()
        path = gui.locator("input[name=path]")
        await path.fill(str(npy.parent))
        async with gui.expect_response(listing):
            await path.press("Enter")
        await gui.locator(f"div[title='{npy.name}']").click()
        await gui.get_by_role("heading", name=f"Open: {npy}").wait_for()
        await u.shot(gui, "dataset-form")
        await gui.get_by_role("button", name="Load Dataset").click()
        await u.events.message("CREATE_DATASET", start)
        await gui.get_by_role("listbox").filter(has_text="Add analysis").wait_for()

    await u.step("open the .npy dataset (NPY loader)", load())
    await u.shot(gui, "dataset-loaded")

    async def analyse() -> None:
        start = u.events.mark()
        await gui.get_by_role("listbox").filter(has_text="Add analysis").click()
        await gui.get_by_role("option", name="Disk").click()
        # adding the analysis runs the frame average for its left-hand image first
        await u.events.message("FINISH_JOB", start)
        await gui.get_by_role("button", name="Apply").wait_for()
        start = u.events.mark()
        await gui.get_by_role("button", name="Apply").click()
        _, started = await u.events.message("JOB_STARTED", start)
        i, _ = await u.events.message("FINISH_JOB", start, job=started["job"])
        png = await u.events.png(i)
        assert len(png) > 100
        (u.shots / f"{u.name}-result-from-websocket.png").write_bytes(png)

    await u.step("Disk analysis: Apply -> result PNG on ws", analyse())
    await u.shot(gui, "analysis-result")


async def shutdown_and_reload(u: User) -> None:
    gui = u.gui
    old_pid = u.pids[-1]

    async def shutdown() -> None:
        await gui.get_by_role("button", name="Shutdown").click()
        modal = gui.locator(".ui.modal")
        await modal.get_by_text("Confirm shutdown").wait_for()
        await u.shot(gui, "shutdown-confirm")
        async with gui.expect_response(
            lambda r: r.url.endswith("/libertem/api/shutdown/") and r.request.method == "DELETE"
        ) as resp_info:
            await modal.get_by_role("button", name="Shutdown").click()
        resp = await resp_info.value
        assert resp.status == 200, (resp.status, await resp.text())
        # the GUI's own verdict once its websocket dropped after a Shutdown
        await gui.get_by_text("Connection is closed").wait_for()
        await asyncio.to_thread(
            wait_until, lambda: not alive(old_pid), 30, f"libertem-server {old_pid} to exit"
        )

    await u.step("Shutdown + confirm -> libertem-server exits", shutdown())
    await u.shot(gui, "after-shutdown")
    status = await u.status()
    assert status["state"] == "stopped", status
    assert status["last_exit_code"] == 0, status

    async def reload() -> None:
        await gui.reload()
        await _expect()(gui).to_have_title("LiberTEM", timeout=GUI_TIMEOUT)
        await gui.locator("input[name=numWorkers]").wait_for(timeout=GUI_TIMEOUT)

    await u.step("reload -> GUI back (new libertem-server)", reload())
    await u.shot(gui, "gui-back-after-reload")
    status = await u.status()
    assert status["state"] == "running", status
    new_pid = status["pid"]
    assert new_pid and new_pid != old_pid, status
    assert alive(new_pid) and not alive(old_pid)
    u.pids.append(new_pid)
    await connect_cluster(u, "reconnect cluster on the new server")


# ---------------------------------------------------------------------------- checks


def libertem_servers(stack: Stack) -> dict[str, list[Proc]]:
    out: dict[str, list[Proc]] = {u: [] for u in USERS}
    for p in stack.processes():
        if p.is_libertem_server:
            out.setdefault(p.env.get("JUPYTERHUB_USER", "?"), []).append(p)
    return out


def check_separate_environments(stack: Stack, users: dict[str, User]) -> None:
    """Each user has their own libertem-server, from LiberTEM's venv, found via the JSON file."""
    servers = libertem_servers(stack)
    for name, u in users.items():
        mine = servers[name]
        assert [p.pid for p in mine] == [u.pids[-1]], (name, [p.command for p in mine], u.pids)
        proc = mine[0]
        # started from LiberTEM's own environment
        assert proc.cmdline[0] == str(LIBERTEM_VENV / "bin" / "python"), proc.command
        assert proc.cmdline[1] == str(LIBERTEM_VENV / "bin" / "libertem-server"), proc.command
        assert proc.env.get("LIBERTEM_ROOT") == str(stack.libertem_root)
        # its dask worker(s) exist and belong to this user only
        workers = [
            p for p in stack.user_processes(name) if p.is_dask_worker and not p.is_libertem_server
        ]
        assert workers, f"{name}: no dask worker processes"
        # the user server runs from the Jupyter env, whose PATH has no libertem-server at all
        user_servers = [p for p in stack.user_processes(name) if p.is_user_server]
        assert len(user_servers) == 1, [p.command for p in user_servers]
        us = user_servers[0]
        assert us.cmdline[0].startswith(str(JUPYTER_VENV)), us.command
        assert us.env["PATH"] == stack.spawn_path
        assert shutil.which("libertem-server", path=us.env["PATH"]) is None, us.env["PATH"]
        assert not (JUPYTER_VENV / "bin" / "libertem-server").exists()
    assert users["alice"].pids[-1] != users["bob"].pids[-1]
    # the proxy says where the command came from: the JSON file below $LIBERTEM_ROOT
    json_file = stack.libertem_root / "etc" / "libertem_jupyter_proxy.json"
    starts = re.findall(r"Starting LiberTEM \(([^)]*)\)", stack.hub_log_text())
    assert len(starts) >= 2 and set(starts) == {str(json_file)}, starts


def _http_status(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


async def _ws_status(url: str, headers: dict[str, str]) -> int:
    """101 if the websocket handshake succeeded, else the HTTP status of the refusal."""
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, headers=headers, timeout=aiohttp.ClientWSTimeout())
        except aiohttp.WSServerHandshakeError as e:
            return e.status
        await ws.close()
        return 101


async def check_bob_cannot_reach_alice(stack: Stack, alice: User, bob: User) -> None:
    alice_pid = alice.pids[-1]
    ws_url = alice.gui_url.replace("http://", "ws://") + "api/events/"

    # bob's browser, logged in to the hub, opens alice's GUI URL
    page = await bob.context.new_page()
    resp = await page.goto(alice.gui_url)
    assert resp is not None and resp.status == 403, (resp and resp.status, page.url)
    await bob.shot(page, "403-on-alice-gui")
    await page.close()

    # bob's API token, over HTTP and websocket; alice's token as the control
    bob_auth = {"Authorization": f"token {stack.user_token('bob')}"}
    alice_auth = {"Authorization": f"token {stack.user_token('alice')}"}
    status_url = alice.base + "libertem-proxy/api/status"
    assert await asyncio.to_thread(_http_status, alice.gui_url, bob_auth) == 403
    assert await asyncio.to_thread(_http_status, status_url, bob_auth) == 403
    assert await asyncio.to_thread(_http_status, alice.gui_url, alice_auth) == 200
    assert await _ws_status(ws_url, bob_auth) == 403
    assert await _ws_status(ws_url, alice_auth) == 101

    # bob's browser cookies (hub login) on alice's websocket, with a same-site Origin
    cookies = await bob.context.cookies(stack.origin)
    cookie_header = "; ".join(f"{c['name']}={c['value']}" for c in cookies)
    assert cookie_header, "bob has no cookies?"
    assert await _ws_status(ws_url, {"Cookie": cookie_header, "Origin": stack.origin}) == 403

    # nothing of that started or stopped anything of alice's
    assert libertem_servers(stack)["alice"][0].pid == alice_pid


async def check_anonymous_goes_to_login(stack: Stack, browser: Any, shots: Path) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = await context.new_page()
        await page.goto(stack.url("/user/alice/libertem/"))
        await page.wait_for_url(re.compile(r"/hub/login"))
        assert page.url.startswith(stack.url("/hub/login")), page.url
        await page.get_by_label("Username:").wait_for()
        await page.screenshot(path=str(shots / "anonymous-01-sent-to-hub-login.png"))
        ws_url = stack.url("/user/alice/libertem/api/events/").replace("http://", "ws://")
        assert await _ws_status(ws_url, {"Origin": stack.origin}) == 403
    finally:
        await context.close()


# ---------------------------------------------------------------------------- the tests


async def _scenario(stack: Stack, artifacts: Path, timings: Timings) -> None:
    from playwright.async_api import async_playwright

    datasets = {}
    for name in USERS:
        datasets[name] = stack.homes[name] / "e2e-data" / "scan.npy"
        write_npy(datasets[name])

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            users: dict[str, User] = {}
            for name in USERS:
                context = await browser.new_context(viewport={"width": 1280, "height": 900})
                context.set_default_timeout(GUI_TIMEOUT)
                events = Events(name)
                context.on("page", events.watch)  # before any page of it opens a websocket
                users[name] = User(name, stack, context, timings, artifacts, events)

            async def phase1(u: User) -> None:
                await log_in_and_open_lab(u)
                await open_gui_from_tile(u)
                await connect_cluster(u, "connect local cluster (1 worker) -> INITIAL_STATE")
                await load_dataset_and_analyse(u, datasets[u.name])

            await asyncio.gather(*(phase1(u) for u in users.values()))

            t = time.monotonic()
            check_separate_environments(stack, users)
            await check_bob_cannot_reach_alice(stack, users["alice"], users["bob"])
            await check_anonymous_goes_to_login(stack, browser, artifacts)
            timings.add("both", "isolation checks (processes, 403, anonymous)", t, time.monotonic())

            await asyncio.gather(*(shutdown_and_reload(u) for u in users.values()))
            check_separate_environments(stack, users)
            for u in users.values():
                # the reloaded page's new websocket got the new server's INITIAL_STATE
                assert len(u.events.urls) >= 2, u.events.urls
        finally:
            await browser.close()


def test_two_users_through_nginx(stack: Stack, artifacts: Path, timings: Timings) -> None:
    asyncio.run(_scenario(stack, artifacts, timings))


async def _loading_page(stack: Stack, artifacts: Path, timings: Timings) -> None:
    from playwright.async_api import async_playwright

    expect = _expect()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(GUI_TIMEOUT)
            u = User(LOADING_PAGE_USER, stack, context, timings, artifacts, Events("carol"))
            await log_in_and_open_lab(u)
            page = await context.new_page()
            t = time.monotonic()
            async with page.expect_response(
                lambda r: r.url.endswith("/libertem-proxy/api/status")
            ) as first_poll:
                await page.goto(u.gui_url)
                await expect(page).to_have_title("Starting LiberTEM…")
                await u.shot(page, "loading-page")
            poll = await first_poll.value
            await u.shot(page, "loading-page-polled")
            # the page can only turn into the GUI if its status poll is answered
            assert poll.status == 200, (
                f"the loading page's status poll got {poll.status}: {await poll.text()}"
            )
            await expect(page).to_have_title("LiberTEM", timeout=GUI_TIMEOUT)
            await page.locator("input[name=numWorkers]").wait_for()
            timings.add(u.name, "loading page -> GUI", t, time.monotonic())
            await u.shot(page, "gui-after-loading-page")
        finally:
            await browser.close()


def test_loading_page_turns_into_gui_under_hub(
    stack: Stack, artifacts: Path, timings: Timings
) -> None:
    """carol's first visit to the GUI (by URL) gets the loading page while LiberTEM starts; it
    must turn into the GUI by itself, which needs its status polls to pass JupyterHub's XSRF
    rule for cookie-authenticated fetches (they got 403 before the page sent X-XSRFToken)."""
    asyncio.run(_loading_page(stack, artifacts, timings))


def _ensure_backend_with_cluster(stack: Stack, user: str) -> None:
    """Make sure ``user`` has a running libertem-server with dask workers (through the API),
    so that this test means something even when run on its own."""
    if any(p.is_dask_worker for p in stack.user_processes(user)):
        return
    token = stack.user_token(user)
    try:
        stack.hub_api("POST", f"users/{user}/server")
    except urllib.error.HTTPError as e:
        if e.code != 400:  # 400: already running
            raise
    wait_until(
        lambda: stack.hub_api("GET", f"users/{user}")["servers"].get("", {}).get("ready"),
        180,
        f"{user}'s server",
        interval=0.2,
    )
    req = urllib.request.Request(
        stack.url(f"/user/{user}/libertem/api/config/connection/"),
        data=json.dumps({"connection": {"type": "LOCAL", "numWorkers": 1, "cudas": {}}}).encode(),
        method="PUT",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=180) as resp:
        assert resp.status == 200


def test_hub_stop_leaves_no_process_and_no_token_dir(
    stack: Stack, artifacts: Path, timings: Timings
) -> None:
    for user in USERS:
        _ensure_backend_with_cluster(stack, user)
    before = stack.processes()
    for user in USERS:
        mine = [p for p in before if p.env.get("JUPYTERHUB_USER") == user]
        assert any(p.is_libertem_server for p in mine), [p.command for p in mine]
        assert any(p.is_dask_worker for p in mine), [p.command for p in mine]
        assert list(stack.user_tmp[user].glob("libertem-proxy-*")), "no token dir while running"
    (artifacts / "processes-before-hub-stop.txt").write_text(
        "\n".join(f"{p.pid} {p.env.get('JUPYTERHUB_USER', '-')} {p.command}" for p in before)
    )

    took = stack.stop_hub()
    timings.add("stack", "SIGTERM hub -> hub exited", time.monotonic() - took, time.monotonic())
    assert stack.hub_proc is not None and stack.hub_proc.poll() is not None, "hub did not exit"

    def leftovers() -> list[Proc]:
        # nginx is still up (it is stopped at teardown); everything else must be gone
        return [p for p in stack.processes() if "nginx" not in p.command]

    t = time.monotonic()
    try:
        wait_until(lambda: not leftovers(), 15, "the hub's processes to disappear", interval=0.1)
    except TimeoutError:
        pass
    timings.add("stack", "hub exited -> no process of it left", t, time.monotonic())
    left = leftovers()
    assert not left, "left running after the hub stopped:\n" + "\n".join(
        f"{p.pid}: {p.command}" for p in left
    )
    for user in USERS:
        dirs = list(stack.user_tmp[user].glob("libertem-proxy-*"))
        assert not dirs, f"token directories left for {user}: {dirs}"
