"""The HTTP reverse proxy: every method, bodies streamed both ways, fixed upstream address.

What it changes in a request or a response is listed once, in :mod:`.contract`; everything
else passes unchanged. The life of one request, in order:

1. ``prepare``: Jupyter's auth and the cross-site rule; a body over ``max_body_size`` is
   refused (413) before it is read; the backend is made ready; the upstream request starts at
   once: through :mod:`.upstream` (no body, or a ``Content-Length`` body: an
   :class:`.upstream.Upload`), or through aiohttp fed from a :class:`.BodyPipe` (a chunked body,
   a body-less POST/PUT/PATCH/DELETE).
2. The body goes upstream as it arrives (backpressure both ways): a ``Content-Length`` body is
   read by the handler itself (``_take_over_body``, pieces of up to 1 MiB) and sent from that
   buffer; a chunked one comes through tornado's ``data_received`` into the pipe.
3. The method (``get``, ``post``...): the body is complete; await the backend's status and
   headers, then ``_relay`` them (headers through :func:`.headers.response_headers`, the body
   small, streamed, spliced or gzipped).

An answer given before the body was read (a refusal, an error page) says
``Connection: close`` (see ``finish``). A backend that answers before it read the whole body
(an early 413) gets no more of it; the browser's body is read and discarded, then the answer
is relayed and the upstream connection closed (it is mid-body, so never reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence

import aiohttp
from tornado import httputil, web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from yarl import URL

from . import adaptations, asset_cache, contract, splice, upstream
from .backend_run import BackendRun
from .base import ProxyHandlerBase
from .body_pipe import BodyPipe
from .compression import GzipStream, accepts_gzip, no_transform, should_compress
from .errors import BackendError
from .headers import response_headers, strip_token_query

# Jupyter's security headers set by JupyterHandler.set_default_headers: a backend header of the
# same name is added next to them instead of replacing them (both then apply).
_KEEP_JUPYTER = contract.SECURITY_HEADERS


SMALL_BODY = 64 * 1024
# what RFC 9110 5.5 forbids in a field value: the control characters other than HTAB
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
BODY_PIECE = 1024 * 1024  # the most _read_body reads at once


def _length(value: str | None) -> int | None:
    """A ``Content-Length`` value (RFC 9110 8.6: ASCII digits only) as a number, else None.

    Not ``str.isdigit`` alone: it accepts digits like "²" that ``int`` refuses (a 500)."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


#: the backend's answer: from aiohttp (requests with a body) or from :mod:`.upstream` (the rest)
Answer = aiohttp.ClientResponse | upstream.Answer
#: requests that go through :mod:`.upstream` when they have no body
FAST_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _is_small(resp: Answer) -> bool:
    """A body with a known, small length: no point in streaming it."""
    length = _length(resp.headers.get("Content-Length"))
    return length is not None and length <= SMALL_BODY


