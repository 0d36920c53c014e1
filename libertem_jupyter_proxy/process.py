"""One run of libertem-server as an OS process: spawn, watch, signal, reap.

simpervisor supervises the child (spawn, reap, signal propagation), but its own restart policy
(respawn at once, forever, on any non-zero exit; never after an explicit kill) is wrong for us, so
:class:`OneShotProcess` turns that off and leaves every decision to :mod:`.supervisor`. A fresh
object is made for every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from simpervisor import SupervisedProcess

from . import guard
from .guard import group_members

__all__ = [
    "OneShotProcess",
    "group_members",
    "kill_group",
    "kill_group_now",
    "retire_guard",
    "signal_group",
    "spawn",
    "spawn_guard",
]

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In the child before exec: its own process group, and SIGTERM when Jupyter dies.

    A new process group (not a new session, as before 0.2) lets us signal libertem-server and
    its dask workers as one, and lets the :mod:`.guard` join that group: a process can only
    join a group of its own session.

    The parent-death signal (Linux only) reaches libertem-server even when Jupyter is killed
    with SIGKILL (OOM killer, ``kill -9`` by a batch system); the guard covers the processes
    it does not reach (a wrapper script's children, workers).
    """
    os.setpgid(0, 0)
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:  # pragma: no cover - exotic libc; the other stop paths still work
        pass


class OneShotProcess(SupervisedProcess):
    """A simpervisor process that is never restarted by simpervisor itself.

    simpervisor 1.0 respawns a child that exits non-zero from ``_restart_process_if_needed``;
    we replace that watcher with one that only reaps and reports the exit code.
    """

    def __init__(self, name: str, *args: Any, on_exit: Callable[[int], None], **kwargs: Any):
        super().__init__(name, *args, always_restart=False, **kwargs)
        self._on_exit = on_exit

    @property
    def asyncio_process(self) -> asyncio.subprocess.Process:
        """The ``asyncio.subprocess.Process`` (simpervisor >= 1.0 wraps it in ``.proc``)."""
        proc = self.proc
        return getattr(proc, "_proc", proc)

    def close_pipes(self) -> None:
        """Stop reading the child's output (its exit is already known)."""
        transport = getattr(self.asyncio_process, "_transport", None)
        if transport is not None:
            transport.close()

    async def _restart_process_if_needed(self) -> None:
        code = await wait_exit(self.asyncio_process)
        with contextlib.suppress(ValueError):
            from simpervisor.atexitasync import remove_handler

            remove_handler(self._handle_signal)
        self.running = False
        self._on_exit(code)


