"""The worker count the real GUI proposes, with the real libertem-server (LiberTEM 0.16).

LiberTEM answers ``api/config/`` with the host's physical cores whatever this Jupyter may use;
through the proxy the answer carries the sizing figure instead. Each test constrains the Jupyter
process (here: the test process, which runs Jupyter in-process) the way a deployment does, and
compares the proxied answer with libertem-server's own one, fetched directly: the two values
are the only difference.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from tornado.httpclient import AsyncHTTPClient

from .test_lifecycle import navigate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("libertem-server") is None, reason="LiberTEM not installed"),
    pytest.mark.proxy_config(command=[], start_timeout=120.0, stop_timeout=10.0),
]

HOST_CORES = psutil.cpu_count(logical=False) or 2  # what LiberTEM 0.16 proposes by itself
SIZING_ENV = ("CPU_LIMIT", "MEM_LIMIT", "SLURM_CPUS_ON_NODE", "SLURM_JOB_CPUS_PER_NODE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No sizing variable of the machine running the tests (CI inside a job or a pod)."""
    for name in SIZING_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """Jupyter's CPU affinity restricted to one CPU, as ``taskset -c N`` or Slurm would."""
    before = os.sched_getaffinity(0)
    if len(before) < 2 or HOST_CORES < 2:
        pytest.skip("needs a machine with >= 2 cores (else 1 proves nothing)")
    cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


async def _configs(client: Any, supervisor: Any) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(through the proxy, directly from libertem-server, the proxied response)."""
    r = await navigate(client, supervisor)
    assert r.code == 200, r.body[:300]
    proxied = await client.fetch("libertem/api/config/")
    assert proxied.code == 200, proxied.body[:300]
    run = supervisor.run
    direct = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{run.port}/api/config/", headers={"X-Api-Key": run.token}
    )
    return json.loads(proxied.body), json.loads(direct.body), proxied


def _only_cpus_differ(proxied: dict[str, Any], direct: dict[str, Any], cpus: int) -> None:
    assert direct["config"]["localCores"] == HOST_CORES, direct["config"]["localCores"]
    expected = json.loads(json.dumps(direct))
    expected["config"]["localCores"] = cpus
    expected["config"]["devices"]["cpus"] = list(range(cpus))
    assert proxied == expected  # GPUs, dataset types, cwd, version: all as LiberTEM sent them


async def _sizing(client: Any) -> dict[str, Any]:
    return (await client.json("libertem-proxy/api/status"))["sizing"]


async def test_affinity_of_jupyter_is_what_the_gui_proposes(one_cpu, client, supervisor):
    proxied, direct, resp = await _configs(client, supervisor)
    _only_cpus_differ(proxied, direct, 1)
    assert "Etag" not in resp.headers  # the backend's ETag described the other body
    # libertem-server (and so its workers) inherited the affinity
    assert os.sched_getaffinity(supervisor.run.pid) == {one_cpu}
    sizing = await _sizing(client)
    assert (sizing["cpus"], sizing["source"], sizing["setting"]) == (1, "affinity", "auto")


@pytest.fixture
def cpu_limit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """JupyterHub's Spawner.get_env writes ``str(cpu_limit)``: ``"1.0"`` for a limit of 1."""
    monkeypatch.setenv("CPU_LIMIT", "1.0")


async def test_cpu_limit_as_kubespawner_sets_it(cpu_limit_env, client, supervisor):
    proxied, direct, _ = await _configs(client, supervisor)
    _only_cpus_differ(proxied, direct, 1)
    assert (await _sizing(client))["source"] == "CPU_LIMIT"


@pytest.fixture
def slurm_job_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Slurm job with ``-c 1`` has (measured with Slurm 22.05: both are "1")."""
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    monkeypatch.setenv("SLURM_JOB_CPUS_PER_NODE", "1")


async def test_slurm_job_cpus(slurm_job_env, client, supervisor):
    proxied, direct, _ = await _configs(client, supervisor)
    _only_cpus_differ(proxied, direct, 1)
    sizing = await _sizing(client)
    assert sizing["source"] == "SLURM_CPUS_ON_NODE", sizing


@pytest.mark.proxy_config(cpus=1)
async def test_integer_setting(client, supervisor):
    proxied, direct, _ = await _configs(client, supervisor)
    _only_cpus_differ(proxied, direct, 1)
    assert (await _sizing(client))["source"] == "setting"


@pytest.mark.proxy_config(cpus="host")
async def test_host_setting_leaves_the_answer_alone(client, supervisor):
    proxied, direct, _ = await _configs(client, supervisor)
    assert proxied == direct
    assert (await _sizing(client))["cpus"] is None
