"""Websocket frame boundaries in a relayed byte stream (RFC 6455, section 5.2).

The websocket bridge does not terminate the websocket: after the handshake it copies bytes
between the browser and libertem-server, the way nginx does. To still enforce the largest
message size and refuse a broken client, it has to know where frames start and end. This module
does exactly that and no more: it reads frame *headers* (2 to 14 bytes) and skips over payloads
without touching (or unmasking, or copying) them. It has no I/O, so it is unit-tested directly.

Everything here is pure: the scanner is fed the bytes of one direction in the order they
arrived, in chunks of any size (a header may be split across chunks).
"""

from __future__ import annotations

import base64
import hashlib
import os

# RFC 6455, 1.3: appended to the client's key to compute Sec-WebSocket-Accept.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# The longest header: 2 bytes, 8 bytes of extended length, 4 bytes of mask key.
MAX_HEADER = 14


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455, 4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def valid_key(key: str) -> bool:
    """A ``Sec-WebSocket-Key`` must be the base64 encoding of 16 bytes (RFC 6455, 4.1)."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def close_frame(code: int, reason: str = "", *, masked: bool) -> bytes:
    """A complete close frame. Frames towards a server must be masked (RFC 6455, 5.3), frames
    towards a client must not be."""
    payload = code.to_bytes(2, "big") + reason.encode("utf-8")[:123]
    if not masked:
        return bytes((0x80 | OP_CLOSE, len(payload))) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + key + body


def refusal(error: tuple[int, str], *, from_browser: bool, limit: int) -> tuple[int, str]:
    """The close code and reason for a frame the scanner refused (``FrameScanner.error``); a
    message over the size limit is told who sent it and what the limit is, in bytes."""
    code, reason = error
    if code == CLOSE_TOO_BIG:
        sender = "browser" if from_browser else "LiberTEM"
        reason = f"message from {sender} larger than {limit} bytes"
    return code, reason


def frame_header(opcode: int, length: int, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """A frame header (for tests and for anything that writes frames itself)."""
    first = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask is not None else 0
    if length < 126:
        head = bytes((first, mbit | length))
    elif length < 1 << 16:
        head = bytes((first, mbit | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((first, mbit | 127)) + length.to_bytes(8, "big")
    return head + (mask or b"")


class FrameScanner:
    """Follows the frames of one direction of a websocket connection.

    ``feed(buf, end)`` looks at ``buf[:end]`` and returns how many of those bytes may be
    forwarded. That is all of them, except

    - an incomplete frame header at the end: those bytes (fewer than 14) are held back and must
      be presented again at the start of the next ``feed`` with the bytes that follow them, so
      a frame we may have to refuse is never half forwarded;
    - a refused frame: then ``error`` is set to ``(close code, reason)`` and the return value is
      the offset of the refused frame's header. Nothing from there on may be forwarded.

    ``strict`` is for the browser's direction: a client's frames must be masked, must not set
    reserved bits or use reserved opcodes, control frames must be short and unfragmented, and
    continuation frames must continue something (RFC 6455, 5.1 to 5.5). libertem-server's
    direction is trusted for protocol details; the message size limit applies to both.

    ``messages`` counts data messages started (text or binary first frames), for activity;
    ``closed`` says a close frame has started (RFC 6455 5.5.1: nothing may follow it).
    """

    __slots__ = (
        "_in_message",
        "_message_size",
        "_payload_left",
        "closed",
        "error",
        "max_message_size",
        "messages",
        "strict",
    )

    def __init__(self, *, max_message_size: int, strict: bool) -> None:
        self.max_message_size = max_message_size
        self.strict = strict
        self.messages = 0
        self.closed = False
        self.error: tuple[int, str] | None = None
        self._payload_left = 0  # payload bytes of the current frame not seen yet
        self._in_message = False  # a fragmented data message awaits its final frame
        self._message_size = 0  # payload bytes of the current data message so far

    @property
    def at_frame_boundary(self) -> bool:
        """Everything forwarded so far ends with a complete frame: a frame of our own (a
        close frame) may be inserted into this direction now without corrupting the stream."""
        return self._payload_left == 0

    @property
    def payload_left(self) -> int:
        """Bytes of the current frame's payload still to come (0: at a frame boundary)."""
        return self._payload_left

    def feed(self, buf: bytes | bytearray | memoryview, end: int) -> int:
        """Scan ``buf[:end]``; return how many bytes may be forwarded (see the class doc)."""
        if self.error is not None:
            return 0
        pos = 0
        left = self._payload_left
        while True:
            if left:
                if left >= end - pos:
                    self._payload_left = left - (end - pos)
                    return end
                pos += left
                left = 0
            self._payload_left = 0
            avail = end - pos
            if avail < 2:
                return pos  # nothing left, or half a header: hold it back
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            if length == 126:
                size = 4
                if avail < size:
                    return pos
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            elif length == 127:
                size = 10
                if avail < size:
                    return pos
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length >> 63:
                    return self._refuse(pos, CLOSE_PROTOCOL_ERROR, "frame length out of range")
            else:
                size = 2
            if b1 & 0x80:
                size += 4  # the mask key
            if avail < size:
                return pos
            problem = self._check(b0, b1, length)
            if problem is not None:
                return self._refuse(pos, *problem)
            pos += size
            left = length

    def _check(self, b0: int, b1: int, length: int) -> tuple[int, str] | None:
        """Account for one complete frame header; the reason to refuse the frame, if any."""
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        strict = self.strict
        if strict:
            if not b1 & 0x80:
                return CLOSE_PROTOCOL_ERROR, "client frames must be masked"
            if b0 & 0x70:
                return CLOSE_PROTOCOL_ERROR, "reserved bits set"
        if opcode >= 8:  # control frames may come between the fragments of a message
            if opcode == OP_CLOSE:
                self.closed = True
            if strict:
                if opcode > OP_PONG:
                    return CLOSE_PROTOCOL_ERROR, "reserved opcode"
                if not fin or length > 125:
                    return CLOSE_PROTOCOL_ERROR, "control frames must be short and whole"
            return None
        if opcode == OP_CONTINUATION:
            if strict and not self._in_message:
                return CLOSE_PROTOCOL_ERROR, "continuation frame without a message"
            size = self._message_size + length
        elif opcode <= OP_BINARY:
            if strict and self._in_message:
                return CLOSE_PROTOCOL_ERROR, "new message before the last one ended"
            self.messages += 1
            size = length
        else:
            if strict:
                return CLOSE_PROTOCOL_ERROR, "reserved opcode"
            size = length
        if size > self.max_message_size:
            return CLOSE_TOO_BIG, "message too big"
        self._message_size = size
        self._in_message = not fin
        return None

    def _refuse(self, pos: int, code: int, reason: str) -> int:
        self.error = (code, reason)
        return pos
