"""A small HTTP/1.1 client for the body-less requests (GET, HEAD, OPTIONS) to libertem-server.

Why not aiohttp for these: a small GET through aiohttp cost Jupyter 300-480 µs of CPU before
anything was relayed (building the request, tracing hooks, timers, its response object), the
largest part of the proxy's own share of a small request (issue 17). This client does only
what the proxy needs, on pooled keep-alive sockets to the one fixed address 127.0.0.1:<port>:

- write the request head in one ``send``; read the answer into one growing buffer;
- parse the status line and fields (RFC 9112 4, 5), skip interim 1xx answers (RFC 9110 15.2),
  and find the body's framing (RFC 9112 6.3): none (HEAD, 1xx, 204, 304), ``Content-Length``,
  chunked (RFC 9112 7.1), or until the backend closes;
- hand the body on as it arrives (pieces are views into the buffer, valid until the next one
  is asked for), or as a socket and a byte count for ``splice``;
- keep the socket for the next request only when the whole body was read and neither side
  said ``Connection: close``; check a pooled socket before reuse (the backend may have closed
  it while idle), and retry once on a fresh socket if a reused one fails before any answer.

A request with a ``Content-Length`` body is an :class:`Upload`: its body is sent from the
caller's buffer as the browser's body arrives, and an answer that comes before the whole body
was taken (an early 413) stops the sending. A chunked request body stays with aiohttp.
Errors are :class:`UpstreamError` (malformed or cut answers) or ``OSError``/``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator

from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEAD = 64 * 1024  # bytes of status line and fields; like aiohttp's and tornado's limits
MAX_INTERIM = 8  # 1xx answers skipped before the final one
# receive buffer sizes: for an answer's head and small bodies, and while a large body streams
# (fewer receives and waits: a chunked download through the proxy went from 0.56 to 0.66 of
# the direct rate, bench/hotpath.py, when it grew from 256 KiB to 1 MiB)
HEAD_BUFFER = 2 * MAX_HEAD
BODY_BUFFER = 1024 * 1024
IDLE_KEPT = 8  # pooled sockets kept per backend run

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
# field-name = token (RFC 9110 5.1, 5.6.2); value: no CR, LF or NUL (RFC 9110 5.5)
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n\x00]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"0*([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")  # leading zeros: any


class UpstreamError(ConnectionError):
    """libertem-server's answer could not be read: malformed, or cut short."""


class _Retry(Exception):
    """A reused socket failed before any byte of the answer: send again on a fresh one."""


class _Conn:
    """One socket to the backend and its receive buffer (``buf[start:end]`` is unread)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(HEAD_BUFFER)
        self.start = 0
        self.end = 0

    async def fill(self, timeout: float | None, size: int = HEAD_BUFFER) -> int:
        """Receive more after ``end`` (into a buffer of at least ``size`` bytes); 0 when the
        backend closed. Unread bytes are moved to the front first when space runs short.
        No view of the buffer may be held across this call (it may be replaced)."""
        self._make_room(size)
        with memoryview(self.buf) as view, view[self.end :] as free:
            while True:
                try:
                    n = self.sock.recv_into(free)
                    break
                except BlockingIOError:
                    await _readable(self.sock.fileno(), timeout)
        self.end += n
        return n

    def find(self, sep: bytes) -> int:
        return self.buf.find(sep, self.start, self.end)

    def _make_room(self, size: int) -> None:
        """A buffer of at least ``size`` bytes with room after ``end``: unread bytes are moved
        to the front when less than a quarter is free."""
        if self.start == self.end:
            self.start = self.end = 0
        if len(self.buf) < size:
            grown = bytearray(size)
            grown[: self.end - self.start] = self.buf[self.start : self.end]
            self.buf, self.end, self.start = grown, self.end - self.start, 0
        elif len(self.buf) - self.end < len(self.buf) // 4:
            self.buf[: self.end - self.start] = self.buf[self.start : self.end]
            self.end -= self.start
            self.start = 0

    def poll(self) -> bool:
        """Receive what has arrived, without waiting. False once nothing more can come in:
        the backend closed or reset the connection (the next :meth:`fill` says which), or the
        buffer is full of unread bytes."""
        self._make_room(HEAD_BUFFER)
        if len(self.buf) == self.end:
            return False
        try:
            with memoryview(self.buf) as view, view[self.end :] as free:
                n = self.sock.recv_into(free)
        except BlockingIOError:
            return True
        except OSError:
            return False
        self.end += n
        return n > 0


class Pool:
    """The idle keep-alive sockets to one backend run (127.0.0.1:``port``)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[_Conn] = []
        self.closed = False

    async def connect(self, timeout: float | None) -> _Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", self.port)), timeout)
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    def take(self) -> _Conn | None:
        """A pooled socket the backend has not closed, or None."""
        while self.idle:
            conn = self.idle.pop()
            try:
                if conn.sock.recv(1, socket.MSG_PEEK) == b"":
                    raise ConnectionResetError  # closed by the backend while idle
            except BlockingIOError:
                return conn  # nothing to read: alive, as an idle connection should be
            except OSError:
                pass
            conn.sock.close()  # closed, or it sent bytes nobody asked for
        return None

    def give_back(self, conn: _Conn) -> None:
        if self.closed or len(self.idle) >= IDLE_KEPT:
            conn.sock.close()
        else:
            conn.start = conn.end = 0
            if len(conn.buf) > HEAD_BUFFER:  # an idle socket keeps only a small buffer
                conn.buf = bytearray(HEAD_BUFFER)
            self.idle.append(conn)

    def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.sock.close()
        self.idle.clear()


