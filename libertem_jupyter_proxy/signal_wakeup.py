"""Wake Jupyter's event loop for every signal, whichever thread the kernel delivers it to.

Why: starting libertem-server with asyncio's subprocess API (Python < 3.12) adds threads that
wait in ``waitpid``. Linux may deliver a process-wide signal such as SIGINT to one of them;
Python then only notes it, and its handler (``KeyboardInterrupt``) runs in the main thread the
next time that thread wakes. An idle Jupyter sleeps in ``epoll_wait`` and did not stop on
SIGINT for over a minute (seen in CI, with a faulthandler dump of the three threads).
``signal.set_wakeup_fd`` makes Python's C-level handler write a byte to a socket that the
event loop watches, so the main thread wakes at once and runs the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket

# the wake-up sockets; never closed (the signal machinery writes to one at any time)
_KEPT: list[socket.socket] = []


def install(loop: asyncio.AbstractEventLoop) -> bool:
    """Watch a wake-up socket on ``loop`` unless a wake-up fd is already set (asyncio sets
    one when a signal handler is added with ``add_signal_handler``). Returns True if
    installed. Main thread only (``set_wakeup_fd`` raises elsewhere: then nothing changes)."""
    try:
        previous = signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread
        return False
    if previous != -1:
        signal.set_wakeup_fd(previous)
        return False
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)

    def drain() -> None:
        with contextlib.suppress(OSError):
            while reader.recv(4096):
                pass

    loop.add_reader(reader.fileno(), drain)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    _KEPT.extend((reader, writer))  # open for the life of the process
    return True
