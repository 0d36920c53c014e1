"""How the websocket relays end a websocket: one close frame per direction at most (RFC 6455
5.5.1), a slow reader still gets the last messages, a refusal waits for the frame under way, the
TLS relay has the same time limit. Found by the second red team of the threaded relay (issue
17); each test failed on the code before its fix."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from libertem_jupyter_proxy.ws_frames import OP_BINARY, OP_CLOSE, OP_TEXT, frame_header

from .helpers import run_on_private_loop
from .test_ws_bridges import (
    LIMIT,
    _close_code,
    _connection,
    _frame,
    _relay_threads,
    _start,
    quick_cut,  # noqa: F401  (fixture)
)


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("kind", ["threads", "transports", "iostreams"])
@pytest.mark.parametrize("closer", ["backend", "browser"])
def test_no_second_close_frame_after_a_close_frame(kind: str, closer: str) -> None:
    """One side sends its close frame (libertem-server 1001, or the browser 1000); before the
    other side answers, it sends a frame the relay refuses (too big). The other side already got
    the close frame, so our 1009 must not follow it (RFC 6455 5.5.1: nothing follows a close
    frame); it got 1001 then 1009, or 1000 then 1009."""
    from_browser = closer == "browser"
    bye = _frame(OP_CLOSE, (1000 if from_browser else 1001).to_bytes(2, "big"), masked=from_browser)
    too_big = frame_header(OP_BINARY, LIMIT + 1, mask=None if from_browser else b"abcd")

    async def run() -> bytes:
        b_reader, b_writer, b_stream = await _connection()
        l_reader, l_writer, l_stream = await _connection()
        bridge = await _start(kind, b_stream, l_stream, lambda: None)
        (c_writer, o_reader), (o_writer, c_reader) = (
            ((b_writer, l_reader), (l_writer, b_reader))
            if from_browser
            else ((l_writer, b_reader), (b_writer, l_reader))
        )
        c_writer.write(bye)
        await c_writer.drain()
        assert await asyncio.wait_for(o_reader.readexactly(len(bye)), 10) == bye
        o_writer.write(too_big)
        await o_writer.drain()
        await asyncio.wait_for(c_reader.read(), 10)
        rest = await asyncio.wait_for(o_reader.read(), 10)
        b_writer.close()
        l_writer.close()
        await asyncio.wait_for(bridge.finished, 20)
        return rest

    rest = run_on_private_loop(run, timeout=60)
    assert rest == b"", f"a second close frame followed the {closer}'s close frame: {rest!r}"
    assert not _relay_threads()


async def _small_connection(
    rcvbuf: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, object]:
    """As ``_connection``, but the peer's receive buffer and the proxy end's send buffer are
    small (a browser on a slow link): what the relay sends to it waits in the relay."""
    from tornado.iostream import IOStream

    server = socket.create_server(("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        peer.connect(server.getsockname()[:2])
        proxy_end, _ = server.accept()
    finally:
        server.close()
    proxy_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    proxy_end.setblocking(False)
    peer.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=peer, limit=rcvbuf)
    return reader, writer, IOStream(proxy_end)


async def _read_slowly(
    reader: asyncio.StreamReader, want: int | None = None, pause: float = 0.01
) -> bytes:
    """Read like a browser on a slow link: 16 KiB, then a pause (the workload, not a wait for
    an event), until the end of the connection or ``want`` bytes."""
    got = bytearray()
    while want is None or len(got) < want:
        chunk = await asyncio.wait_for(reader.read(16 << 10), 10)
        if not chunk:
            break
        got += chunk
        await asyncio.sleep(pause)
    return bytes(got)


def _last_results(fill: bytes) -> bytes:
    """libertem-server's last 3 MiB of results (12 frames of 250 KiB) and its close frame."""
    frame = _frame(OP_BINARY, fill * (250 << 10), masked=False)
    return frame * 12 + _frame(OP_CLOSE, (1000).to_bytes(2, "big"), masked=False)


def _to_a_slow_browser(kind: str, sent: bytes, *, browser_closes_first: bool) -> bytes:
    """What a browser on a slow link (about 1.6 MB/s: 2 s for ``sent``, longer than the
    relay's shortened limit) receives when libertem-server sends ``sent``: either the backend
    then closes its connection (FIN after its close frame, as a server closes first, RFC 6455
    7.1.1), or the browser first sent its own close frame and the backend keeps its connection
    open for the browser to close."""

    async def run() -> bytes:
        b_reader, b_writer, b_stream = await _small_connection(32 << 10)
        l_reader, l_writer, l_stream = await _connection()
        bridge = await _start(kind, b_stream, l_stream, lambda: None)
        if browser_closes_first:
            bye = _frame(OP_CLOSE, (1000).to_bytes(2, "big"), masked=True)
            b_writer.write(bye)
            await b_writer.drain()
            assert await asyncio.wait_for(l_reader.readexactly(len(bye)), 10) == bye
            l_writer.write(sent)
            got = await _read_slowly(b_reader, len(sent))
        else:
            l_writer.write(sent)
            await l_writer.drain()
            l_writer.close()
            got = await _read_slowly(b_reader)
        b_writer.close()
        l_writer.close()
        await asyncio.wait_for(bridge.finished, 20)
        return got

    return run_on_private_loop(run, timeout=90)


