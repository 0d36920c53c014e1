"""How many LiberTEM workers this Jupyter may run: the CPUs (and memory) it is really given.

LiberTEM 0.16's GUI proposes ``psutil.cpu_count(logical=False)`` workers: the host's physical
cores, whatever the process may use. On a shared node (a Slurm job, a Kubernetes pod, a cgroup
with a CPU quota) that oversubscribes the allocation, or gets the workers killed by the memory
limit. :func:`cpu_figure` finds the smallest of the limits that apply to this process:

- the CPU affinity (``os.sched_getaffinity``: Slurm's ``task/affinity``, ``taskset``);
- the cgroup CPU quota (v2 ``cpu.max``; v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), the
  smallest over the process's cgroup and its ancestors, found through ``/proc/self/cgroup`` and
  ``/proc/self/mountinfo`` (so a cgroup namespace or a container's mount works too);
- ``CPU_LIMIT`` (set by JupyterHub's ``Spawner.get_env`` from ``Spawner.cpu_limit``, e.g.
  ``"1.0"``, so by KubeSpawner and batchspawner when configured);
- ``SLURM_CPUS_ON_NODE``, else ``SLURM_JOB_CPUS_PER_NODE`` (``"4(x2),2"``: this node's entry);
- a memory bound: the cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``,
  smallest over the ancestors) or ``MEM_LIMIT`` (bytes, also from ``Spawner.get_env``), divided
  by :data:`WORKER_MEMORY` after :data:`RESERVED_MEMORY` is set aside;
- and never more than LiberTEM's own count (the physical cores): the CPU limits above count
  logical CPUs, which on a host with SMT are twice the cores.

Fractional CPU limits round down (a quota of 1.5 CPUs runs one worker at full speed); the
result is never below 1.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Memory one LiberTEM 0.16 compute worker needs. Measured here (LiberTEM 0.16.0, distributed
# 2026.8, Python 3.11, Debian 12): a compute worker's RSS is 202 MiB idle (PSS 145 MiB) and
# 342 MiB (PSS 282 MiB) after a sum and a disk analysis of a 64 MiB dataset of 128x128 frames;
# a UDF's result buffers and numba's compiled code are what grows. 384 MiB is that plus ~10%.
WORKER_MEMORY = 384 * 1024**2
# Set aside before dividing the memory limit among workers (same measurement): the Jupyter
# server (80-100 MiB), libertem-server's main process (230-300 MiB), its dask service worker
# (~200 MiB) and resource tracker (~12 MiB): ~560 MiB, rounded up to 768 MiB.
RESERVED_MEMORY = 768 * 1024**2

_NO_LIMIT_V1 = 1 << 62  # memory.limit_in_bytes when unlimited is 2^63-1 rounded to a page


@dataclass(frozen=True)
class Bound:
    """One limit that applies to this process.

    ``source``: a short stable name (``affinity``, ``cgroup-cpu``, ``CPU_LIMIT``,
    ``SLURM_CPUS_ON_NODE``, ``SLURM_JOB_CPUS_PER_NODE``, ``cgroup-memory``, ``MEM_LIMIT``,
    ``physical-cores``);
    ``cpus``: the number of workers it allows (>= 1); ``detail``: what was read, for people.
    """

    source: str
    cpus: int
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "cpus": self.cpus, "detail": self.detail}


@dataclass(frozen=True)
class CpuFigure:
    """The number of workers the GUI proposes, and where it came from.

    ``cpus`` is None when ``setting`` is ``"host"``: LiberTEM's own count is left as it is.
    ``source`` is the ``Bound.source`` of the smallest bound (the first one on a tie, in the
    order of the module docstring), ``"setting"`` for an integer setting, ``"host"`` for
    ``"host"``, or ``"host-default"`` when no bound applies (then ``cpus`` is the CPU count the
    OS reports, which is what LiberTEM would see on an unconstrained machine at best).
    """

    setting: str
    cpus: int | None
    source: str
    bounds: list[Bound] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "setting": self.setting,
            "cpus": self.cpus,
            "source": self.source,
            "bounds": [b.to_dict() for b in self.bounds],
        }

    def describe(self) -> str:
        """One line for Jupyter's log."""
        if self.cpus is None:
            return "LiberTEM proposes its own worker count (c.LiberTEMProxy.cpus = 'host')"
        why = "; ".join(f"{b.source}: {b.cpus} ({b.detail})" for b in self.bounds)
        return f"LiberTEM workers: {self.cpus} (from {self.source}{'; ' + why if why else ''})"


