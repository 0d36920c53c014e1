"""The zero-copy download path: exact bytes, keep-alive after it, and every way it can break."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from libertem_jupyter_proxy import splice

from .fake_libertem_server import pattern_bytes

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="os.splice is Linux-only")

MiB = 1024 * 1024


async def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking loopback TCP sockets (splice needs real sockets)."""
    server = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    server.close()
    for s in (a, b):
        s.setblocking(False)
    return a, b


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    parts = []
    while n:
        data = await loop.sock_recv(sock, min(n, MiB))
        if not data:
            break
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


async def test_relay_moves_exactly_count_bytes() -> None:
    """Bytes past ``count`` (the next response on a keep-alive connection) stay unread."""
    up_w, up_r = await _tcp_pair()
    down_w, down_r = await _tcp_pair()
    loop = asyncio.get_running_loop()
    body = pattern_bytes(0, 5 * MiB + 3)
    sender = asyncio.ensure_future(loop.sock_sendall(up_w, body + b"NEXT"))
    received = asyncio.ensure_future(_read_exactly(down_r, len(body)))
    await splice.relay(up_r.fileno(), down_w.fileno(), len(body), idle_timeout=10)
    await sender
    assert hashlib.sha256(await received).digest() == hashlib.sha256(body).digest()
    assert await loop.sock_recv(up_r, 16) == b"NEXT"
    for s in (up_w, up_r, down_w, down_r):
        s.close()


async def test_relay_reports_backend_closing_early() -> None:
    up_w, up_r = await _tcp_pair()
    down_w, down_r = await _tcp_pair()
    up_w.sendall(b"x" * 1000)
    up_w.close()
    with pytest.raises(splice.BackendClosed, match="closed the connection"):
        await splice.relay(up_r.fileno(), down_w.fileno(), 5000, idle_timeout=10)
    for s in (up_r, down_w, down_r):
        s.close()


async def test_relay_reports_browser_gone() -> None:
    up_w, up_r = await _tcp_pair()
    down_w, down_r = await _tcp_pair()
    down_r.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    down_r.close()  # with linger 0: a reset, like a browser tab that was closed
    sender = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(up_w, b"y" * (8 * MiB)))
    with pytest.raises(splice.BrowserGone):
        await splice.relay(up_r.fileno(), down_w.fileno(), 8 * MiB, idle_timeout=10)
    up_w.close()
    sender.cancel()
    for s in (up_r, down_w):
        s.close()


async def test_relay_idle_timeout_and_no_fd_left() -> None:
    up_w, up_r = await _tcp_pair()
    down_w, down_r = await _tcp_pair()
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(TimeoutError, match="no progress"):
        await splice.relay(up_r.fileno(), down_w.fileno(), 10, idle_timeout=0.2)
    assert len(os.listdir("/proc/self/fd")) == fds  # the dups and the pipe are closed
    for s in (up_w, up_r, down_w, down_r):
        s.close()


async def test_download_goes_through_splice_and_keeps_alive(client, monkeypatch) -> None:
    """Two downloads on one browser connection: the first is spliced, and tornado's
    Content-Length accounting is right, so the second request is served on the same socket."""
    used: list[int] = []
    real = splice.relay

    async def counting(src, dst, count, *args, **kwargs):  # a spy; the real relay runs
        used.append(count)
        await real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(splice, "relay", counting)
    cookie = await client.login()
    await client.fetch("libertem/api/config/")
    sizes = (8 * MiB + 5, 3 * MiB)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        for size in sizes:
            writer.write(
                (
                    f"GET {client.base_url}libertem/_fake/download?size={size} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\n\r\n"
                ).encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            assert f"content-length: {size}\r\n".encode() in head.lower(), head
            body = await reader.readexactly(size)
            assert body == pattern_bytes(0, size)
    finally:
        writer.close()
    assert len(used) == 2 and all(0 < n <= s for n, s in zip(used, sizes, strict=True)), used


async def test_compressed_and_small_bodies_are_not_spliced(client, monkeypatch) -> None:
    used: list[int] = []

    async def refuse(*args, **kwargs):
        used.append(1)
        raise AssertionError("must not be spliced")

    monkeypatch.setattr(splice, "relay", refuse)
    r = await client.fetch("libertem/_fake/text?size=300000", headers={"Accept-Encoding": "gzip"})
    assert r.code == 200 and len(r.body) == 300000
    r = await client.fetch("libertem/_fake/download?size=1000")
    assert r.code == 200 and r.body == pattern_bytes(0, 1000)
    assert used == []


async def test_not_modified_with_content_length_is_not_awaited(client) -> None:
    """A 304 may state the full body's length; no body follows, so nothing may wait for it:
    the next request on the same keep-alive connection is answered at once."""
    cookie = await client.login()
    await client.fetch("libertem/api/config/")
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        for path in ("_fake/not-modified?length=10000000", "api/config/"):
            writer.write(
                (
                    f"GET {client.base_url}libertem/{path} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\n\r\n"
                ).encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = head.split(b" ", 2)[1]
            assert status == (b"304" if "not-modified" in path else b"200"), head
    finally:
        writer.close()


async def _pieces(items: list[bytes], fail: Exception | None = None):
    """``items`` as ``send_chunked`` takes them: lists of pieces (here two at a time)."""
    for i in range(0, len(items), 2):
        yield items[i : i + 2]
    if fail is not None:
        raise fail


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    """(body, what follows the last chunk) of chunked framing, strictly (RFC 9112 7.1)."""
    body, pos = [], 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end], 16)
        if size == 0:
            assert data[end + 2 : end + 4] == b"\r\n", data[end : end + 8]
            return b"".join(body), data[end + 4 :]
        body.append(data[end + 2 : end + 2 + size])
        assert data[end + 2 + size : end + 4 + size] == b"\r\n"
        pos = end + 4 + size