class Answer:
    """libertem-server's answer: status, fields, and its body, read on demand."""

    def __init__(
        self,
        pool: Pool,
        conn: _Conn,
        head: tuple[int, int, str, list[tuple[bytes, bytes]]],
        method: str,
        read_timeout: float | None,
    ) -> None:
        version, self.status, self.reason, self.raw_headers = head
        self._pool = pool
        self._conn: _Conn | None = conn
        self._timeout = read_timeout
        fields: CIMultiDict[str] = CIMultiDict()
        for name, value in self.raw_headers:
            fields.add(name.decode("latin-1"), value.decode("latin-1"))
        self.headers = CIMultiDictProxy(fields)
        tokens = {t.strip().lower() for t in ",".join(fields.getall("Connection", [])).split(",")}
        self.keep_alive = version == 1 and "close" not in tokens
        self._chunked = False
        length: int | None = None
        codings = ",".join(fields.getall("Transfer-Encoding", []))
        if method == "HEAD" or self.status in (204, 304) or self.status < 200:
            length = 0
        elif codings:
            if "Content-Length" in fields:
                # RFC 9112 6.3 (3): "ought to be handled as an error"; relaying it would pass
                # on a length that does not describe the body (aiohttp refuses it too)
                raise UpstreamError("LiberTEM sent both Transfer-Encoding and Content-Length")
            # RFC 9112 6.3 (4): the last coding decides
            self._chunked = codings.rsplit(",", 1)[-1].strip().lower() == "chunked"
            if not self._chunked:
                self.keep_alive = False
        elif "Content-Length" in fields:
            values = {v.strip() for v in ",".join(fields.getall("Content-Length")).split(",")}
            value = values.pop() if len(values) == 1 else ""
            if not (value.isascii() and value.isdigit()):
                raise UpstreamError("LiberTEM sent an invalid Content-Length")
            length = int(value)
        else:
            self.keep_alive = False  # read until the backend closes (RFC 9112 6.3, 8)
        self._remaining = length  # body bytes not yet handed on (None: unknown)
        self._buffer = BODY_BUFFER  # receive buffer size while the body is read
        self.complete = length == 0
        #: a reset ends a close-framed body (set for the answer to a refused upload, see _fill)
        self.reset_ends_body = False

    def _live(self) -> _Conn:
        if self._conn is None:
            raise UpstreamError("the answer was already released")
        return self._conn

    async def pieces(self) -> AsyncIterator[memoryview]:
        """The body, decoded of chunked framing, as it arrives. Each piece is a view into the
        receive buffer, valid only until the next one is asked for. Raises UpstreamError if
        the backend closes before the end its framing announced."""
        if self._chunked:
            async for batch in self.batches():
                for piece in batch:
                    yield piece
            return
        conn = self._live()
        while self._remaining is None or self._remaining > 0:
            if conn.start == conn.end and not await self._fill(conn):
                if self._remaining is None:
                    break  # read-until-close: this is the end
                raise UpstreamError(
                    f"LiberTEM closed the connection {self._remaining} bytes before the end"
                )
            end = conn.end
            if self._remaining is not None:
                end = min(end, conn.start + self._remaining)
                self._remaining -= end - conn.start
            with memoryview(conn.buf) as view, view[conn.start : end] as piece:
                conn.start = end
                yield piece
        self.complete = True

    async def _fill(self, conn: _Conn) -> int:
        """:meth:`_Conn.fill` for the body. After a refused upload (``reset_ends_body``), a
        reset ends a body framed by the connection's close: tornado refuses a body over its
        limit with a 400 without length and closes with the upload unread, which the kernel
        turns into a reset. Anywhere else a reset is an error: the body was cut."""
        try:
            return await conn.fill(self._timeout, self._buffer)
        except ConnectionResetError:
            if self._remaining is not None or self._chunked or not self.reset_ends_body:
                raise
            return 0

    async def batches(self) -> AsyncIterator[list[memoryview]]:
        """The body as lists of pieces: all that has arrived, without waiting for more.

        A chunked body (RFC 9112 7.1) is decoded in place: the pieces are the chunks' data,
        views into the receive buffer, valid until the next list is asked for. Many small
        chunks in one receive become one list (one ``writev`` for the sender), not one
        coroutine step each. Raises UpstreamError for framing errors and a cut body."""
        if not self._chunked:
            async for piece in self.pieces():
                yield [piece]
            return
        conn = self._live()
        state, size = "size", 0  # size: data bytes of the current chunk still to come
        while state != "done":
            views: list[memoryview] = []
            with memoryview(conn.buf) as buf:
                try:
                    state, size = self._decode(conn, buf, state, size, views)
                    if views:
                        yield views
                finally:
                    for v in views:
                        v.release()
            if state != "done" and not await conn.fill(self._timeout, self._buffer):
                raise UpstreamError("LiberTEM closed the connection inside a chunked body")
        self.complete = True

    @staticmethod
    def _decode(
        conn: _Conn, buf: memoryview, state: str, size: int, views: list[memoryview]
    ) -> tuple[str, int]:
        """Decode the chunked framing in ``conn``'s unread bytes, appending data views to
        ``views``; returns the state to go on from when more has arrived."""
        while True:
            if state == "data":
                if conn.start == conn.end:
                    return state, size
                end = min(conn.end, conn.start + size)
                views.append(buf[conn.start : end])
                size -= end - conn.start
                conn.start = end
                if size == 0:
                    state = "crlf"
                continue
            at = conn.find(b"\r\n")
            if at < 0:
                if conn.end - conn.start > 4096:
                    raise UpstreamError("LiberTEM sent an over-long line in a chunked body")
                return state, size
            line = bytes(buf[conn.start : at])
            conn.start = at + 2
            if state == "crlf":
                if line:
                    raise UpstreamError("LiberTEM sent a chunk longer than its size line said")
                state = "size"
            elif state == "size":
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise UpstreamError(f"LiberTEM sent an invalid chunk size line {line[:40]!r}")
                size = int(match.group(1), 16)
                state = "data" if size else "trailer"
            elif not line:  # the empty line after the trailer fields (not relayed)
                return "done", 0

    async def read(self) -> bytes:
        """The whole body (the caller knows it is small: the head's buffer is enough)."""
        self._buffer = HEAD_BUFFER
        return b"".join([bytes(p) async for p in self.pieces()])

    def splice_source(self) -> tuple[int, bytes, int] | None:
        """For a body of known length: (socket fd, the part already received, the bytes still
        to come on the socket). The caller moves those bytes itself and then calls
        :meth:`moved`; until then the body counts as unread (the socket is not reused)."""
        conn = self._conn
        if self._chunked or self._remaining is None or conn is None:
            return None
        end = min(conn.end, conn.start + self._remaining)
        head = bytes(conn.buf[conn.start : end])
        conn.start = end
        self._remaining -= len(head)
        return conn.sock.fileno(), head, self._remaining

    def moved(self) -> None:
        """The rest of the body announced by :meth:`splice_source` went out on the socket."""
        self._remaining = 0
        self.complete = True

    def release(self) -> None:
        """The exchange is over: the socket goes back to the pool if it can carry another
        request (whole body read, keep-alive, nothing more received), else it is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.complete and self.keep_alive and conn.start == conn.end:
            self._pool.give_back(conn)
        else:
            conn.sock.close()

    def close(self) -> None:
        """End the exchange and close the socket (an aborted body: the backend sees it)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.sock.close()