# ------------------------------------------------------------------------ parsing helpers


def parse_cpu_limit(value: str) -> int | None:
    """``CPU_LIMIT`` (a float as text, e.g. ``"1.0"``, ``"0.5"``) -> whole CPUs, at least 1."""
    try:
        cpus = float(value)
    except ValueError:
        return None
    if not math.isfinite(cpus) or cpus <= 0:
        return None
    return max(1, math.floor(cpus))


def parse_slurm_cpus_per_node(value: str, node_index: int = 0) -> int | None:
    """``SLURM_JOB_CPUS_PER_NODE`` (``"4(x2),2"``: 4 on the first two nodes, 2 on the third)
    -> this node's count. ``node_index`` is ``SLURM_NODEID``; out of range or malformed: None.
    """
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if not 0 <= node_index < len(counts) or counts[node_index] < 1:
        return None
    return counts[node_index]


def parse_int(value: str) -> int | None:
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# ------------------------------------------------------------------------ cgroups


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path that the mount point shows (not "/" inside a cgroup namespace)
    point: Path
    version: int  # 1 or 2
    controllers: frozenset[str]


def _mounts(proc: Path) -> list[_Mount]:
    """cgroup mounts from ``<proc>/self/mountinfo`` (proc(5): fields, then `` - `` fstype ...)."""
    text = _read(proc / "self" / "mountinfo") or ""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        fstype, options = rfields[0], rfields[2]
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup2":
            controllers = (_read(point / "cgroup.controllers") or "").split()
            mounts.append(_Mount(root, point, 2, frozenset(controllers)))
        elif fstype == "cgroup":
            mounts.append(_Mount(root, point, 1, frozenset(options.split(","))))
    return mounts


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _cgroup_dirs(proc: Path, controller: str) -> list[tuple[int, list[Path]]]:
    """For each hierarchy that has ``controller``: (version, [own dir, parent, ..., mount root]).

    ``/proc/self/cgroup`` lines are ``id:controllers:path`` (v1) or ``0::path`` (v2).
    """
    text = _read(proc / "self" / "cgroup") or ""
    mounts = _mounts(proc)
    found = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            candidates = [m for m in mounts if m.version == 2 and controller in m.controllers]
        else:
            if controller not in ctrls.split(","):
                continue
            candidates = [m for m in mounts if m.version == 1 and controller in m.controllers]
        for m in candidates:
            root = m.root.rstrip("/")
            if root and path != root and not path.startswith(root + "/"):
                continue  # this mount shows another part of the hierarchy
            rel = path[len(root) :].strip("/")
            parts_rel = rel.split("/") if rel else []
            dirs = [m.point.joinpath(*parts_rel[:i]) for i in range(len(parts_rel), -1, -1)]
            found.append((m.version, dirs))
            break
    return found


def cgroup_cpu_quota(proc: Path = Path("/proc")) -> tuple[float, str] | None:
    """The smallest CPU quota (in CPUs) over this process's cgroups and their ancestors, with
    the file it came from; None if no quota is set."""
    best: tuple[float, str] | None = None
    for version, dirs in _cgroup_dirs(proc, "cpu"):
        for d in dirs:
            if version == 2:
                text = _read(d / "cpu.max")
                if text is None or text.split()[0] == "max":
                    continue
                quota_s, _, period_s = text.strip().partition(" ")
                quota, period = int(quota_s), int(period_s or 100000)
                where = f"{d / 'cpu.max'} = {text.strip()}"
            else:
                q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if q is None or p is None or int(q) <= 0:
                    continue
                quota, period = int(q), int(p)
                where = f"{d / 'cpu.cfs_quota_us'} = {quota}, cpu.cfs_period_us = {period}"
            if period > 0 and (best is None or quota / period < best[0]):
                best = (quota / period, where)
    return best


def cgroup_memory_limit(proc: Path = Path("/proc")) -> tuple[int, str] | None:
    """The smallest memory limit in bytes over this process's cgroups and their ancestors."""
    best: tuple[int, str] | None = None
    for version, dirs in _cgroup_dirs(proc, "memory"):
        for d in dirs:
            name = "memory.max" if version == 2 else "memory.limit_in_bytes"
            text = (_read(d / name) or "").strip()
            if not text.isdigit() or int(text) >= _NO_LIMIT_V1:
                continue
            if best is None or int(text) < best[0]:
                best = (int(text), f"{d / name} = {text}")
    return best


# ------------------------------------------------------------------------ the figure


