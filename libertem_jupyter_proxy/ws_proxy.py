"""The websocket bridge for ``{base_url}libertem/api/events/`` (and any other websocket path).

The upstream connection is made first, and only then is the browser's handshake accepted, with
the subprotocol the backend chose; a backend refusal becomes an HTTP error for the browser
instead of a 101 followed by an abrupt close. Frames are relayed as they came (text as text,
binary as binary), each write is awaited (backpressure), and close codes pass both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp
from jupyter_server.auth.decorator import ws_authenticated
from tornado import web
from tornado.websocket import WebSocketClosedError, WebSocketHandler
from yarl import URL

from .base import ProxyHandlerBase
from .errors import BackendError
from .headers import WS_HANDSHAKE, strip_token_query
from .pages import status_for

# Close codes that may appear in a close frame (RFC 6455 7.4); others mean "no frame was sent".
_SENDABLE = (
    frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))
)


class WebSocketProxyHandler(ProxyHandlerBase, WebSocketHandler):
    """Bridges a browser websocket to the same path on libertem-server."""

    def initialize(self) -> None:
        self._upstream: aiohttp.ClientWebSocketResponse | None = None
        self._relay: asyncio.Task[None] | None = None
        self._counted = False
        self._last_recorded = 0.0
        self._closing: asyncio.Future[None] | None = None  # referenced until it is done

    async def prepare(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # no login redirect for websockets: anonymous handshakes get 403 (see ws_authenticated)
        await super().prepare(_redirect_to_login=False)

    @property
    def max_message_size(self) -> int:
        return int(self.proxy_settings.websocket_max_message_size)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """A refused handshake is answered in JSON: the caller is a script, not a person."""
        self.set_header("Content-Type", "application/json")
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.finish(json.dumps({"status": status_code, "message": message}))

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise web.HTTPError(400, "This path only accepts websocket connections")
        if not self.check_origin(self.get_origin() or ""):
            raise web.HTTPError(403, "Cross-origin websocket refused")
        self.supervisor.touch()
        try:
            run = await self.supervisor.ensure_running()
        except BackendError as e:
            self.set_status(status_for(e))
            self.finish(json.dumps(e.to_dict()))
            return
        assert run.session is not None
        url = URL.build(
            scheme="ws",
            host="127.0.0.1",
            port=run.port,
            path=self.upstream_path(),
            query_string=strip_token_query(self.request.query),
            encoded=True,
        )
        offered = self.request.headers.get("Sec-WebSocket-Protocol", "")
        protocols = [p.strip() for p in offered.split(",") if p.strip()]
        try:
            self._upstream = await run.session.ws_connect(
                url,
                headers=self.build_upstream_headers(run, drop=WS_HANDSHAKE),
                protocols=protocols,
                max_msg_size=self.max_message_size,
                autoclose=False,
                autoping=True,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_close=10),
            )
        except aiohttp.WSServerHandshakeError as e:
            status = e.status if 400 <= e.status < 600 else 502
            raise web.HTTPError(status, f"LiberTEM refused the websocket ({e.status})") from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise web.HTTPError(502, f"LiberTEM is not reachable: {e}") from None
        try:
            await super().get(*args, **kwargs)  # the browser handshake; returns when it closes
        finally:
            await self._close_upstream(None, None)
            if self._relay is not None:
                await asyncio.gather(self._relay, return_exceptions=True)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return self._upstream.protocol if self._upstream is not None else None

    def open(self, *args: Any, **kwargs: Any) -> None:
        # read big frames in fewer, larger pieces (tornado's default is 64 KiB per read)
        stream = getattr(self.ws_connection, "stream", None)
        if stream is not None:
            stream.read_chunk_size = 1024 * 1024
        self.supervisor.websocket_opened()
        self._counted = True
        self._relay = asyncio.ensure_future(self._relay_upstream())

    async def on_message(self, message: str | bytes) -> None:
        """Browser -> backend. tornado reads the next frame only after this returns."""
        upstream = self._upstream
        if upstream is None or upstream.closed:
            return
        now = time.monotonic()
        if now - self._last_recorded > 1.0:  # activity is coarse: once a second is plenty
            self._last_recorded = now
            self.supervisor.touch()
            self.record_activity()
        try:
            if isinstance(message, bytes):
                await upstream.send_bytes(message)
            else:
                await upstream.send_str(message)
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            self._abort_browser()

    async def _relay_upstream(self) -> None:
        """Backend -> browser, until either side closes."""
        upstream = self._upstream
        assert upstream is not None
        try:
            while True:
                # not `async for`: aiohttp's iterator swallows the CLOSE message and its code
                msg = await upstream.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await self.write_message(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    await self.write_message(msg.data, binary=True)
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    code = msg.data  # aiohttp: the peer's close code and reason
                    await upstream.close()
                    if code in _SENDABLE:
                        self.close(code, msg.extra or None)
                    else:
                        self.close()
                    return
                else:  # CLOSING, CLOSED or ERROR: the TCP connection broke
                    break
        except WebSocketClosedError:
            return  # the browser went away; on_close closes the upstream side
        except (aiohttp.ClientError, ConnectionError):
            pass
        # the backend dropped the connection without a close frame (that is what libertem-server
        # does when it shuts down): do the same to the browser, so its reconnect logic runs
        self._abort_browser()

    def _abort_browser(self) -> None:
        conn = self.ws_connection
        if conn is not None and conn.stream is not None:  # type: ignore[attr-defined]
            conn.stream.close()  # type: ignore[attr-defined]

    def on_close(self) -> None:
        """The browser closed (or we aborted it): pass its close code on."""
        if self._counted:
            self._counted = False
            self.supervisor.websocket_closed()
        code = self.close_code
        self._closing = asyncio.ensure_future(
            self._close_upstream(code if code in _SENDABLE else None, self.close_reason)
        )

    async def _close_upstream(self, code: int | None, reason: str | None) -> None:
        upstream = self._upstream
        if upstream is None or upstream.closed:
            return
        with contextlib.suppress(Exception):
            await upstream.close(code=code or 1000, message=(reason or "").encode("utf-8")[:123])
