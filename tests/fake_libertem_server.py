#!/usr/bin/env python3
"""A standalone fake of LiberTEM's ``libertem-server`` for the test suite.

The real server (LiberTEM 0.16.0) pulls in dask, numba and a 1.3 MB web client, takes seconds to
start and hundreds of MiB per process. The proxy only cares about its *outside*: the command line,
the ready line on stderr, the token check, the URL layout, the websocket and how it stops. This
file copies exactly that (see ``shared/reference/libertem-server.md``) and adds, under
``/_fake/``, helper routes that let tests look at what the proxy forwarded. Misbehaviour (slow
start, crashes, hangs, stubborn signal handling, orphaned workers) is switched on through
``LIBERTEM_FAKE_*`` environment variables, so a test can set it through the proxy's extra-env
option without touching the command line. Only the standard library and tornado are used.

Run it as ``python tests/fake_libertem_server.py [libertem-server options]``.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, NoReturn

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web
import tornado.websocket

log = logging.getLogger("libertem.web.server")
ENV_PREFIX = "LIBERTEM_FAKE_"
GiB = 1 << 30
CHUNK = 64 * 1024
WORKER_MARKER = "libertem-fake-worker"  # in each worker's argv, so tests can find orphans
PIPE_HOLDER_MARKER = "libertem-fake-pipe-holder"

# --- content: shaped like the real client (relative links, an asset name with a space) ---------
INDEX_HTML = (
    "<!doctype html><html><head><title>LiberTEM</title>"
    '<link rel="stylesheet" href="./assets/LiberTEM%20style.css"></head>'
    '<body><div id="root"></div><img src="./assets/LiberTEM%20logo.png">'
    '<script src="./assets/main.js"></script></body></html>'
)
MAIN_JS = """\
(function () {
  var b = document.body.dataset;
  var proto = location.protocol === 'https:' ? 'wss://' : 'ws://';
  var ws = new WebSocket(proto + location.host + location.pathname + 'api/events/');
  window.fakeWs = ws;
  ws.onopen = function () { b.ws = 'open'; };
  ws.onmessage = function (ev) {
    if (!('firstMessage' in b)) b.firstMessage = typeof ev.data === 'string' ? ev.data : '[binary]';
  };
  ws.onclose = function (ev) { b.ws = 'closed'; b.wsCloseCode = String(ev.code); };
  fetch('api/config/').then(function (r) { return r.json(); }).then(
    function (j) { b.config = j.status === 'ok' ? 'ok' : 'bad'; },
    function (e) { b.config = 'error: ' + e; });
})();
"""
STYLE_CSS = 'body { font-family: sans-serif; }\n#root::before { content: "LiberTEM (fake)"; }\n'
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c636460f85f0f0002870180eb47ba92"
    "0000000049454e44ae426082"
)
ASSETS: dict[str, tuple[bytes, str]] = {
    "LiberTEM logo.png": (PNG_1X1, "image/png"),
    "LiberTEM style.css": (STYLE_CSS.encode(), "text/css"),
    "main.js": (MAIN_JS.encode(), "application/javascript"),
}


def pattern_bytes(offset: int, length: int) -> bytes:
    """Deterministic test data: byte ``i`` of the stream is ``i % 251``.

    251 is prime, so chunk boundaries never line up with the pattern and a lost, doubled or
    reordered chunk shows up. Tests import this to check downloads and websocket bursts."""
    start = offset % 251
    if start + length <= len(_PATTERN):
        return _PATTERN[start : start + length]  # fast path: one copy of a precomputed block
    rotated = _PATTERN[start : start + 251]
    return (rotated * (length // 251 + 1))[:length]


_PATTERN = bytes(range(251)) * ((4 << 20) // 251 + 2)  # covers any chunk up to 4 MiB


def env(name: str, default: str = "") -> str:
    """Read ``LIBERTEM_FAKE_<name>`` fresh each time, so behaviour follows the current env."""
    return os.environ.get(ENV_PREFIX + name, default)


def env_float(name: str, default: float) -> float:
    value = env(name)
    return float(value) if value else default


def append_line(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


# --- command line: same options and errors as the click CLI of the real one -------------------
def usage_error(message: str) -> NoReturn:
    """Print a click-style usage error and exit 2, as ``click.UsageError`` does."""
    sys.stderr.write(
        "Usage: libertem-server [OPTIONS]\nTry 'libertem-server --help' for help.\n\n"
        f"Error: {message}\n"
    )
    sys.exit(2)


class ClickLikeParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        usage_error(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    # add_help=False: like the real CLI, -h is --host and only --help prints help.
    p = ClickLikeParser(prog="libertem-server", add_help=False, allow_abbrev=False)
    p.add_argument("--help", action="help", help="show this message and exit")
    p.add_argument("-h", "--host", default="localhost")
    p.add_argument("-p", "--port", type=int, default=None, help="[default: 9000]")
    p.add_argument("-d", "--local-directory", default="dask-worker-space")
    p.add_argument("-b", "--browser", dest="browser", action="store_true", default=True)
    p.add_argument("-n", "--no-browser", dest="browser", action="store_false")
    p.add_argument("-c", "--cpus", type=int, default=None)
    p.add_argument("-g", "--gpus", type=int, default=None)
    p.add_argument("-o", "--open-ds", default=None)
    p.add_argument("-l", "--log-level", default="INFO")
    p.add_argument("-t", "--token-path", default=None)
    p.add_argument("--preload", action="append", default=[])
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--snooze-timeout", type=float, default=None)
    return p.parse_args(argv)


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.exists(path):
        usage_error(f"Invalid value for '-t' / '--token-path': Path '{path}' does not exist.")
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        usage_error(f"{path} is empty! Refusing to start with insecure configuration.")
    return token


# --- shared state and misbehaviour -----------------------------------------------------------
@dataclass
class FakeState:
    args: argparse.Namespace
    token: str | None
    local_directory: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    websockets: set[EventsHandler] = field(default_factory=set)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    last_ws_close: list[Any] | None = None
    aborted: dict[str, int] = field(default_factory=lambda: {"download": 0, "upload": 0})

    def token_ok(self, request: tornado.httputil.HTTPServerRequest) -> bool:
        """Same rule as the real middleware: a non-empty ``?token=`` wins over ``X-Api-Key``."""
        if self.token is None:
            return True
        given = request.query_arguments.get("token", [b""])[0].decode("utf-8", "replace")
        if not given:
            given = request.headers.get("X-Api-Key", "")
        digest = hashlib.sha256
        return hmac.compare_digest(
            digest(given.encode()).digest(), digest(self.token.encode()).digest()
        )


class SimulatedCrash(RuntimeError):
    """Raised (and printed as a traceback) by the crash modes."""


def crash(code: int, reason: str) -> NoReturn:
    """Die like a broken server: a few log lines, a traceback, then an abrupt exit.

    ``os._exit`` skips all cleanup on purpose: workers stay behind and sockets just drop."""
    log.info("creating local dask cluster")
    log.warning("could not initialize compute resources, giving up")
    try:
        raise SimulatedCrash(f"{reason}: simulated libertem-server failure (exit code {code})")
    except SimulatedCrash:
        traceback.print_exc()
    sys.stderr.flush()
    os._exit(code)


def check_startup_crash() -> None:
    """Crash modes that act before binding: CRASH, CRASH_MARKER and CRASH_COUNT_FILE."""
    code = int(env("CRASH_CODE") or 1)
    if env("CRASH"):
        crash(int(env("CRASH")), "LIBERTEM_FAKE_CRASH")
    marker = env("CRASH_MARKER")
    if marker and os.path.exists(marker):
        crash(code, f"LIBERTEM_FAKE_CRASH_MARKER {marker} exists")
    counter = env("CRASH_COUNT_FILE")
    if counter and os.path.exists(counter):
        with open(counter, "r+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # two starts at once must not both use one crash
            remaining = int(f.read().strip() or 0)
            if remaining > 0:
                f.seek(0)
                f.truncate()
                f.write(f"{remaining - 1}\n")
                f.flush()
        if remaining > 0:
            crash(code, f"LIBERTEM_FAKE_CRASH_COUNT_FILE had {remaining} crashing starts left")


def spawn_workers(state: FakeState, count: int) -> None:
    """Stand-ins for dask workers, in our process group. Unlike real workers they do NOT exit
    when we die, so tests can prove the proxy kills the whole group. Their output goes to
    /dev/null so an orphan never holds the proxy's stderr pipe open."""
    for _ in range(count):
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(3600)", WORKER_MARKER],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        state.workers.append(proc)
        if env("WORKER_PIDFILE"):
            append_line(env("WORKER_PIDFILE"), str(proc.pid))
    if count:
        log.info("started %d fake workers: %s", count, [w.pid for w in state.workers])