def _mark_retrieved(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()


def _emits(log: logging.Logger | logging.LoggerAdapter, level: int) -> bool:
    """Whether a record of ``level`` would reach a handler that writes it.

    Not ``isEnabledFor`` alone: Jupyter's application logger is at DEBUG and its handler at
    INFO, so the logger lets debug records through and the handler drops them."""
    logger: logging.Logger | None = log.logger if isinstance(log, logging.LoggerAdapter) else log
    if logger is None or not logger.isEnabledFor(level):
        return False
    found = False
    while logger is not None:
        for handler in logger.handlers:
            found = True
            if level >= handler.level:
                return True
        if not logger.propagate:
            break
        logger = logger.parent
    last = logging.lastResort
    return not found and last is not None and level >= last.level


def _pieces(resp: Answer) -> AsyncIterator[bytes | memoryview]:
    """The body as it arrives (a piece from :mod:`.upstream` is valid until the next)."""
    if isinstance(resp, upstream.Answer):
        return resp.pieces()
    return resp.content.iter_any()


async def _batches(resp: Answer) -> AsyncIterator[Sequence[bytes | memoryview]]:
    """The body as lists of pieces (see :meth:`.upstream.Answer.batches`)."""
    if isinstance(resp, upstream.Answer):
        async for batch in resp.batches():
            yield batch
        return
    async for piece in resp.content.iter_any():
        yield (piece,)


def _body_read(resp: Answer) -> bool:
    """Whether the whole body was read (then the upstream connection may be reused)."""
    if isinstance(resp, upstream.Answer):
        return resp.complete
    return resp.content.at_eof()


class ClientGone(Exception):
    """The browser closed its connection before the request body was complete."""


@web.stream_request_body
class HttpProxyHandler(ProxyHandlerBase):
    """Forwards ``{base_url}libertem/<path>`` to ``http://127.0.0.1:<port>/<path>``."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def initialize(self) -> None:
        self._pipe: BodyPipe | None = None
        self._upstream: asyncio.Future[Answer] | None = None
        self._run: BackendRun | None = None
        self._client_gone = False
        self._counted = False
        # the browser's whole body has been received (the method runs only then)
        self._body_complete = False
        # the backend answered before it had the whole body: the rest is discarded and the
        # upstream connection is closed after the answer (a body through the pipe; an Upload
        # marks its answer as not reusable itself)
        self._early_answer = False
        # the upstream request failed while the browser's body was still arriving
        self._failed_mid_upload = False
        # the task reading a Content-Length body itself, and the request it feeds
        # (see _take_over_body)
        self._body_reader: asyncio.Future[None] | None = None
        self._upload: upstream.Upload | None = None

    def compute_etag(self) -> str | None:
        return None  # the backend's ETag (if any) passes through unchanged

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()  # Jupyter auth, and our cross-site rule via check_xsrf_cookie
        if self._finished:
            return
        if self.current_user is None:  # also when allow_unauthenticated_access is set
            web.authenticated(lambda _self: None)(self)  # login redirect (GET) or 403
            return
        max_body = self.proxy_settings.max_body_size
        length = self._declared_length()
        if length is not None and length > max_body:
            # refuse before reading it (tornado would answer a bare 400 and close)
            raise web.HTTPError(
                413, f"Request body of {length} bytes exceeds max_body_size ({max_body})"
            )
        self.request.connection.set_max_body_size(max_body)
        if self.refuse_if_stopped():  # stopped on purpose: a cheap 503, not activity
            return
        self._counted = True
        self.supervisor.request_started()
        self.record_activity()
        try:
            if self.is_navigation() and not self.supervisor.ready:
                self._run = await self._start_or_loading_page()
                if self._run is None:
                    return
            else:
                self._run = await self.supervisor.ensure_running(self.is_person())
        except BackendError as e:
            self.send_backend_error(e)
            return
        if self._has_body() and self._take_over_body(self._run, length or 0):
            pass  # an Upload: _upstream is its exchange
        elif self._has_body():
            self._pipe = BodyPipe()  # a chunked body, through tornado and aiohttp
            self._upstream = asyncio.ensure_future(self._send(self._run, self._pipe))
        elif self.request.method in FAST_METHODS:
            self._upstream = asyncio.ensure_future(self._send_fast(self._run))
        else:
            self._upstream = asyncio.ensure_future(self._send(self._run, None))
        # if the browser goes away mid-body nobody awaits this; don't warn about its error
        self._upstream.add_done_callback(_mark_retrieved)
        if self._upload is not None:
            upload = self._upload

            # (an early answer needs no flag here: Upload.write says False from then on, so
            # the body reader discards the rest, and the answer's socket is never reused)
            def upload_done(f: asyncio.Future[Answer]) -> None:
                if f.cancelled() or f.exception() is not None:
                    self._failed_mid_upload = upload.head_sent and not self._body_complete

            self._upstream.add_done_callback(upload_done)
        if self._pipe is not None:
            pipe = self._pipe
            expected = -1 if length is None else length

            def upstream_done(f: asyncio.Future[Answer]) -> None:
                if f.cancelled() or f.exception() is not None:
                    self._failed_mid_upload = not self._body_complete
                    pipe.reader_done()  # nobody sends the rest: discard it
                elif not self._body_complete and not pipe.closed and pipe.total != expected:
                    # an early answer (a 413 before reading): the backend wants no more; the
                    # browser's rest is read and discarded, the answer relayed when it is in
                    self._early_answer = True
                    pipe.reader_done()

            self._upstream.add_done_callback(upstream_done)

    def _declared_length(self) -> int | None:
        """The request's ``Content-Length`` (None without one), made a single value.

        Repeated equal values (``5, 5``: two fields, or a list) are one length (RFC 9110 8.6;
        tornado accepts them too), written back as one value so that the upstream request
        carries a length aiohttp accepts; anything else is a 400 that says why."""
        headers = self.request.headers
        value = headers.get("Content-Length")
        if value is None:
            return None
        values = {v.strip() for v in value.split(",")}
        single = values.pop() if len(values) == 1 else None
        length = _length(single)
        if length is None:
            raise web.HTTPError(400, "Invalid Content-Length: %r", value[:40])
        if single != value:
            headers["Content-Length"] = single
        return length

    def _take_over_body(self, run: BackendRun, length: int) -> bool:
        """Send a ``Content-Length`` body as an :class:`.upstream.Upload`, read here instead of
        through tornado; False if we cannot (the caller then uses tornado, a pipe and aiohttp).

        Why: tornado hands a streamed body over in pieces of at most 64 KiB, each copied three
        times on the way (a fresh receive buffer, its read buffer, the piece); with a pipe and
        aiohttp behind it, that was most of Jupyter's CPU for an upload, which ran at half the
        direct speed (issue 17). Here each piece of up to 1 MiB is received into one reused
        buffer with ``read_into`` and sent to libertem-server from that buffer.

        How: tornado decides whether a body follows from the ``Content-Length`` of the headers
        object it parsed, right after ``prepare``. That object loses the header (so tornado
        reads no body and runs the method at once); the handler keeps a full copy as
        ``self.request.headers``. The method then waits for :meth:`_read_body`. A chunked body
        (``Transfer-Encoding``) stays with tornado.
        """
        conn = self.request.connection
        headers = self.request.headers
        if length <= 0 or "Transfer-Encoding" in headers or not isinstance(conn, HTTP1Connection):
            return False
        if conn._request_headers is not headers:  # not the object tornado reads the body from
            return False
        if run.pool is None:
            return False
        self.request.headers = httputil.HTTPHeaders(headers)
        del headers["Content-Length"]
        settings = self.proxy_settings
        upload = self._upload = upstream.Upload(
            run.pool, self.request.method or "POST", length, settings.read_timeout or None
        )
        target, upstream_headers = self._upstream_request(run)
        self._upstream = asyncio.ensure_future(
            upload.exchange(target, upstream_headers, settings.connect_timeout or None)
        )
        self._body_reader = asyncio.ensure_future(self._read_body(conn.stream, length, upload))
        self._body_reader.add_done_callback(_mark_retrieved)
        return True

    async def _read_body(self, stream: IOStream, length: int, upload: upstream.Upload) -> None:
        """Move ``length`` body bytes from the browser's stream to the upload, in order; once
        the upload stopped (an early answer, a failure) the rest is read and discarded."""
        buf = memoryview(bytearray(min(length, BODY_PIECE)))
        remaining = length
        try:
            while remaining:
                n = await stream.read_into(buf[: min(remaining, len(buf))], partial=True)
                remaining -= n
                await upload.write(buf[:n])  # False once stopped: the piece is dropped
        except StreamClosedError:
            # tornado may not have said so yet; only our part of on_connection_close: tornado's
            # own would fail the request's body future, which tornado resolves itself next
            self._browser_gone()
            raise

    async def _start_or_loading_page(self) -> BackendRun | None:
        """A person is waiting: answer at once with the loading page unless the start is quick.

        The start goes on in the background; the loading page polls the status API and turns
        into the GUI when LiberTEM is ready (or into the error page if the start fails).
        """
        supervisor = self.supervisor
        if supervisor.unseen_error is not None:
            # a start behind an earlier loading page failed: show why, do not start again
            # (the page's Retry button does that)
            error, supervisor.unseen_error = supervisor.unseen_error, None
            raise error
        start = asyncio.ensure_future(supervisor.ensure_running(self.is_person()))
        try:
            return await asyncio.wait_for(
                asyncio.shield(start), self.proxy_settings.loading_page_delay
            )
        except asyncio.TimeoutError:
            start.add_done_callback(supervisor.note_background_start)
            self.send_loading_page()
            return None

    def on_finish(self) -> None:
        self._uncount()

    def finish(self, chunk: str | bytes | dict | None = None) -> asyncio.Future[None]:  # type: ignore[override]
        """Say ``Connection: close`` when answering before the browser's body was read.

        tornado then closes the connection (the only way not to read the body) but did not say
        so: a client that reused the connection got a reset instead of its next answer (a
        refused cross-site POST came back as "connection reset" rather than 403).
        """
        if not self._headers_written and not self._body_complete and self._has_body():
            self.set_header("Connection", "close")
        return super().finish(chunk)

    def _log(self) -> None:
        """Skip Jupyter's access-log formatting when its line would be dropped anyway.

        Jupyter logs successful requests at debug level, but builds the line (scrubbing the
        URI, looking up the user) before the logger discards it: about 3% of Jupyter's CPU per
        proxied small request. tornado keeps ``_log`` as the hook for exactly this.
        """
        status = self.get_status()
        if (status < 300 or status == 304) and not _emits(self.log, logging.DEBUG):
            return
        super()._log()

    def _uncount(self) -> None:
        """End this request's share of ``requests_in_flight`` exactly once, however it ends
        (a finished response, or a browser that went away: then ``on_finish`` may not run)."""
        if self._counted:
            self._counted = False
            self.supervisor.request_finished()

    def _has_body(self) -> bool:
        """Whether the request has a body, by its framing (RFC 9112 6.3), not its method: a
        DELETE without one must reach the backend without one (not as an empty chunked body)."""
        h = self.request.headers
        return "Transfer-Encoding" in h or h.get("Content-Length", "0") not in ("", "0")

    async def _send(self, run: BackendRun, pipe: BodyPipe | None) -> aiohttp.ClientResponse:
        """Send the request upstream; returns once the backend's status and headers are in."""
        assert run.session is not None
        query = strip_token_query(self.request.query)
        url = URL.build(
            scheme="http",
            host="127.0.0.1",
            port=run.port,
            path=self.upstream_path(),
            query_string=query,
            encoded=True,
        )
        return await run.session.request(
            self.request.method or "GET",
            url,
            headers=self.build_upstream_headers(
                run,
                drop=adaptations.request_drop(
                    self.request.method, self.upstream_path(), self.proxy_settings.cpus
                ),
            ),
            data=pipe.chunks() if pipe is not None else None,
            allow_redirects=False,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=self.proxy_settings.client_timeout,
        )

    def _upstream_request(self, run: BackendRun) -> tuple[str, list[tuple[str, str]]]:
        """The request target (path and query) and headers for :mod:`.upstream`."""
        query = strip_token_query(self.request.query)
        path = self.upstream_path()
        drop = adaptations.request_drop(self.request.method, path, self.proxy_settings.cpus)
        return f"{path}?{query}" if query else path, self.build_upstream_headers(run, drop=drop)

    async def _send_fast(self, run: BackendRun) -> upstream.Answer:
        """A body-less GET, HEAD or OPTIONS through :mod:`.upstream` (cheaper than aiohttp)."""
        assert run.pool is not None
        settings = self.proxy_settings
        target, headers = self._upstream_request(run)
        return await upstream.request(
            run.pool,
            self.request.method or "GET",
            target,
            headers,
            settings.connect_timeout or None,
            settings.read_timeout or None,
        )

    async def data_received(self, chunk: bytes) -> None:
        if self._pipe is not None:
            await self._pipe.write(chunk)

    def on_connection_close(self) -> None:
        self._browser_gone()
        super().on_connection_close()

    def _browser_gone(self) -> None:
        """The browser's connection closed: end this request's count, and the upstream
        request with it (an unfinished body is aborted, never ended as if complete)."""
        self._client_gone = True
        self._uncount()
        if self._pipe is not None:
            self._pipe.abort(ClientGone())
        elif self._upstream is not None and not self._upstream.done():
            self._upstream.cancel()  # an Upload's exchange closes its socket
        elif self._upload is not None and not self._body_complete and self._upstream is not None:
            # an early answer, not relayed yet (the rest of the body was being discarded)
            if not self._upstream.cancelled() and self._upstream.exception() is None:
                self._upstream.result().close()

    async def _proxy(self) -> None:
        if self._body_reader is not None:
            try:
                await self._body_reader
            except StreamClosedError:
                return  # the browser went away mid-body
        self._body_complete = True
        if self._upstream is None:
            return
        if self._pipe is not None:
            self._pipe.close()  # a no-op after an early answer: that body stays unfinished
        try:
            resp = await self._upstream
        except asyncio.CancelledError:
            if self._client_gone:
                return
            raise
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            if self._client_gone:
                return
            self._send_unreachable(e)
            return
        try:
            await self._relay(resp)
        finally:
            # a fully read body keeps the pooled connection; anything else closes it, which is
            # how an aborted download is cancelled upstream (and an unfinished upload ended)
            if _body_read(resp) and not self._early_answer:
                resp.release()
            else:
                resp.close()

    def _describe(self, e: BaseException) -> str:
        """``Type: message`` of an upstream error, never with the backend's token.

        Not ``repr``: aiohttp's ``ClientResponseError`` repr carries the request's headers,
        ``X-Api-Key`` among them, and Jupyter's log is often readable by others (spawner logs).
        """
        text = f"{type(e).__name__}: {e}"
        run = self._run or self.supervisor.run
        if run is not None and run.token:
            text = text.replace(run.token, "<token>")
        return text

    def _send_unreachable(self, e: BaseException) -> None:
        described = self._describe(e)
        self.log.warning("LiberTEM proxy: backend request failed: %s", described)
        if isinstance(e, asyncio.TimeoutError):
            error = BackendError(
                "request-timeout",
                f"LiberTEM sent nothing for {self.proxy_settings.read_timeout:g} seconds while "
                "answering this request.",
                hint="If this request legitimately takes longer, raise "
                "c.LiberTEMProxy.read_timeout.",
            )
        elif self._failed_mid_upload and not isinstance(e, asyncio.CancelledError):
            # A backend that answers early (413) and closes at once resets the connection;
            # the proxy reads before each write to catch that answer, but a reset that lands
            # between that read and the next write loses it (asyncio then closes the socket
            # unread). Say what is known rather than "did not answer".
            error = BackendError(
                "unreachable",
                "LiberTEM closed the connection while this upload was still being sent, "
                f"before an answer could be read ({described}). It may have "
                "refused the upload (for example as too large).",
                hint="Check LiberTEM's log below; retry with a smaller file if it was large.",
            )
        else:
            gone = self.supervisor.run is None or self.supervisor.run.exited.is_set()
            error = BackendError(
                "died" if gone else "unreachable",
                f"LiberTEM did not answer this request ({described}).",
                exit_code=self.supervisor.last_exit_code,
                hint="Reload the page; LiberTEM is started again if it stopped.",
            )
        self.send_backend_error(error)

    async def _relay(self, resp: Answer) -> None:
        standard = httputil.responses.get(resp.status, "Unknown")
        reason = resp.reason or standard
        if not (reason.isascii() and reason.isprintable()) or any(c in reason for c in "<>&"):
            reason = standard  # tornado would send "Unknown" (it refuses such a phrase)
        self.set_status(resp.status, reason)
        self.clear_header("Content-Type")
        assert self._run is not None
        seen: set[str] = set()
        # raw bytes as latin-1 text: tornado writes header text back as latin-1, so non-ASCII
        # bytes in the backend's headers reach the browser unchanged
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
        # the one response edited on purpose (adaptations.py): the CPU count LiberTEM proposes
        adapt = adaptations.for_response(
            self.request.method, self.upstream_path(), resp.status, self.proxy_settings.cpus
        )
        if adapt is not None:
            raw = adapt.headers(raw)
        for name, value in response_headers(raw, self._run.port, self.prefix):
            lname = name.lower()
            # a control character (RFC 9110 5.5 allows none but HTAB): newer tornado refuses
            # to send it (one bad header must not turn the answer into a 500), tornado 6.2
            # would send it; either way it is dropped
            try:
                if _CONTROL.search(value):
                    raise ValueError(value)
                if lname in seen or lname in _KEEP_JUPYTER:
                    self.add_header(name, value)
                else:
                    self.set_header(name, value)
                    seen.add(lname)
            except ValueError:  # also what tornado refuses beyond that (6.6: a HTAB)
                self.log.warning("LiberTEM proxy: dropped header %s with an invalid value", name)
        no_body = self.request.method == "HEAD" or resp.status in contract.NO_BODY_STATUSES
        if resp.status == 204:
            self.clear_header("Content-Length")  # RFC 9110 8.6: never on a 204
        gzip = self._gzip_for(resp)
        if adapt is not None:
            self.clear_header("ETag")  # gzip's weak ETag derives from the backend's
        kept = asset_cache.apply(self, resp, gzip is not None)  # Cache-Control, kept gzip bodies
        try:
            if no_body:
                # headers as they are: flushed first, so that tornado neither adds
                # "Content-Length: 0" (a HEAD of a gzipped or chunked GET) nor drops the
                # representation headers of a 304
                await self.flush()
            elif kept is not None:
                self.write(await kept)
            elif _is_small(resp) or adapt is not None:
                # the common API answer: read it whole and send headers and body in one write
                body = await resp.read()
                if adapt is not None:
                    body = adapt.body(body)
                self.write(gzip.compress(body) + gzip.finish() if gzip else body)
            else:
                await self._stream_body(resp, gzip)
            self.finish()
        except (StreamClosedError, splice.BrowserGone):
            # the browser went away; leaving the context closes the upstream connection. A
            # write on our own fd may see that before tornado does: close its stream, so that
            # the automatic finish() does not count the unsent bytes as an error
            with contextlib.suppress(Exception):
                self.request.connection.stream.close()  # type: ignore[attr-defined]
            return
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ClientConnectionError,
            OSError,
            asyncio.TimeoutError,
        ) as e:
            # the backend died mid-body: the browser must see a broken response, not a short one
            self.log.warning("LiberTEM proxy: backend response broke off: %s", self._describe(e))
            if not self._headers_written and not self._finished:
                # nothing sent yet (a small body is read whole first): say what happened
                self._send_unreachable(e)
                return
            with contextlib.suppress(Exception):
                self.request.connection.stream.close()  # type: ignore[attr-defined]

    async def _stream_body(self, resp: Answer, gzip: GzipStream | None) -> None:
        """Relay a large or open-ended body chunk by chunk, as it arrives.

        One flush may be in flight while the next chunk is read from the backend: that keeps
        both sockets busy, and still bounds what we buffer to about two chunks.
        """
        if gzip is None and (await self._splice_body(resp) or await self._send_chunked(resp)):
            return
        self._end_by_closing_if_unframed()
        pending: asyncio.Future[None] | None = None
        async for chunk in _pieces(resp):
            if pending is not None:
                await pending
            self.write(gzip.compress(chunk) if gzip else bytes(chunk))
            pending = self.flush()
        if gzip:
            self.write(gzip.finish())
        if pending is not None:
            await pending

    def _end_by_closing_if_unframed(self) -> None:
        """An HTTP/1.0 browser gets a body without a length unframed: its end is the end of the
        connection (RFC 9112 6.3, 8). tornado would keep a connection open that the browser
        asked to keep alive, and the browser would wait for ever; so it closes, and does not
        say Keep-Alive (tornado's answer echoes the request's ``Connection``)."""
        conn = self.request.connection
        if self.request.version != "HTTP/1.0" or "Content-Length" in self._headers:
            return
        if isinstance(conn, HTTP1Connection):
            conn._disconnect_on_finish = True
            asked = conn._request_headers
            if asked is not None and "Connection" in asked:
                del asked["Connection"]

    def _browser_fd(self) -> int | None:
        """The browser's socket, if the proxy may write to it directly: plain TCP (not
        Jupyter's TLS), HTTP/1.1, and nothing of tornado's left to send (checked by callers
        through a flush)."""
        conn = self.request.connection
        if not isinstance(conn, HTTP1Connection) or isinstance(conn.stream, SSLIOStream):
            return None
        if self.request.version != "HTTP/1.1":
            return None
        return conn.stream.socket.fileno()

    async def _send_chunked(self, resp: Answer) -> bool:
        """Send a body of unknown length in chunked framing written here (:func:`.splice.
        send_chunked`); False if the caller must stream it through tornado.

        tornado writes the headers (with the ``Transfer-Encoding`` set here) and is then told
        that it does not frame this body; it counts nothing written after the headers.
        """
        dst = self._browser_fd()
        if dst is None or resp.status < 200 or resp.status in (204, 304):
            return False
        if "Content-Length" in self._headers:
            return False  # a known length (not spliced here): tornado sends it as it is
        batches = _batches(resp).__aiter__()
        # the headers go out with the first piece, as on tornado's path: a backend that dies
        # before sending any of the body still gets the browser a 502 that says so
        first: Sequence[bytes | memoryview] = await anext(batches, [])
        self.set_header("Transfer-Encoding", "chunked")
        await self.flush()  # the headers; tornado's buffer is empty afterwards
        conn = self.request.connection
        assert isinstance(conn, HTTP1Connection)
        # tornado >= 6.3 chunks whenever there is no Content-Length, even with our header, and
        # would end the body a second time in finish(); the framing is ours from here on
        conn._chunking_output = False

        async def body() -> AsyncIterator[Sequence[bytes | memoryview]]:
            yield first
            async for batch in batches:
                yield batch

        await splice.send_chunked(body(), dst, lambda: self._client_gone)
        return True

    def _splice_fds(self, resp: aiohttp.ClientResponse) -> tuple[int, int, int] | None:
        """(backend fd, browser fd, body length) if this body can go through :mod:`.splice`."""
        if not splice.AVAILABLE or "Transfer-Encoding" in resp.headers:
            return None
        if resp.status < 200 or resp.status in (204, 304) or resp.content.is_eof():
            return None  # no body follows (whatever Content-Length says), or it is all here
        length = _length(resp.headers.get("Content-Length"))
        conn = self.request.connection
        if length is None or not isinstance(conn, HTTP1Connection):
            return None
        stream = conn.stream
        source = resp.connection
        if isinstance(stream, SSLIOStream) or source is None or source.transport is None:
            return None
        sock = source.transport.get_extra_info("socket")
        if sock is None or source.transport.get_extra_info("sslcontext") is not None:
            return None
        return sock.fileno(), stream.socket.fileno(), length

    async def _splice_answer(self, resp: upstream.Answer) -> bool:
        """:meth:`_splice_body` for an answer read by :mod:`.upstream`: the body's head comes
        from its buffer, and the socket stays usable for the next request afterwards."""
        conn = self.request.connection
        if not splice.AVAILABLE or not isinstance(conn, HTTP1Connection):
            return False
        if isinstance(conn.stream, SSLIOStream) or resp.status < 200:
            return False
        source = resp.splice_source()
        if source is None:
            return False
        src, head, rest = source
        await self._send_spliced(src, conn.stream.socket.fileno(), head, rest)
        resp.moved()
        return True

    async def _send_spliced(self, src: int, dst: int, head: bytes, rest: int) -> None:
        """Send ``head`` (the body's part already read) through tornado, then move ``rest``
        bytes from socket ``src`` to the browser's socket ``dst`` with :func:`.splice.relay`."""
        if head:
            self.write(head)
        await self.flush()  # the headers and the head of the body; tornado's buffer is empty
        if rest > 0:
            await splice.relay(
                src, dst, rest, self.proxy_settings.read_timeout, lambda: self._client_gone
            )
            conn = self.request.connection
            assert isinstance(conn, HTTP1Connection)
            conn._expected_content_remaining = 0  # the spliced bytes, which tornado did not see

    async def _splice_body(self, resp: Answer) -> bool:
        """Send the body with ``splice(2)`` if possible; False if the caller must stream it.

        aiohttp has already read some of the body along with the headers: that part goes out
        through tornado first. Then aiohttp stops reading the socket (its parser is bypassed,
        so the upstream connection is closed afterwards, not pooled), and the rest moves from
        socket to socket in the kernel. tornado counts what it sends against Content-Length;
        the spliced bytes are accounted for by hand so that keep-alive to the browser works.
        """
        if isinstance(resp, upstream.Answer):
            return await self._splice_answer(resp)
        fds = self._splice_fds(resp)
        if fds is None:
            return False
        src, dst, length = fds
        conn = self.request.connection
        assert isinstance(conn, HTTP1Connection) and resp.connection is not None
        head = resp.content.read_nowait(-1)
        resp.connection.protocol.pause_reading()  # type: ignore[union-attr]
        rest = length - resp.content.total_bytes
        await self._send_spliced(src, dst, head, rest)
        return True

    def _gzip_for(self, resp: Answer) -> GzipStream | None:
        """Set up compression of this response if the browser takes gzip and it is text.

        Sets every header consequence listed in :data:`.contract.COMPRESSIBLE` (also for a
        HEAD, which must describe the GET). Returns None when the body goes out as it is, or
        when there is no body (HEAD).
        """
        if not self.proxy_settings.compress:
            return None
        h = resp.headers
        cache_control = ", ".join(h.getall("Cache-Control", []))
        if resp.status == 304:
            self._revalidated_gzip(resp)
            return None
        if no_transform(self.request.headers.get("Cache-Control")) or not should_compress(
            resp.status,
            h.get("Content-Type"),
            h.get("Content-Encoding"),
            h.get("Content-Length"),
            cache_control,
        ):
            return None
        self.add_header("Vary", "Accept-Encoding")
        if not accepts_gzip(self.request.headers.get("Accept-Encoding", "")):
            return None
        self.clear_header("Content-Length")
        self.clear_header("Accept-Ranges")  # ranges of the gzipped body cannot be served
        self.set_header("Content-Encoding", "gzip")
        etag = h.get("ETag")
        if etag and not etag.startswith("W/"):
            self.set_header("ETag", "W/" + etag)  # another representation of the same data
        return None if self.request.method == "HEAD" else GzipStream()

    def _revalidated_gzip(self, resp: Answer) -> None:
        """A 304 that confirms the browser's gzipped copy says what that copy's 200 said:
        the weak ETag the proxy made, and ``Vary: Accept-Encoding``.

        The browser holds the gzipped copy exactly when its ``If-None-Match`` lists the weak
        form of the backend's strong ETag (the backend compares weakly, RFC 9110 13.1.2).
        """
        etag = resp.headers.get("ETag")
        if not etag or etag.startswith("W/"):
            return
        tags = [t.strip() for t in self.request.headers.get("If-None-Match", "").split(",")]
        if "W/" + etag in tags and accepts_gzip(self.request.headers.get("Accept-Encoding", "")):
            self.set_header("ETag", "W/" + etag)
            self.add_header("Vary", "Accept-Encoding")

    @web.authenticated
    async def get(self, path: str = "") -> None:
        await self._proxy()

    @web.authenticated
    async def head(self, path: str = "") -> None:
        await self._proxy()

    @web.authenticated
    async def post(self, path: str = "") -> None:
        await self._proxy()

    @web.authenticated
    async def put(self, path: str = "") -> None:
        await self._proxy()

    @web.authenticated
    async def patch(self, path: str = "") -> None:
        await self._proxy()

    @web.authenticated
    async def delete(self, path: str = "") -> None:
        await self._proxy()

    @web.authenticated
    async def options(self, path: str = "") -> None:  # type: ignore[override]
        await self._proxy()


class AddSlashHandler(ProxyHandlerBase):
    """``{base_url}libertem`` -> ``{base_url}libertem/`` keeping the query: the GUI resolves its
    assets and API relative to the page, so the page must end with a slash."""

    @web.authenticated
    def get(self) -> None:
        query = self.request.query
        self.redirect(self.prefix + (f"?{query}" if query else ""))

    head = get
