#!/usr/bin/env python3
"""A lean backend like libertem-server, for measuring the proxy's own cost (issue 17).

``bench/backend.py`` (the test suite's fake) generates every download byte with a pattern
function, writes 256 KiB pieces and logs each request: the backend then spends so much CPU per
byte that the proxy's overhead disappears in the ratio. This one does what libertem-server
(tornado 6, LiberTEM 0.16.0) does on its hot paths and nothing more:

- the same command line (``--port``, ``--token-path``, ...) and ready line, and the same token
  rule (``X-Api-Key`` or a non-empty ``?token=``), so the proxy starts it like libertem-server;
- downloads are written the way a tornado handler streams a file: ``write(64 KiB)`` then
  ``await flush()``, from one pre-made buffer (no per-byte work), with a ``Content-Length`` or
  chunked;
- uploads are read by a ``@stream_request_body`` handler that only counts the bytes;
- the websocket at ``/api/events/`` is tornado's ``WebSocketHandler`` with its default limits
  (like LiberTEM's): binary and text messages are echoed, ``push N`` answers with N bytes of
  binary, ``ack`` answers every binary message with its length as text (one direction alone);
- no access log (libertem-server logs through Python logging at INFO, but its log goes to a
  pipe read by the proxy; here neither side pays for it).

Routes: ``GET /``, ``GET /small`` and ``GET /api/config/`` (small JSON),
``GET /dl?size=N&chunked=0|1``, ``POST /up`` (answers the byte count), websocket ``/api/events/``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import signal
import sys
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

CHUNK = 64 * 1024  # what tornado's StaticFileHandler writes per flush
BLOCK = bytes(range(256)) * (CHUNK // 256)
MAX_PUSH = 64 * 1024 * 1024
_PUSH_CACHE: dict[int, bytes] = {}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="libertem-server", add_help=False)
    p.add_argument("--help", action="help")
    p.add_argument("-h", "--host", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=9000)
    p.add_argument("-t", "--token-path", default=None)
    p.add_argument("-n", "--no-browser", action="store_true")
    p.add_argument("-d", "--local-directory", default=None)
    p.add_argument("-c", "--cpus", default=None)
    p.add_argument("-g", "--gpus", default=None)
    p.add_argument("-l", "--log-level", default="INFO")
    p.add_argument("--snooze-timeout", default=None)
    p.add_argument("--preload", action="append", default=[])
    args, _ = p.parse_known_args(argv)
    return args


class Token:
    value: str | None = None

    @classmethod
    def ok(cls, request: tornado.httputil.HTTPServerRequest) -> bool:
        if cls.value is None:
            return True
        given = request.query_arguments.get("token", [b""])[0].decode("utf-8", "replace")
        given = given or request.headers.get("X-Api-Key", "")
        return hmac.compare_digest(given.encode(), cls.value.encode())


class Base(tornado.web.RequestHandler):
    def prepare(self) -> None:
        if not Token.ok(self.request):
            raise tornado.web.HTTPError(403)


class ConfigHandler(Base):
    def get(self) -> None:
        self.finish({"status": "ok", "messageType": "CONFIG", "config": {"version": "bench"}})


class DownloadHandler(Base):
    async def get(self) -> None:
        size = int(self.get_argument("size"))
        chunked = self.get_argument("chunked", "0") == "1"
        self.set_header("Content-Type", "application/octet-stream")
        if not chunked:
            self.set_header("Content-Length", str(size))
        sent = 0
        while sent < size:
            n = min(CHUNK, size - sent)
            self.write(BLOCK if n == CHUNK else BLOCK[:n])
            await self.flush()
            sent += n
        self.finish()


@tornado.web.stream_request_body
class UploadHandler(Base):
    def initialize(self) -> None:
        self.received = 0

    def data_received(self, chunk: bytes) -> None:
        self.received += len(chunk)

    def post(self) -> None:
        self.finish({"received": self.received})


class EventsHandler(tornado.websocket.WebSocketHandler):
    def prepare(self) -> None:
        if not Token.ok(self.request):
            raise tornado.web.HTTPError(403)

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.ack = False

    async def on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            if self.ack:
                await self.write_message(str(len(message)))
            else:
                await self.write_message(message, binary=True)
            return
        if message.startswith("push "):
            n = min(int(message[5:]), MAX_PUSH)
            body = _PUSH_CACHE.get(n)
            if body is None:
                body = _PUSH_CACHE[n] = (BLOCK * (n // CHUNK + 1))[:n]
            await self.write_message(body, binary=True)
        elif message == "ack":
            self.ack = True
            await self.write_message("ack")
        else:
            await self.write_message(message)


def make_app() -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/", ConfigHandler),
            (r"/api/config/", ConfigHandler),
            (r"/small", ConfigHandler),  # the same answer where the proxy rewrites nothing
            (r"/dl", DownloadHandler),
            (r"/up", UploadHandler),
            (r"/api/events/", EventsHandler),
        ],
        websocket_max_message_size=256 * 1024 * 1024,
    )


async def main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sockets = tornado.netutil.bind_sockets(args.port, args.host)
    server = tornado.httpserver.HTTPServer(make_app(), max_body_size=1 << 31)
    server.add_sockets(sockets)
    print(f"\n\n    LiberTEM listening on http://{args.host}:{args.port}\n", flush=True)
    await stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    cli = parse_args(sys.argv[1:])
    if cli.token_path:
        with open(cli.token_path, encoding="utf-8") as f:
            Token.value = f.read().strip()
    sys.exit(asyncio.run(main(cli)))