def spawn_pipe_holder() -> None:
    """``LIBERTEM_FAKE_PIPE_HOLDER=1``: a child that inherits our stdout/stderr and outlives us,
    like the process a site's wrapper script starts (or a daemon it forgets), so our exit is
    NOT followed by end-of-file on the proxy's pipe. It stays in our process group (stopping the
    group ends it); ``=session`` puts it in a new session instead, out of the group's reach.
    Its pid goes to ``LIBERTEM_FAKE_WORKER_PIDFILE``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(3600)", PIPE_HOLDER_MARKER],
        stdin=subprocess.DEVNULL,
        start_new_session=env("PIPE_HOLDER") == "session",
    )
    if env("WORKER_PIDFILE"):
        append_line(env("WORKER_PIDFILE"), str(proc.pid))
    log.info("started a child that holds our stdout/stderr: pid %d", proc.pid)


def stop_workers(state: FakeState) -> None:
    """Graceful exits tear the cluster down, like the real server's executor shutdown."""
    for w in state.workers:
        w.terminate()
    for w in state.workers:
        try:
            w.wait(timeout=2)
        except subprocess.TimeoutExpired:
            w.kill()


# --- HTTP handlers -----------------------------------------------------------------------------
class TokenMixin:
    """Token check on every request, websocket handshake and unknown path included."""

    state: FakeState
    request: tornado.httputil.HTTPServerRequest

    def initialize(self, state: FakeState) -> None:
        self.state = state

    def prepare(self) -> None:
        if not self.state.token_ok(self.request):
            # tornado's default error page: the 69-byte body the real server sends
            raise tornado.web.HTTPError(403)


