"""Resource figures of LiberTEM's process group (resources.py) and the status API that shows them.

The process-group tests build a real group the way dask does it: a leader in its own process
group that spawns multiprocessing "spawn" children after marking its environment like
``distributed.proctitle.enable_proctitle_on_children`` (what a Nanny does before it starts a
worker), next to children that are not workers. The API tests run the fake libertem-server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from libertem_jupyter_proxy.guard import group_members
from libertem_jupyter_proxy.resources import (
    HAS_SMAPS_ROLLUP,
    GroupResources,
    ResourceSampler,
    is_dask_worker,
    measure_group,
)

# The leader: one plain multiprocessing child (not a worker), then two children spawned the
# way a dask Nanny spawns workers, and one ordinary subprocess. Prints "ready" when all run.
LEADER = r"""
import multiprocessing as mp, os, subprocess, sys, time

def sleep():
    time.sleep(600)

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    plain = ctx.Process(target=sleep)
    plain.start()
    os.environ["__DASK_PARENT_PID"] = str(os.getpid())  # distributed.proctitle
    workers = [ctx.Process(target=sleep) for _ in range(2)]
    for w in workers:
        w.start()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(plain.pid, *(w.pid for w in workers), other.pid, flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


class Group:
    def __init__(self, leader: subprocess.Popen[str], plain: int, workers: list[int], other: int):
        self.leader = leader
        self.pgid = leader.pid
        self.plain = plain
        self.workers = workers
        self.other = other


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    script = tmp_path / "leader.py"
    script.write_text(LEADER)
    leader = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert leader.stdout is not None
        pids = [int(p) for p in leader.stdout.readline().split()]
        assert len(pids) == 4, pids
        yield Group(leader, pids[0], pids[1:3], pids[3])
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(10)


def test_measure_group_counts_processes_and_dask_workers(group: Group) -> None:
    members = group_members(group.pgid)
    # leader, resource tracker, the plain mp child, two workers, the subprocess
    assert {group.pgid, group.plain, *group.workers, group.other} <= set(members)
    r = measure_group(group.pgid)
    assert r.processes == len(members)
    assert r.workers == 2
    expected_rss = sum(psutil.Process(p).memory_info().rss for p in members)
    assert 0.8 * expected_rss < r.rss_bytes < 1.2 * expected_rss
    if HAS_SMAPS_ROLLUP:
        assert r.pss_bytes is not None
        # shared pages of the identical interpreters are split, so the group holds less
        assert 0 < r.pss_bytes < r.rss_bytes
    else:
        assert r.pss_bytes is None
    assert r.cpu_seconds > 0  # five Python interpreters started


def test_is_dask_worker(group: Group) -> None:
    assert [is_dask_worker(psutil.Process(p)) for p in group.workers] == [True, True]
    # a spawn child of the same parent without the Nanny's mark, the parent, a subprocess
    for pid in (group.plain, group.pgid, group.other):
        assert not is_dask_worker(psutil.Process(pid)), psutil.Process(pid).cmdline()


def test_measure_group_excludes_and_skips_gone_processes(group: Group) -> None:
    full = measure_group(group.pgid)
    without = measure_group(group.pgid, exclude={group.workers[0]})
    assert (without.processes, without.workers) == (full.processes - 1, 1)
    os.kill(group.other, signal.SIGKILL)  # dies: a zombie until the leader reaps it
    deadline = time.monotonic() + 10
    while psutil.Process(group.other).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert measure_group(group.pgid).processes == full.processes - 1


def test_measure_group_without_pss_and_of_an_empty_group() -> None:
    r = measure_group(os.getpgid(0), pss=False)
    assert r.pss_bytes is None and r.processes >= 1
    gone = subprocess.Popen(["true"], start_new_session=True)
    gone.wait()
    assert measure_group(gone.pid) == GroupResources(0, 0, 0, 0 if HAS_SMAPS_ROLLUP else None, 0.0)


async def test_sampler_shares_one_measurement(group: Group) -> None:
    sampler = ResourceSampler(max_age=60)
    first, second = await asyncio.gather(sampler.sample(group.pgid), sampler.sample(group.pgid))
    assert first is second
    assert await sampler.sample(group.pgid) is first  # within max_age: the same result
    other = await sampler.sample(group.pgid, exclude={group.other})
    assert other.processes == first.processes - 1
    sampler.max_age = 0
    assert await sampler.sample(group.pgid, exclude={group.other}) is not other


# ------------------------------------------------------------------ the status API


async def test_status_resources_while_stopped_and_running(client, supervisor) -> None:
    status = await client.json("libertem-proxy/api/status")
    assert status["state"] == "stopped" and status["resources"] is None
    await client.json("libertem-proxy/api/start", method="POST", auth="token")
    status = await client.json("libertem-proxy/api/status")
    r = status["resources"]
    assert set(r) == {"processes", "workers", "rss_bytes", "pss_bytes", "cpu_seconds"}
    # the fake server alone: the proxy's guard process is in its group but not counted
    run = supervisor.run
    assert run.guard is not None and run.guard.pid in group_members(run.pid)
    assert r["processes"] == 1 and r["workers"] == 0
    assert r["rss_bytes"] > 1 << 20 and isinstance(r["cpu_seconds"], float)
    await client.json("libertem-proxy/api/stop", method="POST", auth="token")
    assert (await client.json("libertem-proxy/api/status"))["resources"] is None


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_WORKERS": "2"})
async def test_status_resources_count_the_whole_group(client) -> None:
    await client.json("libertem-proxy/api/start", method="POST", auth="token")
    r = (await client.json("libertem-proxy/api/status"))["resources"]
    # the fake's stand-in workers are plain subprocesses, not dask workers
    assert r["processes"] == 3 and r["workers"] == 0


async def test_status_polling_is_not_activity(client, serverapp, supervisor) -> None:
    """The Running panel polls the status API: that must keep neither Jupyter (idle culler)
    nor LiberTEM (idle stop) alive."""
    settings = serverapp.web_app.settings
    await client.json("libertem-proxy/api/start", method="POST", auth="token")
    await client.json("libertem-proxy/api/status")
    api_marked = settings.get("api_last_activity")
    proxy_marked = settings.get("libertem_proxy_last_activity")
    backend_marked = supervisor.last_activity
    for _ in range(3):
        await client.json("libertem-proxy/api/status")
        await client.json("libertem-proxy/api/status", auth="token")
    assert settings.get("api_last_activity") == api_marked
    assert settings.get("libertem_proxy_last_activity") == proxy_marked
    assert supervisor.last_activity == backend_marked
