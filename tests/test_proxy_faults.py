"""Streams that break: client aborts cancel upstream work, backend deaths fail the response."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from tornado.httpclient import HTTPClientError


async def _raw_request(port: int, request: bytes, read: int) -> None:
    """Send a request on a raw socket, read ``read`` bytes of the answer, then hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    got = 0
    while got < read:
        data = await reader.read(65536)
        if not data:
            break
        got += len(data)
    writer.transport.abort()


async def _aborted(client, kind: str, n: int) -> None:
    for _ in range(500):
        info = await client.json("libertem/_fake/pid")
        if info["aborted"][kind] >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"backend saw {info['aborted']} aborted {kind}s, expected {n}")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _settled(fds_before: int, tasks_before: int, slack: int = 2) -> None:
    """Closed connections are released asynchronously: give them 5 s, then insist that file
    descriptors and tasks are back to where they were (a few of slack for the test client)."""
    for _ in range(250):
        if _fds() <= fds_before + slack and len(asyncio.all_tasks()) <= tasks_before + slack:
            return
        await asyncio.sleep(0.02)
    assert _fds() <= fds_before + slack
    assert len(asyncio.all_tasks()) <= tasks_before + slack


async def test_client_abort_mid_download_cancels_upstream(client, supervisor):
    cookie = await client.login()
    await client.fetch("libertem/api/config/")
    fds_before = _fds()
    tasks_before = len(asyncio.all_tasks())
    request = (
        f"GET {client.base_url}libertem/_fake/download?size=1073741824 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\n\r\n"
    ).encode()
    for i in range(20):
        await _raw_request(client.port, request, read=256 * 1024)
        await _aborted(client, "download", i + 1)
    # nothing accumulates: file descriptors and tasks are back where they were
    await _settled(fds_before, tasks_before)
    assert supervisor.requests_in_flight == 0


async def test_client_abort_mid_upload_cancels_upstream(client):
    cookie = await client.login()
    await client.fetch("libertem/api/config/")
    request = (
        f"PUT {client.base_url}libertem/_fake/echo?summary=1 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\n"
        f"Origin: {client.origin}\r\nContent-Length: 104857600\r\n\r\n"
    ).encode() + b"x" * (4 * 1024 * 1024)
    for i in range(5):
        await _raw_request(client.port, request, read=0)
        await _aborted(client, "upload", i + 1)


async def test_backend_death_mid_download_fails_the_response(client, supervisor):
    await client.fetch("libertem/api/config/")
    pid = supervisor.run.pid
    received = 0

    def on_chunk(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)
        if received >= 1024 * 1024 and received - len(chunk) < 1024 * 1024:
            os.kill(pid, signal.SIGKILL)

    # never a complete-looking 200: the connection breaks before Content-Length is met
    with pytest.raises(HTTPClientError) as e:
        await client.fetch(
            "libertem/_fake/download?size=94371840&pause=0.005", streaming_callback=on_chunk
        )
    assert e.value.code == 599, repr(e.value)
    assert 1024 * 1024 <= received < 94371840


async def test_backend_death_mid_upload_gives_error(client, supervisor):
    await client.fetch("libertem/api/config/")
    supervisor.config.extra_env = {}
    pid = supervisor.run.pid
    sent = 0

    async def body(write):
        nonlocal sent
        chunk = b"y" * (1024 * 1024)
        for i in range(200):
            if i == 4:
                os.kill(pid, signal.SIGKILL)
            await write(chunk)
            sent += len(chunk)

    try:
        r = await client.fetch(
            "libertem/_fake/echo?summary=1",
            method="PUT",
            body_producer=body,
            headers={"Content-Length": str(200 * 1024 * 1024)},
            request_timeout=60,
        )
        assert r.code in (502, 599), (r.code, r.body)
    except HTTPClientError as e:  # the proxy may close while we are still sending
        assert e.code in (502, 599)
    # and the next request starts a new backend
    r = await client.fetch("libertem/api/config/")
    assert r.code == 200


async def test_hundred_clients_abort_at_once(client, supervisor):
    """100 browsers hang up mid-download at the same moment: every upstream transfer is
    cancelled and nothing accumulates in the Jupyter process."""
    cookie = await client.login()
    await client.fetch("libertem/api/config/")
    await asyncio.sleep(0.2)  # let the login's own connections settle before counting
    fds_before = _fds()
    tasks_before = len(asyncio.all_tasks())
    aborted_before = (await client.json("libertem/_fake/pid"))["aborted"]["download"]
    request = (
        f"GET {client.base_url}libertem/_fake/download?size=1073741824 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\n\r\n"
    ).encode()
    await asyncio.gather(*(_raw_request(client.port, request, read=64 * 1024) for _ in range(100)))
    await _aborted(client, "download", aborted_before + 100)
    await _settled(fds_before, tasks_before)
    assert supervisor.requests_in_flight == 0
    r = await client.fetch("libertem/api/config/")
    assert r.code == 200
