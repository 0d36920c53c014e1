"""The websocket relay on two threads, one per direction (issue 17: small messages).

After the handshake (``ws_proxy``) a websocket is a pair of byte streams. On Jupyter's event loop
each small message costs a selector round, the loop's callbacks and a write, about 100 us of
Jupyter CPU per 1 KiB round trip, so round trips ran at about half the rate of a direct
connection (bench/hotpath.py, ``ws_rt``). A thread that waits in ``recv`` and forwards with
``sendall`` is woken by the kernel straight into the relay: about 57 us per round trip, and 0.80
of direct instead of 0.54 in the same run (``bench/tcp_relay.py --threads`` against the
event-loop relay). The threads hold the GIL only to follow frame headers (``FrameScanner``); the
copies happen in the kernel calls, which release it.

The rules are those of the event-loop bridge (``ws_proxy._Bridge``):

- frame headers are followed, an incomplete one is held back, a refused frame (too big: 1009,
  protocol error from the browser: 1002) ends the websocket with our own close frame to each side
  whose stream is at a frame boundary;
- backpressure is the blocking ``sendall``: a side that stops reading stops the thread that
  writes to it, which then stops reading from the other side (at most one read buffer,
  ``MAX_READ_SIZE``, is held per direction);
- when one side is gone, the other gets FIN after what was already forwarded to it
  (``shutdown(SHUT_WR)``); its thread ends when that peer closes in turn (libertem-server and
  browsers do at once). After a refusal both threads read and drop what still comes until their
  peer closes: a socket closed with unread bytes is answered with a reset, which can destroy
  the close frame before the peer reads it. ``CLOSE_FLUSH_TIMEOUT`` after the first thread ends
  (or the refusal) both connections are cut (``shutdown(SHUT_RDWR)``: on Linux it wakes a
  thread blocked in ``recv``, which returns 0, and one blocked in ``send``, with ``EPIPE``), so a
  peer that neither reads nor closes cannot keep the bridge open.

Each socket is written by one thread only (the one relaying *towards* it), so frames never
interleave. Everything that touches Jupyter's state (activity, the end of the bridge) is handed
to the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

from tornado.iostream import IOStream

from .ws_frames import CLOSE_TOO_BIG, FrameScanner, close_frame
from .ws_transport import CLOSE_FLUSH_TIMEOUT, MAX_READ_SIZE, new_buffer, take_over

# A thread tells the event loop about browser messages (activity) at most this often, seconds:
# each call wakes the loop, which must not happen per message.
ACTIVITY_INTERVAL = 1.0


class _Direction:
    """One direction of the bridge: what its thread reads from and writes to."""

    __slots__ = ("dst", "early", "from_browser", "lock", "scanner", "src", "stopped")

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        early: bytes,
        scanner: FrameScanner,
        *,
        from_browser: bool,
    ) -> None:
        self.src = src
        self.dst = dst
        self.early = early  # what tornado had read from src past the handshake
        self.scanner = scanner  # follows the frames src sends (forwarded to dst)
        self.from_browser = from_browser
        self.stopped = False  # dst has been shut down for writing
        # held while the scanner follows a chunk and the chunk is sent, so another thread that
        # holds it sees the scanner agree with what dst has received
        self.lock = threading.Lock()


class ThreadBridge:
    """Relays a websocket between the browser and the backend on two threads.

    ``registry`` holds the running thread bridges of one Jupyter server while they run (the
    handler uses the event-loop bridge once there are ``LiberTEMProxy.websocket_threads`` of
    them; the extension aborts them when Jupyter stops, so no thread stays blocked in ``recv``
    on a browser connection after Jupyter's event loop has gone). ``finished`` resolves on the
    event loop once both threads have ended and both sockets are closed.
    """

    def __init__(
        self,
        max_message_size: int,
        on_browser_message: Callable[[], None],
        registry: set[ThreadBridge],
    ) -> None:
        self.max_message_size = max_message_size
        self._registry = registry
        self._on_browser_message = on_browser_message
        self._loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self._loop.create_future()
        self.refusing: tuple[int, str] | None = None  # our close frame, once one is due
        self._socks: tuple[socket.socket, socket.socket] | None = None
        self._directions: tuple[_Direction, _Direction] = ()  # type: ignore[assignment]
        self._ended = 0
        self._threads: list[threading.Thread] = []
        self._timer: asyncio.TimerHandle | None = None

    async def start(self, browser: IOStream, backend: IOStream) -> None:
        """Take both connections over from tornado and start the two threads."""
        try:
            browser_sock, browser_early = take_over(browser)
            backend_sock, backend_early = take_over(backend)
        except OSError:
            browser.close()
            backend.close()
            raise
        self._socks = (browser_sock, backend_sock)
        limit = self.max_message_size
        self._directions = directions = (
            _Direction(
                browser_sock,
                backend_sock,
                browser_early,
                FrameScanner(max_message_size=limit, strict=True),
                from_browser=True,
            ),
            _Direction(
                backend_sock,
                browser_sock,
                backend_early,
                FrameScanner(max_message_size=limit, strict=False),
                from_browser=False,
            ),
        )
        for sock in self._socks:
            sock.setblocking(True)
        self._registry.add(self)
        started = 0
        try:
            for direction in directions:
                name = "libertem websocket " + (
                    "browser->LiberTEM" if direction.from_browser else "LiberTEM->browser"
                )
                # daemon: a thread blocked in recv must not hold up Python's exit
                thread = threading.Thread(target=self._run, args=(direction,), name=name)
                thread.daemon = True
                thread.start()
                self._threads.append(thread)
                started += 1
        except RuntimeError:  # no thread could be started (a limit of the machine)
            self._shut_all()
            for _ in range(2 - started):
                self._thread_ended()
            raise

    def abort(self) -> None:
        """Hang up both sides now (the handler was cancelled); the threads end by themselves."""
        if not self.finished.done():
            self._shut_all()

    # ------------------------------------------------------------------ in the threads

    def _run(self, d: _Direction) -> None:
        try:
            self._relay(d)
            self._drain(d)
        except OSError:
            pass  # a side is gone (reset, or shut down by the timer or ``abort``)
        finally:
            self._stop_sending(d)
            try:
                self._loop.call_soon_threadsafe(self._thread_ended)
            except RuntimeError:
                pass  # Jupyter's loop is closed: Jupyter is exiting, nobody waits for us

    def _relay(self, d: _Direction) -> None:
        """Forward what ``src`` sends until it ends or a refusal ends the websocket."""
        buffer = new_buffer(MAX_READ_SIZE)
        scanner = d.scanner
        held = 0
        early = memoryview(d.early)
        messages = 0
        noted = 0.0
        while self.refusing is None:
            if len(early):
                n = min(len(early), MAX_READ_SIZE - held)
                buffer[held : held + n] = early[:n]
                early = early[n:]
            else:
                n = d.src.recv_into(buffer[held:])
                if not n or self.refusing is not None:  # refused meanwhile: dropped (_drain)
                    return
            end = held + n
            with d.lock:
                if d.stopped:  # refused by the other thread meanwhile
                    return
                ready = scanner.feed(buffer, end)
                if ready:
                    d.dst.sendall(buffer[:ready])
            if scanner.error is not None:
                self._refuse(scanner.error, d)
                return
            held = end - ready
            if held:
                buffer[:held] = bytes(buffer[ready:end])
            if d.from_browser and scanner.messages != messages:
                messages = scanner.messages
                now = time.monotonic()
                if now - noted >= ACTIVITY_INTERVAL:
                    noted = now
                    self._loop.call_soon_threadsafe(self._on_browser_message)

    def _refuse(self, error: tuple[int, str], d: _Direction) -> None:
        code, reason = error
        if code == CLOSE_TOO_BIG:
            sender = "browser" if d.from_browser else "LiberTEM"
            reason = f"message from {sender} larger than {self.max_message_size} bytes"
        self.refusing = (code, reason)
        self._stop_sending(d)
        # the other direction's destination is our source: tell it at once too, unless the
        # other thread is sending to it right now (then it does so itself when it is done)
        other = self._directions[1] if d is self._directions[0] else self._directions[0]
        if other.lock.acquire(blocking=False):
            try:
                self._stop_sending(other, locked=True)
            finally:
                other.lock.release()
        self._loop.call_soon_threadsafe(self._start_timer)

    def _drain(self, d: _Direction) -> None:
        """After a refusal: read and drop what ``src`` still sends, until it closes.

        Closing a socket with unread bytes makes the kernel answer with a reset instead of FIN,
        and a reset can destroy our close frame before the peer reads it (the property test of
        test_ws_bridges found that: a browser frame after the refused one reset the browser's
        connection). The timer bounds how long a peer may keep sending.
        """
        if self.refusing is None:
            return
        scrap = bytearray(64 * 1024)
        while d.src.recv_into(scrap):
            pass

    def _stop_sending(self, d: _Direction, locked: bool = False) -> None:
        """Nothing more goes to ``dst``: our close frame if one is due and fits, then FIN after
        what was forwarded (``shutdown(SHUT_WR)``). Once only per direction."""
        if not locked:
            with d.lock:
                self._stop_sending(d, locked=True)
            return
        if d.stopped:
            return
        d.stopped = True
        if self.refusing is not None and d.scanner.at_frame_boundary:
            frame = close_frame(*self.refusing, masked=d.from_browser)  # masked to the backend
            try:
                # never waits: a side whose buffers are full is just hung up
                d.dst.send(frame, socket.MSG_DONTWAIT)
            except OSError:
                pass
        _shutdown(d.dst, socket.SHUT_WR)

    # ------------------------------------------------------------------ on the event loop

    def _start_timer(self) -> None:
        """The websocket is ending: in CLOSE_FLUSH_TIMEOUT both connections are cut, whether
        or not the peers have read what was sent and closed their ends."""
        if self._timer is None and not self.finished.done():
            self._timer = self._loop.call_later(CLOSE_FLUSH_TIMEOUT, self._shut_all)

    def _thread_ended(self) -> None:
        self._ended += 1
        if self._ended == 1:
            self._start_timer()
            return
        if self._timer is not None:
            self._timer.cancel()
        for thread in self._threads:  # both have told us they are done: only returns remain
            thread.join(CLOSE_FLUSH_TIMEOUT)
        assert self._socks is not None
        for sock in self._socks:
            sock.close()
        self._registry.discard(self)
        if not self.finished.done():
            self.finished.set_result(None)

    def _shut_all(self) -> None:
        if self._socks is not None:
            for sock in self._socks:
                _shutdown(sock)


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # not connected any more
