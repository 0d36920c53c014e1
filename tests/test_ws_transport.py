"""How the websocket bridge takes connections over from tornado (``ws_transport.take_over``)."""

from __future__ import annotations

import socket

from tornado.iostream import IOStream
from tornado.netutil import bind_sockets

from libertem_jupyter_proxy.ws_transport import take_over


async def test_taken_over_backend_socket_sends_without_delay():
    """The backend connection is made as ``socket(AF_INET, SOCK_STREAM)`` (proto 0), on which
    asyncio does not set ``TCP_NODELAY``: Nagle then held the tail of each big browser message
    until the backend's delayed ACK (40 ms a message). The bridge must set it itself."""
    listener = bind_sockets(0, "127.0.0.1")[0]
    stream = IOStream(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    await stream.connect(("127.0.0.1", listener.getsockname()[1]))
    accepted, _ = listener.accept()
    try:
        sock, early = take_over(stream)
        try:
            assert early == b""
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            sock.close()
    finally:
        accepted.close()
        listener.close()


async def test_bytes_tornado_had_read_are_handed_over():
    listener = bind_sockets(0, "127.0.0.1")[0]
    stream = IOStream(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    await stream.connect(("127.0.0.1", listener.getsockname()[1]))
    accepted, _ = listener.accept()
    try:
        accepted.sendall(b"HTTP/1.1 101 x\r\n\r\nframe bytes")
        await stream.read_until(b"\r\n\r\n")
        sock, early = take_over(stream)
        sock.settimeout(5)
        try:  # what tornado had not read yet is still in the socket: nothing lost either way
            rest = b"" if len(early) == 11 else sock.recv(100)
        finally:
            sock.close()
        assert early + rest == b"frame bytes"
    finally:
        accepted.close()
        listener.close()