class BaseHandler(TokenMixin, tornado.web.RequestHandler):
    pass


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        raise tornado.web.HTTPError(404)


class IndexHandler(BaseHandler):
    def get(self) -> None:  # no head(): HEAD / is 405, as on the real server
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(INDEX_HTML)


class AssetHandler(BaseHandler):
    def get(self, name: str) -> None:
        if name not in ASSETS:
            raise tornado.web.HTTPError(404)
        body, content_type = ASSETS[name]
        self.set_header("Content-Type", content_type)
        self.finish(body)  # tornado adds the ETag and answers If-None-Match with 304


class ConfigHandler(BaseHandler):
    def get(self) -> None:
        self.finish(
            {
                "status": "ok",
                "messageType": "CONFIG",
                "config": {
                    "version": "0.16.0+fake",
                    "revision": "fake",
                    "localCores": os.cpu_count() or 1,
                    "cwd": os.getcwd(),
                    "separator": os.sep,
                    "resultFileFormats": {},
                    "devices": {"cpus": list(range(os.cpu_count() or 1)), "cudas": []},
                },
            }
        )


class ConnectionHandler(BaseHandler):
    def get(self) -> None:
        self.finish({"status": "disconnected", "connection": {}})

    def put(self) -> None:
        try:
            payload = json.loads(self.request.body or b"null")
        except ValueError as e:
            raise tornado.web.HTTPError(400, "invalid JSON") from e
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(payload))  # echo exactly what was sent


