"""sizing.py and adaptations.py on fabricated cgroup trees and environments (fast, no processes).

Each test builds a ``proc`` directory (``self/cgroup``, ``self/mountinfo``) pointing at cgroup
mount points below ``tmp_path``, as the kernel shows them on a cgroup v1 machine (Debian 11,
this machine), a cgroup v2 machine (Debian 12 with systemd), and inside a container whose
cgroup namespace shows its own cgroup as the mount root.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libertem_jupyter_proxy import adaptations, sizing
from libertem_jupyter_proxy.sizing import (
    RESERVED_MEMORY,
    WORKER_MEMORY,
    cpu_figure,
    parse_cpu_limit,
    parse_slurm_cpus_per_node,
)

GiB = 1024**3
NO_CPUS_LIMIT = {0, 1, 2, 3, 4, 5, 6, 7}  # an 8-CPU affinity: never the smallest bound here


def _all_cpus() -> set[int]:
    return set(NO_CPUS_LIMIT)


class Tree:
    """A fake /proc/self plus cgroup mounts below one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = root / "proc"
        (self.proc / "self").mkdir(parents=True)
        self.cgroup_lines: list[str] = []
        self.mount_lines: list[str] = []

    def mount(self, version: int, name: str, options: str = "", root: str = "/") -> Path:
        point = self.root / "sys" / "fs" / "cgroup" / name
        point.mkdir(parents=True, exist_ok=True)
        n = len(self.mount_lines) + 30
        fstype = "cgroup2" if version == 2 else "cgroup"
        opts = "rw,nosuid,nodev,noexec,relatime" + ("," + options if options else "")
        self.mount_lines.append(f"{n} 25 0:{n} {root} {point} rw,nosuid - {fstype} {fstype} {opts}")
        return point

    def member(self, hid: int, controllers: str, path: str) -> None:
        self.cgroup_lines.append(f"{hid}:{controllers}:{path}")

    def write(self, point: Path, rel: str, files: dict[str, str]) -> None:
        d = point / rel.strip("/") if rel.strip("/") else point
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text + "\n")

    def figure(self, env: dict[str, str] | None = None, cpus: set[int] | None = None):
        (self.proc / "self" / "cgroup").write_text("\n".join(self.cgroup_lines) + "\n")
        (self.proc / "self" / "mountinfo").write_text(
            "22 1 0:21 / /proc rw - proc proc rw\n" + "\n".join(self.mount_lines) + "\n"
        )
        return cpu_figure(
            "auto",
            environ=env or {},
            proc=self.proc,
            affinity=(lambda: set(cpus)) if cpus is not None else _all_cpus,
            physical=lambda: None,  # the fabricated host's core count is not known
        )


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


# ---------------------------------------------------------------------------- CPU bounds


def test_no_limits_gives_the_affinity(tree: Tree) -> None:
    fig = tree.figure()
    assert (fig.cpus, fig.source) == (8, "affinity")
    assert [b.source for b in fig.bounds] == ["affinity"]


def test_affinity_restricted(tree: Tree) -> None:
    fig = tree.figure(cpus={3})
    assert (fig.cpus, fig.source) == (1, "affinity")
    assert "3" in fig.bounds[0].detail


