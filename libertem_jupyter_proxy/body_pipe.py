"""Hand-over of a request body from tornado (which receives it) to aiohttp (which sends it on)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class BodyPipe:
    """A bounded hand-over of request body chunks from tornado to aiohttp.

    ``write`` waits while the queue is full, and tornado waits for ``data_received``, so a slow
    backend slows the browser's upload instead of filling Jupyter's memory. If the upstream side
    gives up (backend died), writes return at once and the rest of the body is discarded.
    """

    _EOF = object()

    def __init__(self, max_chunks: int = 8) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue(max_chunks)
        self._reader_gone = asyncio.Event()

    async def write(self, chunk: bytes) -> None:
        if self._reader_gone.is_set():
            return
        if not self._queue.full():
            self._queue.put_nowait(chunk)
            return
        put = asyncio.ensure_future(self._queue.put(chunk))
        gone = asyncio.ensure_future(self._reader_gone.wait())
        await asyncio.wait({put, gone}, return_when=asyncio.FIRST_COMPLETED)
        put.cancel()
        gone.cancel()

    def _force(self, item: object) -> None:
        while self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    def reader_done(self) -> None:
        """The upstream request failed: discard the rest of the body.

        aiohttp may stop pulling from :meth:`chunks` without closing the generator, whose
        ``finally`` then runs only at garbage collection; without this, a write waiting on a
        full queue would wait forever.
        """
        self._reader_gone.set()

    def close(self) -> None:
        """The whole body was received."""
        if not self._reader_gone.is_set():
            self._force(self._EOF)

    def abort(self, exc: BaseException) -> None:
        """The browser went away mid-upload: make the upstream request fail, not complete."""
        if not self._reader_gone.is_set():
            self._force(exc)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body for aiohttp; whatever is queued goes out as one write (fewer syscalls)."""
        try:
            while True:
                batch: list[bytes] = []
                item = await self._queue.get()
                while True:
                    if item is self._EOF or isinstance(item, BaseException):
                        break
                    batch.append(item)  # type: ignore[arg-type]
                    if self._queue.empty():
                        break
                    item = self._queue.get_nowait()
                if batch:
                    yield batch[0] if len(batch) == 1 else b"".join(batch)
                if item is self._EOF:
                    return
                if isinstance(item, BaseException):
                    raise item
        finally:
            self._reader_gone.set()
