"""Uploads with a ``Content-Length`` are read by the proxy itself (``_take_over_body``, issue 17).

tornado is told no body follows and the handler reads exactly ``Content-Length`` bytes from the
browser's stream. What that must not change: the backend gets every byte, and the same
keep-alive connection carries the next request, even when that request's bytes arrive in the
same TCP segment as the end of the body (pipelining), so nothing may be read past the body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from libertem_jupyter_proxy import http_proxy

from .helpers import settled


def _post(client: Any, cookie: str, body_length: int, path: str = "_fake/echo?summary=1") -> bytes:
    return (
        f"POST {client.base_url}libertem/{path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\n"
        f"Origin: {client.origin}\r\nContent-Length: {body_length}\r\n\r\n"
    ).encode()


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await asyncio.wait_for(reader.readexactly(length), 30)


async def test_body_taken_over_then_pipelined_requests_on_one_connection(client, monkeypatch):
    read_by_proxy: list[int] = []
    original = http_proxy.HttpProxyHandler._read_body

    async def counting(self: Any, stream: Any, length: int, upload: Any) -> None:
        read_by_proxy.append(length)
        await original(self, stream, length, upload)

    monkeypatch.setattr(http_proxy.HttpProxyHandler, "_read_body", counting)
    cookie = await client.login()
    first = bytes(range(256)) * 4099  # not a multiple of any buffer size
    second = b"x" * 3
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        # the first body in odd pieces; its last piece and the whole second request (head and
        # body) and a GET go out in one write: tornado must find them after the first body
        writer.write(_post(client, cookie, len(first)) + first[:1000])
        await writer.drain()
        writer.write(first[1000:70001])
        await writer.drain()
        get = (
            f"GET {client.base_url}libertem/api/config/ HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\n\r\n"
        ).encode()
        writer.write(first[70001:] + _post(client, cookie, len(second)) + second + get)
        await writer.drain()
        answers = [await _answer(reader) for _ in range(3)]
    finally:
        writer.close()
    summaries = [json.loads(body) for _, body in answers[:2]]
    assert [a[0].split(b" ", 2)[1] for a in answers] == [b"200"] * 3, answers
    assert summaries[0]["length"] == len(first)
    assert summaries[0]["sha256"] == hashlib.sha256(first).hexdigest()
    assert summaries[1]["length"] == len(second)
    assert summaries[1]["sha256"] == hashlib.sha256(second).hexdigest()
    assert b"CONFIG" in answers[2][1]
    assert read_by_proxy == [len(first), len(second)]


async def test_upstream_request_keeps_content_length(client):
    """The backend sees the browser's ``Content-Length`` (tornado's copy lost it on purpose)."""
    r = await client.fetch(
        "libertem/_fake/headers", method="PUT", body=b"abc", headers={"Content-Type": "text/plain"}
    )
    assert r.code == 200, r.body[:300]
    seen = {k.lower(): v for k, v in json.loads(r.body)["headers"].items()}
    assert seen.get("content-length") == "3", seen


async def test_browser_gone_mid_body_reaches_backend_as_incomplete(client, supervisor):
    """A browser that stops after part of a taken-over body: the backend's request fails
    (it never sees a complete body), the connection and the request count are released."""
    cookie = await client.login()
    _, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(_post(client, cookie, 10_000_000, "_fake/echo") + b"y" * 200_000)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await settled(supervisor)
    r = await client.fetch("libertem/api/config/")
    assert r.code == 200


async def test_non_ascii_digit_content_length_is_a_bad_request_not_a_crash(client):
    """``str.isdigit`` is true for "²" (latin-1, as tornado decodes headers) but ``int`` refuses
    it: the proxy once answered such a request with a 500 page. tornado's 400 is the answer."""
    cookie = await client.login()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(
            f"POST {client.base_url}libertem/_fake/echo HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\nOrigin: {client.origin}\r\n"
            "Content-Length: ".encode()
            + "²".encode("latin-1")
            + b"\r\n\r\nab"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    finally:
        writer.close()
    assert head.split(b" ", 2)[1] == b"400", head
