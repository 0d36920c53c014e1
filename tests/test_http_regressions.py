"""Each small input of issue 12 (data integrity and HTTP semantics) as a test, plain and under
Jupyter's own TLS, against the raw backend (every byte it sends is the test's).

Cases the generated suites found are kept at the end of this file as ordinary tests.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from typing import Any

import pytest

from . import jupyter_rig, raw_http, scripts
from .helpers import settled
from .jupyter_rig import BASE_URL, PREFIX, TOKEN, Rig
from .raw_http import chunked
from .scripts import header, response_head, send

KiB = 1024
rig = jupyter_rig.rig  # the fixtures
tls_files = jupyter_rig.tls_files


def ok(body: bytes = b"done", extra: list[tuple[str, str]] = ()) -> list[Any]:  # type: ignore[assignment]
    return send(
        response_head(
            "200 OK",
            [
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(len(body))),
                *extra,
            ],
        )
        + body
    )


# --- 1. bytes are never dropped: a slow backend gets every byte of an upload -------------------


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_slow_backend_gets_the_whole_upload(rig: Rig, framing: str) -> None:
    pieces = [bytes([i]) * (64 * KiB) for i in range(72)]
    sid = scripts.new_id()
    steps = [["read_body_slow", 64 * KiB, 0.002], ok()]
    h = [header(steps, sid), ("Content-Type", "application/octet-stream")]
    if framing == "chunked":
        h.append(("Transfer-Encoding", "chunked"))
        body = chunked(pieces)
    else:
        h.append(("Content-Length", str(72 * 64 * KiB)))
        body = pieces
    resp, _ = await rig.proxied("PUT", "up", h, body)
    assert resp.status == 200, resp
    rec = await rig.record(sid)
    assert rec["body_len"] == 72 * 64 * KiB
    assert rec["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    await settled(rig.supervisor)


# --- 2. read_timeout = 0 means no timeout, also on the splice path ----------------------------


@pytest.mark.proxy_config(read_timeout=0)
async def test_read_timeout_zero_large_download(rig: Rig) -> None:
    size = 4 * 1024 * KiB
    sid = scripts.new_id()
    head = response_head(
        "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
    )
    steps = [send(head), scripts.body(7, size, 256 * KiB, 0.001)]
    resp, _ = await rig.proxied("GET", "big", [header(steps, sid)])
    assert resp.status == 200 and not resp.truncated
    assert hashlib.sha256(resp.body).hexdigest() == scripts.sha(7, size)
    await settled(rig.supervisor)


# --- 3. Expect: 100-continue is answered by Jupyter, never forwarded -------------------------


async def test_expect_not_forwarded(rig: Rig) -> None:
    sid = scripts.new_id()
    steps = [["read_body"], ok()]
    h = [header(steps, sid), ("Expect", "100-continue"), ("Content-Length", "5")]
    resp, _ = await rig.proxied("POST", "x", h, [b"hello"])
    assert resp.status == 200
    rec = await rig.record(sid)
    assert "expect" not in {n.lower() for n, _ in rec["headers"]}
    assert rec["body_len"] == 5
    await settled(rig.supervisor)


async def test_expect_with_backend_that_answers_at_once_and_closes(rig: Rig) -> None:
    sid = scripts.new_id()
    refusal = response_head(
        "413 Payload Too Large", [("Content-Length", "4"), ("Connection", "close")]
    )
    steps = [send(refusal + b"nope"), ["close"]]
    size = 256 * KiB
    h = [header(steps, sid), ("Expect", "100-continue"), ("Content-Length", str(size))]
    resp, _ = await asyncio.wait_for(rig.proxied("POST", "x", h, [b"x" * size]), 30)
    assert resp.status == 413 and resp.body == b"nope"
    await settled(rig.supervisor)


# --- 4. an early answer (413 while the browser still uploads) reaches the browser -------------


async def test_early_413_while_uploading(rig: Rig) -> None:
    sid = scripts.new_id()
    refusal = response_head(
        "413 Payload Too Large", [("Content-Length", "8"), ("Connection", "close")]
    )
    steps = [send(refusal + b"too big!"), ["close"]]
    pieces = [b"y" * (64 * KiB)] * 32
    h = [header(steps, sid), ("Content-Length", str(32 * 64 * KiB))]
    resp, _ = await rig.proxied("PUT", "x", h, pieces, pause=0.005)
    if resp.status == 502:
        # The one residual race (see http_proxy._send_unreachable): the backend's reset lands
        # between the proxy's read and its next write, and asyncio closes the socket unread.
        # Seen twice in about 30 runs on a 2-core machine at load 10+; the answer says so.
        assert b"closed the connection while this upload was still being sent" in resp.body
    else:
        assert resp.status == 413 and resp.body == b"too big!"
    await settled(rig.supervisor)


# --- 5. an answer given before the body was read says Connection: close -----------------------


async def login_cookie(rig: Rig) -> str:
    head = raw_http.request_head(
        "GET", f"{BASE_URL}api/status?token={TOKEN}", [("Host", f"127.0.0.1:{rig.port}")]
    )
    resp, _ = await raw_http.exchange(rig.port, head, tls=rig.tls)
    cookies = [c.split(b";", 1)[0].decode() for c in resp.get_all("Set-Cookie")]
    return "; ".join(c for c in cookies if not c.startswith("_xsrf"))


async def test_cross_site_refusal_says_connection_close(rig: Rig) -> None:
    cookie = await login_cookie(rig)
    h = [
        ("Host", f"127.0.0.1:{rig.port}"),
        ("Cookie", cookie),
        ("Origin", "http://evil.example"),
        ("Content-Length", "5"),
    ]
    head = raw_http.request_head("POST", PREFIX + "api/x", h)
    resp, _ = await raw_http.exchange(rig.port, head, [b"hello"], tls=rig.tls)
    assert resp.status == 403
    assert resp.get("Connection") == b"close"
    await settled(rig.supervisor)


@pytest.mark.proxy_config(max_body_size=1000)
async def test_oversized_body_refused_with_413_and_connection_close(rig: Rig) -> None:
    h = [header([["read_body"], ok()], scripts.new_id()), ("Content-Length", "5000")]
    resp, _ = await rig.proxied("PUT", "x", h, [b"z" * 5000])
    assert resp.status == 413
    assert resp.get("Connection") == b"close"
    await settled(rig.supervisor)


# --- 6. 304 and 204 with a Content-Length ------------------------------------------------------


@pytest.mark.parametrize("status", ["304 Not Modified", "204 No Content"])
async def test_no_body_status_with_content_length(rig: Rig, status: str) -> None:
    head = response_head(status, [("ETag", '"v1"'), ("Content-Length", "1234")])
    h = [header([send(head)], scripts.new_id())]
    nxt = raw_http.request_head(
        "GET",
        PREFIX + "again",
        [
            ("Host", f"127.0.0.1:{rig.port}"),
            ("Authorization", f"token {TOKEN}"),
            header([ok()], scripts.new_id()),
        ],
    )
    resp, second = await rig.proxied("GET", "x", h, then=nxt)
    assert resp.status == int(status[:3])
    assert resp.get("ETag") == b'"v1"'
    if status.startswith("304"):
        assert resp.get("Content-Length") == b"1234"  # RFC 9110 8.6: the 200's length
    else:
        assert resp.get("Content-Length") is None  # RFC 9110 8.6: never on a 204
    assert second is not None and second.status == 200  # the connection stays usable
    await settled(rig.supervisor)


# --- 7. gzip and its consequences --------------------------------------------------------------

HTML = b"<html>" + b"LiberTEM " * 600 + b"</html>"


def html_head(extra: list[tuple[str, str]] = (), length: bool = True) -> bytes:  # type: ignore[assignment]
    h = [("Content-Type", "text/html"), ("ETag", '"abc"'), ("Accept-Ranges", "bytes"), *extra]
    if length:
        h.append(("Content-Length", str(len(HTML))))
    else:
        h.append(("Transfer-Encoding", "chunked"))
    return response_head("200 OK", h)


async def test_gzip_get_and_its_headers(rig: Rig) -> None:
    steps = [send(html_head() + HTML)]
    h = [header(steps, scripts.new_id()), ("Accept-Encoding", "gzip")]
    resp, _ = await rig.proxied("GET", "index", h)
    assert resp.get("Content-Encoding") == b"gzip"
    assert gzip.decompress(resp.body) == HTML
    assert resp.get("ETag") == b'W/"abc"'
    assert resp.get("Accept-Ranges") is None
    assert b"Accept-Encoding" in b",".join(resp.get_all("Vary"))


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_gzip_head_has_no_zero_length(rig: Rig, length: bool) -> None:
    steps = [send(html_head(length=length))]
    h = [header(steps, scripts.new_id()), ("Accept-Encoding", "gzip")]
    resp, _ = await rig.proxied("HEAD", "index", h)
    assert resp.status == 200
    assert resp.get("Content-Length") != b"0"
    assert resp.get("Content-Encoding") == b"gzip"
    assert resp.get("ETag") == b'W/"abc"'


async def test_head_of_chunked_get_without_gzip(rig: Rig) -> None:
    head = response_head(
        "200 OK", [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")]
    )
    resp, _ = await rig.proxied("HEAD", "blob", [header([send(head)], scripts.new_id())])
    assert resp.status == 200 and resp.get("Content-Length") is None


async def test_no_transform_is_never_gzipped(rig: Rig) -> None:
    steps = [send(html_head([("Cache-Control", "max-age=60, no-transform")]) + HTML)]
    h = [header(steps, scripts.new_id()), ("Accept-Encoding", "gzip")]
    resp, _ = await rig.proxied("GET", "index", h)
    assert resp.get("Content-Encoding") is None and resp.body == HTML
    assert resp.get("ETag") == b'"abc"' and resp.get("Accept-Ranges") == b"bytes"


async def test_304_revalidating_gzipped_copy(rig: Rig) -> None:
    head = response_head("304 Not Modified", [("ETag", '"abc"')])
    h = [
        header([send(head)], scripts.new_id()),
        ("Accept-Encoding", "gzip"),
        ("If-None-Match", 'W/"abc"'),
    ]
    resp, _ = await rig.proxied("GET", "index", h)
    assert resp.status == 304
    assert resp.get("ETag") == b'W/"abc"'
    assert b"Accept-Encoding" in b",".join(resp.get_all("Vary"))


async def test_weak_if_range_drops_range(rig: Rig) -> None:
    sid = scripts.new_id()
    h = [
        header([ok()], sid),
        ("Range", "bytes=100-"),
        ("If-Range", 'W/"abc"'),
        ("Accept-Encoding", "gzip"),
    ]
    await rig.proxied("GET", "index", h)
    names = {n.lower() for n, _ in (await rig.record(sid))["headers"]}
    assert "range" not in names and "if-range" not in names


# --- 8. non-ASCII header bytes pass byte for byte ----------------------------------------------


async def test_non_ascii_header_bytes(rig: Rig) -> None:
    sid = scripts.new_id()
    value = "café ☃".encode()
    back = "Grüße".encode()
    steps = [send(response_head("200 OK", [("X-Back", back), ("Content-Length", "0")]))]
    h = [header(steps, sid), ("X-Name", value), ("Cookie", b"n=" + value)]
    resp, _ = await rig.proxied("GET", "x", h)
    assert resp.get("X-Back") == back
    rec = dict((n.lower(), v.encode("latin-1")) for n, v in (await rig.record(sid))["headers"])
    assert rec["x-name"] == value
    assert rec["cookie"] == b"n=" + value


# --- 9. a percent-encoded token parameter is still the token -----------------------------------


async def test_percent_encoded_token_not_forwarded(rig: Rig) -> None:
    sid = scripts.new_id()
    head = raw_http.request_head(
        "GET",
        f"{PREFIX}x?a=1&%74oken={TOKEN}&to%6Ben={TOKEN}&b=%20",
        [("Host", f"127.0.0.1:{rig.port}"), header([ok()], sid)],
    )
    resp, _ = await raw_http.exchange(rig.port, head, tls=rig.tls)
    assert resp.status == 200
    rec = await rig.record(sid)
    assert rec["target"] == "/x?a=1&b=%20"
    assert TOKEN not in json.dumps(rec)


# --- 10. one prefixing convention, held for all four headers -----------------------------------


async def test_prefixing_convention(rig: Rig) -> None:
    sid = scripts.new_id()
    port, _ = await rig.backend()
    head = response_head(
        "302 Found",
        [
            ("Location", "/login?next=%2Fa"),
            ("Content-Location", f"http://127.0.0.1:{port}/doc/1"),
            ("Refresh", "3; url=/after"),
            ("Set-Cookie", "sid=1; Path=/api; HttpOnly; Domain=127.0.0.1; Max-Age=60"),
            ("Set-Cookie", 'pref="a b"; Expires=Wed, 09 Jun 2027 10:18:14 GMT'),
            ("Content-Length", "0"),
        ],
    )
    resp, _ = await rig.proxied("GET", "x", [header([send(head)], sid)])
    assert resp.get("Location") == PREFIX.encode() + b"login?next=%2Fa"
    assert resp.get("Content-Location") == PREFIX.encode() + b"doc/1"
    assert resp.get("Refresh") == b"3; url=" + PREFIX.encode() + b"after"
    backend_cookies = [c for c in resp.get_all("Set-Cookie") if not c.startswith(b"username-")]
    assert backend_cookies == [
        b"sid=1; Path=" + PREFIX.encode() + b"api; HttpOnly; Max-Age=60",
        b'pref="a b"; Expires=Wed, 09 Jun 2027 10:18:14 GMT',
    ]
    names = {n.lower() for n, _ in (await rig.record(sid))["headers"]}
    assert "x-forwarded-prefix" not in names  # the backend is not told: paths are rewritten


# --- found by the generated suites -------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_backend_dies_before_small_body_complete(rig: Rig, framing: str) -> None:
    """Found by test_body_integrity: a 51-byte body cut at 0 bytes. The proxy reads small
    bodies whole before answering, so nothing was sent yet: the browser now gets a 502 that
    names the problem instead of a connection closed without any answer."""
    head = [("Content-Type", "application/octet-stream")]
    head.append(
        ("Transfer-Encoding", "chunked") if framing == "chunked" else ("Content-Length", "51")
    )
    steps = [send(response_head("200 OK", head)), [*scripts.body(3, 51, 1, 0, framing), False, 0]]
    resp, _ = await rig.proxied("GET", "x", [header(steps, scripts.new_id())])
    assert resp.status == 502
    await settled(rig.supervisor)


async def test_malformed_answer_never_puts_the_token_in_the_log(rig: Rig) -> None:
    """Found by the red-team review: a status line aiohttp cannot parse was logged with the
    exception's repr, which carries the request's headers, X-Api-Key among them."""
    import logging

    from jupyter_server.base.handlers import log as jupyter_log

    # the logger the handlers use (Jupyter's application log; which one depends on what other
    # tests left as the traitlets Application singleton, so not caplog's root capture)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = jupyter_log()
    keep = Keep(logging.DEBUG)
    logger.addHandler(keep)
    level = logger.level  # a leftover application may have set ERROR: warnings would be dropped
    logger.setLevel(logging.DEBUG)
    try:
        _, token = await rig.backend()
        steps = [send(b"HTTX/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")]
        resp, _ = await rig.proxied("GET", "x", [header(steps, scripts.new_id(), close=True)])
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    assert resp.status == 502
    assert token not in resp.body.decode("latin-1")
    logged = "\n".join(rec.getMessage() for rec in records)
    assert "backend request failed" in logged  # the failure is logged ...
    assert token not in logged  # ... without the secret
    await settled(rig.supervisor)


async def test_what_tornado_cannot_send_is_dropped_not_a_500(rig: Rig) -> None:
    """Found by the red-team review: a DEL byte in a backend header value made the whole answer
    Jupyter's bare 500; a reason phrase tornado refuses became "Unknown"."""
    head = b"HTTP/1.1 200 <Fine>\r\nContent-Length: 2\r\nX-Bad: a\x7fb\r\nX-Good: yes\r\n\r\nok"
    resp, _ = await rig.proxied("GET", "x", [header([send(head)], scripts.new_id())])
    assert resp.status == 200
    assert resp.reason == b"OK"
    assert resp.body == b"ok"
    names = {k.lower() for k, _ in resp.headers}
    assert b"x-good" in names
    assert b"x-bad" not in names
    await settled(rig.supervisor)
