#!/usr/bin/env python3
"""A backend on raw asyncio whose every byte on the wire is chosen by the test.

Started by the proxy in place of ``libertem-server`` (same command line: ``--port``,
``--token-path``, the rest ignored), it answers the readiness probe ``GET /`` and then runs a
*script* that each request carries in its ``X-Raw-Script`` header (base64 of JSON). The header
passes through the proxy unchanged, so the same script runs whether the test talks to this
backend directly or through Jupyter: that is what makes the transparency test differential.

A script is a list of steps, run in order on the connection:

- ``["read_body"]`` read the whole request body (Content-Length or chunked), as fast as it comes;
- ``["read_body_slow", piece, pause]`` the same, ``piece`` bytes at a time with ``pause`` seconds
  between reads (a slow backend, to exercise backpressure);
- ``["send", b64]`` write these bytes (status line, headers, body framing: all the test's);
- ``["body", seed, size, piece, pause, framing, text, cut]`` write ``size`` deterministic
  pseudo-random bytes (:func:`pattern`) in pieces, ``framing`` "length" (raw) or "chunked"
  (chunk framing); with ``cut``, stop after that many bytes and close the connection;
- ``["sleep", seconds]``; ``["close"]`` close the connection now (also: after the script if the
  body was not read, since the next request could not be found in the stream); ``["reset"]``
  close it with a reset (RST) instead;
- ``["linger", seconds]`` end the answer politely: half-close, read and discard what the client
  still sends (at most ``seconds`` between reads), then close.

What the backend received is recorded under the script's ``id`` (method, target, raw header
lines, body length and sha256, framing) and served as JSON by ``GET /_record/<id>``. Every
request must carry the token as ``X-Api-Key`` (checked like libertem-server does; 403 if not).
Only the standard library is used: this file runs in a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import random
import socket
import struct
import sys
from typing import Any

RECORDS: dict[str, dict[str, Any]] = {}
MAX_HEAD = 256 * 1024


def pattern(seed: int, size: int, text: bool = False) -> bytes:
    """``size`` pseudo-random bytes, the same for the same seed in the test and here
    (``text``: hex digits, so that a text type is honest)."""
    data = random.Random(seed).randbytes(size if not text else (size + 1) // 2)
    return data.hex().encode()[:size] if text else data


class Request:
    def __init__(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.method, self.target, self.version = lines[0].decode("latin-1").split(" ", 2)
        self.headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(b":")
            self.headers.append((name.strip(), value.strip()))
        self.body_read = False

    def get(self, name: str) -> bytes | None:
        for n, v in self.headers:
            if n.decode("latin-1").lower() == name:
                return v
        return None


async def read_body(
    reader: asyncio.StreamReader, req: Request, piece: int = 1 << 20, pause: float = 0.0
) -> tuple[str, int, str]:
    """Read the request body: (framing, length, sha256)."""
    digest = hashlib.sha256()
    total = 0
    te = (req.get("transfer-encoding") or b"").lower()
    if b"chunked" in te:
        framing = "chunked"
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                break
            left = size
            while left:
                data = await reader.readexactly(min(left, piece))
                digest.update(data)
                total += len(data)
                left -= len(data)
                if pause:
                    await asyncio.sleep(pause)
            await reader.readexactly(2)
    else:
        length = int(req.get("content-length") or b"0")
        framing = "length" if req.get("content-length") is not None else "none"
        left = length
        while left:
            data = await reader.readexactly(min(left, piece))
            digest.update(data)
            total += len(data)
            left -= len(data)
            if pause:
                await asyncio.sleep(pause)
    req.body_read = True
    return framing, total, digest.hexdigest()


async def send_body(
    writer: asyncio.StreamWriter,
    seed: int,
    size: int,
    piece: int,
    pause: float,
    framing: str,
    text: bool = False,
    cut: int | None = None,
) -> None:
    """``cut``: stop after this many bytes and close (a backend that dies mid-body)."""
    data = pattern(seed, size, text)
    if cut is not None:
        data = data[:cut]
    for i in range(0, len(data), max(piece, 1)):
        part = data[i : i + piece]
        writer.write(b"%x\r\n%s\r\n" % (len(part), part) if framing == "chunked" else part)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    if cut is not None:
        raise ConnectionAbortedError("cut on purpose")
    if framing == "chunked":
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def simple(status: str, body: bytes, ctype: bytes = b"text/plain") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(),
        ctype,
        len(body),
        body,
    )


class Backend:
    def __init__(self, token: bytes) -> None:
        self.token = token

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self.one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False if the connection must end."""
        head = await reader.readuntil(b"\r\n\r\n")
        req = Request(head[:-4])
        if req.get("x-api-key") != self.token:
            writer.write(simple("403 Forbidden", b"bad token"))
            await writer.drain()
            return False
        if req.target.startswith("/_record/"):
            rec = RECORDS.get(req.target[len("/_record/") :], {})
            writer.write(simple("200 OK", json.dumps(rec).encode(), b"application/json"))
            await writer.drain()
            return True
        script_b64 = req.get("x-raw-script")
        if script_b64 is None:  # the readiness probe, or anything else: a plain answer
            if req.get("content-length") or req.get("transfer-encoding"):
                await read_body(reader, req)
            writer.write(simple("200 OK", b"raw backend"))
            await writer.drain()
            return True
        script = json.loads(base64.b64decode(script_b64))
        record: dict[str, Any] = {
            "method": req.method,
            "target": req.target,
            "version": req.version,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in req.headers],
        }
        RECORDS[str(script.get("id", ""))] = record
        for step in script["steps"]:
            op = step[0]
            if op == "read_body":
                record["framing"], record["body_len"], record["body_sha256"] = await read_body(
                    reader, req
                )
            elif op == "read_body_slow":
                record["framing"], record["body_len"], record["body_sha256"] = await read_body(
                    reader, req, int(step[1]), float(step[2])
                )
            elif op == "send":
                writer.write(base64.b64decode(step[1]))
                await writer.drain()
            elif op == "body":
                await send_body(writer, *step[1:])
            elif op == "sleep":
                await asyncio.sleep(float(step[1]))
            elif op == "close":
                return False
            elif op == "reset":
                # an abortive close (SO_LINGER 0): the client sees a reset, not an end
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            elif op == "linger":
                # a polite early answer (RFC 9112 9.6): stop sending, read what the client
                # still sends until it closes, then close; no reset can eat the answer
                writer.write_eof()
                with contextlib.suppress(asyncio.TimeoutError):
                    while await asyncio.wait_for(reader.read(1 << 20), float(step[1])):
                        pass
                return False
        has_body = req.get("content-length") not in (None, b"0") or req.get("transfer-encoding")
        return bool(req.body_read or not has_body) and not script.get("close", False)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", "-p", type=int, required=True)
    parser.add_argument("--token-path", "-t", required=True)
    args, _ = parser.parse_known_args()
    with open(args.token_path, "rb") as f:
        token = f.read().strip()
    backend = Backend(token)
    server = await asyncio.start_server(
        backend.handle, "127.0.0.1", args.port, limit=MAX_HEAD, reuse_address=True
    )
    print(f"LiberTEM listening on http://127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
