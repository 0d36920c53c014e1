"""Found by the red-team review of issue 17's changes (upload take-over, the proxy's own chunked
framing, its own client for body-less requests): each is kept here as an ordinary test, run
over plain HTTP and Jupyter's own TLS (the rig's two transports)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from libertem_jupyter_proxy.http_proxy import _emits

from . import jupyter_rig, scripts
from .helpers import settled
from .jupyter_rig import PREFIX, TOKEN, Rig
from .raw_backend import pattern
from .raw_http import read_response, request_head

rig = jupyter_rig.rig  # the fixtures
tls_files = jupyter_rig.tls_files

MiB = 1024 * 1024


@contextlib.contextmanager
def _errors_logged() -> Iterator[list[logging.LogRecord]]:
    """The error records logged meanwhile by tornado (its "Uncaught exception" lines) or
    anything that reaches the root logger."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.ERROR)
    loggers = [logging.getLogger("tornado.application"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(keep)


def _answer(size: int, framing: str, seed: int = 7, piece: int = 65536) -> list[Any]:
    fields = [("Content-Type", "application/octet-stream")]
    fields.append(
        ("Transfer-Encoding", "chunked") if framing == "chunked" else ("Content-Length", str(size))
    )
    head = scripts.response_head("200 OK", fields)
    return [["read_body"], scripts.send(head), scripts.body(seed, size, piece, framing=framing)]


def _get(path: str, steps: list[Any], version: str = "HTTP/1.1", extra: str = "") -> bytes:
    name, value = scripts.header(steps, scripts.new_id())
    return (
        f"GET {PREFIX}{path} {version}\r\nHost: 127.0.0.1\r\nAuthorization: token {TOKEN}\r\n"
        f"{name}: {value}\r\n{extra}\r\n"
    ).encode()


@pytest.mark.parametrize("size", [100_000, 200_000])
async def test_known_length_body_read_with_its_headers_keeps_its_framing(rig: Rig, size: int):
    """A Content-Length body over 64 KiB that arrives right behind its headers (read whole
    before it could be spliced) went out with Transfer-Encoding: chunked as well."""
    second = request_head(
        "GET",
        PREFIX + "next",
        [
            ("Host", f"127.0.0.1:{rig.port}"),
            ("Authorization", f"token {TOKEN}"),
            scripts.header(_answer(10, "length", piece=10), scripts.new_id()),
        ],
    )
    steps = _answer(size, "length", piece=size)
    resp, after = await rig.proxied(
        "GET", "blob", [scripts.header(steps, scripts.new_id())], then=second
    )
    assert resp.status == 200 and resp.body == pattern(7, size)
    assert (
        resp.get("transfer-encoding") is None and resp.get("content-length") == str(size).encode()
    )
    assert after is not None and after.status == 200, "keep-alive broken after the body"


@pytest.mark.proxy_config(read_timeout=1.0)
@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_paused_download_outlasts_read_timeout(rig: Rig, framing: str) -> None:
    """``read_timeout`` is how long LiberTEM may stay silent, not the browser: a paused download
    (the browser stops reading) for longer than it must still arrive whole afterwards."""
    size = 48 * MiB
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", rig.port, ssl=rig.tls, limit=1 << 16
    )
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    writer.write(_get("dl", _answer(size, framing, seed=5)))
    await writer.drain()
    writer.transport.pause_reading()
    await asyncio.sleep(2.5)  # the pause itself is the case: longer than read_timeout
    writer.transport.resume_reading()
    try:
        resp = await asyncio.wait_for(read_response(reader, "GET"), 60)
    finally:
        writer.close()
    assert not resp.truncated and len(resp.body) == size
    assert resp.body == pattern(5, size)


async def test_upload_cut_after_its_head_logs_no_uncaught_exception(rig: Rig) -> None:
    """A tab closed right after sending the head and a little of a Content-Length body: the
    proxy's body reader once ran tornado's own ``on_connection_close`` before tornado had
    finished the request, and every such upload logged an InvalidStateError traceback."""
    with _errors_logged() as records:
        await rig.backend()
        for _ in range(10):
            name, value = scripts.header([["read_body"]], scripts.new_id())
            _, writer = await asyncio.open_connection("127.0.0.1", rig.port, ssl=rig.tls)
            writer.write(
                f"PUT {PREFIX}up HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token {TOKEN}\r\n"
                f"{name}: {value}\r\nContent-Length: 5000000\r\n\r\n".encode()
                + b"z" * 1000
            )
            await writer.drain()
            writer.transport.abort()
        await settled(rig.supervisor)
    errors = [r.getMessage() for r in records if r.exc_info or "Uncaught" in r.getMessage()]
    assert errors == []


@pytest.mark.parametrize("value", ["55, 55", "55,55"])
async def test_repeated_equal_content_length_is_one_length(rig: Rig, value: str) -> None:
    """``Content-Length: 55, 55`` is one length (tornado reads it so); the upstream client
    refused it and the browser got a 500."""
    sid = scripts.new_id()
    ok = scripts.response_head("200 OK", [("Content-Length", "2")]) + b"ok"
    name, val = scripts.header([["read_body"], scripts.send(ok)], sid)
    head = (
        f"POST {PREFIX}up HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token {TOKEN}\r\n"
        f"{name}: {val}\r\nContent-Length: {value}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port, ssl=rig.tls)
    try:
        writer.write(head + b"b" * 55)
        await writer.drain()
        resp = await asyncio.wait_for(read_response(reader, "POST"), 30)
    finally:
        writer.close()
    assert resp.status == 200 and resp.body == b"ok"
    record = await rig.record(sid)
    assert record["body_len"] == 55
    lengths = [v for n, v in record["headers"] if n.lower() == "content-length"]
    assert lengths == ["55"]


@pytest.mark.parametrize(
    "version,extra",
    [
        ("HTTP/1.0", ""),
        ("HTTP/1.0", "Connection: keep-alive\r\n"),
        ("HTTP/1.1", "Connection: close\r\n"),
    ],
)
async def test_unknown_length_body_to_old_and_closing_clients(rig: Rig, version: str, extra: str):
    """An HTTP/1.0 client that asked for keep-alive got a body without length or framing on a
    connection that stayed open: it could never tell where the body ended."""
    size = 300_000
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port, ssl=rig.tls)
    writer.write(_get("dl", _answer(size, "chunked", seed=9), version, extra))
    data = b""
    try:
        while piece := await asyncio.wait_for(reader.read(MiB), 10):
            data += piece
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    fields = {
        line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")[1:]
    }
    if version == "HTTP/1.0":
        assert body == pattern(9, size) and b"transfer-encoding" not in fields
        assert fields.get(b"connection", b"").lower() != b"keep-alive"
    else:
        assert fields.get(b"transfer-encoding") == b"chunked"


def test_emits_follows_the_handlers_not_only_the_logger() -> None:
    """The access-log shortcut asked the logger alone; Jupyter's logger is at DEBUG and its
    handler at INFO, so the line was always built and then dropped."""
    logger = logging.getLogger("ljp-test-emits")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        assert not _emits(logger, logging.DEBUG)
        assert _emits(logger, logging.INFO)
        assert not _emits(logging.LoggerAdapter(logger, {}), logging.DEBUG)
        handler.setLevel(logging.DEBUG)
        assert _emits(logger, logging.DEBUG)
        logger.setLevel(logging.INFO)
        assert not _emits(logger, logging.DEBUG)
    finally:
        logger.removeHandler(handler)


async def test_many_tiny_chunks_in_one_receive(rig: Rig) -> None:
    """Thousands of 1-byte chunks arriving at once become one list of pieces, framed in one
    gathered write: more buffers than one ``writev`` takes (IOV_MAX) must still all go out."""
    body = bytes(range(256)) * 20
    framed = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body)))
    head = scripts.response_head(
        "200 OK", [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")]
    )
    steps = [["read_body"], scripts.send(head + framed + b"0\r\n\r\n")]
    resp, _ = await rig.proxied("GET", "tiny", [scripts.header(steps, scripts.new_id())])
    assert resp.status == 200 and resp.body == body


# --- found by the red-team review of upstream.py (the proxy's own client) ---------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 099 Odd\r\nContent-Length: 5\r\n\r\n",
    ],
)
async def test_answer_that_cannot_be_relayed_is_a_named_502(rig: Rig, head: bytes) -> None:
    """Both length fields (RFC 9112 6.3: an error) or a status below 100 (RFC 9110 15): the
    proxy's own client once relayed them, and tornado then broke the answer off with an
    uncaught exception; now the browser gets the 502 that names it, as with aiohttp."""
    body = b"5\r\nhello\r\n0\r\n\r\n" if b"chunked" in head else b"hello"
    steps = [["read_body"], scripts.send(head + body)]
    resp, _ = await rig.proxied("GET", "odd", [scripts.header(steps, scripts.new_id(), close=True)])
    assert resp.status == 502
    assert b"Transfer-Encoding and Content-Length" in resp.body or b"status code 099" in resp.body
    await settled(rig.supervisor)


async def test_aborted_spliced_downloads_log_no_uncaught_exception(rig: Rig) -> None:
    """A browser that drops a Content-Length download moved by splice: the proxy saw the
    broken socket before tornado did, and tornado's automatic finish() then logged
    'Tried to write N bytes less than Content-Length' with a traceback."""
    with _errors_logged() as records:
        await rig.backend()

        async def aborted(i: int) -> None:
            steps = _answer(50_000_000, "length", seed=i)
            reader, writer = await asyncio.open_connection("127.0.0.1", rig.port, ssl=rig.tls)
            writer.write(_get(f"big{i}", steps))
            await reader.readexactly(200_000)
            writer.transport.abort()

        for _ in range(2):
            await asyncio.gather(*(aborted(i) for i in range(20)))
        await settled(rig.supervisor)
    assert [r.getMessage() for r in records] == []
