"""The websocket bridge for ``{base_url}libertem/api/events/`` (and any other websocket path).

The bridge does not terminate the websocket on either side. It authenticates the browser's
upgrade request by Jupyter's rules, sends the upgrade to libertem-server itself (same
``Sec-WebSocket-Key``, plus ``X-Api-Key``), and only when the backend answers ``101`` does it
answer the browser with ``101`` and the subprotocol the backend chose; a refusal becomes an HTTP
error for the browser instead of a 101 followed by an abrupt close. From then on it copies bytes
both ways, like nginx: frames are neither unmasked nor re-framed, so close codes, pings and
fragmentation pass through unchanged, and a side that stops reading stops the other side's
reading too (backpressure: Jupyter never holds more than about 1 MiB per direction).

Why: terminating the websocket on both sides (tornado towards the browser, aiohttp towards the
backend) parsed, unmasked and re-masked every message in Python, about 430 us of Jupyter CPU per
1 KiB round trip; copying bytes costs about a third of that. Frame *headers* are still followed
(``ws_frames``), so the largest message size stays enforced (close 1009 to both sides) and a
browser that breaks the protocol is refused (close 1002).

The handshake is done on tornado IOStreams; then both connections are moved to sockets of
their own (``ws_transport.take_over``) and relayed by one of three relays with the same rules:

- ``ws_threads.ThreadBridge``, a blocking thread per direction: the fastest for the GUI's small
  messages (1 KiB round trips: about 80 us of Jupyter CPU and 0.55-0.73 of direct, against
  110-120 us and 0.49-0.51 on the event loop; issue 17). Used for up to
  ``LiberTEMProxy.websocket_threads`` websockets at once.
- ``_Bridge``, asyncio transports on Jupyter's event loop, for websockets beyond that number:
  their read callback hands each chunk straight to us and ``write`` sends at once, where an
  IOStream read is a future, a task wake-up and a re-registration per chunk (about 200 us per
  1 KiB round trip with IOStream coroutines, 80-120 us with transports).
- ``_StreamBridge``, tornado IOStreams, under Jupyter's own TLS (``ServerApp.certfile``): the
  browser's connection is then an ``SSLSocket`` that can be neither duplicated nor shared by
  two threads (one ``ssl`` object per connection).

Both relayed sockets get ``TCP_NODELAY`` (``ws_transport.no_delay``): without it the tail of
each large browser message waited for the backend's delayed ACK (issue 17).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from jupyter_server.auth.decorator import ws_authenticated
from tornado import httputil, web
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError, UnsatisfiableReadError

from .base import ProxyHandlerBase
from .errors import BackendError
from .headers import WS_HANDSHAKE, strip_token_query
from .pages import status_for
from .ws_frames import (
    FrameScanner,
    accept_value,
    close_frame,
    refusal,
    valid_key,
)
from .ws_threads import ThreadBridge
from .ws_transport import (
    CLOSE_FLUSH_TIMEOUT,
    FIRST_READ_SIZE,
    MAX_READ_SIZE,
    WRITE_BUFFER_HIGH,
    Taken,
    new_buffer,
    take_over_both,
)

# The backend's answer to the upgrade is a few hundred bytes; anything longer is not it.
MAX_RESPONSE_HEAD = 64 * 1024
# RFC 9110 token (header names); header values may not contain CR, LF or NUL.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
# request targets must be visible ASCII (or obs-text): no spaces, no control characters
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")


class HandshakeError(Exception):
    """The browser's upgrade request cannot be forwarded as it is (answered with 400)."""


