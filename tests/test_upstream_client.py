"""The proxy's own client for body-less requests (``upstream.py``), differential against aiohttp.

A raw backend (asyncio server) answers every request with scripted bytes, cut into pieces that
arrive one by one. ``hypothesis`` generates the answer: interim 1xx answers, status, reason,
fields (duplicates, obs-text bytes, odd spacing), framing (Content-Length, chunked with sizes,
extensions and trailers, until close, none), the body and how it is cut into pieces. aiohttp
(the client the proxy used for these requests before, and still uses for requests with a
body) reads the same bytes: status, reason, fields and body must be equal, and where aiohttp
refuses an answer, so must ours. Found cases are kept below as ordinary tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from libertem_jupyter_proxy import upstream

from .helpers import run_on_private_loop

MAX_EXAMPLES = int(os.environ.get("LJP_UPSTREAM_EXAMPLES", "150"))


class RawBackend:
    """Answers each request (head read up to CRLF CRLF) with the next scripted answer: a list
    of byte pieces sent one by one, then optionally closes. Counts connections."""

    def __init__(self) -> None:
        self.answers: list[tuple[list[bytes], bool]] = []
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                pieces, close = self.answers.pop(0)
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)  # let the client read between pieces
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


@dataclass(frozen=True)
class Scripted:
    method: str
    raw: bytes  # the whole answer
    cuts: tuple[int, ...]  # where it is cut into pieces
    close: bool  # the backend closes after it

    def pieces(self) -> list[bytes]:
        points = [0, *sorted(c for c in self.cuts if 0 < c < len(self.raw)), len(self.raw)]
        return [self.raw[a:b] for a, b in itertools.pairwise(points) if b > a]


TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_.!#$%&'*+^`|~", min_size=1, max_size=12
)
VALUE = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if c in range(0x20, 0x7F) or c >= 0x80 or c == 9).strip(b" \t")
)
RESERVED = {"content-length", "transfer-encoding", "connection"}


@st.composite
def answers(draw: st.DrawFn) -> Scripted:
    method = draw(st.sampled_from(["GET", "HEAD", "OPTIONS"]))
    out = b""
    for _ in range(draw(st.integers(0, 2))):
        out += b"HTTP/1.1 %d Interim\r\n\r\n" % draw(st.sampled_from([100, 102, 103]))
    status = draw(st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500]))
    reason = draw(st.sampled_from([b"OK", b"", b"Fine Thing", b"\xe9t\xe9"]))
    out += b"HTTP/1.1 %d %s\r\n" % (status, reason) if reason else b"HTTP/1.1 %d \r\n" % status
    for _ in range(draw(st.integers(0, 5))):
        name = draw(TOKEN)
        if name.lower() in RESERVED:
            continue
        spacing = draw(st.sampled_from([b"", b" ", b"  ", b"\t"]))
        out += name.encode() + b":" + spacing + draw(VALUE) + draw(st.sampled_from([b"", b" "]))
        out += b"\r\n"
    body = draw(st.binary(max_size=3000)) * draw(st.sampled_from([1, 1, 40]))
    framing = draw(st.sampled_from(["length", "chunked", "close", "none"]))
    no_body = method == "HEAD" or status in (204, 304)
    close = False
    if framing == "length":
        out += b"Content-Length: %d\r\n\r\n" % len(body)
        out += b"" if no_body else body
    elif framing == "chunked":
        out += b"Transfer-Encoding: chunked\r\n\r\n"
        if not no_body:
            pos = 0
            while pos < len(body):
                n = draw(st.integers(1, max(1, len(body) - pos)))
                ext = draw(st.sampled_from([b"", b";a=b", b" ;x"]))
                out += b"%x%s\r\n%s\r\n" % (n, ext, body[pos : pos + n])
                pos += n
            out += b"0\r\n" + draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"])) + b"\r\n"
    elif framing == "close":
        out += b"\r\n" + (b"" if no_body else body)
        close = True
    else:  # no framing fields at all
        out += b"Content-Length: 0\r\n\r\n" if not no_body else b"\r\n"
    cuts = tuple(draw(st.lists(st.integers(1, max(1, len(out) - 1)), max_size=6)))
    close = close or draw(st.booleans())
    return Scripted(method, out, cuts, close)


async def _ours(port: int, method: str) -> tuple[Any, ...]:
    pool = upstream.Pool(port)
    try:
        answer = await upstream.request(pool, method, "/x", [("X-Test", "1")], 5, 5)
        body = await answer.read()
        answer.release()
        fields = [(k.lower(), v) for k, v in answer.raw_headers]
        return ("ok", answer.status, answer.reason.encode("latin-1"), fields, body)
    except (upstream.UpstreamError, OSError, asyncio.TimeoutError) as e:
        return ("error", type(e).__name__)
    finally:
        pool.close()


async def _aiohttp(port: int, method: str) -> tuple[Any, ...]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        try:
            async with s.request(
                method, f"http://127.0.0.1:{port}/x", headers={"X-Test": "1"}
            ) as r:
                body = await r.read()
                fields = [(k.lower(), v) for k, v in r.raw_headers]
                reason = (r.reason or "").encode("utf-8", "surrogateescape")
                return ("ok", r.status, reason, fields, body)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            return ("error", type(e).__name__)


def _comparable(result: tuple[Any, ...]) -> tuple[Any, ...]:
    """What must be equal: status, reason and body as bytes, fields with their values."""
    if result[0] == "error":
        return ("error",)
    kind, status, reason, fields, body = result
    # whitespace around a value is not part of it (RFC 9110 5.5); aiohttp 3.9.0 kept the
    # trailing part in raw_headers, later versions and ours do not
    fields = [(name, value.strip(b" \t")) for name, value in fields]
    return (kind, status, reason, fields, body)


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(answers())
@example(
    Scripted("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", (), False)
)
@example(
    Scripted(
        "GET",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        (3, 30),
        True,
    )
)
@example(Scripted("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", (), False))
def test_same_answer_as_aiohttp(scripted: Scripted) -> None:
    async def both() -> tuple[Any, Any]:
        backend = RawBackend()
        port = await backend.start()
        try:
            backend.answers = [(scripted.pieces(), scripted.close)]
            ours = await _ours(port, scripted.method)
            backend.answers = [(scripted.pieces(), scripted.close)]
            theirs = await _aiohttp(port, scripted.method)
        finally:
            await backend.stop()
        return ours, theirs

    ours, theirs = run_on_private_loop(both)
    assert _comparable(ours) == _comparable(theirs), (scripted, ours, theirs)


# --- keep-alive, reuse and failures -------------------------------------------------------------


async def _backend(*answers: tuple[list[bytes], bool]) -> tuple[RawBackend, int]:
    backend = RawBackend()
    port = await backend.start()
    backend.answers = list(answers)
    return backend, port


@contextlib.asynccontextmanager
async def _serving(*answers: tuple[list[bytes], bool]) -> AsyncIterator[tuple[RawBackend, Any]]:
    """A raw backend with these answers and a pool of sockets to it; both closed after."""
    backend, port = await _backend(*answers)
    pool = upstream.Pool(port)
    try:
        yield backend, pool
    finally:
        pool.close()
        await backend.stop()


async def test_socket_is_reused_after_a_whole_body() -> None:
    ok = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    chunked = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"]
    backend, port = await _backend((ok, False), (chunked, False), (ok, False))
    pool = upstream.Pool(port)
    try:
        bodies = []
        for _ in range(3):
            answer = await upstream.request(pool, "GET", "/", [], 5, 5)
            bodies.append(await answer.read())
            answer.release()
        assert bodies == [b"ok", b"hi", b"ok"]
        assert backend.connections == 1
    finally:
        pool.close()
        await backend.stop()


async def test_unread_body_or_close_is_never_pooled() -> None:
    """A body not read to its end, ``Connection: close``, HTTP/1.0, or read-until-close: the
    socket is closed, never reused for the next request (which would read the leftovers)."""
    big = [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", b"56789"]
    close = [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"]
    old = [b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\ny"]
    ok = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    backend, port = await _backend((big, False), (close, False), (old, False), (ok, False))
    pool = upstream.Pool(port)
    try:
        first = await upstream.request(pool, "GET", "/", [], 5, 5)
        first.release()  # body unread
        for _ in range(2):
            answer = await upstream.request(pool, "GET", "/", [], 5, 5)
            await answer.read()
            answer.release()
        last = await upstream.request(pool, "GET", "/", [], 5, 5)
        assert await last.read() == b"ok"
        last.release()
        assert backend.connections == 4
    finally:
        pool.close()
        await backend.stop()


async def test_idle_socket_closed_by_the_backend_is_replaced() -> None:
    ok = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    backend, port = await _backend((ok, True), (ok, False))  # closes after the first answer
    pool = upstream.Pool(port)
    try:
        answer = await upstream.request(pool, "GET", "/", [], 5, 5)
        await answer.read()
        answer.release()
        await asyncio.sleep(0)  # (the close reaches our socket; take() checks it anyway)
        answer = await upstream.request(pool, "GET", "/", [], 5, 5)
        assert await answer.read() == b"ok"
        answer.release()
        assert backend.connections == 2
    finally:
        pool.close()
        await backend.stop()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_cut_or_bad_body_is_an_error_never_a_short_body(raw: bytes) -> None:
    backend, port = await _backend(([raw], True))
    pool = upstream.Pool(port)
    try:
        answer = await upstream.request(pool, "GET", "/", [], 5, 5)
        with pytest.raises(upstream.UpstreamError):
            await answer.read()
        answer.close()
    finally:
        pool.close()
        await backend.stop()


async def test_chunk_size_may_have_leading_zeros() -> None:
    """RFC 9112 7.1 limits a chunk's size, not its digits: aiohttp takes many leading zeros."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = head + b"00000000000000005\r\nhello\r\n0\r\n\r\n"
    async with _serving(([raw], True)) as (_, pool):
        answer = await upstream.request(pool, "GET", "/", [], 5, 5)
        assert await answer.read() == b"hello"
        answer.release()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n  b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
        b"",
    ],
)
async def test_malformed_answer_is_named(raw: bytes) -> None:
    async with _serving(([raw] if raw else [], True)) as (_, pool):
        with pytest.raises(upstream.UpstreamError, match="LiberTEM"):
            await upstream.request(pool, "GET", "/", [], 5, 5)


