"""Uploads through ``upstream.Upload`` against the raw backend: what its red team found.

Each case failed before its fix (82fa446, the first version of the upload path):

- an interim answer (``100 Continue`` sent unasked, ``103 Early Hints``) stopped the upload as
  if it were a refusal: the backend never got the body, the browser got a 504;
- a refusal without a length (tornado's bare ``400 Bad Request`` for a body over its
  ``max_body_size``: its end is the close), followed by a reset of the connection because the
  body was left unread, became a 502 "did not answer" instead of the 400;
- an early *successful* answer stopped the body too, although the backend went on reading it
  (RFC 9112 9.3: only an error answer is a reason to stop).

And what the second red team found in those fixes (a740cad):

- the reset rule applied to every body framed by the close: a GET download cut by a reset
  reached the browser as a complete body;
- an early 2xx answer followed by a backend that neither read nor closed became a 504, although
  its 200 was already in;
- an early 2xx answer with a large body, then the backend reading the upload: neither side read,
  both waited until ``read_timeout`` (504).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_server.serverapp import ServerApp

from . import jupyter_rig, scripts
from .helpers import settled
from .jupyter_rig import Rig
from .scripts import header, response_head, send

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def prig(request: pytest.FixtureRequest, io_loop: Any, jp_dirs: dict[str, Path]) -> Iterator[Rig]:
    """The raw-backend rig over plain HTTP (options from ``proxy_config``)."""
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("proxy_config"))):
        options.update(marker.kwargs)
    r = jupyter_rig.make_rig(io_loop, jp_dirs, None, **options)
    yield r
    io_loop.run_sync(r.app._cleanup, timeout=60)
    ServerApp.clear_instance()


def ok(body: bytes = b"done") -> list[Any]:
    return send(response_head("200 OK", [("Content-Length", str(len(body)))]) + body)


def _pieces(size: int, piece: int = 256 * KiB) -> list[bytes]:
    return [bytes([i % 251]) * min(piece, size - at) for i, at in enumerate(range(0, size, piece))]


@pytest.mark.proxy_config(read_timeout=10)
@pytest.mark.parametrize("interim", [b"100 Continue", b"103 Early Hints"])
async def test_interim_answer_does_not_stop_the_upload(prig: Rig, interim: bytes) -> None:
    pieces = _pieces(8 * MiB)
    sid = scripts.new_id()
    steps = [send(b"HTTP/1.1 " + interim + b"\r\n\r\n"), ["read_body"], ok()]
    h = [header(steps, sid), ("Content-Length", str(8 * MiB))]
    resp, _ = await prig.proxied("PUT", "up", h, pieces, pause=0.002, timeout=30)
    rec = await prig.record(sid)
    assert (resp.status, resp.body) == (200, b"done"), resp.body[:300]
    assert rec.get("body_sha256") == hashlib.sha256(b"".join(pieces)).hexdigest()
    await settled(prig.supervisor)


@pytest.mark.parametrize("body", [b"", b"request too large"])
async def test_refusal_ended_by_a_reset_reaches_the_browser(prig: Rig, body: bytes) -> None:
    refusal = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n" + body
    got = []
    for _ in range(3):
        sid = scripts.new_id()
        h = [header([send(refusal), ["close"]], sid), ("Content-Length", str(4 * MiB))]
        resp, _ = await prig.proxied("PUT", "x", h, _pieces(4 * MiB))
        got.append((resp.status, resp.body))
    assert got == [(400, body)] * 3
    await settled(prig.supervisor)


async def test_early_success_answer_lets_the_backend_read_the_whole_body(prig: Rig) -> None:
    pieces = _pieces(4 * MiB, 64 * KiB)
    sid = scripts.new_id()
    h = [header([ok(b"accepted"), ["read_body"], ["close"]], sid), ("Content-Length", str(4 * MiB))]
    resp, _ = await prig.proxied("PUT", "up", h, pieces, pause=0.002)
    assert (resp.status, resp.body) == (200, b"accepted")
    await settled(prig.supervisor)
    # the answer can reach the browser before the backend finished reading the body: wait
    # for its record of the body (or for it to have ended without one)
    deadline = asyncio.get_running_loop().time() + 20
    while "body_sha256" not in (rec := await prig.record(sid)):
        assert asyncio.get_running_loop().time() < deadline, rec
        await asyncio.sleep(0.05)
    assert rec["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest(), rec


async def test_download_cut_by_a_reset_stays_cut(prig: Rig) -> None:
    """A body framed by the close and cut by a reset: the browser must see it broken off (a
    chunked body without its last chunk), as a direct client sees the reset."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n"
    steps = [send(head), scripts.body(3, 300_000), ["reset"]]
    direct, _ = await prig.direct("GET", "cut", [header(steps, scripts.new_id())])
    assert direct.truncated
    resp, _ = await prig.proxied("GET", "cut", [header(steps, scripts.new_id())])
    assert resp.status == 200 and resp.truncated, (resp.framing, len(resp.body))
    await settled(prig.supervisor)


@pytest.mark.proxy_config(read_timeout=2)
async def test_early_success_then_a_stalled_backend_keeps_the_answer(prig: Rig) -> None:
    size = 24 * MiB
    h = [header([ok(b"accepted"), ["sleep", 6], ["close"]], scripts.new_id())]
    resp, _ = await prig.proxied("PUT", "up", [*h, ("Content-Length", str(size))], _pieces(size))
    assert (resp.status, resp.body) == (200, b"accepted"), resp.body[:300]
    await settled(prig.supervisor)


@pytest.mark.proxy_config(read_timeout=5)
async def test_early_success_with_a_large_body_before_reading(prig: Rig) -> None:
    """The backend sends its whole answer (24 MiB) before it reads the upload. Once that
    answer fills the proxy's buffer, the body stops and the answer is relayed whole (the
    backend gets a cut body, as it did with aiohttp); before, both sides waited."""
    size = 24 * MiB
    steps = [
        send(response_head("200 OK", [("Content-Length", str(size))])),
        scripts.body(7, size, 256 * KiB),
        ["read_body"],
    ]
    h = [header(steps, scripts.new_id()), ("Content-Length", str(size))]
    resp, _ = await prig.proxied("PUT", "up", h, _pieces(size, MiB), timeout=60)
    assert (resp.status, len(resp.body), resp.truncated) == (200, size, False)
    await settled(prig.supervisor)
