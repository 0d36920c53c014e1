"""The HTTP proxy against the fake libertem-server, through a real Jupyter ServerApp."""

from __future__ import annotations

import hashlib
import json

import pytest

from .conftest import TOKEN


# the GUI itself, not the loading page, however long the stand-in takes to start on a busy machine
@pytest.mark.proxy_config(loading_page_delay=60.0)
async def test_index_and_asset_with_space(client):
    r = await client.fetch("libertem/", headers={"Accept": "text/html"})
    assert r.code == 200
    assert b"<title>LiberTEM</title>" in r.body
    r = await client.fetch("libertem/assets/LiberTEM%20logo.png")
    assert r.code == 200
    assert r.headers["Content-Type"] == "image/png"
    assert r.body.startswith(b"\x89PNG")


async def test_redirect_adds_slash_and_keeps_query(client):
    r = await client.fetch("libertem?a=1&b=%20x")
    assert r.code == 302
    assert r.headers["Location"] == f"{client.base_url}libertem/?a=1&b=%20x"


@pytest.mark.base_url("/")
async def test_works_at_root_base_url(client):
    r = await client.fetch("libertem/api/config/")
    assert r.code == 200
    assert json.loads(r.body)["status"] == "ok"
    r = await client.fetch("libertem")
    assert r.headers["Location"] == "/libertem/"


async def test_anonymous_get_redirects_to_login(client, supervisor):
    r = await client.fetch("libertem/", auth="none")
    assert r.code == 302
    assert "/login" in r.headers["Location"]
    assert supervisor.starts == 0  # nothing was started for an anonymous visitor


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
async def test_anonymous_other_methods_forbidden(client, supervisor, method):
    r = await client.fetch(
        "libertem/api/shutdown/",
        method=method,
        auth="none",
        headers={"Origin": client.origin},
    )
    assert r.code in (403, 302) if method == "HEAD" else r.code == 403
    assert supervisor.starts == 0


async def test_anonymous_redirect_handler(client):
    r = await client.fetch("libertem", auth="none")
    assert r.code == 302 and "/login" in r.headers["Location"]


async def test_token_injected_and_credentials_stripped(client):
    cookie = await client.login()
    r = await client.fetch(
        "libertem/_fake/headers?token=browser-token&x=1%202",
        headers={
            "Cookie": cookie + "; _xsrf=abc; backend_cookie=keep",
            "X-Api-Key": "chosen-by-browser",
            "X-Forwarded-For": "6.6.6.6",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "must-go",
            "Accept": "application/json",
        },
    )
    assert r.code == 200
    seen = json.loads(r.body)
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-api-key"] not in ("chosen-by-browser", "", None)
    assert "authorization" not in headers
    assert headers["cookie"] == "backend_cookie=keep"
    assert "x-hop" not in headers
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert "x-forwarded-prefix" not in headers  # see contract.py: paths are rewritten instead
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{client.port}"
    assert seen["query"] == "x=1%202"  # token= dropped, the rest still raw
    assert seen["host"].startswith("127.0.0.1:")


async def test_authorization_header_not_forwarded(client):
    r = await client.fetch("libertem/_fake/headers", auth="token")
    assert r.code == 200
    headers = {k.lower() for k in json.loads(r.body)["headers"]}
    assert "authorization" not in headers
    assert "x-api-key" in headers


async def test_token_never_in_response(client, supervisor):
    # (not /_fake/headers: that one echoes what the backend received, token included)
    paths = ["libertem/", "libertem/api/config/", "libertem/_fake/redirect", "libertem/nope/"]
    await client.fetch("libertem/")
    token = supervisor.run.token
    for path in paths:
        r = await client.fetch(path)
        assert token.encode() not in r.body
        assert all(token not in v for _, v in r.headers.get_all())
    status = await client.fetch("libertem-proxy/api/status")
    assert token.encode() not in status.body


@pytest.mark.parametrize(
    "path",
    [
        "libertem/@evil.example/",
        "libertem//evil.example/x",
        "libertem/..%2f..%2fetc/passwd",
        "libertem/%2e%2e/%2e%2e/x",
        "libertem/http://evil.example/x",
        "libertem/a%5cb",
    ],
)
async def test_path_tricks_stay_on_backend(client, supervisor, path):
    """Whatever the path, the request reaches the backend at 127.0.0.1:<port> (or nothing)."""
    await client.fetch("libertem/")
    port = supervisor.run.port
    r = await client.fetch(path)
    # The fake answers 404 for unknown paths after checking the token: a 404 from the
    # backend proves the request went there with our token and nowhere else.
    assert r.code == 404, r.code
    assert b"403" not in r.body
    assert supervisor.run.port == port and supervisor.starts == 1