def test_cgroup_v1_cpu_quota_of_an_ancestor(tree: Tree) -> None:
    """Slurm's cgroup v1 layout: the job's directory has the limit, the task's inherits it."""
    cpu = tree.mount(1, "cpu,cpuacct", "cpu,cpuacct")
    path = "/slurm_node1/uid_1000/job_7/step_0/task_0"
    tree.member(4, "cpu,cpuacct", path)
    tree.write(cpu, "", {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"})
    tree.write(
        cpu,
        "/slurm_node1/uid_1000/job_7",
        {"cpu.cfs_quota_us": "300000", "cpu.cfs_period_us": "100000"},
    )
    tree.write(cpu, path, {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"})
    fig = tree.figure()
    assert (fig.cpus, fig.source) == (3, "cgroup-cpu")
    assert "job_7" in fig.bounds[1].detail


def test_cgroup_v1_fractional_quota_rounds_down_but_not_to_zero(tree: Tree) -> None:
    cpu = tree.mount(1, "cpu", "cpu")
    tree.member(2, "cpu", "/pod")
    tree.write(cpu, "/pod", {"cpu.cfs_quota_us": "150000", "cpu.cfs_period_us": "100000"})
    assert tree.figure().cpus == 1
    tree.write(cpu, "/pod", {"cpu.cfs_quota_us": "20000", "cpu.cfs_period_us": "100000"})
    assert tree.figure().cpus == 1


def test_cgroup_v2_cpu_max(tree: Tree) -> None:
    unified = tree.mount(2, "unified")
    (unified / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    tree.member(0, "", "/user.slice/user-1000.slice/session-3.scope")
    tree.write(unified, "/user.slice", {"cpu.max": "max 100000"})
    tree.write(unified, "/user.slice/user-1000.slice", {"cpu.max": "200000 100000"})
    tree.write(unified, "/user.slice/user-1000.slice/session-3.scope", {"cpu.max": "max 100000"})
    fig = tree.figure()
    assert (fig.cpus, fig.source) == (2, "cgroup-cpu")


def test_cgroup_v2_without_cpu_controller_is_ignored(tree: Tree) -> None:
    """This machine: a v2 mount with no controllers next to the v1 hierarchies."""
    unified = tree.mount(2, "unified")
    (unified / "cgroup.controllers").write_text("\n")
    tree.member(0, "", "/")
    tree.write(unified, "", {"cpu.max": "100000 100000"})  # would be 1 if it were read
    assert tree.figure().source == "affinity"


def test_container_cgroup_namespace_mount_root(tree: Tree) -> None:
    """Inside a container the mount shows the container's own cgroup as its root."""
    cpu = tree.mount(1, "cpu", "cpu", root="/kubepods/pod123/ctr")
    tree.member(3, "cpu", "/kubepods/pod123/ctr")
    tree.write(cpu, "", {"cpu.cfs_quota_us": "200000", "cpu.cfs_period_us": "100000"})
    assert tree.figure().cpus == 2


def test_mount_of_another_part_of_the_hierarchy_is_not_used(tree: Tree) -> None:
    cpu = tree.mount(1, "cpu", "cpu", root="/other")
    tree.member(3, "cpu", "/mine")
    tree.write(cpu, "", {"cpu.cfs_quota_us": "100000", "cpu.cfs_period_us": "100000"})
    assert tree.figure().source == "affinity"


def test_cpu_limit_as_kubespawner_sets_it(tree: Tree) -> None:
    fig = tree.figure({"CPU_LIMIT": "2.0"})
    assert (fig.cpus, fig.source) == (2, "CPU_LIMIT")
    assert tree.figure({"CPU_LIMIT": "0.5"}).cpus == 1
    # nonsense is ignored, not fatal
    assert tree.figure({"CPU_LIMIT": "lots"}).source == "affinity"
    assert tree.figure({"CPU_LIMIT": "0"}).source == "affinity"


def test_slurm_cpus_on_node_wins_over_job_cpus_per_node(tree: Tree) -> None:
    fig = tree.figure({"SLURM_CPUS_ON_NODE": "3", "SLURM_JOB_CPUS_PER_NODE": "6"})
    assert (fig.cpus, fig.source) == (3, "SLURM_CPUS_ON_NODE")
    fig = tree.figure({"SLURM_JOB_CPUS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2"})
    assert (fig.cpus, fig.source) == (2, "SLURM_JOB_CPUS_PER_NODE")


@pytest.mark.parametrize(
    ("value", "node", "expected"),
    [
        ("1", 0, 1),
        ("4(x2),2", 0, 4),
        ("4(x2),2", 1, 4),
        ("4(x2),2", 2, 2),
        ("4(x2),2", 3, None),
        ("72(x3)", 2, 72),
        ("", 0, None),
        ("4(x)", 0, None),
        ("four", 0, None),
    ],
)
def test_parse_slurm_cpus_per_node(value: str, node: int, expected: int | None) -> None:
    assert parse_slurm_cpus_per_node(value, node) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 512), st.integers(1, 9)), min_size=1, max_size=6))
def test_parse_slurm_cpus_per_node_round_trip(groups: list[tuple[int, int]]) -> None:
    text = ",".join(f"{n}(x{k})" if k > 1 else str(n) for n, k in groups)
    expanded = [n for n, k in groups for _ in range(k)]
    for i, n in enumerate(expanded):
        assert parse_slurm_cpus_per_node(text, i) == n
    assert parse_slurm_cpus_per_node(text, len(expanded)) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_parse_cpu_limit_never_raises(text: str) -> None:
    n = parse_cpu_limit(text)
    assert n is None or n >= 1


# ---------------------------------------------------------------------------- memory bound


def test_cgroup_v1_memory_limit(tree: Tree) -> None:
    mem = tree.mount(1, "memory", "memory")
    tree.member(4, "memory", "/slurm_n/uid_1/job_2/step_0")
    tree.write(mem, "", {"memory.limit_in_bytes": "9223372036854771712"})  # unlimited
    tree.write(mem, "/slurm_n/uid_1/job_2", {"memory.limit_in_bytes": str(2 * GiB)})
    tree.write(mem, "/slurm_n/uid_1/job_2/step_0", {"memory.limit_in_bytes": str(4 * GiB)})
    fig = tree.figure()
    expected = (2 * GiB - RESERVED_MEMORY) // WORKER_MEMORY
    assert (fig.cpus, fig.source) == (expected, "cgroup-memory")
    assert "job_2" in fig.bounds[-1].detail and "per worker" in fig.bounds[-1].detail


def test_cgroup_v2_memory_max(tree: Tree) -> None:
    unified = tree.mount(2, "unified")
    (unified / "cgroup.controllers").write_text("cpu memory\n")
    tree.member(0, "", "/pod")
    tree.write(unified, "/pod", {"memory.max": str(3 * GiB), "cpu.max": "max 100000"})
    assert tree.figure().cpus == (3 * GiB - RESERVED_MEMORY) // WORKER_MEMORY
    tree.write(unified, "/pod", {"memory.max": "max"})
    assert tree.figure().source == "affinity"


def test_mem_limit_and_a_tiny_limit_still_gives_one(tree: Tree) -> None:
    fig = tree.figure({"MEM_LIMIT": str(GiB)})
    assert (fig.cpus, fig.source) == (1, "MEM_LIMIT")
    fig = tree.figure({"MEM_LIMIT": str(100 * 1024**2)})
    assert fig.cpus == 1


def test_smallest_bound_wins_and_all_are_reported(tree: Tree) -> None:
    env = {"CPU_LIMIT": "4", "SLURM_CPUS_ON_NODE": "6", "MEM_LIMIT": str(16 * GiB)}
    fig = tree.figure(env, cpus={0, 1, 2, 3, 4})
    assert (fig.cpus, fig.source) == (4, "CPU_LIMIT")
    assert [b.source for b in fig.bounds] == [
        "affinity",
        "CPU_LIMIT",
        "SLURM_CPUS_ON_NODE",
        "MEM_LIMIT",
    ]
    assert json.loads(json.dumps(fig.to_dict()))["cpus"] == 4


# ---------------------------------------------------------------------------- settings


def test_integer_and_host_settings() -> None:
    assert cpu_figure(5).to_dict() == {"setting": "5", "cpus": 5, "source": "setting", "bounds": []}
    assert cpu_figure("host").cpus is None
    with pytest.raises(ValueError):
        cpu_figure(0)
    with pytest.raises(ValueError):
        cpu_figure("many")


def test_never_more_than_the_physical_cores() -> None:
    """SMT: 16 logical CPUs on 8 cores; LiberTEM itself proposes 8, so "auto" never more
    (red-team finding: the affinity alone proposed 16)."""
    fig = cpu_figure("auto", {}, Path("/nonexistent"), lambda: set(range(16)), lambda: 8)
    assert (fig.cpus, fig.source) == (8, "physical-cores")
    fig = cpu_figure(
        "auto", {"CPU_LIMIT": "4"}, Path("/nonexistent"), lambda: set(range(16)), lambda: 8
    )
    assert (fig.cpus, fig.source) == (4, "CPU_LIMIT")


def test_this_machine_gives_a_sane_figure() -> None:
    fig = cpu_figure("auto")
    assert fig.cpus is not None and 1 <= fig.cpus <= (len(sizing.os.sched_getaffinity(0)))


# ---------------------------------------------------------------------------- the rewrite

CONFIG = {
    "status": "ok",
    "messageType": "CONFIG",
    "config": {
        "version": "0.16.0",
        "localCores": 64,
        "devices": {"cpus": list(range(64)), "cudas": [0, 1], "has_cupy": True},
        "cwd": "/home/a</b",
        "separator": "/",
    },
}


def test_config_rewrite_changes_only_the_cpu_count() -> None:
    adapt = adaptations.for_response("GET", "/api/config/", 200, 3)
    assert adapt is not None
    body = json.dumps(CONFIG).replace("</", "<\\/").encode()
    out = json.loads(adapt.body(body))
    expected = json.loads(json.dumps(CONFIG))
    expected["config"]["localCores"] = 3
    expected["config"]["devices"]["cpus"] = [0, 1, 2]
    assert out == expected
    assert b"<\\/b" in adapt.body(body)  # escaped as tornado escapes it


@pytest.mark.parametrize(
    ("method", "path", "status", "cpus"),
    [
        ("PUT", "/api/config/", 200, 3),
        ("GET", "/api/config/connection/", 200, 3),
        ("GET", "/api/config", 200, 3),
        ("GET", "/api/config/", 304, 3),
        ("GET", "/api/config/", 200, None),
    ],
)
def test_no_other_response_is_touched(method: str, path: str, status: int, cpus: int) -> None:
    assert adaptations.for_response(method, path, status, cpus) is None


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[1, 2]", b'{"config": {"localCores": 2}}', b'{"config": 1}']
)
def test_unknown_config_shapes_pass_unchanged(body: bytes) -> None:
    assert adaptations.ConfigRewrite(1).body(body) == body