def workers_for_memory(limit: int) -> int:
    """Workers that fit in ``limit`` bytes: (limit - RESERVED_MEMORY) // WORKER_MEMORY, >= 1."""
    return max(1, (limit - RESERVED_MEMORY) // WORKER_MEMORY)


def _mib(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB"


def bounds(
    environ: Mapping[str, str] | None = None,
    proc: Path = Path("/proc"),
    affinity: Callable[[], set[int]] | None = None,
) -> list[Bound]:
    """Every limit that applies, in a fixed order (see the module docstring)."""
    env = os.environ if environ is None else environ
    get_affinity = affinity or (lambda: os.sched_getaffinity(0))
    found: list[Bound] = []
    try:
        cpus = sorted(get_affinity())
    except (AttributeError, OSError):  # not on Linux
        cpus = []
    if cpus:
        found.append(Bound("affinity", len(cpus), f"sched_getaffinity: {_cpu_list(cpus)}"))
    quota = cgroup_cpu_quota(proc)
    if quota is not None:
        found.append(Bound("cgroup-cpu", max(1, math.floor(quota[0])), quota[1]))
    if "CPU_LIMIT" in env:
        n = parse_cpu_limit(env["CPU_LIMIT"])
        if n is not None:
            found.append(Bound("CPU_LIMIT", n, f"CPU_LIMIT={env['CPU_LIMIT']}"))
    slurm = parse_int(env.get("SLURM_CPUS_ON_NODE", ""))
    if slurm is not None:
        found.append(Bound("SLURM_CPUS_ON_NODE", slurm, f"SLURM_CPUS_ON_NODE={slurm}"))
    elif "SLURM_JOB_CPUS_PER_NODE" in env:
        node = parse_int(env.get("SLURM_NODEID", "")) or 0
        n = parse_slurm_cpus_per_node(env["SLURM_JOB_CPUS_PER_NODE"], node)
        if n is not None:
            found.append(
                Bound(
                    "SLURM_JOB_CPUS_PER_NODE",
                    n,
                    f"SLURM_JOB_CPUS_PER_NODE={env['SLURM_JOB_CPUS_PER_NODE']}, node {node}",
                )
            )
    memory = cgroup_memory_limit(proc)
    if memory is not None:
        found.append(
            Bound(
                "cgroup-memory",
                workers_for_memory(memory[0]),
                f"{memory[1]} ({_mib(memory[0])}; {_per_worker()})",
            )
        )
    mem_env = parse_int(env.get("MEM_LIMIT", ""))
    if mem_env is not None:
        found.append(
            Bound(
                "MEM_LIMIT",
                workers_for_memory(mem_env),
                f"MEM_LIMIT={mem_env} ({_mib(mem_env)}; {_per_worker()})",
            )
        )
    return found


def _per_worker() -> str:
    return f"{_mib(RESERVED_MEMORY)} reserved + {_mib(WORKER_MEMORY)} per worker"


def _cpu_list(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the kernel's cpulist format)."""
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


def physical_cores() -> int | None:
    """The host's physical core count, as LiberTEM 0.16 counts it (``psutil.cpu_count(
    logical=False)``); None where psutil cannot tell."""
    import psutil

    return psutil.cpu_count(logical=False)


def cpu_figure(
    setting: str | int,
    environ: Mapping[str, str] | None = None,
    proc: Path = Path("/proc"),
    affinity: Callable[[], set[int]] | None = None,
    physical: Callable[[], int | None] = physical_cores,
) -> CpuFigure:
    """The figure for ``c.LiberTEMProxy.cpus``: ``"auto"``, ``"host"`` or a positive int.

    Raises ValueError for anything else (the traitlet validates first).
    """
    if setting == "host":
        return CpuFigure("host", None, "host")
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 1:
            raise ValueError(f"c.LiberTEMProxy.cpus must be >= 1, got {setting}")
        return CpuFigure(str(setting), setting, "setting")
    if setting != "auto":
        raise ValueError(f"c.LiberTEMProxy.cpus must be 'auto', 'host' or an integer: {setting!r}")
    found = bounds(environ, proc, affinity)
    # never more than LiberTEM itself would propose: the affinity and the quotas count logical
    # CPUs, so on a host with SMT (2 threads per core) they alone would double the workers
    cores = physical()
    if cores:
        found.append(Bound("physical-cores", cores, f"psutil.cpu_count(logical=False): {cores}"))
    if not found:
        return CpuFigure("auto", os.cpu_count() or 1, "host-default")
    smallest = min(found, key=lambda b: b.cpus)
    return CpuFigure("auto", smallest.cpus, smallest.source, found)
