"""The websocket bridge as a frame-aware byte relay: the frame scanner on its own, then raw
websocket clients through the real Jupyter (split writes, fragments, violations, limits)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import Iterable

import pytest
from tornado.websocket import WebSocketClosedError

from libertem_jupyter_proxy.ws_frames import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameScanner,
    accept_value,
    close_frame,
    frame_header,
    valid_key,
)
from libertem_jupyter_proxy.ws_proxy import HandshakeError, upgrade_request

# every websocket test runs with both relays (threads, event loop): conftest
pytestmark = pytest.mark.usefixtures("both_websocket_relays")


# ------------------------------------------------------------------ building frames
def mask(payload: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """A frame as a browser sends it: masked."""
    key = os.urandom(4)
    head = bytearray(frame_header(opcode, len(payload), fin=fin, mask=key))
    head[0] |= rsv << 4
    return bytes(head) + mask(payload, key)


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A frame as a server sends it: not masked."""
    return frame_header(opcode, len(payload), fin=fin) + payload


def relay(scanner: FrameScanner, chunks: Iterable[bytes]) -> bytes:
    """What the bridge does with the scanner: hold back what it may not forward yet and
    present it again in front of the next chunk. Returns everything forwarded."""
    out = bytearray()
    held = b""
    for chunk in chunks:
        data = held + chunk
        ready = scanner.feed(data, len(data))
        out += data[:ready]
        if scanner.error is not None:
            break
        held = data[ready:]
    return bytes(out)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def scanner(strict: bool = True, limit: int = 1 << 20) -> FrameScanner:
    return FrameScanner(max_message_size=limit, strict=strict)


# ------------------------------------------------------------------ the scanner alone
@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
def test_lengths_7_16_and_64_bit(length):
    data = client_frame(OP_BINARY, b"z" * length) + client_frame(OP_TEXT, b"next")
    s = scanner()
    assert relay(s, [data]) == data
    assert s.messages == 2 and s.error is None and s.at_frame_boundary


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_headers_split_anywhere(size):
    """Headers (with 16- and 64-bit lengths and mask keys) cut at every possible place: the
    incomplete part is held back, never half forwarded, and nothing is lost."""
    data = b"".join(
        client_frame(op, b"p" * n) for op, n in [(OP_TEXT, 5), (OP_BINARY, 200), (OP_BINARY, 70000)]
    )
    s = scanner()
    assert relay(s, pieces(data, size)) == data
    assert s.messages == 3


def test_incomplete_header_is_held_back():
    frame = client_frame(OP_BINARY, b"x" * 1000)  # 2 + 2 + 4 header bytes
    s = scanner()
    for cut in range(1, 8):
        assert s.feed(frame[:cut], cut) == 0
    assert s.feed(frame[:8], 8) == 8  # the whole header: forward it, payload follows
    assert not s.at_frame_boundary
    assert s.feed(frame[8:], 1000) == 1000
    assert s.at_frame_boundary


def test_fragmented_message_with_control_frames_in_between():
    data = (
        client_frame(OP_TEXT, b"ab", fin=False)
        + client_frame(OP_PING, b"are you there")
        + client_frame(OP_CONTINUATION, b"cd", fin=False)
        + client_frame(OP_PONG, b"")
        + client_frame(OP_CONTINUATION, b"ef")
        + client_frame(OP_BINARY, b"whole")
    )
    s = scanner()
    assert relay(s, pieces(data, 3)) == data
    assert s.error is None and s.messages == 2


def test_size_limit_counts_all_fragments_but_no_control_frames():
    limit = 100
    ok = (
        client_frame(OP_BINARY, b"a" * 60, fin=False)
        + client_frame(OP_PING, b"p" * 100)  # control frames do not count
        + client_frame(OP_CONTINUATION, b"b" * 40)
    )
    s = scanner(limit=limit)
    assert relay(s, [ok]) == ok and s.error is None
    over = client_frame(OP_BINARY, b"a" * 60, fin=False) + client_frame(OP_CONTINUATION, b"b" * 41)
    s = scanner(limit=limit)
    forwarded = relay(s, [over])
    assert s.error is not None and s.error[0] == CLOSE_TOO_BIG
    assert forwarded == over[: len(client_frame(OP_BINARY, b"a" * 60))]  # up to the culprit