def test_rewrite_drops_headers_that_describe_the_old_body() -> None:
    raw = [("Content-Type", "application/json"), ("Content-Length", "99"), ("Etag", '"abc"')]
    assert adaptations.ConfigRewrite(1).headers(raw) == [("Content-Type", "application/json")]


# ---------------------------------------------------------------------------- through the proxy
# (the fake libertem-server answers api/config/ in LiberTEM's shape; the real one is in
# test_sizing_real.py)


@pytest.mark.proxy_config(cpus=1)
@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_proxy_rewrites_only_the_config_answer(client, supervisor, encoding: str) -> None:
    await supervisor.ensure_running()
    r = await client.fetch(
        "libertem/api/config/",
        headers={"Accept-Encoding": encoding},
        decompress_response=True,
    )
    assert r.code == 200
    config = json.loads(r.body)["config"]
    assert config["localCores"] == 1 and config["devices"]["cpus"] == [0]
    assert "Etag" not in r.headers  # neither the backend's nor gzip's weak one
    if encoding == "identity":
        assert int(r.headers["Content-Length"]) == len(r.body)
    # the other answers under api/config/ are not touched
    conn = await client.json("libertem/api/config/connection/")
    assert conn == {"status": "disconnected", "connection": {}}


@pytest.mark.proxy_config(cpus="host")
async def test_proxy_host_setting_passes_the_config_through(client, supervisor) -> None:
    await supervisor.ensure_running()
    r = await client.fetch("libertem/api/config/")
    assert json.loads(r.body)["config"]["localCores"] == (sizing.os.cpu_count() or 1)
    status = await client.json("libertem-proxy/api/status")
    assert status["sizing"] == {"setting": "host", "cpus": None, "source": "host", "bounds": []}


@pytest.mark.proxy_config(cpus="host")
async def test_a_copy_cached_before_the_rewrite_is_never_confirmed(client, supervisor, app) -> None:
    """Red-team finding: the browser's If-None-Match (the backend's ETag, cached while
    ``cpus = "host"``, or under 0.1.x) reached the backend, whose 304 kept the old count."""
    await supervisor.ensure_running()
    r = await client.fetch("libertem/api/config/")
    etag = r.headers["Etag"]  # "host": nothing rewritten, the backend's own validator
    again = await client.fetch("libertem/api/config/", headers={"If-None-Match": etag})
    assert again.code == 304  # the backend does honour it (so the check below can fail)
    # as after a restart with c.LiberTEMProxy.cpus = 1
    app.settings["libertem_proxy"].sizing = cpu_figure(1)
    r = await client.fetch("libertem/api/config/", headers={"If-None-Match": etag})
    assert r.code == 200, r.code
    assert json.loads(r.body)["config"]["localCores"] == 1
