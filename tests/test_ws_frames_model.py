"""``FrameScanner`` against a plain reference model of RFC 6455's frame headers (hypothesis).

The scanner runs twice per websocket round trip in the relays, so it is written for speed: a
table of what the first byte decides and a short path for a message in a single frame. The
model here is written for reading instead: it walks the whole byte stream frame by frame,
checking the rules of RFC 6455 5.2-5.5 in the order the scanner reports them. Generated
streams of valid and invalid frames (every opcode, reserved bits, masked or not, 7-, 16- and
64-bit lengths including non-minimal and out-of-range ones, a last frame cut short), fed in
generated pieces the way the relays feed them (held-back bytes presented again), must give
the same forwarded byte count, refusal, message count and close flag as the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libertem_jupyter_proxy.ws_frames import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PONG,
    OP_TEXT,
    FrameScanner,
    frame_header,
)


@dataclass
class Outcome:
    forwarded: int  # bytes that may reach the other side
    error: tuple[int, str] | None
    messages: int
    closed: bool


def model(stream: bytes, *, strict: bool, limit: int) -> Outcome:
    """The whole stream at once, frame by frame, as RFC 6455 reads it."""
    pos, messages, closed = 0, 0, False
    in_message, message_size = False, 0
    while True:
        if len(stream) - pos < 2:
            return Outcome(pos, None, messages, closed)
        b0, b1 = stream[pos], stream[pos + 1]
        fin, reserved, opcode = b0 >> 7, (b0 >> 4) & 7, b0 & 0x0F
        masked, length = b1 >> 7, b1 & 0x7F
        extended = {126: 2, 127: 8}.get(length, 0)
        header = 2 + extended + 4 * masked
        if len(stream) - pos < 2 + extended:
            return Outcome(pos, None, messages, closed)
        if extended:
            length = int.from_bytes(stream[pos + 2 : pos + 2 + extended], "big")
            if length >= 1 << 63:  # 5.2: the most significant bit must be 0
                return Outcome(
                    pos, (CLOSE_PROTOCOL_ERROR, "frame length out of range"), messages, closed
                )
        if len(stream) - pos < header:
            return Outcome(pos, None, messages, closed)
        control = opcode >= 8
        error = None
        if closed:
            error = (CLOSE_PROTOCOL_ERROR, "frame after a close frame")
        elif strict and not masked:
            error = (CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        elif strict and reserved:
            error = (CLOSE_PROTOCOL_ERROR, "reserved bits set")
        elif strict and control and opcode > OP_PONG:
            error = (CLOSE_PROTOCOL_ERROR, "reserved opcode")
        elif strict and control and (not fin or length > 125):
            error = (CLOSE_PROTOCOL_ERROR, "control frames must be short and whole")
        elif control:
            closed = closed or opcode == OP_CLOSE
        elif strict and opcode == OP_CONTINUATION and not in_message:
            error = (CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
        elif strict and opcode in (1, 2) and in_message:
            error = (CLOSE_PROTOCOL_ERROR, "new message before the last one ended")
        elif strict and opcode > 2:
            error = (CLOSE_PROTOCOL_ERROR, "reserved opcode")
        else:
            # a stray continuation (libertem-server's side only) counts alone
            size = message_size + length if opcode == OP_CONTINUATION and in_message else length
            if size > limit:
                error = (CLOSE_TOO_BIG, "message too big")
            else:
                messages += opcode in (1, 2)
                message_size, in_message = size, not fin
        if error is not None:
            return Outcome(pos, error, messages, closed)
        if len(stream) - pos - header <= length:  # the stream ends inside this frame
            return Outcome(len(stream), None, messages, closed)
        pos += header + length


def scan(stream: bytes, cuts: list[int], *, strict: bool, limit: int) -> Outcome:
    """Feed ``stream`` in pieces ending at ``cuts`` as the relays do."""
    scanner = FrameScanner(max_message_size=limit, strict=strict)
    buf = bytearray(len(stream) + 16)
    held = forwarded = start = 0
    for end_of_piece in [*sorted(set(cuts)), len(stream)]:
        piece = stream[start:end_of_piece]
        start = max(start, end_of_piece)
        buf[held : held + len(piece)] = piece
        end = held + len(piece)
        ready = scanner.feed(memoryview(buf), end)
        forwarded += ready
        if scanner.error is not None:
            break
        held = end - ready
        assert held < 14, "only an incomplete header may be held back"
        buf[:held] = bytes(buf[ready:end])
    return Outcome(forwarded, scanner.error, scanner.messages, scanner.closed)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame, valid or not; its payload may be shorter than its header says only if it is
    the stream's last frame (the caller cuts there)."""
    opcode = draw(st.sampled_from([0, 1, 2, 8, 9, 10]) | st.integers(0, 15))
    fin = draw(st.booleans()) if opcode < 8 else draw(st.sampled_from([True, True, False]))
    reserved = draw(st.sampled_from([0, 0, 0, 0, 1, 2, 4, 7]))
    masked = draw(st.sampled_from([True, True, True, False]))
    length = draw(st.integers(0, 300) | st.sampled_from([125, 126, 127, 65535, 65536]))
    encoding = draw(st.sampled_from(["minimal", "minimal", "16", "64"]))
    if encoding == "minimal":
        encoding = "7" if length < 126 else "16" if length < 1 << 16 else "64"
    if encoding == "16" and length >= 1 << 16:
        encoding = "64"
    head = bytes([(0x80 if fin else 0) | reserved << 4 | opcode])
    mbit = 0x80 if masked else 0
    if encoding == "7":
        head += bytes([mbit | length])
    elif encoding == "16":
        head += bytes([mbit | 126]) + length.to_bytes(2, "big")
    else:
        top = draw(st.sampled_from([0, 0, 0, 1 << 63]))  # rarely out of range
        head += bytes([mbit | 127]) + (length | top).to_bytes(8, "big")
    if masked:
        head += b"\x01\x02\x03\x04"
    return head + bytes(min(length, 300))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(frames(), max_size=12),
    st.integers(0, 600),
    st.booleans(),
    st.data(),
)
def test_scanner_agrees_with_the_model(parts, limit, strict, data):
    stream = b"".join(parts)
    cut_at = data.draw(st.integers(0, len(stream)), label="stream cut at")
    stream = stream[:cut_at]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="pieces")
    assert scan(stream, cuts, strict=strict, limit=limit) == model(
        stream, strict=strict, limit=limit
    )


