"""A raw HTTP/1.1 client for the tests: the exact bytes go out, and the answer is parsed from the
exact bytes that come back (header names and values as bytes, duplicates and order kept).

Used to make the same exchange directly with ``tests/raw_backend.py`` and through Jupyter; no
client library normalises anything on the way. The body is sent concurrently with reading the
answer, so an early answer (before the body is read) is seen as the client would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: "length", "chunked", "close" (read to EOF) or "none" (no body by status or method)
    framing: str
    #: the body ended before its framing said it would (a broken-off response)
    truncated: bool = False
    #: interim 1xx answers before this one
    interim: list[int] = field(default_factory=list)
    #: the server closed the connection after this answer
    closed: bool = False

    def get(self, name: str) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name.lower().encode():
                return v
        return None

    def get_all(self, name: str) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower().encode()]


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else b""
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    return status, reason, headers


async def read_response(reader: asyncio.StreamReader, method: str) -> RawResponse:
    interim = []
    while True:
        status, reason, headers = await _read_head(reader)
        if 100 <= status < 200 and status != 101:
            interim.append(status)
            continue
        break
    resp = RawResponse(status, reason, headers, b"", "none", interim=interim)
    te = (resp.get("transfer-encoding") or b"").lower()
    length = resp.get("content-length")
    if method == "HEAD" or status in (204, 304) or status < 200:
        return resp
    body = bytearray()
    try:
        if b"chunked" in te:
            resp.framing = "chunked"
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        elif length is not None:
            resp.framing = "length"
            body += await reader.readexactly(int(length))
        else:
            resp.framing = "close"
            body += await reader.read()
    except asyncio.IncompleteReadError as e:
        body += e.partial
        resp.truncated = True
    except (ConnectionError, ValueError):
        resp.truncated = True
    resp.body = bytes(body)
    return resp


async def exchange(
    port: int,
    head: bytes,
    body_pieces: list[bytes] = (),  # type: ignore[assignment]
    *,
    pause: float = 0.0,
    tls: ssl.SSLContext | None = None,
    then: bytes | None = None,
    timeout: float = 60.0,
    check_closed: bool = False,
) -> tuple[RawResponse, RawResponse | None]:
    """Send ``head`` then ``body_pieces`` (``pause`` s apart) on a new connection to
    127.0.0.1:``port``; read the answer. ``then``: a second request on the same connection
    (keep-alive), whose answer is returned second (None if the connection was closed).
    ``check_closed``: wait a moment to see whether the server closes after its answer."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=tls, limit=1 << 20), timeout
    )
    method = head.split(b" ", 1)[0].decode()

    async def send_body() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(head)
            await writer.drain()
            for piece in body_pieces:
                writer.write(piece)
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)

    sender = asyncio.ensure_future(send_body())
    try:
        first = await asyncio.wait_for(read_response(reader, method), timeout)
        # the answer may come before the body is sent (an early answer): then the server
        # closes, and the rest of the body has nowhere to go
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            await asyncio.wait_for(asyncio.shield(sender), 0 if first.closed else timeout)
        second = None
        if then is not None:
            try:
                writer.write(then)
                await writer.drain()
                second = await asyncio.wait_for(
                    read_response(reader, then.split(b" ", 1)[0].decode()), timeout
                )
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                second = None
        elif check_closed:
            first.closed = await _closed(reader)
        return first, second
    finally:
        sender.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection within a moment after its answer."""
    try:
        data = await asyncio.wait_for(reader.read(1), 0.3)
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


def request_head(method: str, target: str, headers: list[tuple[str | bytes, str | bytes]]) -> bytes:
    """An HTTP/1.1 request head from (name, value) pairs (str as latin-1, bytes as they are)."""

    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else x.encode("latin-1")

    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    lines += [b(n) + b": " + b(v) for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunked(pieces: list[bytes]) -> list[bytes]:
    """``pieces`` in chunked framing (one chunk each, then the last chunk)."""
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p] + [b"0\r\n\r\n"]
