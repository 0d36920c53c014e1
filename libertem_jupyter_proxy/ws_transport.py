"""Moving a websocket's connections from tornado to the relay, and the relay's sizes.

Shared by the two relays of ``ws_proxy`` (asyncio transports, tornado IOStreams under TLS) and
the threaded one of ``ws_threads``.
"""

from __future__ import annotations

import asyncio
import mmap
import socket

from tornado.iostream import IOStream, StreamClosedError

# How long what is queued for a closing connection (the last frames, our own close frame) may
# take to leave before we hang up anyway: a peer that stops reading cannot keep it open.
CLOSE_FLUSH_TIMEOUT = 5.0
# Outgoing bytes queued per connection before the other side stops reading (backpressure).
WRITE_BUFFER_HIGH = 1 << 20
# Read buffer per connection: small at first (the GUI's events are small JSON messages),
# doubled each time a read fills it, up to 1 MiB and one more step of 64 KiB (so a big message
# takes a few reads, not hundreds, and a power-of-two message, 1 MiB and its frame header, fits
# one read: at exactly 1 MiB the header's 14 bytes came in a second read and wake-up).
FIRST_READ_SIZE = 64 * 1024
MAX_READ_SIZE = 1024 * 1024 + FIRST_READ_SIZE


# A connection taken over from tornado: its own socket and what tornado had read past the
# handshake.
Taken = tuple[socket.socket, bytes]


def take_over(stream: IOStream) -> tuple[socket.socket | None, bytes]:
    """Move a connection from a tornado IOStream to a non-blocking socket of its own (for asyncio
    or a relay thread), with the bytes tornado had already read past the handshake (they must
    not be lost). The socket is None if the peer has closed the connection already.

    tornado has no public way to hand a socket over, so: take whatever is buffered (a read of
    everything available resolves at once; a read that would wait means nothing was buffered),
    duplicate the descriptor, and close the IOStream, which unregisters and closes its own
    descriptor while the connection stays open through the duplicate.
    """
    buffered = b""
    try:
        read = stream.read_bytes(stream.max_buffer_size, partial=True)
    except StreamClosedError:
        read = None
    if read is not None and read.done() and read.exception() is None:  # type: ignore[attr-defined]
        buffered = read.result()  # type: ignore[attr-defined]
    if stream.socket is None:  # the peer closed meanwhile and tornado let the socket go
        return None, buffered
    sock = stream.socket.dup()
    stream.close()  # a pending read ends with StreamClosedError; tornado silences it
    sock.setblocking(False)
    no_delay(sock)
    return sock, buffered


def no_delay(sock: socket.socket) -> None:
    """Send each write at once (``TCP_NODELAY``) on a TCP socket.

    asyncio sets it on its transports only when the socket's ``proto`` is ``IPPROTO_TCP``; a
    socket made as ``socket(AF_INET, SOCK_STREAM)`` (proto 0, as the backend connection is)
    keeps Nagle's algorithm. Then the tail of a big message (the last bytes of a frame, read
    after the rest) waited for the backend's delayed ACK: 40 ms per browser message, the
    "browser -> backend is 9x slower" of issue 17.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def new_buffer(size: int) -> memoryview:
    """A read buffer of its own anonymous mapping, not from the heap: its pages become memory
    only when a read touches them (a bytearray is zero-filled at once), and they go back to the
    system when it is dropped (freed heap blocks between other allocations stay resident: the
    soak test saw Jupyter's RSS grow by 30 MiB over 1,400 websockets with bytearrays)."""
    return memoryview(mmap.mmap(-1, size))


async def take_over_both(browser: IOStream, backend: IOStream) -> tuple[Taken, Taken] | None:
    """Take the backend's connection, then the browser's; None if either has closed meanwhile
    (then both are closed: the websocket ended as it began).

    What a backend sent before it closed (its last frames, a close frame) still goes to the
    browser, whose stream is still tornado's at that point.
    """
    backend_sock, backend_early = take_over(backend)
    if backend_sock is None:
        try:
            if backend_early:
                await asyncio.wait_for(browser.write(backend_early), CLOSE_FLUSH_TIMEOUT)
        except (StreamClosedError, asyncio.TimeoutError):
            pass
        browser.close()
        return None
    browser_sock, browser_early = take_over(browser)
    if browser_sock is None:
        backend_sock.close()
        return None
    return (browser_sock, browser_early), (backend_sock, backend_early)
