"""Faults and hostile input (issue 8): each gets a clear answer, and later requests work."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile

import pytest
from tornado.httpclient import HTTPClientError

from libertem_jupyter_proxy import backend_run


@pytest.mark.proxy_config(read_timeout=0.5)
async def test_backend_silent_mid_request_is_idle_timeout(client):
    r = await client.fetch("libertem/_fake/slow?seconds=3")
    assert r.code == 504
    assert json.loads(r.body)["error"] == "request-timeout"
    r = await client.fetch("libertem/_fake/slow?seconds=0.1")
    assert r.code == 200  # silence shorter than the idle timeout is fine


async def test_port_taken_between_choice_and_bind(client, supervisor, monkeypatch):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = backend_run.free_port
    ports = iter([taken])
    monkeypatch.setattr(backend_run, "free_port", lambda: next(ports, None) or real())
    try:
        r = await client.fetch("libertem/api/config/")
        assert r.code == 200
        assert supervisor.run.port != taken
        assert supervisor.starts == 2 and supervisor.crash_count == 0
    finally:
        squatter.close()


async def test_token_directory_deleted_under_running_backend(client, supervisor):
    await client.fetch("libertem/api/config/")
    shutil.rmtree(supervisor.run.tmpdir)
    r = await client.fetch("libertem/api/config/")
    assert r.code == 200  # the backend read its token at start
    await supervisor.stop()
    assert supervisor.state.value == "stopped"


async def test_unwritable_tmp_gives_clear_error(client, supervisor, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/tmp/dir")
    r = await client.fetch("libertem/api/config/")
    assert r.code == 502
    data = json.loads(r.body)
    assert "/nonexistent/tmp/dir" in data["message"] and "TMPDIR" in data["hint"]
    monkeypatch.setattr(tempfile, "tempdir", None)
    r = await client.fetch("libertem/api/config/")
    assert r.code == 200


async def test_slow_websocket_reader_is_bounded(client, supervisor):
    """A browser that stops reading: backpressure reaches the backend, Jupyter's memory stays
    bounded (the backend's burst is held in socket buffers, not in our process)."""
    import psutil

    ws = await client.websocket()
    rss_before = psutil.Process().memory_info().rss
    # 2 GiB of binary messages; we read none of them for a while
    await ws.write_message("!burst 2048 1048576")
    await asyncio.sleep(1.0)  # give an unbounded proxy time to balloon (this is the test)
    grown = psutil.Process().memory_info().rss - rss_before
    assert grown < 256 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    # the stream still works: read a few messages, then close
    for _ in range(3):
        msg = await ws.read_message()
        assert isinstance(msg, bytes) and len(msg) == 1048576
    ws.close()


@pytest.mark.parametrize(
    "raw",
    [
        # conflicting framing (request smuggling): refused before anything is forwarded
        b"POST {p}libertem/_fake/echo HTTP/1.1\r\nHost: {h}\r\nCookie: {c}\r\n"
        b"Origin: http://{h}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
        # header injection attempt via a bare LF in a header value
        b"GET {p}libertem/ HTTP/1.1\r\nHost: {h}\r\nCookie: {c}\r\nX-A: a\nX-Api-Key: evil\r\n\r\n",
        # an oversized header
        b"GET {p}libertem/ HTTP/1.1\r\nHost: {h}\r\nCookie: {c}\r\nX-Big: "
        + b"a" * 200000
        + b"\r\n\r\n",
        # absolute URL to another host in the request line
        b"GET http://evil.example{p}libertem/ HTTP/1.1\r\nHost: {h}\r\nCookie: {c}\r\n\r\n",
    ],
)
async def test_malformed_requests_never_reach_elsewhere(client, supervisor, raw):
    cookie = await client.login()
    await client.fetch("libertem/api/config/")
    host = f"127.0.0.1:{client.port}"
    data = raw.replace(b"{p}", client.base_url.encode()).replace(b"{h}", host.encode())
    data = data.replace(b"{c}", cookie.encode())
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(data)
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.read(4096), 10)
    except ConnectionResetError:
        head = b""  # refused by closing the connection
    writer.close()
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else None
    # refused, or answered by our own backend only (nothing can point elsewhere)
    assert status is None or status in (200, 400, 403, 404, 405, 431), head[:200]
    assert supervisor.run.token.encode() not in head
    r = await client.fetch("libertem/api/config/")
    assert r.code == 200


async def test_dns_rebinding_host_refused(client, supervisor):
    r = await client.fetch("libertem/api/config/", headers={"Host": "evil.example"})
    assert r.code == 403
    assert supervisor.starts == 0


async def test_foreign_origin_websocket_with_cookie_refused(client, supervisor):
    with pytest.raises(HTTPClientError) as e:
        await client.websocket(origin="http://127.0.0.1.evil.example")
    assert e.value.code == 403
    assert supervisor.starts == 0


def test_only_loopback_upstream():
    """The upstream address is built from constants: no request data can change it."""
    import inspect

    from libertem_jupyter_proxy import http_proxy, ws_proxy

    for module in (http_proxy, ws_proxy):
        src = inspect.getsource(module)
        assert 'host="127.0.0.1"' in src
    assert os.environ.get("NO_SUCH_ENV_USED") is None
