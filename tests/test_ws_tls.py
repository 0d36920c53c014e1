"""Websockets under Jupyter's own TLS (``ServerApp.certfile``/``keyfile``), issue 12 item 11.

The browser's connection is then an ``SSLSocket``: it cannot be duplicated and handed to an
asyncio transport (``socket.dup()`` raises ``NotImplementedError``), which used to leave every
websocket open and silent after its 101. The bridge now relays such connections on tornado's
IOStreams. A CA and a server certificate for 127.0.0.1 are made in the test with
``cryptography``; Jupyter is configured with them exactly as an admin would, and its web
application is served with the ``ssl_options`` Jupyter derived from that configuration.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_server.serverapp import ServerApp
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.websocket import WebSocketClientConnection, websocket_connect
from traitlets.config import Config

from .conftest import TOKEN
from .helpers import OTHER_EXTENSIONS
from .jupyter_rig import make_tls_files

AUTH = {"Authorization": f"token {TOKEN}"}


async def read(ws: WebSocketClientConnection) -> Any:
    """The next message, within a bound: the defect was a websocket that stays silent."""
    return await asyncio.wait_for(ws.read_message(), 30)


class TlsJupyter:
    """A Jupyter with ``certfile``/``keyfile`` and this extension, served over HTTPS."""

    def __init__(self, app: ServerApp, port: int, ca: Path, base_url: str) -> None:
        self.app = app
        self.port = port
        self.base_url = base_url
        self.client_ssl = ssl.create_default_context(cafile=str(ca))

    def url(self, path: str, scheme: str = "https") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{self.base_url}{path}"

    async def fetch(self, path: str) -> Any:
        request = HTTPRequest(self.url(path), headers=AUTH, ssl_options=self.client_ssl)
        return await AsyncHTTPClient().fetch(request, raise_error=False)

    async def websocket(self, **kwargs: Any) -> WebSocketClientConnection:
        request = HTTPRequest(
            self.url("libertem/api/events/", "wss"), headers=AUTH, ssl_options=self.client_ssl
        )
        return await websocket_connect(request, **kwargs)


@pytest.fixture
def tls_jupyter(
    io_loop: Any,
    jp_dirs: dict[str, Path],
    tmp_path: Path,
    base_url: str,
    proxy_options: dict[str, Any],
) -> Iterator[TlsJupyter]:
    files = make_tls_files(tmp_path)  # the CA and certificate of the HTTP suites' rig
    ca, cert, key = files.ca, files.cert, files.key
    config = Config()
    config.ServerApp.jpserver_extensions = {
        "libertem_jupyter_proxy": True,
        **{name: False for name in OTHER_EXTENSIONS},
    }
    config.ServerApp.reraise_server_extension_failures = True
    config.ServerApp.base_url = base_url
    config.ServerApp.root_dir = str(jp_dirs["root"])
    config.ServerApp.open_browser = False
    config.ServerApp.certfile = str(cert)
    config.ServerApp.keyfile = str(key)
    config.IdentityProvider.token = TOKEN
    for name, value in proxy_options.items():
        setattr(config.LiberTEMProxy, name, value)
    app = ServerApp(config=config)
    app.initialize(argv=[], new_httpserver=False)
    assert app.ssl_options and app.ssl_options["certfile"] == str(cert)
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(app.web_app, ssl_options=app.ssl_options)  # as ServerApp does
    server.add_sockets(sockets)
    yield TlsJupyter(app, sockets[0].getsockname()[1], ca, base_url)
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)
    io_loop.run_sync(app._cleanup, timeout=60)
    ServerApp.clear_instance()


async def test_tls_http_reaches_the_backend(tls_jupyter):
    resp = await tls_jupyter.fetch("libertem/api/config/")
    assert resp.code == 200, resp.body[:300]


async def test_tls_websocket_relays_text_and_large_binary(tls_jupyter):
    ws = await tls_jupyter.websocket(max_message_size=64 << 20)
    await ws.write_message("hello ü")
    assert await read(ws) == "hello ü"
    for size in (1, 70_000, 3 << 20):  # one read, a few reads, many reads of the relay
        blob = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        await ws.write_message(blob, binary=True)
        assert await read(ws) == blob
    await ws.write_message("!burst 20 5000")  # many backend messages back to back
    got = b"".join([await read(ws) for _ in range(20)])
    assert len(got) == 100_000
    ws.close()


async def test_tls_close_codes_pass_both_ways(tls_jupyter):
    ws = await tls_jupyter.websocket()
    await ws.write_message("!close 4001 custom reason")
    assert await read(ws) is None
    assert (ws.close_code, ws.close_reason) == (4001, "custom reason")


async def test_tls_backend_drop_closes_the_browser(tls_jupyter):
    ws = await tls_jupyter.websocket()
    await ws.write_message("!drop")
    assert await read(ws) is None  # the connection ends instead of hanging


@pytest.mark.proxy_config(websocket_max_message_size=10_000)
async def test_tls_too_big_message_is_refused_with_1009(tls_jupyter):
    ws = await tls_jupyter.websocket()
    await ws.write_message(b"y" * 20_000, binary=True)
    assert await read(ws) is None
    assert ws.close_code == 1009
    # and the next websocket works: nothing was left stuck
    ws2 = await tls_jupyter.websocket()
    await ws2.write_message("again")
    assert await read(ws2) == "again"
    ws2.close()
