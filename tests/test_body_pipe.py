"""BodyPipe on its own: no byte dropped, duplicated or reordered, whatever the reader's pace."""

from __future__ import annotations

import asyncio

import pytest

from libertem_jupyter_proxy.body_pipe import BodyPipe


async def test_close_on_a_full_pipe_keeps_every_chunk() -> None:
    """Issue 12, item 1: close() used to drop a queued chunk to make room for its marker."""
    pipe = BodyPipe(max_bytes=4)
    chunks = [bytes([i]) * 2 for i in range(10)]
    got: list[bytes] = []

    async def slow_reader() -> None:
        async for c in pipe.chunks():
            got.append(c)
            await asyncio.sleep(0.001)

    reader = asyncio.ensure_future(slow_reader())
    for c in chunks:
        await pipe.write(c)
    pipe.close()  # while the buffer is full
    await asyncio.wait_for(reader, 5)
    assert b"".join(got) == b"".join(chunks)


async def test_abort_fails_the_body() -> None:
    pipe = BodyPipe()
    await pipe.write(b"abc")
    pipe.abort(ConnectionResetError("gone"))
    with pytest.raises(ConnectionResetError):
        async for _ in pipe.chunks():
            pass


async def test_reader_done_releases_a_waiting_writer_and_close_is_then_a_noop() -> None:
    pipe = BodyPipe(max_bytes=1)
    await pipe.write(b"x")
    blocked = asyncio.ensure_future(pipe.write(b"y"))
    await asyncio.sleep(0)
    assert not blocked.done()
    pipe.reader_done()
    await asyncio.wait_for(blocked, 1)
    pipe.close()
    assert not pipe.closed  # a body cut short is never ended as if complete