async def test_send_chunked_frames_every_piece_and_ends_the_body() -> None:
    a, b = await _tcp_pair()
    items = [b"x", b"", pattern_bytes(0, 3 * MiB + 1), b"tail"]  # an empty piece is skipped
    fds = len(os.listdir("/proc/self/fd"))
    received = asyncio.ensure_future(_read_all(b))
    await splice.send_chunked(_pieces(items), a.fileno())
    assert len(os.listdir("/proc/self/fd")) == fds
    a.close()
    body, rest = _dechunk(await received)
    assert body == b"".join(items) and rest == b""
    b.close()


async def test_send_chunked_never_ends_a_body_the_backend_cut() -> None:
    """The backend broke off: its error propagates and no last chunk is sent, so the browser
    sees a cut body, never a complete short one."""
    a, b = await _tcp_pair()
    received = asyncio.ensure_future(_read_all(b))
    with pytest.raises(ConnectionResetError, match="cut"):
        await splice.send_chunked(_pieces([b"abc"], ConnectionResetError("cut")), a.fileno())
    a.close()
    assert await received == b"3\r\nabc\r\n"
    b.close()


async def test_send_chunked_reports_browser_gone() -> None:
    a, b = await _tcp_pair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    b.close()
    with pytest.raises(splice.BrowserGone):
        await splice.send_chunked(_pieces([b"z" * MiB] * 16), a.fileno())
    a.close()


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    parts = []
    while data := await loop.sock_recv(sock, MiB):
        parts.append(data)
    return b"".join(parts)


async def test_chunked_download_framed_by_the_proxy_keeps_alive(client, monkeypatch) -> None:
    """Two chunked downloads on one browser connection: the proxy frames them itself
    (``send_chunked``), tornado adds no framing of its own, and the connection carries the
    second request."""
    used: list[int] = []
    real = splice.send_chunked

    async def counting(*args, **kwargs):  # a spy; the real sender runs
        used.append(1)
        await real(*args, **kwargs)

    monkeypatch.setattr(splice, "send_chunked", counting)
    cookie = await client.login()
    sizes = (5 * MiB + 7, 1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port, limit=16 * MiB)
    try:
        for size in sizes:
            writer.write(
                (
                    f"GET {client.base_url}libertem/_fake/download?size={size}&chunked=1"
                    f"&chunk=70001 HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\n"
                    f"Cookie: {cookie}\r\n\r\n"
                ).encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            assert head.lower().count(b"transfer-encoding: chunked") == 1, head
            assert b"content-length" not in head.lower(), head
            framed = b""
            while not framed.endswith(b"\r\n0\r\n\r\n"):
                framed += await asyncio.wait_for(reader.read(MiB), 30)
            body, rest = _dechunk(framed)
            assert body == pattern_bytes(0, size) and rest == b""
    finally:
        writer.close()
    assert used == [1, 1]


async def test_known_length_without_splice_keeps_its_framing(client, monkeypatch) -> None:
    """Where splice cannot be used (not Linux), a body with a Content-Length is streamed with
    that length: never framed chunked as well (both fields in one answer is invalid, RFC 9112
    6.1, and a browser may take either)."""
    monkeypatch.setattr(splice, "AVAILABLE", False)
    r = await client.fetch("libertem/_fake/download?size=300000")
    assert r.code == 200 and r.body == pattern_bytes(0, 300000)
    assert r.headers.get("Content-Length") == "300000"
    assert "Transfer-Encoding" not in r.headers
