"""A tiny watchdog that takes LiberTEM's whole process group down when Jupyter dies.

Why it exists: the parent-death signal that :mod:`.process` sets reaches only the process that
Jupyter started. If that is a wrapper script that does not ``exec`` (``module load ...;
libertem-server "$@"``), the shell dies and libertem-server, reparented to init, keeps running
with its dask workers after a ``kill -9`` of Jupyter (OOM killer, batch system, container
stop) - and nobody is left to stop it.

How it works: Jupyter starts this file as a second child, in LiberTEM's process group, with a
pipe on its stdin whose write end only Jupyter holds. The kernel closes that write end whenever
Jupyter's process ends, however it ends, so end-of-file on stdin means "Jupyter is gone": the
guard sends SIGTERM to the group, waits ``grace`` seconds, SIGKILLs what is left, and removes
the run's private directory (the token file and the dask scratch space), which Jupyter would
have removed had it lived. A pipe is used rather than a second parent-death signal because it
also works on macOS and does not depend on which Jupyter thread forked the child.

It runs as ``python -I -S guard.py PGID GRACE RUNDIR`` (a few MiB, ~10 ms to start), so this file
imports only the standard library. :mod:`.process` imports :func:`group_members` from here so
the guard and Jupyter agree on what a live member of the group is.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    ``killpg(pgid, 0)`` is not enough: orphaned workers whose new parent does not reap them (a
    container whose PID 1 is not an init) stay as zombies, which hold no resources but still
    count as group members. On Linux we read /proc; elsewhere we fall back to the signal check.
    """
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except OSError:
            return []
        return [pgid]
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


def _others(pgid: int) -> list[int]:
    me = os.getpid()
    return [p for p in group_members(pgid) if p != me]


def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM to the group, then SIGKILL to whatever is still alive after ``grace`` seconds.

    Used by the guard (a member of the group, which must outlive its own signals long enough
    to clean up) and by Jupyter's ``atexit`` last resort (not a member), hence the exclusion
    of the calling process and SIGKILL per member rather than to the whole group.
    """
    if not _others(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGTERM)  # the guard ignores SIGTERM by now
    except OSError:
        return
    deadline = time.monotonic() + grace
    while _others(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)  # the members are not our children: there is nothing to wait on
    # repeat in case a member forked meanwhile
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        others = _others(pgid)
        if not others:
            break
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def main(argv: list[str]) -> int:
    """Wait for end-of-file on stdin, then stop process group ``argv[1]``, remove ``argv[3]``."""
    pgid, grace, rundir = int(argv[1]), float(argv[2]), argv[3]
    # Jupyter stops the group with SIGTERM itself while it is alive and reaps us afterwards;
    # on Jupyter's death we must outlive our own SIGTERM to the group, so ignore it from then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C meant for someone else
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closing terminal is Jupyter's business
    while True:
        try:
            data = os.read(0, 4096)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        except OSError:
            data = b""
        if not data:
            break
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop_group(pgid, grace)
    shutil.rmtree(rundir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