def test_a_refused_close_frame_does_not_count_as_closed():
    """A close frame refused by its header (not final, from the browser) never passed: the
    relay must still send its own close frame to the backend."""
    scanner = FrameScanner(max_message_size=100, strict=True)
    frame = bytes([OP_CLOSE, 0x80 | 2]) + b"\x01\x02\x03\x04" + b"\x00\x00"
    assert scanner.feed(frame, len(frame)) == 0
    assert scanner.error == (CLOSE_PROTOCOL_ERROR, "control frames must be short and whole")
    assert not scanner.closed


def test_a_stray_continuation_from_libertem_counts_alone():
    """Found by the red team: the short path left the size of the last message behind, and a
    stray continuation from libertem-server's side was measured against it (accepted over the
    limit after a whole message, refused under it after an empty one)."""
    after_whole = frame_header(OP_BINARY, 10) + bytes(10) + frame_header(OP_CONTINUATION, 4)
    after_empty = (
        frame_header(0x3, 10)
        + bytes(10)
        + frame_header(OP_BINARY, 0)
        + frame_header(OP_CONTINUATION, 11)
    )
    for data, refused in ((after_whole + bytes(4), False), (after_empty + bytes(11), True)):
        scanner = FrameScanner(max_message_size=10, strict=False)
        ready = scanner.feed(data, len(data))
        assert (scanner.error is not None) == refused
        assert ready == (len(data) - 13 if refused else len(data))


@pytest.mark.parametrize("strict", [True, False])
def test_nothing_passes_after_a_close_frame(strict):
    """RFC 6455 5.5.1 (found by the red team: data after a close frame was forwarded)."""
    mask = b"\x01\x02\x03\x04" if strict else None
    bye = frame_header(OP_CLOSE, 2, mask=mask) + b"\x03\xe8"
    data = bye + frame_header(OP_TEXT, 5, mask=mask) + b"after"
    scanner = FrameScanner(max_message_size=100, strict=strict)
    assert scanner.feed(data, len(data)) == len(bye)
    assert scanner.closed and scanner.error == (CLOSE_PROTOCOL_ERROR, "frame after a close frame")
