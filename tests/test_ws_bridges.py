"""The three websocket relays side by side, without Jupyter (issue 17: the threaded relay).

``ThreadBridge`` (two threads), ``_Bridge`` (asyncio transports) and ``_StreamBridge`` (tornado
IOStreams, used under TLS) must relay the same bytes. ``hypothesis`` generates frames for both
directions, the pieces each peer writes them in, and (in the second property) a frame the relay
must refuse. The peers are plain TCP sockets on 127.0.0.1; each relay gets the proxy's ends of
the two connections as tornado IOStreams, as the handler hands them over after the handshake.

The expected result is exact: with valid frames each peer receives byte for byte what the other
sent (the relay changes nothing: no unmasking, no re-framing). After a refused browser frame
the backend receives every byte before that frame, then one masked close frame with the code,
then the end of the connection; the browser receives the unmasked close frame and the end.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.iostream import IOStream

from libertem_jupyter_proxy.ws_frames import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    frame_header,
)
from libertem_jupyter_proxy.ws_proxy import _Bridge, _StreamBridge
from libertem_jupyter_proxy.ws_threads import ThreadBridge
from libertem_jupyter_proxy.ws_transport import take_over_both

from .helpers import run_on_private_loop

BRIDGES = ("threads", "transports", "iostreams")
LIMIT = 256 * 1024  # largest message relayed in these tests
THREAD_NAME = "libertem websocket"
# each example starts real relays on real sockets: slow and large by hypothesis' measures
_RELAY_RUNS = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def _frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool) -> bytes:
    if not masked:
        return frame_header(opcode, len(payload), fin=fin) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return frame_header(opcode, len(payload), fin=fin, mask=key) + body


def _messages(masked: bool) -> st.SearchStrategy[list[bytes]]:
    """Whole messages as frames: text or binary, some in fragments with a ping in between."""
    size = st.one_of(st.integers(0, 200), st.integers(0, 4000), st.integers(60_000, LIMIT))

    @st.composite
    def message(draw: Any) -> bytes:
        length = draw(size)
        payload = bytes([draw(st.integers(0, 255))]) * length
        opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        if length < 2 or not draw(st.booleans()):
            return _frame(opcode, payload, masked=masked)
        cut = draw(st.integers(1, length - 1))
        return (
            _frame(opcode, payload[:cut], fin=False, masked=masked)
            + _frame(OP_PING, b"p", masked=masked)
            + _frame(OP_CONTINUATION, payload[cut:], masked=masked)
        )

    return st.lists(message(), max_size=6)


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length), in order."""
    points = sorted({c % len(data) for c in cuts} | {0, len(data)}) if data else [0]
    return [data[a:b] for a, b in itertools.pairwise(points)]