async def wait_exit(proc: asyncio.subprocess.Process) -> int:
    """The exit code of ``proc``, as soon as the process itself has exited.

    ``asyncio.subprocess.Process.wait()`` also waits for end-of-file on the child's pipes
    (CPython 3.11 wakes its waiters only once every pipe is closed), so a process that exits
    while a child of it still holds the inherited stdout/stderr (a wrapper script, a daemon)
    looked alive until that child exited. Instead, wait on the pid: a pidfd (Linux >= 5.3)
    becomes readable when the process exits; elsewhere poll the child watcher's return code.
    ``waitid(WNOWAIT)`` reads the status without reaping, so asyncio's own child watcher still
    reaps the process and ``proc.returncode`` stays right. Codes follow asyncio: ``-N`` for
    death by signal N.
    """
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    pidfd = -1
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(proc.pid)
    try:
        if pidfd >= 0:
            loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
            code = _peek_exit_code(proc.pid)
            if code is not None:
                return code
        # reaped already (the watcher was faster) or no pidfd: the watcher's code follows soon
        while proc.returncode is None:  # noqa: ASYNC110 - no event for "returncode set"
            await asyncio.sleep(0.01 if pidfd >= 0 else 0.05)
        return proc.returncode
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _peek_exit_code(pid: int) -> int | None:
    """Exit status of the exited, not yet reaped child ``pid`` without reaping it; None if it
    was reaped meanwhile."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except ChildProcessError:
        return None
    if info is None:  # pragma: no cover - the pidfd said it exited
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status  # CLD_KILLED / CLD_DUMPED: the signal number


def _preserve_signal_handlers() -> contextlib.AbstractContextManager[None]:
    """Restore Jupyter's SIGINT/SIGTERM handlers after simpervisor's first start replaced them.

    simpervisor (issue 38) installs handlers that forward the signal to its children and then
    ``sys.exit(0)``, which skips Jupyter's graceful shutdown (and our ``stop_extension``).
    """

    @contextlib.contextmanager
    def cm() -> Any:
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in saved.items():
                if handler is not None and signal.getsignal(sig) is not handler:
                    with contextlib.suppress(ValueError):  # not in the main thread
                        signal.signal(sig, handler)

    return cm()


async def spawn(
    argv: Sequence[str],
    env: dict[str, str],
    cwd: str | None,
    on_exit: Callable[[int], None],
) -> OneShotProcess:
    """Start ``argv`` in its own process group (so we can signal all of it at once).

    stdin is /dev/null (libertem-server asks a question on SIGINT when stdin is a tty); stdout
    and stderr are merged into one pipe because libertem-server logs to stderr.
    """
    proc = OneShotProcess(
        "libertem-server",
        *argv,
        on_exit=on_exit,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=_child_setup,
        limit=1024 * 1024,
    )
    with _preserve_signal_handlers():
        await proc.start()
    return proc


async def spawn_guard(pgid: int, grace: float, rundir: str) -> asyncio.subprocess.Process:
    """Start :mod:`.guard` in process group ``pgid``; it stops the group (and removes
    ``rundir``) if Jupyter dies.

    Its stdin is a pipe whose write end stays in this process only (pipes are created
    non-inheritable and subprocesses close other fds), so the guard sees end-of-file exactly
    when Jupyter's process is gone. Raises OSError (or SubprocessError) if the group has
    already vanished; the caller decides how loud that is.
    """

    def join_group() -> None:
        os.setpgid(0, pgid)

    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",  # no user site, no PYTHON* variables, no script directory on sys.path
        "-S",  # no site-packages: the guard needs only the standard library
        guard.__file__,
        str(pgid),
        f"{grace:g}",
        rundir,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        cwd="/",  # hold no directory open (a user may want to unmount theirs)
        preexec_fn=join_group,
    )


async def retire_guard(proc: asyncio.subprocess.Process) -> None:
    """Reap a guard once its group is gone (it died with the group's SIGTERM, or it gets EOF
    now and finds nothing left to stop)."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), _KILL_WAIT)
    except asyncio.TimeoutError:  # pragma: no cover - it ignores nothing but SIGINT/SIGHUP
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a pid reused by another user
        return False
    return True


_ESCALATION = (signal.SIGTERM, signal.SIGKILL)
_KILL_WAIT = 5.0  # after SIGKILL, only the kernel can be slow


async def kill_group(pgid: int, term_timeout: float, log: Any = None) -> None:
    """SIGTERM to every process of the group, SIGKILL to what is left after ``term_timeout``.

    Returns when no live process of the group remains (or SIGKILL's wait ran out).
    """
    for sig, wait in zip(_ESCALATION, (term_timeout, _KILL_WAIT), strict=True):
        if not group_members(pgid):
            return
        if log is not None:
            log.info("Sending %s to LiberTEM's process group %d", sig.name, pgid)
        signal_group(pgid, sig)
        deadline = time.monotonic() + wait
        # the workers are not our children: no exit event to await, so poll /proc
        while group_members(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def kill_group_now(pgid: int, term_timeout: float) -> None:
    """:func:`kill_group` without an event loop (for ``atexit``): the guard's own routine."""
    guard.stop_group(pgid, term_timeout)
