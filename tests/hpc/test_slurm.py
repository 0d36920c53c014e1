"""LiberTEM in a Slurm job through JupyterHub + batchspawner, in a real browser (see conftest.py).

One person: logs in through the hub's form, the hub submits the user server as a Slurm job with
one CPU, the browser opens ``/user/<u>/libertem/``, LiberTEM starts through the site's wrapper
script and Lmod module, its GUI proposes **1** worker (the job's CPUs, not the node's two), the
cluster starts, one analysis on a small .npy file sends its result image. Then the hub stops the
server, and a second job is cancelled with ``scancel``: each time no process of the user and no
run directory of the proxy may be left. Screenshots go to ``hpc-artifacts/``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..e2e.test_hub import Events, User, connect_cluster, load_dataset_and_analyse, write_npy
from ..helpers import CHROMIUM_ARGS
from .conftest import HUB, JUPYTER_ENV, LIBERTEM_ENV, PASSWORD, Cluster, wait_until

pytestmark = [pytest.mark.hpc, pytest.mark.slow, pytest.mark.browser]

TIMEOUT_MS = 120_000
GONE_TIMEOUT = 45.0  # Slurm: SIGTERM, KillWait=30 s, then SIGKILL of the whole cgroup


class _Hub:
    """What the e2e helpers need of a stack: URLs."""

    origin = HUB

    def url(self, path: str = "/") -> str:
        return HUB + path


class _Timings:
    def __init__(self) -> None:
        self.steps: list[tuple[str, str, float]] = []

    def add(self, who: str, step: str, start: float, end: float) -> None:
        self.steps.append((who, step, round(end - start, 2)))


def _assert_nothing_left(c: Cluster, what: str) -> None:
    try:
        wait_until(lambda: not c.processes() and not c.run_dirs(), GONE_TIMEOUT, what)
    except TimeoutError:
        pass
    left = c.processes()
    assert not left, f"{what}: processes of {c.user} left:\n" + "\n".join(
        f"{pid}: {cmd}" for pid, cmd in left
    )
    assert not c.run_dirs(), f"{what}: run directories left: {c.run_dirs()}"


def _job_processes(c: Cluster) -> dict[str, list[int]]:
    """The user's processes by kind, each checked to be inside the Slurm job's cgroup."""
    kinds: dict[str, list[int]] = {"singleuser": [], "libertem-server": [], "other": []}
    for pid, cmd in c.processes():
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        assert re.search(r"/slurm[^/]*/uid_\d+/job_\d+", cgroup), (cmd, cgroup)
        if "jupyterhub-singleuser" in cmd and cmd.startswith(str(JUPYTER_ENV)):
            kinds["singleuser"].append(pid)  # (srun's own two processes name it too)
        elif "libertem-server" in cmd:
            kinds["libertem-server"].append(pid)
        else:
            kinds["other"].append(pid)
    return kinds


async def _browser_session(c: Cluster, artifacts: Path, npy: Path) -> dict[str, Any]:
    from playwright.async_api import async_playwright, expect

    timings = _Timings()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            events = Events(c.user)
            context.on("page", events.watch)
            u = User(c.user, _Hub(), context, timings, artifacts, events)  # type: ignore[arg-type]
            page = u.page = await context.new_page()

            t = time.monotonic()
            await page.goto(HUB + "/hub/login")
            await page.get_by_label("Username:").fill(c.user)
            await page.get_by_label("Password:", exact=True).fill(PASSWORD)
            await u.shot(page, "hub-login")
            await page.get_by_role("button", name="Sign in").click()
            # the hub submits the job, waits for it to run and the server to answer
            await page.wait_for_url(re.compile(rf"/user/{c.user}/"), timeout=TIMEOUT_MS)
            timings.add(c.user, "log in -> server running in a Slurm job", t, time.monotonic())
            await u.shot(page, "user-server")

            t = time.monotonic()
            gui = u.gui = page
            await gui.goto(u.gui_url)
            await expect(gui).to_have_title("LiberTEM", timeout=TIMEOUT_MS)
            workers = gui.locator("input[name=numWorkers]")
            await workers.wait_for(timeout=TIMEOUT_MS)
            timings.add(
                c.user, "open /libertem/ -> GUI (through wrapper + module)", t, time.monotonic()
            )
            await u.shot(gui, "gui-proposes-workers")
            proposed = await workers.input_value()
            status_resp = await context.request.get(u.base + "libertem-proxy/api/status")
            status = await status_resp.json()
            config_resp = await context.request.get(u.gui_url + "api/config/")
            config = (await config_resp.json())["config"]

            await connect_cluster(u, "connect local cluster (1 worker)")
            await load_dataset_and_analyse(u, npy)
            return {
                "proposed": proposed,
                "status": status,
                "config": config,
                "timings": timings.steps,
            }
        finally:
            await browser.close()


def test_libertem_in_a_slurm_job(cluster: Cluster, artifacts: Path) -> None:
    c = cluster
    # in the home directory, where the GUI's file browser opens (libertem-server's cwd): the
    # browser's first listing and the one for the typed path then show the same directory,
    # whichever of the two answers comes last
    npy = c.home / "scan.npy"
    write_npy(npy)
    shutil.chown(npy, c.user)

    t0 = time.monotonic()
    seen = asyncio.run(_browser_session(c, artifacts, npy))
    (artifacts / "seen.json").write_text(json.dumps(seen, indent=2))

    # the GUI proposes the job's one CPU; the node has more (or the test proves nothing)
    assert len(os.sched_getaffinity(0)) >= 2, "the node must have >= 2 CPUs for this test"
    assert seen["proposed"] == "1", seen["proposed"]
    assert seen["config"]["localCores"] == 1 and seen["config"]["devices"]["cpus"] == [0]
    sizing = seen["status"]["sizing"]
    assert sizing["cpus"] == 1 and sizing["setting"] == "auto", sizing
    by_source = {b["source"]: b["cpus"] for b in sizing["bounds"]}
    assert by_source["affinity"] == 1 and by_source["SLURM_CPUS_ON_NODE"] == 1, sizing

    # everything runs inside the job, LiberTEM from its own venv (the module's PATH)
    kinds = _job_processes(c)
    assert len(kinds["singleuser"]) == 1, kinds
    (server,) = kinds["libertem-server"]
    argv = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
    assert argv[0].decode() == str(LIBERTEM_ENV / "bin" / "python"), argv
    (job,) = c.jobs()

    # the hub stops the server: the job ends and takes everything with it
    t = time.monotonic()
    c.hub_api("DELETE", f"users/{c.user}/server")
    wait_until(lambda: not c.server(), 60, "the hub to report the server stopped")
    _assert_nothing_left(c, "after the hub stopped the server")
    wait_until(lambda: job not in c.jobs(), 30, f"job {job} to leave squeue")
    stop_took = time.monotonic() - t

    # a second server, with LiberTEM and a worker running, ended by scancel
    t = time.monotonic()
    c.hub_api("POST", f"users/{c.user}/server")
    wait_until(lambda: c.server().get("ready"), 120, "the second server to be ready")
    token = c.hub_api("POST", f"users/{c.user}/tokens", {"expires_in": 600})["token"]
    req = urllib.request.Request(
        f"{HUB}/user/{c.user}/libertem/api/config/connection/",
        data=json.dumps({"connection": {"type": "LOCAL", "numWorkers": 1, "cudas": {}}}).encode(),
        method="PUT",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200
    assert c.run_dirs(), "LiberTEM runs, so its run directory exists"
    (job,) = c.jobs()
    c.slurm("scancel", job)
    _assert_nothing_left(c, f"after scancel {job}")
    scancel_took = time.monotonic() - t
    (artifacts / "timings.json").write_text(
        json.dumps(
            {
                "browser_steps": seen["timings"],
                "hub_stop_to_nothing_left_s": round(stop_took, 1),
                "second_spawn_and_scancel_s": round(scancel_took, 1),
                "total_s": round(time.monotonic() - t0, 1),
            },
            indent=2,
        )
    )
