"""Hand-over of a request body from tornado (which receives it) to aiohttp (which sends it on)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

#: buffered bytes up to which ``chunks`` joins the buffered pieces into one
JOIN_BELOW = 256 * 1024


class BodyPipe:
    """A bounded, loss-free hand-over of request body chunks from tornado to aiohttp.

    ``write`` waits while ``max_bytes`` are buffered, and tornado waits for ``data_received``,
    so a slow backend slows the browser's upload instead of filling Jupyter's memory. The end of
    the body (``close``) and an abort are recorded next to the buffer, never in it: a full
    buffer can neither delay nor displace them, and no chunk is ever dropped to make room (an
    earlier version did, and a slow backend got a body 64 KiB short). If the upstream side gives
    up (the backend answered early, or died), writes return at once and the rest of the body is
    discarded: the backend has said it does not want it.

    Order: chunks leave in the order they were written; ``chunks`` joins small buffered chunks
    into one write (fewer syscalls) without reordering, and hands large ones on as they are.
    """

    def __init__(self, max_bytes: int = 512 * 1024) -> None:
        self._max_bytes = max_bytes
        self._buf: deque[bytes] = deque()
        self._buffered = 0
        self._end: BaseException | bool = False  # True: complete; an exception: aborted
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._reader_gone = False
        #: bytes written so far (the whole body once ``close`` was called)
        self.total = 0

    @property
    def closed(self) -> bool:
        """True once the body is complete (``close``) or aborted."""
        return self._end is not False

    @property
    def reader_gone(self) -> bool:
        """True once the upstream side stopped reading (the rest of the body is discarded)."""
        return self._reader_gone

    async def write(self, chunk: bytes) -> None:
        """Queue ``chunk``; waits while the buffer is full (backpressure)."""
        while not self._reader_gone and self._buffered >= self._max_bytes:
            self._writable.clear()
            await self._writable.wait()
        if self._reader_gone or not chunk:
            return
        self._buf.append(chunk)
        self._buffered += len(chunk)
        self.total += len(chunk)
        self._readable.set()

    def reader_done(self) -> None:
        """The upstream request ended early: discard the rest of the body, release writers.

        aiohttp may stop pulling from :meth:`chunks` without closing the generator, whose
        ``finally`` then runs only at garbage collection; without this, a write waiting on a
        full buffer would wait forever.
        """
        self._reader_gone = True
        self._buf.clear()
        self._buffered = 0
        self._writable.set()

    def close(self) -> None:
        """The whole body was received; everything written before still goes out.

        A no-op once the reader is gone: a body cut short must never be ended as if complete
        (chunked framing would tell the backend it got all of it)."""
        if self._reader_gone:
            return
        if self._end is False:
            self._end = True
        self._readable.set()

    def abort(self, exc: BaseException) -> None:
        """The browser went away mid-upload: make the upstream request fail, not complete."""
        self._end = exc
        self._readable.set()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body for aiohttp, in order; raises the abort's exception if there was one."""
        try:
            while True:
                if isinstance(self._end, BaseException):
                    raise self._end
                if self._buf:
                    # Let the event loop read from the backend before each write: a backend
                    # that answers early and closes makes the next write fail with a reset,
                    # and asyncio then closes the socket without reading the answer that is
                    # already there (the browser got 502 instead of the backend's 413).
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                    if self._reader_gone or isinstance(self._end, BaseException):
                        continue
                    if len(self._buf) == 1 or self._buffered > JOIN_BELOW:
                        batch = self._buf.popleft()  # large pieces: joining them only copies
                    else:
                        batch = b"".join(self._buf)
                        self._buf.clear()
                    self._buffered -= len(batch)
                    if self._buffered < self._max_bytes:
                        self._writable.set()
                    yield batch
                    continue
                if self._end is True:
                    return
                self._readable.clear()
                await self._readable.wait()
        finally:
            self.reader_done()
