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

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    """In the child before exec: get SIGTERM when Jupyter dies, even by SIGKILL (Linux only).

    Without this, a Jupyter server killed with SIGKILL (OOM killer, ``kill -9`` by a batch
    system) leaves libertem-server and its dask workers running with nobody to stop them.
    """
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

    async def _restart_process_if_needed(self) -> None:
        code = await self.proc.wait()
        with contextlib.suppress(ValueError):
            from simpervisor.atexitasync import remove_handler

            remove_handler(self._handle_signal)
        self.running = False
        self._on_exit(code)


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
    """Start ``argv`` in its own session (so we can signal its whole process group).

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
        start_new_session=True,
        preexec_fn=_set_parent_death_signal,
        limit=1024 * 1024,
    )
    with _preserve_signal_handlers():
        await proc.start()
    return proc


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a pid reused by another user
        return False
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    ``killpg(pgid, 0)`` is not enough: orphaned workers whose new parent does not reap them (a
    container whose PID 1 is not an init) stay as zombies, which hold no resources but still
    count as group members. On Linux we read /proc; elsewhere we fall back to the signal check.
    """
    if not os.path.isdir("/proc/self"):
        return [pgid] if signal_group(pgid, 0) else []
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: parse after the last ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


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
    """:func:`kill_group` without an event loop (for ``atexit``)."""
    for sig, wait in zip(_ESCALATION, (term_timeout, _KILL_WAIT), strict=True):
        if not group_members(pgid):
            return
        signal_group(pgid, sig)
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)