def test_size_limit_is_inclusive():
    s = scanner(limit=1000)
    assert relay(s, [client_frame(OP_BINARY, b"x" * 1000)]) and s.error is None
    s = scanner(limit=1000)
    assert relay(s, [client_frame(OP_BINARY, b"x" * 1001)]) == b""
    assert s.error == (CLOSE_TOO_BIG, "message too big")
    assert s.feed(b"\x82\x00", 2) == 0  # nothing more once refused


def test_server_direction_is_unmasked_and_limited_too():
    data = server_frame(OP_TEXT, b"hello") + server_frame(OP_BINARY, b"y" * 70000)
    s = scanner(strict=False)
    assert relay(s, pieces(data, 4)) == data and s.error is None
    s = scanner(strict=False, limit=1000)
    relay(s, [server_frame(OP_BINARY, b"y" * 1001)])
    assert s.error is not None and s.error[0] == CLOSE_TOO_BIG


@pytest.mark.parametrize(
    "frame",
    [
        server_frame(OP_TEXT, b"unmasked"),
        client_frame(OP_TEXT, b"rsv1", rsv=4),  # permessage-deflate was never negotiated
        client_frame(OP_TEXT, b"rsv3", rsv=1),
        client_frame(0x3, b"reserved opcode"),
        client_frame(0xB, b"reserved control opcode"),
        client_frame(OP_PING, b"p" * 126),
        client_frame(OP_PING, b"fragmented", fin=False),
        client_frame(OP_CONTINUATION, b"continues nothing"),
        client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"new message"),
        bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big") + b"mask",
    ],
)
def test_browser_protocol_violations(frame):
    s = scanner()
    relay(s, [frame])
    assert s.error is not None and s.error[0] == CLOSE_PROTOCOL_ERROR, s.error


def test_backend_direction_is_not_policed_for_protocol_details():
    data = server_frame(OP_TEXT, b"a", fin=False) + server_frame(OP_TEXT, b"b")
    s = scanner(strict=False)
    assert relay(s, [data]) == data and s.error is None


def test_accept_value_and_key():
    # the example of RFC 6455, section 1.3
    assert accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert valid_key(base64.b64encode(os.urandom(16)).decode())
    assert not valid_key("")
    assert not valid_key(base64.b64encode(b"short").decode())
    assert not valid_key("not base64 ü")


def test_close_frames():
    plain = close_frame(1009, "too big", masked=False)
    assert plain == bytes((0x88, 9)) + (1009).to_bytes(2, "big") + b"too big"
    masked = close_frame(1009, "too big", masked=True)
    assert masked[0] == 0x88 and masked[1] == 0x80 | 9
    assert mask(masked[6:], masked[2:6]) == plain[2:]
    assert len(close_frame(1000, "x" * 500, masked=False)) == 2 + 125  # control frame limit


@pytest.mark.parametrize(
    "headers",
    [[("X-A", "a\r\nX-Api-Key: evil")], [("X-A", "a\nb")], [("Bad Name", "v")], [("X", "\x00")]],
)
def test_upgrade_request_refuses_line_breaks(headers):
    with pytest.raises(HandshakeError):
        upgrade_request("/api/events/", 9000, "a2V5", None, headers)
    with pytest.raises(HandshakeError):
        upgrade_request("/api/events/ HTTP/1.1\r\nX: y", 9000, "a2V5", None, [])


def test_upgrade_request_shape():
    raw = upgrade_request("/api/events/?a=1", 4321, "a2V5", "lt.v1", [("X-Api-Key", "t")])
    assert raw.startswith(b"GET /api/events/?a=1 HTTP/1.1\r\nHost: 127.0.0.1:4321\r\n")
    assert b"Sec-WebSocket-Key: a2V5\r\n" in raw and b"Sec-WebSocket-Protocol: lt.v1\r\n" in raw
    assert raw.endswith(b"X-Api-Key: t\r\n\r\n")


