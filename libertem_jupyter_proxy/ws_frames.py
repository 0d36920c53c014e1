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


# A frame's kind, from its first byte and mask bit alone (``_KINDS``): the low bit is FIN.
_FIN = 1
_DATA = 2  # text or binary: starts a message
_CONTINUATION = 4
_OTHER_DATA = 6  # a reserved data opcode (3-7), accepted from libertem-server only
_CONTROL = 8  # ping, pong, reserved control opcodes from libertem-server
_CLOSE = 10
_WHOLE_MESSAGE = _DATA | _FIN  # the common case: a message in a single frame

Kind = int | tuple[int, str]  # a kind above, or (close code, reason) to refuse the frame


def _kind(b0: int, masked: bool, strict: bool) -> Kind:
    """The rules of RFC 6455 (5.1 to 5.5) that a frame's first byte and its mask bit decide."""
    opcode = b0 & 0x0F
    fin = _FIN if b0 & 0x80 else 0
    if strict:
        if not masked:
            return CLOSE_PROTOCOL_ERROR, "client frames must be masked"
        if b0 & 0x70:
            return CLOSE_PROTOCOL_ERROR, "reserved bits set"
    if opcode >= 8:  # control frames may come between the fragments of a message
        if strict:
            if opcode > OP_PONG:
                return CLOSE_PROTOCOL_ERROR, "reserved opcode"
            if not fin:
                return CLOSE_PROTOCOL_ERROR, "control frames must be short and whole"
        return (_CLOSE if opcode == OP_CLOSE else _CONTROL) | fin
    if opcode == OP_CONTINUATION:
        return _CONTINUATION | fin
    if opcode <= OP_BINARY:
        return _DATA | fin
    if strict:
        return CLOSE_PROTOCOL_ERROR, "reserved opcode"
    return _OTHER_DATA | fin


# indexed by the first byte, plus 256 if the frame is masked; for strict=False and True
_KINDS = tuple(
    tuple(_kind(i & 0xFF, i >= 256, strict) for i in range(512)) for strict in (False, True)
)
# after a close frame, in both directions: RFC 6455 5.5.1, nothing may follow it
_AFTER_CLOSE = ((CLOSE_PROTOCOL_ERROR, "frame after a close frame"),) * 512


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
    ``closed`` says a close frame has been accepted; any frame after it is refused (1002, RFC
    6455 5.5.1: nothing may follow it). A continuation frame that continues nothing, which only
    libertem-server's direction lets pass, counts as a message of its own for the size limit.

    ``feed`` runs once per received chunk in the websocket relays (twice per round trip of a
    small message), so what the first byte decides is looked up in a table made once
    (``_KINDS``) and a message in a single frame takes a short path: in Jupyter's relay
    threads this halved the scanner's cost, about 15 us of CPU per 1 KiB round trip before.
    """

    __slots__ = (
        "_in_message",
        "_kinds",
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
        self._kinds = _KINDS[strict]
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
        kinds = self._kinds
        while True:
            if left:
                if left >= end - pos:
                    self._payload_left = left - (end - pos)
                    return end
                pos += left
            avail = end - pos
            if avail < 2:
                self._payload_left = 0
                return pos  # nothing left, or half a header: hold it back
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            size = 6 if b1 & 0x80 else 2  # with the mask key, if any
            if length > 125:
                extended = 2 if length == 126 else 8
                if avail < 2 + extended:
                    self._payload_left = 0
                    return pos
                if extended == 2:
                    length = buf[pos + 2] << 8 | buf[pos + 3]
                else:
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    if length >> 63:
                        return self._refuse(
                            pos, (CLOSE_PROTOCOL_ERROR, "frame length out of range")
                        )
                size += extended
            if avail < size:
                self._payload_left = 0
                return pos
            kind = kinds[buf[pos] | (b1 & 0x80) << 1]
            if kind == _WHOLE_MESSAGE and not self._in_message:
                if length > self.max_message_size:
                    return self._refuse(pos, (CLOSE_TOO_BIG, "message too big"))
                self.messages += 1
            else:
                problem = self._check(kind, length)
                if problem is not None:
                    return self._refuse(pos, problem)
                kinds = self._kinds  # after a close frame: another table
            pos += size
            left = length

    def _check(self, kind: Kind, length: int) -> tuple[int, str] | None:
        """Account for one complete frame header; the reason to refuse the frame, if any (the
        rules that need the frame's length or the state of the message under way)."""
        if isinstance(kind, tuple):
            return kind  # refused by its first byte
        strict = self.strict
        what = kind & ~_FIN
        if what >= _CONTROL:
            if strict and length > 125:
                return CLOSE_PROTOCOL_ERROR, "control frames must be short and whole"
            if what == _CLOSE:
                self.closed = True
                self._kinds = _AFTER_CLOSE  # any frame after it is refused
            return None
        if what == _CONTINUATION:
            if not self._in_message:  # libertem-server's stray one counts alone
                if strict:
                    return CLOSE_PROTOCOL_ERROR, "continuation frame without a message"
                size = length
            else:
                size = self._message_size + length
        elif what == _DATA:
            if strict and self._in_message:
                return CLOSE_PROTOCOL_ERROR, "new message before the last one ended"
            size = length
        else:  # _OTHER_DATA
            size = length
        if size > self.max_message_size:
            return CLOSE_TOO_BIG, "message too big"
        if what == _DATA:
            self.messages += 1  # counted once accepted, as on the short path
        self._message_size = size
        self._in_message = not kind & _FIN
        return None

    def _refuse(self, pos: int, problem: tuple[int, str]) -> int:
        """Refuse the frame whose header starts at ``pos``: nothing from there on passes."""
        self.error = problem
        self._payload_left = 0
        return pos
