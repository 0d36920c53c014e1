"""Kubernetes as far as this machine allows: Jupyter in a cgroup with a CPU quota and a memory
limit, with ``CPU_LIMIT``/``MEM_LIMIT`` set as KubeSpawner sets them, and the real
libertem-server behind it.

A pod's container gets a cgroup with ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` (cgroup v1; v2:
``cpu.max``) and ``memory.limit_in_bytes`` (v2: ``memory.max``) from its limits, and
KubeSpawner passes JupyterHub's ``Spawner.get_env``, which sets ``CPU_LIMIT`` (``str(float)``)
and ``MEM_LIMIT`` (bytes). Here a ``jupyter server`` process is put into fresh cgroup v1
``cpu`` and ``memory`` directories (at the top of each hierarchy, as Slurm does) before it
starts, and the test asks the GUI's ``api/config/`` through the proxy what it proposes. Not
covered: a real kubelet, cgroup v2 (this machine's v2 hierarchy has no controllers; the fake
trees in test_sizing.py cover ``cpu.max``/``memory.max``), and a cgroup namespace.

Needs root and writable cgroup v1 ``cpu`` and ``memory`` hierarchies; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from .helpers import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("libertem-server") is None, reason="LiberTEM not installed"),
]

CGROUP = Path("/sys/fs/cgroup")
GiB = 1024**3
HOST_CORES = psutil.cpu_count(logical=False) or 2


def _cgroup_v1_writable() -> bool:
    return (
        os.geteuid() == 0
        and (CGROUP / "cpu" / "cpu.cfs_quota_us").exists()
        and (CGROUP / "memory" / "memory.limit_in_bytes").exists()
        and os.access(CGROUP / "cpu", os.W_OK)
    )


class Pod:
    """A ``jupyter server`` in its own cpu and memory cgroups, like a pod's container."""

    def __init__(self, tmp: Path, cpus: float, memory: int, env: dict[str, str]) -> None:
        name = f"ltjp-pod-{secrets.token_hex(4)}"
        self.dirs = [CGROUP / "cpu" / name, CGROUP / "memory" / name]
        for d in self.dirs:
            d.mkdir()
        period = 100_000
        (self.dirs[0] / "cpu.cfs_period_us").write_text(str(period))
        (self.dirs[0] / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
        (self.dirs[1] / "memory.limit_in_bytes").write_text(str(memory))
        self.port = free_port()
        self.token = secrets.token_hex(16)
        root = tmp / "root"
        root.mkdir()
        config = tmp / "jupyter_server_config.json"
        config.write_text(
            json.dumps(
                {
                    "ServerApp": {
                        "ip": "127.0.0.1",
                        "port": self.port,
                        "root_dir": str(root),
                        "open_browser": False,
                        "allow_root": True,
                    },
                    "IdentityProvider": {"token": self.token},
                    "LiberTEMProxy": {"command": [], "start_timeout": 120.0},
                }
            )
        )
        procs = [str(d / "cgroup.procs") for d in self.dirs]

        def enter_cgroups() -> None:  # in the child, before exec: Jupyter starts inside
            os.setsid()
            for p in procs:
                with open(p, "w") as f:
                    f.write(str(os.getpid()))

        self.log = tmp / "jupyter.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyter_server", f"--config={config}"],
                env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp), **env},
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=enter_cgroups,
            )

    def get(self, path: str, timeout: float = 120) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/{path}",
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                self.get("api/status", timeout=5)
                return
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)  # polling the server's own readiness (no event to await)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # Jupyter stops LiberTEM on the way out
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        left: list[str] = []
        for d in self.dirs:
            procs = (d / "cgroup.procs").read_text().split()
            left += procs
            for pid in procs:  # nothing should be left; if it is, do not leave it running
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            deadline = time.monotonic() + 10
            while (d / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
                time.sleep(0.05)
            d.rmdir()
        assert not left, f"processes left in the pod's cgroup: {left}"


@pytest.fixture
def pod_factory(tmp_path: Path) -> Iterator[Any]:
    if not _cgroup_v1_writable():
        pytest.skip("needs root and writable cgroup v1 cpu/memory hierarchies")
    pods: list[Pod] = []

    def make(cpus: float, memory: int, env: dict[str, str]) -> Pod:
        d = tmp_path / f"pod{len(pods)}"
        d.mkdir()
        pod = Pod(d, cpus, memory, env)
        pods.append(pod)
        pod.wait_ready()
        return pod

    yield make
    for pod in pods:
        pod.stop()


def _proposed(pod: Pod) -> tuple[int, dict[str, Any]]:
    config = pod.get("libertem/api/config/")["config"]  # starts libertem-server, then asks it
    assert config["devices"]["cpus"] == list(range(config["localCores"]))
    return config["localCores"], pod.get("libertem-proxy/api/status")["sizing"]


def test_pod_with_one_cpu(pod_factory: Any) -> None:
    """limits cpu: 1, memory: 4Gi: the quota (and CPU_LIMIT) say 1 worker, not the host's."""
    if HOST_CORES < 2:
        pytest.skip("needs >= 2 cores")
    pod = pod_factory(1.0, 4 * GiB, {"CPU_LIMIT": "1.0", "MEM_LIMIT": str(4 * GiB)})
    proposed, sizing = _proposed(pod)
    assert proposed == 1, sizing
    bounds = {b["source"]: b["cpus"] for b in sizing["bounds"]}
    assert bounds["cgroup-cpu"] == 1 and bounds["CPU_LIMIT"] == 1, sizing
    assert sizing["source"] == "cgroup-cpu", sizing  # the first of the equal bounds


def test_pod_whose_memory_allows_one_worker(pod_factory: Any) -> None:
    """limits cpu: 2, memory: 1Gi: CPUs would allow two workers, memory only one."""
    if HOST_CORES < 2:
        pytest.skip("needs >= 2 cores")
    pod = pod_factory(2.0, GiB, {"CPU_LIMIT": "2.0", "MEM_LIMIT": str(GiB)})
    proposed, sizing = _proposed(pod)
    assert proposed == 1, sizing
    bounds = {b["source"]: b["cpus"] for b in sizing["bounds"]}
    assert bounds["cgroup-cpu"] == 2 and bounds["CPU_LIMIT"] == 2, sizing
    assert bounds["cgroup-memory"] == 1 and bounds["MEM_LIMIT"] == 1, sizing
    assert sizing["source"] == "cgroup-memory", sizing