def upgrade_request(
    target: str, port: int, key: str, protocols: str | None, headers: list[tuple[str, str]]
) -> bytes:
    """The upgrade request for libertem-server, checked so no browser value can add a line."""
    if _BAD_TARGET.search(target) or not target.startswith("/"):
        raise HandshakeError("bad request target")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {key}",
    ]
    if protocols:
        if _BAD_VALUE.search(protocols):
            raise HandshakeError("bad Sec-WebSocket-Protocol")
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    for name, value in headers:
        if not _TOKEN.match(name) or _BAD_VALUE.search(value):
            raise HandshakeError(f"bad header {name!r}")
        lines.append(f"{name}: {value}")
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise HandshakeError("header not encodable") from None


class _Side(asyncio.BufferedProtocol):
    """One connection of the bridge (the browser's or the backend's), as an asyncio protocol.

    asyncio calls ``buffer_updated`` straight from the event loop's read callback, after
    ``recv_into`` our own buffer; relaying there, with ``transport.write`` sending at once,
    costs neither a coroutine step nor an allocation per chunk (``recv`` of asyncio's plain
    protocols allocates 256 KiB for every read, however small the message). Backpressure is
    the transports' flow control: when this side's outgoing buffer is above its high-water
    mark, the *other* side stops reading.
    """

    def __init__(self, bridge: _Bridge, scanner: FrameScanner, masked: bool) -> None:
        self.bridge = bridge
        self.scanner = scanner  # follows the frames this side sends
        self.masked = masked  # frames *to* this side must be masked (it is the backend)
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.buffer = new_buffer(FIRST_READ_SIZE)
        self.held = 0  # buffer[:held] is an incomplete frame header, waiting for the rest
        self.early: list[bytes] = []  # what arrived before the bridge started
        self.lost = False
        self.finishing = False  # FIN sent after a refusal (see finish)
        self._abort_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer[self.held :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.bridge.started:
            self.bridge.relay(self, self.held + nbytes)
        else:  # rare: the other connection is not handed over yet
            self.early.append(bytes(self.buffer[self.held : self.held + nbytes]))

    def swap_buffer(self, old: memoryview, ready: int, end: int, grow: bool) -> None:
        """Read on into a new buffer (twice as big if ``grow``), starting with the held bytes."""
        fresh = new_buffer(min(2 * len(old), MAX_READ_SIZE) if grow else len(old))
        fresh[: end - ready] = old[ready:end]
        self.buffer = fresh

    def feed(self, data: bytes) -> None:
        """Relay bytes that did not come through ``buffer_updated`` (see ``_Bridge.start``)."""
        view = memoryview(data)
        while len(view) and not self.bridge.refusing:
            n = min(len(view), len(self.buffer) - self.held)
            self.buffer[self.held : self.held + n] = view[:n]
            self.bridge.relay(self, self.held + n)
            view = view[n:]

    def eof_received(self) -> bool:
        return False  # a websocket peer does not half-close: close, which ends the bridge

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        self.bridge.side_lost()

    def close(self) -> None:
        """Close after what is queued for this side has been sent, within a time limit."""
        transport = self.transport
        if transport is None or self.lost:
            return
        if not transport.is_closing():
            transport.close()
        if self._abort_timer is None:  # a peer that does not read must not keep it open
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(CLOSE_FLUSH_TIMEOUT, self.abort)

    def close_later(self) -> None:
        """The websocket is over (both close frames have passed, or a refusal waits for the
        frame under way): cut the connection if it is still open after the time limit, and
        all that was queued for it has left (a slow reader still gets all of it)."""
        if self._abort_timer is None and not self.lost:
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(CLOSE_FLUSH_TIMEOUT, self._cut_when_sent)

    def _cut_when_sent(self) -> None:
        transport = self.transport
        if transport is not None and not self.lost and transport.get_write_buffer_size():
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(CLOSE_FLUSH_TIMEOUT, self._cut_when_sent)
        else:
            self.abort()

    def finish(self) -> None:
        """After a refusal: FIN once what is queued has left, but read on (``relay`` drops what
        comes) until the peer closes, within a time limit. A socket closed with unread bytes
        is answered with a reset, which can destroy our close frame before the peer reads it
        (found by test_ws_bridges: a browser frame after the refused one reset the browser)."""
        transport = self.transport
        if transport is None or self.lost or self.finishing:
            return
        self.finishing = True
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
        transport.resume_reading()  # it may be paused by the other side's backpressure
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        loop = asyncio.get_running_loop()
        self._abort_timer = loop.call_later(CLOSE_FLUSH_TIMEOUT, self.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


class _Bridge:
    """Relays bytes between the browser and the backend until either hangs up."""

    def __init__(self, max_message_size: int, on_browser_message: Callable[[], None]) -> None:
        self.browser = _Side(
            self, FrameScanner(max_message_size=max_message_size, strict=True), False
        )
        self.backend = _Side(
            self, FrameScanner(max_message_size=max_message_size, strict=False), True
        )
        self.browser.peer, self.backend.peer = self.backend, self.browser
        self.max_message_size = max_message_size
        self._on_browser_message = on_browser_message
        self._browser_messages = 0
        self.started = False
        self.refusing = False  # we sent our own close frames: relay nothing more
        self.close_frame: tuple[int, str] = (0, "")  # our close frame's code and reason
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self, browser: Taken, backend: Taken) -> None:
        """Relay the two connections taken over from tornado (``ws_transport``)."""
        loop = asyncio.get_running_loop()
        (browser_sock, browser_early), (backend_sock, backend_early) = browser, backend
        for sock in (browser_sock, backend_sock):
            sock.setblocking(False)  # as taken over (a ThreadBridge that gave up left it so)
        try:
            await loop.create_connection(lambda: self.backend, sock=backend_sock)
        except BaseException:
            browser_sock.close()
            backend_sock.close()
            raise
        try:
            await loop.connect_accepted_socket(lambda: self.browser, sock=browser_sock)
        except BaseException:
            browser_sock.close()
            self.backend.abort()
            raise
        self.started = True
        for side, early in ((self.browser, browser_early), (self.backend, backend_early)):
            chunks, side.early = [early, *side.early], []
            for chunk in chunks:
                side.feed(chunk)
        self.side_lost()  # one may have gone already

    def relay(self, side: _Side, end: int) -> None:
        """``side.buffer[:end]`` came from ``side``: pass on whole frames and frame pieces,
        keep an incomplete header for later, refuse what the scanner refuses."""
        if self.refusing:
            self._finish_frame(side, end)
            return
        scanner = side.scanner
        view = side.buffer
        ready = scanner.feed(view, end)
        peer = side.peer
        assert peer is not None and peer.transport is not None
        transport = peer.transport
        if ready:
            transport.write(view[:ready])
        if scanner.error is not None:
            self.refuse(scanner.error, from_browser=side is self.browser)
            return
        held = end - ready
        if transport.get_write_buffer_size():
            # Not all was sent: the transport may still refer to this buffer (Python >= 3.12
            # keeps a view of what it could not send, not a copy), so read on into another.
            side.swap_buffer(view, ready, end, grow=False)
        elif end == len(view) and len(view) < MAX_READ_SIZE:  # the traffic filled it: grow
            side.swap_buffer(view, ready, end, grow=True)
        elif held:
            view[:held] = bytes(view[ready:end])
        side.held = held
        if side is self.browser and scanner.messages != self._browser_messages:
            self._browser_messages = scanner.messages
            self._on_browser_message()
        if scanner.closed and peer.scanner.closed:  # both close frames passed: nothing follows
            for one in (self.browser, self.backend):
                one.close_later()

    def refuse(self, error: tuple[int, str], from_browser: bool) -> None:
        """Close both sides with our own close frame (1009, 1002). A side in the middle of
        receiving a frame first gets the rest of it (``_finish_frame``); a side that was sent a
        close frame already gets no second one (RFC 6455 5.5.1)."""
        self.refusing = True
        self.close_frame = refusal(error, from_browser=from_browser, limit=self.max_message_size)
        for side in (self.browser, self.backend):
            peer = side.peer
            assert peer is not None
            if peer.scanner.at_frame_boundary:
                self._close_side(side)
            else:  # the rest of the frame under way first, within the time limit
                side.close_later()

    def _close_side(self, side: _Side) -> None:
        """Our close frame to ``side`` unless it had one, then FIN, reading on (``finish``)."""
        peer = side.peer
        assert peer is not None
        if side.transport is not None and not side.lost and not peer.scanner.closed:
            side.transport.write(close_frame(*self.close_frame, masked=side.masked))
        side.finish()

    def _finish_frame(self, side: _Side, end: int) -> None:
        """After a refusal: of what ``side`` sends, pass on only the rest of the frame it was
        in the middle of, then close its peer; drop everything else (read only so that
        closing does not reset the connection, see ``_Side.finish``)."""
        peer = side.peer
        assert peer is not None
        left = side.scanner.payload_left
        if not left or peer.finishing:
            return
        n = min(left, end)
        side.scanner.feed(side.buffer, n)
        if peer.transport is not None and not peer.lost:
            peer.transport.write(bytes(side.buffer[:n]))
        if side.scanner.at_frame_boundary:
            self._close_side(peer)

    def side_lost(self) -> None:
        """One connection is gone: close the other; when both are, the bridge is finished."""
        if not self.started:
            return
        if (self.browser.lost or self.backend.lost) and not self.refusing:
            self.browser.close()  # after a refusal each side waits for its own peer (finish)
            self.backend.close()
        if self.browser.lost and self.backend.lost and not self.finished.done():
            self.finished.set_result(None)

    def abort(self) -> None:
        self.browser.abort()
        self.backend.abort()


class _StreamBridge:
    """The same relay on tornado IOStreams, for when a connection cannot be handed to asyncio.

    That is the case under Jupyter's own TLS (``ServerApp.certfile``/``keyfile``): the browser's
    connection is an ``SSLSocket`` whose TLS session lives in Python's ``ssl`` object, so it can
    neither be duplicated (``socket.dup()`` raises ``NotImplementedError``) nor adopted by an
    asyncio transport. One coroutine per direction reads what is there (at most
    ``MAX_READ_SIZE``), passes on what the frame scanner allows and awaits the write before it
    reads again: a side that stops reading stops the other side's reading, as with transports.
    It costs a task step per chunk more than ``_Bridge``; the rules (sizes, 1009/1002, closing)
    are the same.
    """

    def __init__(self, max_message_size: int, on_browser_message: Callable[[], None]) -> None:
        self.max_message_size = max_message_size
        self._on_browser_message = on_browser_message
        self._scanners = {
            True: FrameScanner(max_message_size=max_message_size, strict=True),
            False: FrameScanner(max_message_size=max_message_size, strict=False),
        }
        self.refusing = False
        self._refusal: tuple[int, str] = (0, "")  # our close frame's code and reason
        self._closed_to: set[IOStream] = set()  # the sides our close frame went to
        self._streams: tuple[IOStream, IOStream] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cut_timer: asyncio.TimerHandle | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self, browser: IOStream, backend: IOStream) -> None:
        self._streams = (browser, backend)
        for stream in (browser, backend):
            stream.set_nodelay(True)
        self._tasks = [
            asyncio.ensure_future(self._pump(browser, backend, from_browser=True)),
            asyncio.ensure_future(self._pump(backend, browser, from_browser=False)),
        ]
        done = asyncio.gather(*self._tasks, return_exceptions=True)
        done.add_done_callback(self._ended)

    def _ended(self, _: object) -> None:
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        if not self.finished.done():
            self.finished.set_result(None)

    async def _pump(self, src: IOStream, dst: IOStream, *, from_browser: bool) -> None:
        scanner = self._scanners[from_browser]
        held = b""
        messages = 0
        try:
            while True:
                if self.refusing:  # the other direction refused: the rest of this frame
                    await self._finish_frame(src, dst, scanner, from_browser)
                    return
                chunk = await src.read_bytes(MAX_READ_SIZE, partial=True)
                data = held + chunk if held else chunk
                if self.refusing:  # refused while this side waited
                    await self._finish_frame(src, dst, scanner, from_browser, data)
                    return
                ready = scanner.feed(data, len(data))
                if ready:
                    await dst.write(data if ready == len(data) else data[:ready])
                if scanner.error is not None:
                    await self._refuse(scanner.error, from_browser)
                    return
                held = data[ready:]
                if from_browser and scanner.messages != messages:
                    messages = scanner.messages
                    self._on_browser_message()
                if scanner.closed and self._scanners[not from_browser].closed:
                    self._close_later()
        except StreamClosedError:
            pass
        finally:
            if not self.refusing:
                dst.close()  # the peer is gone: so is the other side (writes were awaited)
                src.close()

    async def _refuse(self, error: tuple[int, str], from_browser: bool) -> None:
        """Our own close frame to each side at a frame boundary (see ``_Bridge.refuse``).

        The side this direction writes to is between frames (the refused frame was held
        back): it gets the close frame now. The other side may be in the middle of a frame
        from its peer; then the other direction's pump sends it the rest of that frame first
        (:meth:`_finish_frame`), within ``CLOSE_FLUSH_TIMEOUT``."""
        self.refusing = True
        assert self._streams is not None
        browser, backend = self._streams
        self._refusal = refusal(error, from_browser=from_browser, limit=self.max_message_size)
        src, dst = (browser, backend) if from_browser else (backend, browser)
        await self._send_close(dst, from_browser)
        if self._scanners[not from_browser].at_frame_boundary:
            await self._send_close(src, not from_browser)
            self._close_both()
        elif self._cut_timer is None:
            loop = asyncio.get_running_loop()
            self._cut_timer = loop.call_later(CLOSE_FLUSH_TIMEOUT, self.abort)

    async def _finish_frame(
        self,
        src: IOStream,
        dst: IOStream,
        scanner: FrameScanner,
        from_browser: bool,
        data: bytes = b"",
    ) -> None:
        """After the other direction refused: relay the rest of the frame under way (starting
        with ``data``, already read from ``src``; what lies beyond the frame is dropped), then
        our close frame, then end both connections."""
        try:
            while True:
                data = data[: scanner.payload_left]
                if data:
                    scanner.feed(data, len(data))
                    await dst.write(data)
                left = scanner.payload_left
                if not left:
                    break
                data = await src.read_bytes(min(left, MAX_READ_SIZE), partial=True)
            await self._send_close(dst, from_browser)
        finally:
            self._close_both()

    async def _send_close(self, stream: IOStream, masked: bool) -> None:
        """Our close frame to ``stream`` (masked towards the backend), once, unless a close
        frame already went to it (RFC 6455 5.5.1); then, on a plain socket, FIN after it: the
        peer reads the frame and the end, and the other direction may still read from it."""
        if stream in self._closed_to:
            return
        self._closed_to.add(stream)
        scanner = self._scanners[masked]  # the direction that writes to this stream
        try:
            if not scanner.closed and not stream.closed():
                frame = close_frame(*self._refusal, masked=masked)
                await asyncio.wait_for(stream.write(frame), CLOSE_FLUSH_TIMEOUT)
            if not isinstance(stream, SSLIOStream) and stream.socket is not None:
                stream.socket.shutdown(socket.SHUT_WR)  # TLS has no half-close here
        except (StreamClosedError, asyncio.TimeoutError, OSError):
            stream.close()

    def _close_both(self) -> None:
        if self._streams is not None:
            for stream in self._streams:
                stream.close()

    def _close_later(self) -> None:
        """Both close frames have passed: if the peers have not closed after the time limit,
        and nothing is being written any more, cut both connections."""
        if self._cut_timer is None:
            loop = asyncio.get_running_loop()
            self._cut_timer = loop.call_later(CLOSE_FLUSH_TIMEOUT, self._cut_when_sent)

    def _cut_when_sent(self) -> None:
        if self._streams is not None and any(s.writing() for s in self._streams):
            loop = asyncio.get_running_loop()
            self._cut_timer = loop.call_later(CLOSE_FLUSH_TIMEOUT, self._cut_when_sent)
        else:
            self.abort()

    def abort(self) -> None:
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        self._close_both()
        for task in self._tasks:
            task.cancel()