async def _readable(fd: int, timeout: float | None) -> None:
    """Wait until ``fd`` can be read; asyncio.TimeoutError after ``timeout`` seconds (None: no
    limit).

    A plain future on the selector, not ``asyncio.wait_for`` around ``sock_recv_into``, which
    creates a task for every wait: this is on the path of every proxied request."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    def expired() -> None:
        if not fut.done():
            fut.set_exception(asyncio.TimeoutError(f"LiberTEM sent nothing for {timeout:g} s"))

    loop.add_reader(fd, ready)
    timer = loop.call_later(timeout, expired) if timeout else None
    try:
        await fut
    finally:
        loop.remove_reader(fd)
        if timer is not None:
            timer.cancel()


def _parse_head(data: bytes) -> tuple[int, int, str, list[tuple[bytes, bytes]]]:
    """(minor version, status, reason, fields) of a response head without its final CRLF."""
    lines = data.split(b"\r\n")
    match = _STATUS.fullmatch(lines[0])
    if match is None:
        raise UpstreamError(f"LiberTEM sent an invalid status line {lines[0][:60]!r}")
    fields = []
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:  # also obs-fold (RFC 9112 5.2) and a bare LF inside a line
            raise UpstreamError(f"LiberTEM sent an invalid header line {line[:60]!r}")
        fields.append((field.group(1), field.group(2)))
    reason = (match.group(3) or b"").decode("latin-1")
    return int(match.group(1)), int(match.group(2)), reason, fields


def request_head(method: str, target: str, port: int, headers: list[tuple[str, str]]) -> bytes:
    """The request line and fields; values are encoded as UTF-8 as aiohttp does (see
    :func:`.headers.as_utf8`), and ``Host`` names the backend's own address."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