async def test_raw_path_forwarded(client):
    r = await client.fetch("libertem/_fake/headers?p=%2F%20")
    assert json.loads(r.body)["path"] == "/_fake/headers"
    assert json.loads(r.body)["query"] == "p=%2F%20"


async def test_cross_origin_put_refused(client, supervisor):
    body = json.dumps({"connection": {"type": "local"}})
    for origin in ("http://evil.example", "null"):
        r = await client.fetch(
            "libertem/api/config/connection/",
            method="PUT",
            body=body,
            headers={"Origin": origin},
        )
        assert r.code == 403, origin
    # no Origin and no Referer: refused too (the GUI always sends one)
    r = await client.fetch(
        "libertem/api/config/connection/",
        method="PUT",
        body=body,
        headers={"Origin": None},
    )
    assert r.code == 403
    # a foreign Referer without Origin
    r = await client.fetch(
        "libertem/api/config/connection/",
        method="PUT",
        body=body,
        headers={"Origin": None, "Referer": "http://evil.example/page"},
    )
    assert r.code == 403
    # same origin passes; so does a same-origin Referer
    r = await client.fetch("libertem/api/config/connection/", method="PUT", body=body)
    assert r.code == 200
    assert json.loads(r.body) == json.loads(body)
    r = await client.fetch(
        "libertem/api/config/connection/",
        method="PUT",
        body=body,
        headers={"Origin": None, "Referer": client.origin + client.base_url + "libertem/"},
    )
    assert r.code == 200


async def test_token_authenticated_script_needs_no_origin(client):
    r = await client.fetch("libertem/api/config/connection/", method="PUT", body="{}", auth="token")
    assert r.code == 200


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_WS_SUBPROTOCOL": ""})
async def test_all_methods_and_bodies(client):
    payload = bytes(range(256)) * 1000
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        r = await client.fetch("libertem/_fake/echo?summary=1", method=method, body=payload)
        assert r.code == 200, (method, r.code, r.body[:200])
        summary = json.loads(r.body)
        assert summary["method"] == method
        assert summary["length"] == len(payload)
        assert summary["sha256"] == hashlib.sha256(payload).hexdigest()
    r = await client.fetch("libertem/_fake/echo", method="OPTIONS")
    assert r.code == 200


async def test_head_gets_headers_without_body(client):
    r = await client.fetch("libertem/_fake/download?size=12345", method="HEAD")
    assert r.code == 200
    assert r.headers["Content-Length"] == "12345"
    assert r.body == b""


async def test_location_and_cookie_rewritten(client):
    r = await client.fetch("libertem/_fake/redirect")
    assert r.code == 302
    assert r.headers["Location"] == f"{client.base_url}libertem/api/config/"
    cookie = r.headers["Set-Cookie"]
    assert f"Path={client.base_url}libertem/" in cookie
    assert "127.0.0.1:" not in r.headers["Location"]


async def test_jupyter_security_headers_kept(client):
    r = await client.fetch("libertem/")
    assert "frame-ancestors" in r.headers.get("Content-Security-Policy", "")
    r = await client.fetch("libertem/api/config/")
    assert r.headers.get("X-Content-Type-Options") == "nosniff"


async def test_backend_status_codes_pass_through(client):
    for code in (201, 204, 400, 404, 418, 500, 503):
        r = await client.fetch(f"libertem/_fake/status/{code}")
        assert r.code == code


async def test_large_download_streams(client):
    size = 64 * 1024 * 1024 + 7
    digest = hashlib.sha256()
    received = 0

    def on_chunk(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)
        digest.update(chunk)

    r = await client.fetch(
        f"libertem/_fake/download?size={size}&chunk=1048576", streaming_callback=on_chunk
    )
    assert r.code == 200
    assert received == size
    from .fake_libertem_server import pattern_bytes

    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(0, size)).hexdigest()