class ShutdownHandler(BaseHandler):
    async def delete(self) -> None:
        await self.finish({"status": "ok", "messageType": "SERVER_SHUTDOWN"})
        log.warning("Exiting...")
        for ws in list(self.state.websockets):
            ws.drop()  # the real server's sockets just vanish: no close frame
        loop = asyncio.get_running_loop()
        loop.call_later(env_float("SHUTDOWN_DELAY", 0.2), self.state.stop.set)


class HeadersHandler(BaseHandler):
    def get(self) -> None:
        """What arrived here. Header names as tornado normalises them (``X-Api-Key``); repeated
        headers joined with ``, ``. Headers are under ``headers`` and, for convenience, also at
        the top level; ``header_list`` keeps order and repeats."""
        r = self.request
        pairs = list(r.headers.get_all())
        headers = {name: ", ".join(r.headers.get_list(name)) for name, _ in pairs}
        self.finish(
            {
                **headers,
                "headers": headers,
                "header_list": pairs,
                "path": r.path,
                "uri": r.uri,
                "query": r.query,
                "method": r.method,
                "host": r.host,
                "remote_ip": r.remote_ip,
            }
        )

    # what arrived with a body, too (the body itself is ignored)
    post = put = patch = get


@tornado.web.stream_request_body
class EchoHandler(BaseHandler):
    """Sends the request body back (any method). The body is spooled to a temp file while it
    arrives, so GiB uploads never sit in memory and the client is never asked to read while it
    is still sending. ``?summary=1`` answers with its length and sha256 instead."""

    def prepare(self) -> None:
        super().prepare()
        self.request.connection.set_max_body_size(64 * GiB)  # type: ignore[union-attr]
        self.spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        self.sha = hashlib.sha256()
        self.length = 0

    def data_received(self, chunk: bytes) -> None:
        self.spool.write(chunk)
        self.sha.update(chunk)
        self.length += len(chunk)

    async def respond(self, *args: Any) -> None:
        self.set_header("X-Fake-Body-Length", str(self.length))
        if self.get_query_argument("summary", "") == "1":
            self.finish(
                {
                    "length": self.length,
                    "sha256": self.sha.hexdigest(),
                    "method": self.request.method,
                }
            )
            return
        ctype = self.request.headers.get("Content-Type", "application/octet-stream")
        self.set_header("Content-Type", ctype)
        self.set_header("Content-Length", str(self.length))
        self.spool.seek(0)
        try:
            while chunk := self.spool.read(CHUNK):
                self.write(chunk)
                await self.flush()
        except tornado.iostream.StreamClosedError:
            return
        self.finish()

    get = post = put = patch = delete = options = respond

    def head(self) -> None:
        self.set_header("X-Fake-Body-Length", str(self.length))

    def on_finish(self) -> None:
        self.spool.close()

    def on_connection_close(self) -> None:
        # the client (the proxy) went away before the body was complete
        self.state.aborted["upload"] += 1
        self.spool.close()
        super().on_connection_close()


class DownloadHandler(BaseHandler):
    async def get(self) -> None:
        size = int(self.get_query_argument("size", "0"))
        chunk = max(1, int(self.get_query_argument("chunk", str(CHUNK))))
        pause = float(self.get_query_argument("pause", "0"))  # seconds after each chunk
        self.set_header("Content-Type", "application/octet-stream")
        if self.get_query_argument("chunked", "0") != "1":  # else tornado frames it chunked
            self.set_header("Content-Length", str(size))
        if name := self.get_query_argument("filename", ""):
            self.set_header("Content-Disposition", f'attachment; filename="{name}"')
        sent = 0
        try:
            while sent < size:
                n = min(chunk, size - sent)
                self.write(pattern_bytes(sent, n))
                sent += n
                await self.flush()  # never hold more than one chunk
                if pause:
                    await asyncio.sleep(pause)
        except tornado.iostream.StreamClosedError:
            self.state.aborted["download"] += 1
            return

    async def head(self) -> None:
        # tornado sends no body for HEAD; the loop above only sets the headers here
        await self.get()