async def _connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, IOStream]:
    """A TCP connection on 127.0.0.1: the peer's end as asyncio streams, the proxy's end as the
    IOStream the handler would hand to a relay."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        reader, writer = await asyncio.open_connection(*server.getsockname()[:2])
        proxy_end, _ = server.accept()
    finally:
        server.close()
    proxy_end.setblocking(False)
    return reader, writer, IOStream(proxy_end)


async def _send(writer: asyncio.StreamWriter, pieces: list[bytes]) -> None:
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0)  # let the other side and the relay run between pieces


async def _start(kind: str, browser: IOStream, backend: IOStream, note: Callable[[], None]) -> Any:
    """Start a relay of ``kind`` on the two connections, the way the handler does."""
    if kind == "iostreams":
        bridge: Any = _StreamBridge(LIMIT, note)
        await bridge.start(browser, backend)
        return bridge
    taken = await take_over_both(browser, backend)
    assert taken is not None
    if kind == "threads":
        bridge = ThreadBridge(LIMIT, note, set())
        assert bridge.start(*taken)
    else:
        bridge = _Bridge(LIMIT, note)
        await bridge.start(*taken)
    return bridge


def _relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


@dataclass
class Run:
    """What each peer received, and how often the relay reported a browser message."""

    at_backend: bytes
    at_browser: bytes
    noted: int


async def _run(
    kind: str, from_browser: list[bytes], from_backend: list[bytes], *, until_eof: bool
) -> Run:
    noted = 0

    def note() -> None:
        nonlocal noted
        noted += 1

    b_reader, b_writer, b_stream = await _connection()
    l_reader, l_writer, l_stream = await _connection()
    bridge = await _start(kind, b_stream, l_stream, note)
    want_backend = sum(map(len, from_browser))
    want_browser = sum(map(len, from_backend))

    async def receive(reader: asyncio.StreamReader, want: int) -> bytes:
        if until_eof:
            return await reader.read()  # everything up to the relay's hang-up
        return await reader.readexactly(want)

    # return_exceptions: after a refusal the relay hangs up while a peer may still be sending
    sending = asyncio.gather(
        _send(b_writer, from_browser), _send(l_writer, from_backend), return_exceptions=True
    )
    got_backend, got_browser = await asyncio.gather(
        receive(l_reader, want_backend), receive(b_reader, want_browser)
    )
    await sending
    b_writer.close()
    l_writer.close()
    await asyncio.wait_for(bridge.finished, 20)
    return Run(got_backend, got_browser, noted)


@settings(_RELAY_RUNS, max_examples=25)
@given(
    browser=_messages(masked=True),
    backend=_messages(masked=False),
    cuts_b=st.lists(st.integers(0, 1 << 20), max_size=8),
    cuts_l=st.lists(st.integers(0, 1 << 20), max_size=8),
)
def test_each_relay_passes_every_byte_unchanged(
    browser: list[bytes], backend: list[bytes], cuts_b: list[int], cuts_l: list[int]
) -> None:
    sent_b = b"".join(browser)
    sent_l = b"".join(backend)
    for kind in BRIDGES:
        run = run_on_private_loop(
            lambda kind=kind: _run(
                kind, _pieces(sent_b, cuts_b), _pieces(sent_l, cuts_l), until_eof=False
            ),
            timeout=60,
        )
        assert run.at_backend == sent_b, kind
        assert run.at_browser == sent_l, kind
        assert (run.noted > 0) == bool(browser), kind
    assert not _relay_threads()


def _close_code(data: bytes, *, masked: bool) -> int:
    """The code of the close frame ``data`` consists of."""
    assert data[0] == 0x80 | OP_CLOSE, data[:2]
    assert bool(data[1] & 0x80) == masked, "masking must follow RFC 6455 5.3"
    length = data[1] & 0x7F
    head = 6 if masked else 2
    assert len(data) == head + length
    payload = data[head:]
    if masked:
        key = data[2:6]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return int.from_bytes(payload[:2], "big")


_REFUSED = {
    "unmasked": (_frame(OP_TEXT, b"no mask", masked=False), CLOSE_PROTOCOL_ERROR),
    "reserved opcode": (_frame(0x3, b"", masked=True), CLOSE_PROTOCOL_ERROR),
    "continuation first": (_frame(OP_CONTINUATION, b"x", masked=True), CLOSE_PROTOCOL_ERROR),
    "too big": (frame_header(OP_BINARY, LIMIT + 1, mask=b"abcd"), CLOSE_TOO_BIG),
}


@settings(_RELAY_RUNS, max_examples=15)
@given(
    before=_messages(masked=True),
    refused=st.sampled_from(sorted(_REFUSED)),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=8),
)
def test_a_refused_browser_frame_ends_both_sides_with_a_close_frame(
    before: list[bytes], refused: str, cuts: list[int]
) -> None:
    frame, code = _REFUSED[refused]
    valid = b"".join(before)
    # something after the refused frame too: none of it may reach the backend
    sent = valid + frame + _frame(OP_TEXT, b"after", masked=True)
    # not "iostreams" (Jupyter's own TLS): it closes at once after its close frames, and the
    # browser's unread bytes can still turn that into a reset (a known limit, see its doc)
    for kind in ("threads", "transports"):
        run = run_on_private_loop(
            lambda kind=kind: _run(kind, _pieces(sent, cuts), [], until_eof=True), timeout=60
        )
        assert run.at_backend[: len(valid)] == valid, kind
        assert _close_code(run.at_backend[len(valid) :], masked=True) == code, kind
        assert _close_code(run.at_browser, masked=False) == code, kind
    assert not _relay_threads()


@pytest.mark.parametrize("kind", sorted(BRIDGES))
@pytest.mark.parametrize("who", ["browser", "backend"])
def test_either_side_hanging_up_ends_the_relay_and_its_threads(kind: str, who: str) -> None:
    """One side goes away without a close frame (a crash, a closed tab): the other side sees
    the end of its connection, the relay finishes, no thread or socket stays."""

    async def run() -> bytes:
        b_reader, b_writer, b_stream = await _connection()
        l_reader, l_writer, l_stream = await _connection()
        bridge = await _start(kind, b_stream, l_stream, lambda: None)
        gone, stays = (b_writer, l_reader) if who == "browser" else (l_writer, b_reader)
        gone.write(_frame(OP_TEXT, b"last", masked=who == "browser"))
        await gone.drain()
        gone.transport.abort()
        rest = await asyncio.wait_for(stays.read(), 20)
        await asyncio.wait_for(bridge.finished, 20)
        (l_writer if who == "browser" else b_writer).close()
        return rest

    rest = run_on_private_loop(run, timeout=60)
    # the frame sent before the hang-up was relayed or cut with the connection, never altered
    frame_len = len(b"last") + (2 if who == "backend" else 6)
    assert len(rest) in (0, frame_len)
    assert not _relay_threads()


def test_a_peer_that_stops_reading_stops_the_other_sides_reading() -> None:
    """Backpressure with threads: a browser that reads nothing while the backend sends 64 MiB
    makes the relay thread wait in ``sendall`` (it reads no more from the backend), so the
    backend's writes stop too; when the browser hangs up, everything ends."""

    async def run() -> int:
        _, b_writer, b_stream = await _connection()
        _, l_writer, l_stream = await _connection()
        bridge = await _start("threads", b_stream, l_stream, lambda: None)
        chunk = _frame(OP_BINARY, b"z" * (128 << 10), masked=False)  # within LIMIT
        l_writer.transport.set_write_buffer_limits(high=0)
        sent = 0
        for _ in range(512):
            l_writer.write(chunk)
            try:  # drain waits once the kernel buffers are full: the relay has stopped reading
                await asyncio.wait_for(l_writer.drain(), 2)
            except asyncio.TimeoutError:
                break
            sent += 1
        b_writer.transport.abort()
        await asyncio.wait_for(bridge.finished, 20)
        l_writer.transport.abort()
        return sent

    sent = run_on_private_loop(run, timeout=120)
    assert sent < 512, "the backend could write 64 MiB into a relay whose browser reads nothing"
    assert not _relay_threads()