@pytest.mark.usefixtures("quick_cut")
@pytest.mark.parametrize("kind", ["threads", "transports"])
def test_a_backend_that_closes_after_its_last_message_does_not_cut_a_slow_browser(
    kind: str,
) -> None:
    """libertem-server sends 3 MiB of results, its close frame and closes its connection (FIN,
    a normal end). The browser is on a slow link but reads steadily. Every byte must arrive: the
    relay may not cut a destination that is still taking data (the 5 s limit is for peers that
    neither read nor close). Threads: the sender waiting in ``_send_rest`` sees POLLRDHUP on the
    backend, starts the timer, and both connections are cut while the browser is still reading."""
    sent = _last_results(b"D")
    got = _to_a_slow_browser(kind, sent, browser_closes_first=False)
    assert len(got) == len(sent), f"the browser got {len(got)} of {len(sent)} bytes"
    assert got == sent
    assert not _relay_threads()


@pytest.mark.usefixtures("quick_cut")
@pytest.mark.parametrize("kind", ["threads", "transports"])
def test_the_backends_last_messages_after_the_browsers_close_frame_reach_a_slow_browser(
    kind: str,
) -> None:
    """The browser starts the closing handshake (1000); libertem-server still sends 3 MiB of
    results before its own close frame (RFC 6455 5.5.1 allows it) and keeps its TCP connection
    open for the browser to close. The browser, on a slow link, reads steadily: it must get every
    byte and the backend's close frame (the time limit after both close frames is for peers
    that neither read nor close). The event-loop relay's ``close_later`` aborts both transports
    CLOSE_FLUSH_TIMEOUT after the second close frame was *queued*, with the backend's last
    messages still in the browser transport's write buffer."""
    sent = _last_results(b"E")
    got = _to_a_slow_browser(kind, sent, browser_closes_first=True)
    assert len(got) == len(sent), f"the browser got {len(got)} of {len(sent)} bytes"
    assert got == sent
    assert not _relay_threads()


def _last_frame_is_close(data: bytes, frames: bytes) -> int | None:
    """The close code if ``data`` is a prefix of ``frames`` ending on a frame boundary and
    followed by one unmasked close frame; None otherwise."""
    pos = 0
    while pos < len(data):
        b1 = data[pos + 1] if pos + 1 < len(data) else None
        if b1 is None:
            return None
        if data[pos] == 0x88:
            try:
                return _close_code(data[pos:], masked=False)
            except AssertionError:
                return None
        length = b1 & 0x7F
        head = 2
        if length == 126:
            length, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
        elif length == 127:
            length, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
        end = pos + head + length
        if end > len(data) or data[pos:end] != frames[pos:end]:
            return None
        pos = end
    return None


# "threads" passes (ThreadBridge finishes the frame under way, then sends its close frame); the
# event-loop relay, used beyond websocket_threads and when no thread can be started, does not
@pytest.mark.parametrize("kind", ["threads", "transports"])
def test_a_refusal_reaches_a_slow_browser_after_the_frame_under_way(kind: str) -> None:
    """libertem-server streams results to a browser on a slow link (the relay waits for the
    browser to take them); the browser then sends a message over the limit. The browser reads
    steadily and well within the relay's time limit, so it must get the frames relayed so far,
    then the 1009 close frame. The event-loop relay (``_Bridge.refuse``) writes its close frame
    only if the browser's stream is between frames at that moment; it is not (a frame is on
    its way), so the browser is hung up mid-frame without one: an abnormal 1006 for the GUI,
    the bug 71880f7 fixed for the threads only."""
    frame = _frame(OP_BINARY, b"S" * (250 << 10), masked=False)
    frames = frame * 12

    async def run() -> bytes:
        b_reader, b_writer, b_stream = await _small_connection(32 << 10)
        _l_reader, l_writer, l_stream = await _connection()
        bridge = await _start(kind, b_stream, l_stream, lambda: None)
        l_writer.write(frames)
        first = await asyncio.wait_for(b_reader.readexactly(64 << 10), 10)
        b_writer.write(frame_header(OP_BINARY, LIMIT + 1, mask=b"abcd"))
        await b_writer.drain()
        got = first + await _read_slowly(b_reader, pause=0.005)
        b_writer.close()
        l_writer.close()
        await asyncio.wait_for(bridge.finished, 20)
        return got

    got = run_on_private_loop(run, timeout=90)
    code = _last_frame_is_close(got, frames)
    assert code == 1009, (
        f"the browser got {len(got)} bytes, ending {got[-20:]!r}: whole frames of the backend "
        "then a 1009 close frame expected"
    )
    assert not _relay_threads()


