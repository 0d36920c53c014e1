"""What LiberTEM costs right now: memory, CPU time, processes and dask workers of its group.

libertem-server runs in its own process group (see :mod:`.process`); its dask workers, their
resource tracker and anything a wrapper script starts are members of that group too, and stay
members when a crash orphans them. So the figures are sums over the live (non-zombie) members
of the group, found the same way the stop path finds them (:func:`.guard.group_members`), and
read with ``psutil``. The proxy's own guard process joins the group to be able to signal it;
it is not LiberTEM's and is left out.

Measured on the real libertem-server (LiberTEM 0.16.0, distributed 2026.8.0) with a LOCAL
cluster of two workers: 5 processes (the server, two compute workers, one service worker, the
multiprocessing resource tracker). Reading RSS, CPU times and command lines costs ~0.1 ms per
process; PSS (``/proc/<pid>/smaps_rollup``, a walk of the page tables) costs ~5-10 ms per
process, so :class:`ResourceSampler` measures in a worker thread (the event loop that proxies
the GUI is never blocked) and shares one measurement between callers for ``max_age`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import psutil

from .guard import group_members

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = [
    "GroupResources",
    "ResourceSampler",
    "is_dask_worker",
    "measure_group",
    "status_resources",
]

# multiprocessing's "spawn" start method (dask's default for Nanny workers) runs a new
# interpreter with this argument; "fork" children keep their parent's command line.
_SPAWN_ARG = "--multiprocessing-fork"
# distributed.proctitle: a Nanny sets this in its environment before spawning a worker, so
# the worker's (exec-time) environment names the Nanny's process as its parent.
_DASK_PARENT_VAR = "__DASK_PARENT_PID"
# the title distributed.worker sets when the optional ``setproctitle`` package is installed
_DASK_WORKER_TITLE = "dask worker"
# PSS only from the kernel's one-line summary (Linux >= 4.14): where it is missing, psutil
# would parse the full /proc/<pid>/smaps, which costs a multiple and is no figure for a poll.
HAS_SMAPS_ROLLUP = os.path.exists("/proc/self/smaps_rollup")


@dataclass(frozen=True)
class GroupResources:
    """Resource figures of LiberTEM's process group at one moment.

    Field names and units are the status API's (docs/usage.rst, "Status API"):

    - ``processes``: live processes in the group (libertem-server, dask workers, helpers).
    - ``workers``: of those, dask worker processes (see :func:`is_dask_worker`). LiberTEM's
      local cluster has one *service* worker beside its compute workers, so a cluster of N
      workers shows N + 1.
    - ``rss_bytes``: resident set size summed over the processes, in bytes. Pages shared
      between processes (the Python interpreter, numpy, numba) count once per process.
    - ``pss_bytes``: proportional set size summed over the processes, in bytes: each shared
      page is divided among the processes that map it, so the sum is what the group really
      holds. ``None`` where the kernel offers no ``/proc/<pid>/smaps_rollup`` (Linux < 4.14,
      non-Linux) or it may not be read.
    - ``cpu_seconds``: CPU time (user + system) of the live processes plus that of children
      they have reaped (a worker that ended and was waited for), in seconds.
    """

    processes: int
    workers: int
    rss_bytes: int
    pss_bytes: int | None
    cpu_seconds: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def is_dask_worker(proc: psutil.Process) -> bool:
    """Whether ``proc`` is a dask worker process started by a Nanny (LiberTEM's local cluster).

    A worker either carries distributed's process title (``dask worker [...]``, when
    ``setproctitle`` is installed), or it is a multiprocessing "spawn" child whose environment
    names its parent as the Nanny's process (``__DASK_PARENT_PID``, set by
    ``distributed.proctitle.enable_proctitle_on_children``). The resource tracker and the
    server itself match neither. Raises ``psutil.Error`` if the process went away.
    """
    cmdline = proc.cmdline()
    if cmdline and cmdline[0].startswith(_DASK_WORKER_TITLE):
        return True
    if _SPAWN_ARG not in cmdline:
        return False
    try:
        parent = proc.environ().get(_DASK_PARENT_VAR)
    except psutil.AccessDenied:
        return False
    return parent == str(proc.ppid())


def _pss(proc: psutil.Process) -> int | None:
    """PSS in bytes from ``smaps_rollup`` (psutil reads it where the kernel has it)."""
    if not HAS_SMAPS_ROLLUP:
        return None
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.AccessDenied, AttributeError, NotImplementedError):
        return None  # no PSS on this platform, or not ours to read


def measure_group(pgid: int, exclude: Collection[int] = (), pss: bool = True) -> GroupResources:
    """Sum the figures over the live members of process group ``pgid``, except ``exclude``.

    Blocking (reads ``/proc``): call it from a thread in async code. A process that ends while
    it is being read is simply left out. ``pss=False`` skips the expensive PSS read.
    """
    processes = workers = rss = 0
    pss_total: int | None = 0 if pss and HAS_SMAPS_ROLLUP else None
    cpu = 0.0
    for pid in group_members(pgid):
        if pid in exclude:
            continue
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                member_rss = int(proc.memory_info().rss)
                member_pss = _pss(proc) if pss_total is not None else None
                worker = is_dask_worker(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:  # a member that changed its uid: nothing to read
            continue
        processes += 1
        workers += worker
        rss += member_rss
        cpu += times.user + times.system + times.children_user + times.children_system
        if pss_total is not None:
            pss_total = None if member_pss is None else pss_total + member_pss
    return GroupResources(
        processes=processes,
        workers=workers,
        rss_bytes=rss,
        pss_bytes=pss_total,
        cpu_seconds=round(cpu, 2),
    )


class ResourceSampler:
    """Measures a process group off the event loop; callers within ``max_age`` share a result.

    Several Jupyter tabs poll the status API; one measurement (tens of milliseconds of kernel
    time with PSS) serves all requests that arrive within ``max_age`` seconds, and concurrent
    requests wait for the one measurement in flight instead of starting their own.
    """

    def __init__(self, max_age: float = 2.0) -> None:
        self.max_age = max_age
        self._key: tuple[int, frozenset[int]] | None = None
        self._at = 0.0
        self._result: GroupResources | None = None
        self._pending: asyncio.Future[GroupResources] | None = None

    async def sample(self, pgid: int, exclude: Collection[int] = ()) -> GroupResources:
        key = (pgid, frozenset(exclude))
        if (
            self._result is not None
            and self._key == key
            and time.monotonic() - self._at < self.max_age
        ):
            return self._result
        if self._pending is None or self._key != key:
            self._key = key
            self._pending = asyncio.ensure_future(asyncio.to_thread(measure_group, pgid, key[1]))
        pending = self._pending
        try:
            result = await asyncio.shield(pending)
        finally:
            if self._pending is pending and pending.done():
                self._pending = None
        if self._key == key:
            self._result, self._at = result, time.monotonic()
        return result


_samplers: WeakKeyDictionary[Supervisor, ResourceSampler] = WeakKeyDictionary()


async def status_resources(supervisor: Supervisor) -> dict[str, object] | None:
    """The ``resources`` object of the status API: figures of the current run's process group,
    or ``None`` while no libertem-server process runs (stopped, failed)."""
    run = supervisor.run
    if run is None or run.pid is None or run.exited.is_set():
        return None
    exclude = (run.guard.pid,) if run.guard is not None else ()
    sampler = _samplers.get(supervisor)
    if sampler is None:
        sampler = _samplers[supervisor] = ResourceSampler()
    return (await sampler.sample(run.pid, exclude)).to_dict()