# ---------------------------------------------------------------- found by the red team (issue 17)


@pytest.fixture
def quick_cut(monkeypatch: pytest.MonkeyPatch) -> float:
    """A short ``CLOSE_FLUSH_TIMEOUT`` (the relays' time limit for ending), so a test can wait
    for a relay that ends by it; a relay that never ends still fails the test."""
    from libertem_jupyter_proxy import ws_proxy, ws_threads

    for module in (ws_proxy, ws_threads):
        monkeypatch.setattr(module, "CLOSE_FLUSH_TIMEOUT", 0.5)
    return 0.5


@pytest.mark.usefixtures("quick_cut")
@pytest.mark.parametrize("kind", BRIDGES)  # iostreams (TLS) had no limit: second red team
def test_a_finished_close_handshake_ends_the_relay(kind: str) -> None:
    """Both close frames have passed, but libertem-server keeps its TCP connection open and the
    browser waits for the server to close first (RFC 6455 7.1.1): the relay ends anyway, its
    time limit after the second close frame (it stayed for as long as both waited)."""

    async def run() -> None:
        b_reader, b_writer, b_stream = await _connection()
        l_reader, l_writer, l_stream = await _connection()
        bridge = await _start(kind, b_stream, l_stream, lambda: None)
        closing = (1000).to_bytes(2, "big") + b"bye"
        b_writer.write(_frame(OP_CLOSE, closing, masked=True))
        await b_writer.drain()
        assert (await asyncio.wait_for(l_reader.readexactly(6 + len(closing)), 10))[0] == 0x88
        l_writer.write(_frame(OP_CLOSE, closing, masked=False))  # the answer; no TCP close
        await l_writer.drain()
        assert (await asyncio.wait_for(b_reader.readexactly(2 + len(closing)), 10))[0] == 0x88
        await asyncio.wait_for(bridge.finished, 20)
        b_writer.close()
        l_writer.close()

    run_on_private_loop(run, timeout=60)
    assert not _relay_threads()


async def _fill(writer: asyncio.StreamWriter, frame: bytes) -> None:
    """Write ``frame`` again and again until the way is full (a write does not drain in 1 s)."""
    writer.transport.set_write_buffer_limits(high=0)
    for _ in range(2048):
        writer.write(frame)
        try:
            await asyncio.wait_for(writer.drain(), 1)
        except asyncio.TimeoutError:
            return
    raise AssertionError("the relay took 2048 frames from a side whose peer reads nothing")