@pytest.mark.usefixtures("both_websocket_relays")
@pytest.mark.proxy_config(websocket_max_message_size=65536)
async def test_through_jupyter_the_browser_gets_one_close_frame(client):
    """The same as ``test_no_second_close_frame_after_the_backends_close_frame``, through a
    real Jupyter and the fake libertem-server: the server closes (4000); the browser, before
    answering, sends a message over the limit. The browser must see the server's close frame
    and then the end of the connection, not a second close frame (1009) after it."""
    from .test_ws_relay import RawWebsocket, client_frame

    raw, _ = await RawWebsocket.connect(client)
    await raw.send(client_frame(OP_BINARY, b"x"))  # a message first
    await raw.frame()  # its echo: the websocket is relayed
    await raw.send(client_frame(OP_TEXT, b"!close 4000 bye"))
    opcode, _, payload = await raw.frame()
    assert opcode == OP_CLOSE and payload[:2] == (4000).to_bytes(2, "big")
    await raw.send(client_frame(OP_BINARY, b"o" * 65537))
    rest = b""
    try:
        rest = await asyncio.wait_for(raw.reader.read(), 20)
    except ConnectionResetError:
        pass
    raw.close()
    assert rest == b"", f"after the server's close frame the browser got {rest!r}"


@pytest.mark.parametrize("kind", ["threads", "transports"])
def test_a_browser_frame_after_its_own_close_frame_adds_no_close_frame_for_the_backend(
    kind: str,
) -> None:
    """The browser sends its close frame (1000), then (a broken or hostile client) an unmasked
    frame, which the relay refuses (1002). libertem-server already has the browser's close
    frame; the relay's own close frame must not follow it (the refusing direction's
    ``_stop_sending`` in ``_refuse`` does not look at ``scanner.closed`` either)."""
    bye = _frame(OP_CLOSE, (1000).to_bytes(2, "big"), masked=True)

    async def run() -> bytes:
        b_reader, b_writer, b_stream = await _connection()
        l_reader, l_writer, l_stream = await _connection()
        bridge = await _start(kind, b_stream, l_stream, lambda: None)
        b_writer.write(bye + _frame(OP_TEXT, b"after close, unmasked", masked=False))
        await b_writer.drain()
        got = await asyncio.wait_for(l_reader.read(), 10)
        await asyncio.wait_for(b_reader.read(), 10)
        b_writer.close()
        l_writer.close()
        await asyncio.wait_for(bridge.finished, 20)
        return got

    got = run_on_private_loop(run, timeout=60)
    assert got[: len(bye)] == bye
    assert got[len(bye) :] == b"", f"after the browser's close frame the backend got {got!r}"


@pytest.mark.usefixtures("quick_cut")
@pytest.mark.parametrize("kind", ["threads", "transports", "iostreams"])
@pytest.mark.parametrize("closer", ["browser", "backend"])
def test_a_valid_frame_after_a_close_frame_is_not_forwarded(kind: str, closer: str) -> None:
    """RFC 6455 5.5.1: a side sends nothing after its close frame. A valid text frame that
    followed one was forwarded by every relay (third red team of issue 17); now the scanner
    refuses it, and the other side gets the close frame and then the end of the connection."""
    from_browser = closer == "browser"
    bye = _frame(OP_CLOSE, (1000).to_bytes(2, "big"), masked=from_browser)
    after = _frame(OP_TEXT, b"after the close frame", masked=from_browser)

    async def run() -> bytes:
        b_reader, b_writer, b_stream = await _connection()
        l_reader, l_writer, l_stream = await _connection()
        bridge = await _start(kind, b_stream, l_stream, lambda: None)
        writer = b_writer if from_browser else l_writer
        writer.write(bye + after)
        await writer.drain()
        got = await asyncio.wait_for((l_reader if from_browser else b_reader).read(), 10)
        b_writer.close()
        l_writer.close()
        await asyncio.wait_for(bridge.finished, 20)
        return got

    got = run_on_private_loop(run, timeout=60)
    assert got == bye, f"after the {closer}'s close frame the other side got {got[len(bye) :]!r}"