async def test_silent_backend_times_out() -> None:
    # the second (empty) answer keeps the connection open: nothing more is sent
    async with _serving(([b"HTTP/1.1 200 OK\r\n"], False), ([], False)) as (_, pool):
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await upstream.request(pool, "GET", "/", [], 5, 0.2)


async def test_request_head_is_what_aiohttp_would_send() -> None:
    """Host names the backend; the fields follow in order; values are UTF-8 (as aiohttp)."""
    backend, port = await _backend(([b"HTTP/1.1 204 No Content\r\n\r\n"], False))
    pool = upstream.Pool(port)
    try:
        answer = await upstream.request(
            pool, "GET", "/a%20b?q=1", [("X-A", "1"), ("Cookie", "k=\u00e9"), ("X-A", "2")], 5, 5
        )
        answer.release()
    finally:
        pool.close()
        await backend.stop()
    lines = backend.requests[0].split(b"\r\n")
    assert lines[0] == b"GET /a%20b?q=1 HTTP/1.1"
    assert lines[1:5] == [
        f"Host: 127.0.0.1:{port}".encode(),
        b"X-A: 1",
        b"Cookie: k=\xc3\xa9",
        b"X-A: 2",
    ]


def test_no_socket_left_behind() -> None:
    """Every way an exchange ends closes or pools its socket: none leaks."""

    async def many() -> None:
        ok = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        cut = [b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nok"]
        backend, port = await _backend(*([(ok, False), (cut, True)] * 20))
        pool = upstream.Pool(port)
        for _ in range(40):
            with contextlib.suppress(upstream.UpstreamError):
                answer = await upstream.request(pool, "GET", "/", [], 5, 5)
                try:
                    await answer.read()
                finally:
                    answer.release()
        pool.close()
        await backend.stop()

    before = len(os.listdir("/proc/self/fd"))
    run_on_private_loop(many)
    assert len(os.listdir("/proc/self/fd")) <= before