@pytest.mark.usefixtures("quick_cut")
@pytest.mark.parametrize("who", ["browser", "backend"])
def test_a_side_reset_while_the_relay_waits_to_send_to_the_other_ends_it(who: str) -> None:
    """libertem-server's connection is reset while the browser reads nothing, or the browser's
    while libertem-server reads nothing: the thread waiting to send watches its source, sees
    the reset, and the relay ends within its time limit. (A blocking ``sendall`` waited for the
    reader alone; the event-loop relay still does: its transport's reading is paused by the
    backpressure, so it sees no reset either.) A plain close (FIN) cannot be seen this way: it
    waits in the kernel behind the data nobody reads, as for any proxy."""

    async def run() -> None:
        _, b_writer, b_stream = await _connection()
        _, l_writer, l_stream = await _connection()
        sender, reader = (l_writer, b_writer) if who == "backend" else (b_writer, l_writer)
        reader.transport.pause_reading()  # this side reads nothing from now on
        bridge = await _start("threads", b_stream, l_stream, lambda: None)
        await _fill(sender, _frame(OP_BINARY, b"r" * (128 << 10), masked=who == "browser"))
        sock = sender.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sender.transport.abort()  # closed with SO_LINGER 0: a reset
        await asyncio.wait_for(bridge.finished, 20)
        reader.transport.abort()

    run_on_private_loop(run, timeout=90)
    assert not _relay_threads()


@pytest.mark.parametrize("kind", BRIDGES)
def test_a_refusal_waits_for_the_frame_under_way_to_the_other_side(kind: str) -> None:
    """The browser sends a message over the limit while libertem-server is in the middle of a
    frame to it: the browser gets the rest of that frame, then the 1009 close frame (it was
    hung up on without one, an abnormal 1006 for the GUI; the TLS relay, iostreams, still did
    so until the third red team of issue 17)."""

    async def run() -> bytes:
        b_reader, b_writer, b_stream = await _connection()
        l_reader, l_writer, l_stream = await _connection()
        bridge = await _start(kind, b_stream, l_stream, lambda: None)
        result = _frame(OP_BINARY, b"R" * 100_000, masked=False)
        l_writer.write(result[:30_000])
        await l_writer.drain()
        assert await asyncio.wait_for(b_reader.readexactly(30_000), 10) == result[:30_000]
        b_writer.write(frame_header(OP_BINARY, LIMIT + 1, mask=b"abcd"))
        await b_writer.drain()
        # the backend learns first (its close frame); only then does the rest come
        assert _close_code(await asyncio.wait_for(l_reader.read(), 10), masked=True) == 1009
        l_writer.write(result[30_000:])
        await l_writer.drain()
        rest = await asyncio.wait_for(b_reader.read(), 10)
        b_writer.close()
        l_writer.close()
        await asyncio.wait_for(bridge.finished, 20)
        return rest

    rest = run_on_private_loop(run, timeout=60)
    frame_rest = _frame(OP_BINARY, b"R" * 100_000, masked=False)[30_000:]
    assert rest[: len(frame_rest)] == frame_rest
    assert _close_code(rest[len(frame_rest) :], masked=False) == 1009


@pytest.mark.parametrize("gone", ["backend", "browser"])
def test_a_side_that_closed_during_the_handover_ends_the_websocket_quietly(gone: str) -> None:
    """libertem-server answers the upgrade and is gone at once (a restart at that moment), or
    the browser goes: the handover gives up without an error (tornado may have let the socket
    go already: ``AttributeError`` from ``None.dup()`` reached Jupyter's log after the 101),
    and what the backend sent before it went still reaches the browser."""
    last = _frame(OP_CLOSE, (1001).to_bytes(2, "big"), masked=False)

    async def run() -> bytes:
        b_reader, b_writer, b_stream = await _connection()
        l_reader, l_writer, l_stream = await _connection()
        closing, stream = (l_writer, l_stream) if gone == "backend" else (b_writer, b_stream)
        if gone == "backend":
            closing.write(last)
        closing.close()
        # the close has arrived (tornado notices it when the handover reads)
        await asyncio.to_thread(select.select, [stream.socket], [], [], 10)
        taken = await take_over_both(b_stream, l_stream)
        if taken is not None:  # the close came just after the handover: relayed as usual
            bridge = ThreadBridge(LIMIT, lambda: None, set())
            assert bridge.start(*taken)
        other = b_reader if gone == "backend" else l_reader
        got = await asyncio.wait_for(other.read(), 10)
        if taken is not None:
            await asyncio.wait_for(bridge.finished, 20)
        b_writer.close()
        l_writer.close()
        return got

    got = run_on_private_loop(run, timeout=60)
    # the backend's close frame reached the browser; the browser's end reached the backend
    assert got == (last if gone == "backend" else b"")
