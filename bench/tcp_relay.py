#!/usr/bin/env python3
"""The least any userspace proxy in Python can cost: a TCP relay that understands nothing.

``bench/hotpath.py`` runs it as a third target next to ``direct`` and ``ours``: bytes from each
client connection go to a new connection to the backend and back, unchanged, on asyncio's
protocols (``TCP_NODELAY`` both ways, the same as the proxy), with flow control and nothing
else: no HTTP parsing, no authentication, no headers. Whatever ratio it reaches against
``direct`` is the cost of the extra process hop itself on this machine (two more wake-ups,
receives and sends per message). A proxy that also parses and authenticates pays that and
more, unless it moves the bytes more cheaply than the relay does (``splice``, larger reads):
then it can beat this floor, and the proxy's own downloads of a known length do.

    python bench/tcp_relay.py LISTEN_PORT BACKEND_PORT     # prints "ready" once listening
    python bench/tcp_relay.py LISTEN_PORT BACKEND_PORT --threads

``--threads``: the same relay without an event loop: one thread per direction of each
connection, blocking ``recv_into`` and ``sendall`` on one buffer. Each message then costs one
wake-up of the thread that waits in ``recv`` instead of a selector round, its callbacks and
the transport's buffering. On this machine it reached 0.80 of direct for 1 KiB websocket
round trips where the event-loop relay reached 0.54 (2026-11-30): the cost of a hop in Python
depends on how it waits, not only on the hop.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading


class Half(asyncio.Protocol):
    """One side of a relayed connection; ``peer`` is the other side once it is connected."""

    def __init__(self) -> None:
        self.peer: Half | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # client bytes that came before the backend connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def main(listen: int, backend: int) -> None:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def connect(client: Half) -> None:
        try:
            _, upstream = await loop.create_connection(Half, "127.0.0.1", backend)
        except OSError:
            assert client.transport is not None
            client.transport.close()
            return
        upstream.peer, client.peer = client, upstream
        assert upstream.transport is not None
        for data in client.early:
            upstream.transport.write(data)
        client.early.clear()

    class Front(Half):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            task = loop.create_task(connect(self))
            pending.add(task)
            task.add_done_callback(pending.discard)

    server = await loop.create_server(Front, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Move bytes from ``src`` to ``dst`` until ``src`` ends, then end ``dst``'s sending side."""
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    try:
        while n := src.recv_into(buf):
            dst.sendall(view[:n])
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _relay_threads(client: socket.socket, backend: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", backend))
    except OSError:
        client.close()
        return
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def main_threads(listen: int, backend: int) -> None:
    with socket.create_server(("127.0.0.1", listen), backlog=128) as server:
        print("ready", flush=True)
        while True:
            client, _ = server.accept()
            threading.Thread(target=_relay_threads, args=(client, backend), daemon=True).start()


if __name__ == "__main__":
    if "--threads" in sys.argv[3:]:
        main_threads(int(sys.argv[1]), int(sys.argv[2]))
    else:
        asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