async def test_sse_not_buffered(client):
    """Server-sent events with a generic Accept arrive one by one, not at the end."""
    import time

    arrivals: list[float] = []
    t0 = time.monotonic()
    r = await client.fetch(
        "libertem/_fake/sse?count=3&interval=0.3",
        headers={"Accept": "*/*"},
        streaming_callback=lambda chunk: arrivals.append(time.monotonic() - t0),
    )
    assert r.code == 200
    assert len(arrivals) >= 3
    # the first event arrived well before the stream ended (0.6 s later)
    assert arrivals[0] < arrivals[-1] - 0.3


def test_token_constant_is_not_the_backend_token():
    assert TOKEN  # the Jupyter token; the backend's is generated per start


async def _text(client, query: str, accept_encoding: str | None = "gzip, deflate, br"):
    return await client.fetch(
        f"libertem/_fake/text?{query}",
        headers={"Accept-Encoding": accept_encoding},
        decompress_response=False,
    )


async def test_gzip_for_text_when_accepted(client):
    import gzip

    r = await _text(client, "size=300000&chunks=5")
    assert r.code == 200
    assert r.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in r.headers["Vary"]
    assert r.headers["ETag"].startswith('W/"')
    body = gzip.decompress(r.body)
    assert len(body) == 300000 and body.startswith(b"function liberTEM")
    assert len(r.body) < len(body) / 10
    plain = await _text(client, "size=300000&chunks=5", accept_encoding=None)
    assert "Content-Encoding" not in plain.headers
    assert plain.body == body


@pytest.mark.parametrize(
    ("query", "accept"),
    [
        ("size=300000&type=image/png", "gzip"),  # not text
        ("size=500", "gzip"),  # too small to gain
        ("size=300000", "gzip;q=0, identity"),  # refused by the browser
        ("size=300000", "identity"),
    ],
)
async def test_no_gzip_when_pointless_or_refused(client, query, accept):
    r = await _text(client, query, accept_encoding=accept)
    assert r.code == 200
    assert "Content-Encoding" not in r.headers


@pytest.mark.proxy_config(compress=False)
async def test_gzip_can_be_turned_off(client):
    r = await _text(client, "size=300000")
    assert "Content-Encoding" not in r.headers and len(r.body) == 300000


async def test_event_stream_not_compressed_and_still_streamed(client):
    """Server-sent events stay uncompressed (and so unbuffered) even if gzip is accepted."""
    import time

    arrivals = []
    t0 = time.monotonic()
    r = await client.fetch(
        "libertem/_fake/sse?count=3&interval=0.3",
        headers={"Accept-Encoding": "gzip", "Accept": "*/*"},
        decompress_response=False,
        streaming_callback=lambda chunk: arrivals.append(time.monotonic() - t0),
    )
    assert r.code == 200
    assert "Content-Encoding" not in r.headers
    assert arrivals and arrivals[0] < arrivals[-1] - 0.3


@pytest.mark.proxy_config(read_timeout=0.5)
async def test_no_total_timeout_on_slow_but_steady_download(client):
    """The read timeout is an idle timeout: a download that keeps sending is never cut."""
    size = 12 * 65536  # 12 chunks, 0.25 s apart: 3 s in all, far beyond read_timeout
    r = await client.fetch(f"libertem/_fake/download?size={size}&pause=0.25")
    assert r.code == 200
    assert len(r.body) == size


async def test_access_log_lines_for_proxied_requests(client, serverapp):
    """Skipping the formatting of dropped debug lines must not drop any line that is shown:
    successes appear at debug level, errors at warning level whatever the level."""
    import logging

    from jupyter_server.base.handlers import log as jupyter_log

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = jupyter_log()
    keep = Keep(level=logging.DEBUG)
    old_level = logger.level
    logger.addHandler(keep)
    try:
        logger.setLevel(logging.INFO)
        await client.fetch("libertem/api/config/")
        r = await client.fetch("libertem/_fake/status/404")
        assert r.code == 404
        logger.setLevel(logging.DEBUG)
        await client.fetch("libertem/api/config/?second")
    finally:
        logger.setLevel(old_level)
        logger.removeHandler(keep)
    lines = [(r.levelno, r.getMessage()) for r in records if "libertem/" in r.getMessage()]
    assert any(lvl == logging.WARNING and "404 GET" in m and "status/404" in m for lvl, m in lines)
    assert any(lvl == logging.DEBUG and "200 GET" in m and "?second" in m for lvl, m in lines)
    assert not any("200 GET" in m and "config/ (" in m for _, m in lines), lines