async def request(
    pool: Pool,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    connect_timeout: float | None,
    read_timeout: float | None,
) -> Answer:
    """Send a body-less request; returns once the final answer's head is in."""
    head = request_head(method, target, pool.port, headers)
    conn = pool.take()
    if conn is not None:
        try:
            return await _exchange(pool, conn, head, method, read_timeout, reused=True)
        except _Retry:
            pass
    conn = await pool.connect(connect_timeout)
    return await _exchange(pool, conn, head, method, read_timeout, reused=False)


async def _exchange(
    pool: Pool, conn: _Conn, head: bytes, method: str, read_timeout: float | None, reused: bool
) -> Answer:
    try:
        try:
            await _send_head(conn, head)
        except OSError:
            if reused:
                raise _Retry from None
            raise
        return await _read_answer(pool, conn, method, read_timeout, reused)
    except BaseException:
        conn.sock.close()
        raise


async def _send_head(conn: _Conn, head: bytes) -> None:
    loop = asyncio.get_running_loop()
    try:
        sent = conn.sock.send(head)  # a request head fits the socket buffer: no wait
        if sent < len(head):
            await loop.sock_sendall(conn.sock, head[sent:])
    except BlockingIOError:
        await loop.sock_sendall(conn.sock, head)


async def _read_answer(
    pool: Pool,
    conn: _Conn,
    method: str,
    read_timeout: float | None,
    reused: bool,
) -> Answer:
    """Read up to the final answer's head (interim 1xx answers skipped); the caller closes the
    socket if this raises. ``reused``: a failure before any byte raises :class:`_Retry`."""
    for _ in range(MAX_INTERIM + 1):
        while (end := conn.find(b"\r\n\r\n")) < 0:
            if conn.end - conn.start > MAX_HEAD:
                raise UpstreamError(f"LiberTEM's answer head is over {MAX_HEAD} bytes")
            try:
                received = await conn.fill(read_timeout)
            except (ConnectionResetError, BrokenPipeError):
                if reused and conn.end == 0:
                    raise _Retry from None
                raise
            if not received:
                if reused and conn.end == 0:
                    raise _Retry
                raise UpstreamError("LiberTEM closed the connection before its answer")
        if end - conn.start > MAX_HEAD:
            raise UpstreamError(f"LiberTEM's answer head is over {MAX_HEAD} bytes")
        parsed = _parse_head(bytes(conn.buf[conn.start : end]))
        if parsed[1] < 100:  # RFC 9110 15: status codes are 100-599
            raise UpstreamError(f"LiberTEM sent the status code {parsed[1]:03d}")
        conn.start = end + 4
        if not 100 <= parsed[1] < 200 or parsed[1] == 101:
            break
    else:
        raise UpstreamError(f"LiberTEM sent more than {MAX_INTERIM} interim answers")
    if parsed[1] == 101:  # the proxy never asks to switch protocols on this path
        raise UpstreamError("LiberTEM switched protocols on a plain HTTP request")
    return Answer(pool, conn, parsed, method, read_timeout)