# ------------------------------------------------------------------ through the real Jupyter
class RawWebsocket:
    """A websocket client that writes frames byte for byte (to send what browsers would not)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = bytearray()  # everything the server sent, for the token check

    @classmethod
    async def connect(
        cls,
        client,
        *,
        path: str = "libertem/api/events/",
        extra: bytes = b"",
        headers: str = "",
    ) -> tuple[RawWebsocket, bytes]:
        """Open, send the upgrade (and ``extra`` right behind it, in the same write), read the
        answer's head."""
        cookie = await client.login()
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {client.base_url}{path} HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\n"
            f"Cookie: {cookie}\r\nOrigin: {client.origin}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            f"{headers}\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        ws = cls(reader, writer)
        writer.write(request + extra)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        ws.received += head
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert f"Sec-WebSocket-Accept: {accept_value(key)}\r\n".encode() in head
        return ws, head

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _read(self, n: int) -> bytes:
        data = await asyncio.wait_for(self.reader.readexactly(n), 20)
        self.received += data
        return data

    async def frame(self) -> tuple[int, bool, bytes]:
        """The next frame from the server: (opcode, fin, payload)."""
        b0, b1 = await self._read(2)
        assert not b1 & 0x80, "the server masked a frame"
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(await self._read(2), "big")
        elif length == 127:
            length = int.from_bytes(await self._read(8), "big")
        return b0 & 0x0F, bool(b0 & 0x80), await self._read(length)

    async def close_code(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            opcode, _, payload = await self.frame()
            if opcode == OP_CLOSE:
                return int.from_bytes(payload[:2], "big")

    async def at_eof(self) -> bool:
        """The server hangs up (an orderly FIN or a reset both count)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), 20)
        except ConnectionResetError:
            return True
        self.received += rest
        return True

    def close(self) -> None:
        self.writer.close()


async def _last_close(client, expected: list) -> list:
    """The close code and reason the backend received (it records them), once it has."""
    for _ in range(250):
        info = await client.json("libertem/_fake/pid")
        if info.get("last_ws_close") == expected:
            return expected
        await asyncio.sleep(0.02)
    return info.get("last_ws_close")


@pytest.mark.proxy_config(websocket_max_message_size=65536)
async def test_limit_just_under_passes_just_over_is_1009(client):
    ws = await client.websocket(max_message_size=1 << 20)
    await ws.write_message(b"u" * 65536, binary=True)
    assert await ws.read_message() == b"u" * 65536
    await ws.write_message("t" * 65536)
    assert await ws.read_message() == "t" * 65536
    await ws.write_message(b"o" * 65537, binary=True)
    assert await ws.read_message() is None
    assert ws.close_code == CLOSE_TOO_BIG
    assert "65536" in (ws.close_reason or "")
    # the backend was told too
    assert await _last_close(client, [1009, ws.close_reason]) == [1009, ws.close_reason]


@pytest.mark.proxy_config(websocket_max_message_size=65536)
async def test_limit_applies_to_the_backends_messages(client):
    ws = await client.websocket(max_message_size=1 << 20)
    await ws.write_message("!binary 65536")
    assert len(await ws.read_message()) == 65536
    await ws.write_message("!binary 65537")
    assert await ws.read_message() is None
    assert ws.close_code == CLOSE_TOO_BIG
    assert (await _last_close(client, [1009, ws.close_reason]))[0] == 1009


@pytest.mark.proxy_config(websocket_max_message_size=1000)
async def test_limit_counts_fragments(client):
    ws, _ = await RawWebsocket.connect(client)
    await ws.send(client_frame(OP_BINARY, b"a" * 600, fin=False))
    await ws.send(client_frame(OP_CONTINUATION, b"b" * 401))
    assert await ws.close_code() == CLOSE_TOO_BIG
    assert await ws.at_eof()
    ws.close()


async def test_fragmented_message_with_ping_in_between(client):
    ws, _ = await RawWebsocket.connect(client)
    await ws.send(client_frame(OP_TEXT, b"frag", fin=False))
    await ws.send(client_frame(OP_PING, b"ping!"))
    await ws.send(client_frame(OP_CONTINUATION, "mented ü".encode()[:5], fin=False))
    await ws.send(client_frame(OP_CONTINUATION, "mented ü".encode()[5:]))
    got = {}
    for _ in range(2):
        opcode, fin, payload = await ws.frame()
        got[opcode] = (fin, payload)
    assert got[OP_PONG] == (True, b"ping!")  # answered by the backend, through the relay
    assert got[OP_TEXT] == (True, "fragmented ü".encode())
    ws.close()


async def test_frames_sent_with_the_handshake_are_not_lost(client):
    """A client that does not wait for the 101: its first frames arrive with the request and
    are buffered by tornado's HTTP server; they must still reach the backend, in order."""
    first = client_frame(OP_TEXT, b"one") + client_frame(OP_BINARY, b"two" * 10000)
    ws, _ = await RawWebsocket.connect(client, extra=first)
    assert await ws.frame() == (OP_TEXT, True, b"one")
    assert await ws.frame() == (OP_BINARY, True, b"two" * 10000)
    ws.close()


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_INITIAL_STATE": "1"})
async def test_backend_frames_right_after_its_101_are_not_lost(client):
    ws, _ = await RawWebsocket.connect(client)
    opcode, _, payload = await ws.frame()
    assert opcode == OP_TEXT and json.loads(payload)["messageType"] == "INITIAL_STATE"
    ws.close()


@pytest.mark.parametrize(
    "frame",
    [
        server_frame(OP_TEXT, b"unmasked"),
        client_frame(OP_TEXT, b"compressed?", rsv=4),
        client_frame(OP_PING, b"p" * 200),
    ],
    ids=["unmasked", "rsv1", "long-ping"],
)
async def test_protocol_violation_is_1002(client, frame):
    ws, _ = await RawWebsocket.connect(client)
    await ws.send(client_frame(OP_TEXT, b"fine"))
    assert await ws.frame() == (OP_TEXT, True, b"fine")
    await ws.send(frame)
    assert await ws.close_code() == CLOSE_PROTOCOL_ERROR
    assert await ws.at_eof()
    ws.close()
    assert (await _last_close(client, [1002, "client frames must be masked"]))[0] == 1002


async def test_no_extension_is_negotiated(client):
    """permessage-deflate would set RSV1 on frames the scanner must read: never offered on."""
    ws, head = await RawWebsocket.connect(
        client, headers="Sec-WebSocket-Extensions: permessage-deflate\r\n"
    )
    assert b"sec-websocket-extensions" not in head.lower()
    await ws.send(client_frame(OP_TEXT, b"plain"))
    assert await ws.frame() == (OP_TEXT, True, b"plain")
    ws.close()


async def test_token_never_reaches_the_browser(client, supervisor):
    ws, head = await RawWebsocket.connect(client, path="libertem/api/events/?token=abc&x=1")
    await ws.send(client_frame(OP_TEXT, b"!binary 100000"))
    await ws.frame()
    await ws.send(client_frame(OP_TEXT, b"!close 4000 bye"))
    assert await ws.close_code() == 4000
    assert await ws.at_eof()
    ws.close()
    token = supervisor.run.token.encode()
    assert token not in ws.received
    assert b"api-key" not in ws.received.lower()
    assert str(supervisor.run.port).encode() not in head


async def test_refused_upgrade_is_an_error_before_any_101(client):
    cookie = await client.login()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        (
            f"GET {client.base_url}libertem/api/no-such-socket/ HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\nOrigin: {client.origin}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    writer.close()
    assert head.startswith(b"HTTP/1.1 404 "), head


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("Sec-WebSocket-Version: 8\r\n", 426),
        ("Sec-WebSocket-Key: bm90IDE2IGJ5dGVz\r\n", 400),
    ],
)
async def test_bad_handshakes_are_refused(client, supervisor, headers, status):
    cookie = await client.login()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    lines = {
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    name, value = headers.strip().split(": ")
    lines[name] = value
    writer.write(
        (
            f"GET {client.base_url}libertem/api/events/ HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{client.port}\r\nCookie: {cookie}\r\nOrigin: {client.origin}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in lines.items())
            + "\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    writer.close()
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    if status == 426:
        assert b"\r\nSec-Websocket-Version: 13\r\n" in head
    assert supervisor.starts == 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_many_websockets_leave_nothing_behind(client, supervisor):
    """Normal closes, refusals and backend drops: sockets, tasks and the count all return."""
    ws = await client.websocket()
    await ws.write_message("warm up")
    await ws.read_message()
    ws.close()
    for _ in range(250):
        if supervisor.websockets == 0:
            break
        await asyncio.sleep(0.02)
    fds_before = _fds()
    tasks_before = len(asyncio.all_tasks())
    for i in range(10):
        ws = await client.websocket()
        await ws.write_message(["x", "!drop", "!close 4001 x"][i % 3])
        if i % 3 == 0:
            assert await ws.read_message() == "x"
            ws.close()
        else:
            assert await ws.read_message() is None
        raw, _ = await RawWebsocket.connect(client)
        await raw.send(server_frame(OP_TEXT, b"unmasked"))
        assert await raw.close_code() == CLOSE_PROTOCOL_ERROR
        raw.close()
    for _ in range(250):
        settled = (
            supervisor.websockets == 0
            and _fds() <= fds_before + 2
            and len(asyncio.all_tasks()) <= tasks_before + 2
        )
        if settled:
            break
        await asyncio.sleep(0.02)
    assert supervisor.websockets == 0
    assert _fds() <= fds_before + 2
    assert len(asyncio.all_tasks()) <= tasks_before + 2
    assert not [t for t in threading.enumerate() if t.name.startswith("libertem websocket")]


async def test_browser_gone_mid_message_closes_backend_side(client, supervisor):
    ws, _ = await RawWebsocket.connect(client)
    big = client_frame(OP_BINARY, b"h" * 100000)
    await ws.send(big[:5000])  # half a frame, then the browser vanishes
    ws.writer.transport.abort()
    for _ in range(250):
        if supervisor.websockets == 0:
            break
        await asyncio.sleep(0.02)
    assert supervisor.websockets == 0
    # and the next one works
    ws2 = await client.websocket()
    await ws2.write_message("after")
    assert await ws2.read_message() == "after"
    ws2.close()
    with pytest.raises(WebSocketClosedError):
        await ws2.write_message("late")


async def test_stopping_jupyter_ends_websockets_whose_browser_stays(
    client, serverapp, supervisor, both_websocket_relays, monkeypatch
):
    """Jupyter stops while a tab keeps its websocket open and never closes it: the extension's
    stop hook hangs the websockets up at once. With threads, nothing else would: the thread
    reading the browser stays in ``recv`` until the flush time limit, and Jupyter's event loop,
    which runs that timer, is about to stop (here the limit is made an hour long)."""
    from libertem_jupyter_proxy import ws_proxy, ws_threads

    monkeypatch.setattr(ws_threads, "CLOSE_FLUSH_TIMEOUT", 3600.0)
    monkeypatch.setattr(ws_proxy, "CLOSE_FLUSH_TIMEOUT", 3600.0)
    ws, _ = await RawWebsocket.connect(client)
    await ws.send(client_frame(OP_TEXT, b"open"))
    for _ in range(250):
        if supervisor.websockets == 1:
            break
        await asyncio.sleep(0.02)
    await serverapp.extension_manager.stop_all_extensions()
    assert await ws.at_eof()
    for _ in range(500):
        threads = [t for t in threading.enumerate() if t.name.startswith("libertem websocket")]
        if supervisor.websockets == 0 and not threads:
            break
        await asyncio.sleep(0.02)
    assert supervisor.websockets == 0
    assert not threads
    ws.close()