class TextHandler(BaseHandler):
    """``/_fake/text?size=N&type=T&chunks=K&note=X``: a compressible text body (like the GUI's
    JS bundle), written in K flushed chunks, with Content-Length and an ETag. ``note`` starts
    the body but is not part of the ETag (an ETag is only unique within one URL)."""

    async def get(self) -> None:
        size = int(self.get_query_argument("size", "100000"))
        chunks = max(1, int(self.get_query_argument("chunks", "1")))
        line = b"function liberTEM(frame) { return frame * 2; } // padding text\n"
        note = self.get_query_argument("note", "").encode()
        body = (note + line * (size // len(line) + 1))[:size]
        self.set_header("Content-Type", self.get_query_argument("type", "application/javascript"))
        self.set_header("Content-Length", str(size))
        self.set_header("ETag", f'"fake-text-{size}"')
        step = -(-size // chunks)
        for i in range(0, size, step):
            self.write(body[i : i + step])
            await self.flush()


class SSEHandler(BaseHandler):
    async def get(self) -> None:
        count = int(self.get_query_argument("count", "5"))
        interval = float(self.get_query_argument("interval", "0.1"))
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        try:
            for i in range(count):
                if i:
                    await asyncio.sleep(interval)
                data = json.dumps({"n": i, "time": time.time()})
                self.write(f"id: {i}\nevent: tick\ndata: {data}\n\n")
                await self.flush()
        except tornado.iostream.StreamClosedError:
            return


class RedirectHandler(BaseHandler):
    def get(self) -> None:
        # The real server never redirects or sets cookies; this lets tests check that the
        # proxy rewrites or passes both.
        self.set_header("Set-Cookie", "x=1; Path=/")
        self.redirect(f"http://127.0.0.1:{self.state.port}/api/config/")


class StatusHandler(BaseHandler):
    def any_method(self, code_str: str) -> None:
        code = int(code_str)
        self.set_status(code, None if code in http.client.responses else "Fake Status")
        if code in (204, 304):
            self.finish()
        else:
            self.finish({"status": code})

    get = post = put = patch = delete = any_method


_HELD: list[object] = []


class NotModifiedHandler(BaseHandler):
    """``/_fake/not-modified?length=N``: a 304 that carries the full representation's
    Content-Length (allowed by RFC 9110 15.4.5, refused by tornado's own writer), so it is
    written raw. No body follows; a proxy that waits for N bytes hangs."""

    async def get(self) -> None:
        length = int(self.get_query_argument("length", "10000000"))
        stream = self.request.connection.detach()  # type: ignore[attr-defined]
        await stream.write(
            f"HTTP/1.1 304 Not Modified\r\nContent-Length: {length}\r\n"
            'ETag: "fake"\r\nConnection: close\r\n\r\n'.encode()
        )
        # the socket stays open a while (a server's lingering close): a client that wrongly
        # waits for the body waits, instead of seeing an early end-of-file
        _HELD.append(stream)
        self._finished = True  # the connection is ours now: tornado must not write a response


class SlowHandler(BaseHandler):
    async def get(self) -> None:
        seconds = float(self.get_query_argument("seconds", "1"))
        await asyncio.sleep(seconds)
        self.finish({"slept": seconds})


class PidHandler(BaseHandler):
    def get(self) -> None:
        self.finish(
            {
                "pid": os.getpid(),
                "port": self.state.port,
                "argv": sys.argv,
                "cwd": os.getcwd(),
                "local_directory": self.state.local_directory,
                "workers": [w.pid for w in self.state.workers],
                "last_ws_close": self.state.last_ws_close,
                "aborted": self.state.aborted,
                "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)},
            }
        )


class EventsHandler(TokenMixin, tornado.websocket.WebSocketHandler):
    """``/api/events/``: echo plus ``!commands``. tornado's default check_origin is kept on
    purpose (no Origin, or Origin host:port == Host), because the real server does the same."""

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        wanted = env("WS_SUBPROTOCOL")
        return wanted if wanted and wanted in subprotocols else None

    async def open(self, *args: str, **kwargs: str) -> None:
        self.state.websockets.add(self)
        if env("INITIAL_STATE") == "1":
            await self.send(
                json.dumps(
                    {
                        "status": "ok",
                        "messageType": "INITIAL_STATE",
                        "datasets": [],
                        "jobs": [],
                        "analyses": [],
                        "compoundAnalyses": [],
                    }
                )
            )

    async def send(self, message: str | bytes) -> None:
        try:
            await self.write_message(message, binary=isinstance(message, bytes))
        except (tornado.websocket.WebSocketClosedError, tornado.iostream.StreamClosedError):
            pass

    async def on_message(self, message: str | bytes) -> None:
        """tornado waits for this coroutine before it reads the next message (backpressure)."""
        if isinstance(message, str) and message.startswith("!"):
            cmd, *rest = message.split(" ", 2)
            if cmd == "!close":
                code = int(rest[0]) if rest else 1000
                self.close(code, rest[1] if len(rest) > 1 else "")
                return
            if cmd == "!binary":
                await self.send(pattern_bytes(0, int(rest[0])))
                return
            if cmd == "!text":
                await self.send("x" * int(rest[0]))
                return
            if cmd == "!burst":
                count, size = int(rest[0]), int(rest[1])
                for i in range(count):  # all messages joined == pattern_bytes(0, count * size)
                    await self.send(pattern_bytes(i * size, size))
                return
            if cmd == "!drop":
                self.drop()
                return
        await self.send(message)  # anything else: echo, text as text and binary as binary

    def drop(self) -> None:
        """Tear the TCP connection down without a close frame."""
        if self.ws_connection is not None and self.ws_connection.stream is not None:
            self.ws_connection.stream.close()

    def on_close(self) -> None:
        self.state.websockets.discard(self)
        # what the last client said when closing, for tests of close-code relaying
        self.state.last_ws_close = [self.close_code, self.close_reason]


def make_app(state: FakeState) -> tornado.web.Application:
    kw = {"state": state}
    return tornado.web.Application(
        [
            (r"/", IndexHandler, kw),
            (r"/assets/(.*)", AssetHandler, kw),
            (r"/api/config/", ConfigHandler, kw),
            (r"/api/config/connection/", ConnectionHandler, kw),
            (r"/api/events/", EventsHandler, kw),
            (r"/api/shutdown/", ShutdownHandler, kw),
            (r"/_fake/headers", HeadersHandler, kw),
            (r"/_fake/echo", EchoHandler, kw),
            (r"/_fake/text", TextHandler, kw),
            (r"/_fake/download", DownloadHandler, kw),
            (r"/_fake/sse", SSEHandler, kw),
            (r"/_fake/redirect", RedirectHandler, kw),
            (r"/_fake/status/([0-9]+)", StatusHandler, kw),
            (r"/_fake/not-modified", NotModifiedHandler, kw),
            (r"/_fake/slow", SlowHandler, kw),
            (r"/_fake/pid", PidHandler, kw),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=kw,
        websocket_max_message_size=GiB,  # big-message tests should measure the proxy, not us
    )


# --- main --------------------------------------------------------------------------------------
async def run(state: FakeState) -> int:
    args = state.args
    loop = asyncio.get_running_loop()
    if env("IGNORE_SIGINT") != "1":
        loop.add_signal_handler(signal.SIGINT, state.stop.set)  # quick graceful exit 0
    log.info("starting fake libertem-server (pid %d)", os.getpid())
    if env("PIPE_HOLDER"):
        spawn_pipe_holder()

    delay = env_float("START_DELAY", 0.0)
    deadline = loop.time() + delay
    while (remaining := deadline - loop.time()) > 0 and not state.stop.is_set():
        log.info("still starting up... (%.1f s of LIBERTEM_FAKE_START_DELAY left)", remaining)
        try:
            await asyncio.wait_for(state.stop.wait(), timeout=min(0.5, remaining))
        except asyncio.TimeoutError:
            pass
    if state.stop.is_set():
        return 0
    check_startup_crash()
    if env("NEVER_LISTEN") == "1":
        log.info("LIBERTEM_FAKE_NEVER_LISTEN=1: not binding any port")
        await state.stop.wait()
        return 0

    port = args.port if args.port is not None else 9000
    try:
        sockets = tornado.netutil.bind_sockets(port, args.host)
    except OSError:
        if args.port is not None:
            raise  # like the real one: -p N busy -> traceback, exit 1
        sockets = tornado.netutil.bind_sockets(0, args.host)
        log.info(
            f"port {port} already in use, using random open port {sockets[0].getsockname()[1]}"
        )
        port = sockets[0].getsockname()[1]
    state.port = sockets[0].getsockname()[1]  # the real port, even for -p 0

    hung: list[asyncio.StreamWriter] = []
    if env("HANG") == "1":

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            hung.append(writer)  # accept TCP, read everything, never answer
            while await reader.read(CHUNK):
                pass

        servers = [await asyncio.start_server(swallow, sock=s) for s in sockets]
    else:
        # A websocket frame must fit the stream's read buffer (tornado default 100 MiB); keep
        # tornado's default 100 MiB cap for ordinary request bodies.
        http_server = tornado.httpserver.HTTPServer(
            make_app(state), max_buffer_size=2 * GiB, max_body_size=100 * 1024 * 1024
        )
        http_server.add_sockets(sockets)

    try:
        is_ipv6 = isinstance(ipaddress.ip_address(args.host), ipaddress.IPv6Address)
    except ValueError:
        is_ipv6 = False
    url = f"http://[{args.host}]:{port}" if is_ipv6 else f"http://{args.host}:{port}"
    if args.open_ds is not None:
        url = f"{url}/#action=open&path={args.open_ds}"
    log.info(f"\n\n    LiberTEM listening on {url}\n")  # the real server's ready line
    if args.browser:
        log.info("would open a browser at %s (the fake never does)", url)
    spawn_workers(state, int(env("WORKERS") or 0))
    if env("CRASH_AFTER"):
        loop.call_later(
            float(env("CRASH_AFTER")),
            crash,
            int(env("CRASH_CODE") or 1),
            f"LIBERTEM_FAKE_CRASH_AFTER={env('CRASH_AFTER')}",
        )

    await state.stop.wait()
    log.warning("Exiting...")
    if env("HANG") == "1":
        for s in servers:
            s.close()
        for w in hung:
            w.close()
    else:
        http_server.stop()
    for ws in list(state.websockets):
        ws.drop()
    stop_workers(state)
    return 0


def main(argv: list[str] | None = None) -> int:
    if env("PIDFILE"):
        append_line(env("PIDFILE"), str(os.getpid()))  # first thing: every start is recorded
    args = parse_args(sys.argv[1:] if argv is None else argv)
    token = read_token(args.token_path)
    if token is None and args.host not in ("localhost", "127.0.0.1", "::1") and not args.insecure:
        port = args.port if args.port is not None else 9000
        usage_error(
            f"listening on non-localhost {args.host}:{port} currently requires token "
            "authentication or --insecure"
        )
    level = getattr(logging, args.log_level.upper(), None)
    if not isinstance(level, int):
        usage_error(
            f"Invalid log level: {args.log_level}.\nAllowed values are 'critical', "
            "'error', 'warning', 'info', 'debug'."
        )
    logging.basicConfig(  # stderr only, in the real server's format; stdout stays empty
        stream=sys.stderr,
        level=level,
        format="[%(asctime)s] %(levelname)s [%(name)s.%(funcName)s:%(lineno)d] %(message)s",
    )
    # SIGTERM keeps its default action (death by -15) unless told otherwise.
    signal.signal(
        signal.SIGTERM, signal.SIG_IGN if env("IGNORE_SIGTERM") == "1" else signal.SIG_DFL
    )
    if env("IGNORE_SIGINT") == "1":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    local_directory = os.path.abspath(args.local_directory)
    os.makedirs(local_directory, exist_ok=True)
    state = FakeState(args=args, token=token, local_directory=local_directory)
    return asyncio.run(run(state))


if __name__ == "__main__":
    sys.exit(main())