class Upload:
    """A request with a ``Content-Length`` body, sent from the caller's buffer as it arrives.

    Why not aiohttp (issue 17): each piece of an upload was copied into a pipe, handed through
    a generator and aiohttp's writer; an upload through the proxy ran at 0.65 of the direct rate.
    Here :meth:`write` sends straight from the caller's buffer (no copy) and returns once the
    kernel took all of it, so one reused buffer serves the whole body.

    Two parties: :meth:`exchange` (connect, send the head, then read the answer) and the body's
    reader, which calls :meth:`write` for each piece; either may run ahead of the other.

    An early answer: before each piece, and while waiting for the socket to take more, the
    socket is checked for the backend's answer (RFC 9112 9.3: a client "SHOULD monitor the
    network connection for an error response" while it sends). Sending stops (``stopped``;
    :meth:`write` returns False, the caller discards the rest, :meth:`exchange` reads what the
    backend said) when the answer is an error status (>= 400, e.g. a 413 for a body it will not
    read) or the connection ends or fails. An interim answer (1xx, RFC 9110 15.2) is skipped and
    a final 2xx/3xx answer lets the body go on: the backend may still read it.

    ``read_timeout`` applies between two times the socket takes more of the body (as nginx's
    ``proxy_send_timeout``) and then to the answer: a backend that neither takes more nor
    answers for that long fails the request with ``asyncio.TimeoutError``. The socket takes
    more only once a good part of its buffer (megabytes on loopback) is free again, so a backend
    that reads less than that within ``read_timeout`` is cut although it reads.

    A pooled socket is checked as for body-less requests, but a request with a body is never
    sent twice (it need not be idempotent, RFC 9110 9.2.2).
    """

    def __init__(self, pool: Pool, method: str, length: int, read_timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._pool = pool
        self._conn: _Conn | None = None
        self._method = method
        self._timeout = read_timeout
        #: body bytes not yet sent
        self.remaining = length
        #: True once sending stopped before the whole body: an answer, a failure, or close()
        self.stopped = False
        #: True once the request head went out (the backend may have seen part of the body)
        self.head_sent = False
        self._error: BaseException | None = None  # why sending stopped, if it failed
        self._ready: asyncio.Future[None] = loop.create_future()  # head sent, or stopped
        self._sent: asyncio.Future[None] = loop.create_future()  # body sent, or stopped
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._answer_seen = False  # a final 2xx/3xx head arrived: the body goes on
        self._interim = 0  # interim answers consumed while sending

    def _stop(self, error: BaseException | None = None) -> None:
        self.stopped = True
        if self._error is None:
            self._error = error
        for fut in (self._ready, self._sent):
            if not fut.done():
                fut.set_result(None)

    async def exchange(
        self, target: str, headers: list[tuple[str, str]], connect_timeout: float | None
    ) -> Answer:
        """Connect, send the head (``headers`` carry the ``Content-Length``), wait until the
        body was sent or sending stopped, and return the answer's head. Raises UpstreamError,
        OSError or asyncio.TimeoutError; the socket is closed then, and on cancellation."""
        try:
            head = request_head(self._method, target, self._pool.port, headers)
            conn = self._pool.take() or await self._pool.connect(connect_timeout)
            if self._closed:  # closed while connecting
                conn.sock.close()
                raise UpstreamError("the upload was closed")
            self._conn = conn
            await _send_head(conn, head)
            self.head_sent = True
            if self.remaining <= 0:
                self._sent.set_result(None)
            self._ready.set_result(None)
            await self._sent
            if self._conn is None:
                raise UpstreamError("the upload was closed")
            if isinstance(self._error, asyncio.TimeoutError) and not self._answer_seen:
                raise self._error  # (with an answer in, the backend has said what it had to)
            try:
                resp = await _read_answer(self._pool, conn, self._method, self._timeout, False)
            except (OSError, UpstreamError):
                if self._error is None:
                    raise
                # reset mid-body, and no answer to read: say what happened while sending
                raise self._error from None
            self._conn = None  # the answer owns the socket now
            if self.stopped:
                resp.keep_alive = False  # mid-body: never reused (release closes it)
                resp.reset_ends_body = True
            return resp
        except BaseException:
            self.close()
            raise

    async def write(self, data: memoryview) -> bool:
        """Send all of ``data`` (the caller keeps it unchanged until this returns). False, with
        nothing of ``data`` counted, once the backend stopped taking the body: the caller
        discards the rest. Never raises for the backend's failures (:meth:`exchange` does)."""
        if not self._ready.done():
            await asyncio.shield(self._ready)
        conn = self._conn
        if self.stopped or conn is None:
            return False
        if self._refused(conn):  # the backend answered (or went away) while the browser sent
            self._stop()
            return False
        view = data
        while len(view):
            try:
                view = view[conn.sock.send(view) :]
            except BlockingIOError:
                if not await self._wait_writable(conn):
                    return False
            except OSError as e:  # EPIPE, ECONNRESET: the answer may be in, read it
                self._stop(e)
                return False
        self.remaining -= len(data)
        if self.remaining <= 0 and not self._sent.done():
            self._sent.set_result(None)
        return True

    async def _wait_writable(self, conn: _Conn) -> bool:
        """Wait until the socket takes more (True) or the backend answered, failed or was
        silent for ``read_timeout`` (False: sending stopped)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = conn.sock.fileno()
        readable = False

        def answered() -> None:
            nonlocal readable
            readable = True
            if not fut.done():
                fut.set_result(None)

        def writable() -> None:
            if not fut.done():
                fut.set_result(None)

        def expired() -> None:
            if not fut.done():
                text = f"LiberTEM took none of the upload for {self._timeout:g} s"
                fut.set_exception(asyncio.TimeoutError(text))

        loop.add_reader(fd, answered)
        loop.add_writer(fd, writable)
        timer = loop.call_later(self._timeout, expired) if self._timeout else None
        self._waiter = fut
        try:
            await fut
        except asyncio.TimeoutError as e:
            self._stop(e)
            return False
        finally:
            self._waiter = None
            if not self._closed:  # close() unregistered the socket before closing it
                loop.remove_reader(fd)
                loop.remove_writer(fd)
            if timer is not None:
                timer.cancel()
        if self._closed:
            return False
        if readable and self._refused(conn):
            self._stop()
            return False
        return True

    def _refused(self, conn: _Conn) -> bool:
        """Whether sending must stop: receive what the backend sent so far (without waiting)
        and look at it. Complete interim answers are consumed (:meth:`exchange` would skip
        them anyway); True for an error status, a connection that ended or failed, or bytes
        that are not an answer (:meth:`exchange` then says what is wrong with them)."""
        if not conn.poll():
            return True
        if self._answer_seen:
            # its bytes are kept as they come (in the buffer, safe from a later reset); a
            # backend that sends its whole answer before reading the body fills the buffer,
            # then sending stops (the answer is relayed, the body is cut, as aiohttp did)
            return False
        while conn.start < conn.end:
            line_end = conn.find(b"\r\n")
            if line_end < 0:  # the status line is not complete yet
                return conn.end - conn.start > MAX_HEAD
            match = _STATUS.fullmatch(bytes(conn.buf[conn.start : line_end]))
            if match is None:
                return True
            status = int(match.group(2))
            if status < 100 or status >= 400:
                return True
            if status >= 200 or status == 101:
                self._answer_seen = True  # RFC 9112 9.3: only an error stops the body
                return False
            end = conn.find(b"\r\n\r\n")
            if end < 0:
                return conn.end - conn.start > MAX_HEAD
            try:
                _parse_head(bytes(conn.buf[conn.start : end]))
            except UpstreamError:
                return True
            conn.start = end + 4  # an interim answer: the body goes on
            self._interim += 1
            if self._interim > MAX_INTERIM:
                return True  # (exchange says so)
        return False

    def close(self) -> None:
        """Abandon the request (the browser went away, or it failed): the backend sees the
        connection close before the body's end, never a complete body."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._waiter is not None:
                loop = asyncio.get_running_loop()
                loop.remove_reader(conn.sock.fileno())
                loop.remove_writer(conn.sock.fileno())
                if not self._waiter.done():
                    self._waiter.set_result(None)
            conn.sock.close()
        self._stop()