def _can_take_over(stream: IOStream) -> bool:
    """Whether the connection is a plain socket asyncio can own (not TLS inside Python)."""
    return not isinstance(stream, SSLIOStream) and not isinstance(stream.socket, ssl.SSLSocket)


class WebSocketProxyHandler(ProxyHandlerBase):
    """Bridges a browser websocket to the same path on libertem-server (see the module doc)."""

    def initialize(self) -> None:
        self._last_recorded = 0.0

    async def prepare(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # no login redirect for websockets: anonymous handshakes get 403 (see ws_authenticated)
        await super().prepare(_redirect_to_login=False)

    @property
    def max_message_size(self) -> int:
        return int(self.proxy_settings.websocket_max_message_size)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """A refused handshake is answered in JSON: the caller is a script, not a person."""
        self.set_header("Content-Type", "application/json")
        if status_code == 426:  # RFC 6455, 4.4: say which version we speak
            self.set_header("Sec-WebSocket-Version", "13")
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.finish(json.dumps({"status": status_code, "message": message}))

    def _browser_key(self) -> str:
        """Check the browser's upgrade request the way tornado's websocket handler does."""
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            raise web.HTTPError(400, "This path only accepts websocket connections")
        connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
        if "upgrade" not in connection:
            raise web.HTTPError(400, '"Connection" must be "Upgrade"')
        if headers.get("Sec-WebSocket-Version") != "13":
            raise web.HTTPError(426, "Only websocket version 13 is supported")
        key = headers.get("Sec-WebSocket-Key", "")
        if not valid_key(key):
            raise web.HTTPError(400, "Missing or invalid Sec-WebSocket-Key")
        return key

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        key = self._browser_key()
        if not self.check_origin():
            raise web.HTTPError(403, "Cross-origin websocket refused")
        if self.refuse_if_stopped():  # stopped on purpose: refused, not activity
            return
        self.supervisor.touch()
        try:
            run = await self.supervisor.ensure_running(explicit=False)
        except BackendError as e:
            self.set_status(status_for(e))
            self.finish(json.dumps(e.to_dict()))
            return
        query = strip_token_query(self.request.query)
        target = self.upstream_path() + (f"?{query}" if query else "")
        protocols = self.request.headers.get("Sec-WebSocket-Protocol")
        try:
            request = upgrade_request(
                target,
                run.port,
                key,
                protocols,
                self.build_upstream_headers(run, drop=WS_HANDSHAKE),
            )
        except HandshakeError as e:
            raise web.HTTPError(400, f"Websocket request not forwarded: {e}") from None
        backend = await self._connect(host="127.0.0.1", port=run.port)
        try:
            chosen = await self._backend_handshake(backend, request, key, protocols)
        except BaseException:
            backend.close()
            raise
        # From here on the connection is ours, not tornado's HTTP server's (as in tornado's
        # own WebSocketHandler): no more HTTP responses, we write the 101 ourselves.
        browser = self.detach()
        head = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_value(key)}\r\n"
        )
        if chosen:
            head += f"Sec-WebSocket-Protocol: {chosen}\r\n"
        try:
            # awaited: it must have left before the connection changes hands
            await browser.write((head + "\r\n").encode("latin-1"))
        except StreamClosedError:  # the browser gave up meanwhile
            browser.close()
            backend.close()
            return
        self.set_status(101)  # for Jupyter's request log
        self.application.log_request(self)
        bridge = await self._relay(browser, backend)
        if bridge is None:  # a side closed during the handover: over before it began
            return
        self.supervisor.websocket_opened()
        try:
            await bridge.finished
        finally:
            bridge.abort()  # only if we were cancelled: the bridge has normally ended
            self.supervisor.websocket_closed()

    async def _relay(
        self, browser: IOStream, backend: IOStream
    ) -> ThreadBridge | _Bridge | _StreamBridge | None:
        """Start relaying with the right relay (see the module doc); None if a side closed
        during the handover."""
        if not _can_take_over(browser):  # Jupyter's own TLS: relay on the IOStreams
            stream_bridge = _StreamBridge(self.max_message_size, self._browser_message)
            await stream_bridge.start(browser, backend)
            return stream_bridge
        taken = await take_over_both(browser, backend)
        if taken is None:
            return None
        registry = self.proxy_settings.thread_bridges
        if len(registry) < self.proxy_settings.websocket_threads:
            threads = ThreadBridge(self.max_message_size, self._browser_message, registry)
            if threads.start(*taken):
                return threads
            self.log.warning("No thread to relay a websocket: it is relayed on the event loop")
        bridge = _Bridge(self.max_message_size, self._browser_message)
        await bridge.start(*taken)
        return bridge

    async def _connect(self, *, host: str, port: int) -> IOStream:
        """A TCP connection to the backend (the caller passes fixed loopback, never anything
        from the request)."""
        stream = IOStream(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        try:
            await asyncio.wait_for(
                stream.connect((host, port)), self.proxy_settings.connect_timeout
            )
        except (OSError, StreamClosedError, asyncio.TimeoutError) as e:
            stream.close()
            raise web.HTTPError(502, f"LiberTEM is not reachable: {e!r}") from None
        return stream

    async def _backend_handshake(
        self, backend: IOStream, request: bytes, key: str, offered: str | None
    ) -> str | None:
        """Send the upgrade, read the answer's head; the subprotocol the backend chose."""
        timeout = self.proxy_settings.read_timeout or 30.0
        try:
            await backend.write(request)
            raw = await asyncio.wait_for(
                backend.read_until(b"\r\n\r\n", max_bytes=MAX_RESPONSE_HEAD), timeout
            )
            text = raw.decode("latin-1")
            first, _, rest = text.partition("\r\n")
            start = httputil.parse_response_start_line(first)
            headers = httputil.HTTPHeaders.parse(rest)
        except (StreamClosedError, UnsatisfiableReadError, asyncio.TimeoutError) as e:
            raise web.HTTPError(502, f"LiberTEM did not answer the websocket: {e!r}") from None
        except httputil.HTTPInputError as e:
            raise web.HTTPError(502, f"LiberTEM answered the websocket badly: {e}") from None
        if start.code != 101:
            status = start.code if 400 <= start.code < 600 else 502
            raise web.HTTPError(status, f"LiberTEM refused the websocket ({start.code})")
        if headers.get("Sec-WebSocket-Accept") != accept_value(key):
            raise web.HTTPError(502, "LiberTEM's websocket answer does not match the request")
        if headers.get("Sec-WebSocket-Extensions"):
            raise web.HTTPError(502, "LiberTEM chose a websocket extension nobody offered")
        chosen = headers.get("Sec-WebSocket-Protocol")
        if chosen is not None:
            offers = {p.strip() for p in (offered or "").split(",")}
            if chosen not in offers or _BAD_VALUE.search(chosen):
                raise web.HTTPError(502, "LiberTEM chose a subprotocol nobody offered")
        return chosen

    def _browser_message(self) -> None:
        """The browser sent a message: activity, recorded at most once a second."""
        now = time.monotonic()
        if now - self._last_recorded > 1.0:
            self._last_recorded = now
            self.supervisor.touch()
            self.record_activity()
