"""The websocket relay on two threads, one per direction (issue 17: small messages).

After the handshake (``ws_proxy``) a websocket is a pair of byte streams. On Jupyter's event loop
each small message costs a selector round, the loop's callbacks and a write, about 100 us of
Jupyter CPU per 1 KiB round trip, so round trips ran at about half the rate of a direct
connection (bench/hotpath.py, ``ws_rt``). A thread that waits in ``recv`` and forwards with
``send`` is woken by the kernel straight into the relay (bench/tcp_relay.py ``--threads``: 0.80
of direct where the event-loop relay reached 0.54 in the same run). The threads hold the GIL only
to follow frame headers (``FrameScanner``); the copies happen in the kernel calls, which release
it.

The rules are those of the event-loop bridge (``ws_proxy._Bridge``), with three additions:

- frame headers are followed, an incomplete one is held back; a refused frame (too big: 1009,
  protocol error from the browser: 1002) ends the websocket with our own close frame to each
  side. A side in the middle of receiving a frame first gets the rest of that frame (its header
  was accepted), then the close frame; only a side that does not get it within
  ``CLOSE_FLUSH_TIMEOUT`` is hung up without one;
- backpressure: a thread sends all it read before it reads again, so a side that stops reading
  stops the reading of the other side (at most one read buffer, ``MAX_READ_SIZE``, is held per
  direction). While it waits to send, it also watches its source: if that side hangs up
  meanwhile, the bridge ends (``CLOSE_FLUSH_TIMEOUT`` later if the waiting goes on);
- when one side is gone, the other gets FIN after what was already forwarded to it
  (``shutdown(SHUT_WR)``), and its thread ends when that peer closes in turn (libertem-server and
  browsers do at once). After a refusal both threads read and drop what still comes until their
  peer closes: a socket closed with unread bytes is answered with a reset, which can destroy
  the close frame before the peer reads it. ``CLOSE_FLUSH_TIMEOUT`` after the first thread ends,
  a refusal, or both close frames having passed (RFC 6455 5.5.1: nothing may follow them), both
  connections are cut (``shutdown(SHUT_RDWR)``, which on Linux wakes a thread blocked in ``recv``
  or ``poll``), so peers that neither read nor close cannot keep the bridge open.

Each socket is written by one thread only (the one relaying *towards* it) or, for our close
frame, by a thread holding that direction's lock, so frames never interleave. What touches
Jupyter's state is done on the event loop: the end of the bridge is handed to it with
``call_soon_threadsafe``, and it reads the browser's message count once a second (activity).
The last thread to end closes both sockets itself, so nothing stays open if Jupyter's loop
has already stopped.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from collections.abc import Callable

from .ws_frames import FrameScanner, close_frame, refusal
from .ws_transport import CLOSE_FLUSH_TIMEOUT, MAX_READ_SIZE, Taken, new_buffer

# How often, in seconds, the event loop looks whether the browser sent messages (activity): the
# threads count them (``FrameScanner.messages``) and never wake the loop for them.
ACTIVITY_INTERVAL = 1.0
# What poll reports, asked or not, when a source was reset (POLLERR) or is shut down both ways
# (POLLHUP). A FIN (POLLRDHUP) is not a hang-up here: a source may close normally after its
# last message while that message is still on its way (found by the second red team).
_HUNG_UP = select.POLLERR | select.POLLHUP
_DONTWAIT = socket.MSG_DONTWAIT


class _Direction:
    """One direction of the bridge: what its thread reads from and writes to."""

    __slots__ = (
        "close_seen",
        "dst",
        "early",
        "from_browser",
        "lock",
        "scanner",
        "sending",
        "src",
        "stopped",
    )

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
        self.close_seen = False  # a close frame from src has been forwarded
        self.sending = False  # waiting for dst to take the rest of a chunk (_send_rest)
        # held while the scanner follows a chunk and the chunk is sent, so another thread that
        # holds it sees the scanner agree with what dst has received
        self.lock = threading.Lock()


class ThreadBridge:
    """Relays a websocket between the browser and the backend on two threads.

    ``registry`` holds the running thread bridges of one Jupyter server (the handler uses the
    event-loop bridge once there are ``LiberTEMProxy.websocket_threads`` of them; the extension
    aborts them when Jupyter stops). ``finished`` resolves on the event loop once both threads
    have ended and both sockets are closed.
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
        self._socks: tuple[socket.socket, socket.socket] = ()  # type: ignore[assignment]
        self._directions: tuple[_Direction, _Direction] = ()  # type: ignore[assignment]
        self._lock = threading.Lock()  # guards _ended and _closed
        self._ended = 0
        self._closed = False
        self._go = threading.Event()
        self._cancelled = False
        self._threads: list[threading.Thread] = []
        self._timer: asyncio.TimerHandle | None = None
        self._activity: asyncio.TimerHandle | None = None  # _watch_activity's next look
        self._messages_seen = 0
        self._waits_for_sends = False  # _timer is _cut_when_sent's (it waits for the sends)

    def start(self, browser: Taken, backend: Taken) -> bool:
        """Relay the two taken-over connections (``ws_transport.take_over``) on two threads.

        Returns False, with the sockets untouched, if the machine gives no thread (a limit on
        processes or memory): the caller relays them on the event loop instead.
        """
        (browser_sock, browser_early), (backend_sock, backend_early) = browser, backend
        limit = self.max_message_size
        self._socks = (browser_sock, backend_sock)
        self._directions = (
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
        try:
            for d in self._directions:
                name = "libertem websocket " + (
                    "browser->LiberTEM" if d.from_browser else "LiberTEM->browser"
                )
                thread = threading.Thread(target=self._run, args=(d,), name=name)
                thread.daemon = True  # one blocked in recv must not hold up Python's exit
                thread.start()
                self._threads.append(thread)
        except RuntimeError:  # "can't start new thread"
            self._cancelled = True
            self._go.set()
            for thread in self._threads:
                thread.join()
            return False
        for sock in self._socks:
            sock.setblocking(True)
        self._registry.add(self)
        self._go.set()  # the threads wait for this: the sockets are blocking now
        self._activity = self._loop.call_later(ACTIVITY_INTERVAL, self._watch_activity)
        return True

    def abort(self) -> None:
        """Hang up both sides now (the handler was cancelled, Jupyter stops); the threads end
        by themselves."""
        self._shut_all()

    # ------------------------------------------------------------------ in the threads

    def _run(self, d: _Direction) -> None:
        self._go.wait()
        if self._cancelled:
            return
        try:
            self._relay(d)
            self._stop_sending(d)
            if self.refusing is not None:
                self._drain(d)
        except OSError:
            pass  # a side is gone (reset, or shut down by the timer or ``abort``)
        finally:
            self._stop_sending(d)
            self._thread_ended()

    def _relay(self, d: _Direction) -> None:
        """Forward what ``src`` sends until it ends or a refusal ends the websocket.

        The loop runs once per message or piece of one; in Jupyter's process (caches shared
        with the backend and the browser on two cores) each Python step in it costs several
        times what it costs alone. So what it looks up is bound to local names first, what is
        rare (a refusal, a close frame) is checked with one condition and handled in
        :meth:`_after_rare`, and the browser's activity is read by the event loop once a
        second (:meth:`_watch_activity`) instead of being checked here per message."""
        buffer = new_buffer(MAX_READ_SIZE)
        scanner = d.scanner
        feed = scanner.feed
        recv_into = d.src.recv_into
        send = d.dst.send
        acquire, release = d.lock.acquire, d.lock.release  # cheaper than ``with`` here
        held = 0
        early = memoryview(d.early)
        while True:
            if early:
                n = min(len(early), MAX_READ_SIZE - held)
                buffer[held : held + n] = early[:n]
                early = early[n:]
            else:
                n = recv_into(buffer[held:] if held else buffer)
                if not n:
                    return
            if self.refusing is not None:  # refused meanwhile: finish the frame under way
                left = scanner.payload_left
                if not left:
                    return
                n = min(n, left)
            end = held + n
            acquire()
            try:
                if d.stopped:
                    return
                ready = feed(buffer, end)
                if ready:
                    try:
                        sent = send(buffer[:ready], _DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    if sent != ready:  # the rest when dst takes it (rare: it reads slowly)
                        self._send_rest(d, buffer[sent:ready])
            finally:
                release()
            if scanner.error is not None or scanner.closed or self.refusing is not None:
                if self._after_rare(d):
                    return
            held = end - ready
            if held:
                buffer[:held] = bytes(buffer[ready:end])

    def _after_rare(self, d: _Direction) -> bool:
        """After a chunk that was refused, carried a close frame, or came during a refusal:
        True if this direction's relaying ends here."""
        scanner = d.scanner
        if scanner.error is not None:
            self._refuse(scanner.error, d)
            return True
        if self.refusing is not None and scanner.at_frame_boundary:
            return True  # the frame under way is complete: our close frame follows it
        if scanner.closed and not d.close_seen:
            d.close_seen = True
            if self._other(d).scanner.closed:  # both close frames have passed: nothing may follow
                self._call(self._cut_when_sent)
        return False

    def _other(self, d: _Direction) -> _Direction:
        """The opposite direction: its destination is ``d``'s source."""
        return self._directions[1] if d is self._directions[0] else self._directions[0]

    def _send_rest(self, d: _Direction, data: memoryview) -> None:
        """Send ``data`` once ``dst`` takes it, waiting with ``poll`` and watching ``src`` too:
        a source that is reset meanwhile ends the bridge, after ``CLOSE_FLUSH_TIMEOUT`` if
        ``dst`` still does not read, where a blocking ``sendall`` would wait for ``dst`` alone,
        possibly for ever. (A source's FIN is its normal end; if its peer is gone, the FIN
        waits in the kernel behind data nobody reads, and cannot be seen, here or in any
        proxy.)"""
        d.sending = True
        try:
            self._wait_and_send(d, data)
        finally:
            d.sending = False

    def _wait_and_send(self, d: _Direction, data: memoryview) -> None:
        poller = select.poll()
        poller.register(d.dst, select.POLLOUT)
        poller.register(d.src, 0)  # errors only
        src = d.src.fileno()
        while data:
            for fd, events in poller.poll():
                if fd == src and events & _HUNG_UP:
                    poller.unregister(src)  # once is enough (the state stays reported)
                    self._call(self._start_timer)
            try:
                data = data[d.dst.send(data, _DONTWAIT) :]
            except BlockingIOError:
                pass

    def _refuse(self, error: tuple[int, str], d: _Direction) -> None:
        self.refusing = refusal(error, from_browser=d.from_browser, limit=self.max_message_size)
        self._stop_sending(d)
        self._call(self._start_timer)
        # The other direction's destination is our source: give it our close frame now if
        # its stream is between frames and its thread is not sending to it right now; else
        # that thread does it itself once the frame under way is complete.
        other = self._other(d)
        if other.lock.acquire(blocking=False):
            try:
                if other.scanner.at_frame_boundary:
                    self._stop_sending(other, locked=True)
            finally:
                other.lock.release()

    def _drain(self, d: _Direction) -> None:
        """After a refusal: read and drop what ``src`` still sends, until it closes.

        Closing a socket with unread bytes makes the kernel answer with a reset instead of FIN,
        and a reset can destroy our close frame before the peer reads it (test_ws_bridges
        found it: a browser frame after the refused one reset the browser's connection).
        """
        scrap = bytearray(64 * 1024)
        while d.src.recv_into(scrap):
            pass

    def _stop_sending(self, d: _Direction, locked: bool = False) -> None:
        """Nothing more goes to ``dst``: our close frame if one is due and ``dst`` is between
        frames, then FIN after what was forwarded (``shutdown(SHUT_WR)``). Once per direction."""
        if not locked:
            with d.lock:
                self._stop_sending(d, locked=True)
            return
        if d.stopped:
            return
        d.stopped = True
        scanner = d.scanner
        if self.refusing is not None and scanner.at_frame_boundary and not scanner.closed:
            frame = close_frame(*self.refusing, masked=d.from_browser)  # masked to the backend
            try:
                # never waits: a side whose buffers are full is just hung up
                d.dst.send(frame, socket.MSG_DONTWAIT)
            except OSError:
                pass
        _shutdown(d.dst, socket.SHUT_WR)

    def _thread_ended(self) -> None:
        """The last thread to end closes both sockets, here (Jupyter's loop may be gone)."""
        with self._lock:
            self._ended += 1
            last = self._ended == 2
            if last:
                self._closed = True
                for sock in self._socks:
                    sock.close()
        if not last:
            self._call(self._start_timer)
            return
        self._registry.discard(self)
        self._call(self._finish)

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:
            pass  # Jupyter's loop is closed: Jupyter is exiting, nobody waits for us

    # ------------------------------------------------------------------ on the event loop

    def _start_timer(self) -> None:
        """The websocket is ending: in CLOSE_FLUSH_TIMEOUT both connections are cut, whether
        or not the peers have read what was sent and closed their ends."""
        if self._timer is not None and self._waits_for_sends:  # a hard limit replaces it
            self._timer.cancel()
            self._timer = None
            self._waits_for_sends = False
        if self._timer is None and not self.finished.done():
            self._timer = self._loop.call_later(CLOSE_FLUSH_TIMEOUT, self._shut_all)

    def _cut_when_sent(self) -> None:
        """Both close frames have passed: cut both connections after the time limit, once no
        thread is still waiting to send (a slow reader still gets the last messages)."""
        if self.finished.done() or (self._timer is not None and not self._waits_for_sends):
            return  # a hard limit runs already (a refusal, a side gone)
        self._waits_for_sends = True
        if self._timer is not None:
            self._timer.cancel()
        if any(d.sending for d in self._directions):
            self._timer = self._loop.call_later(CLOSE_FLUSH_TIMEOUT, self._cut_when_sent)
        else:
            self._timer = self._loop.call_later(CLOSE_FLUSH_TIMEOUT, self._shut_all)

    def _watch_activity(self) -> None:
        """Once a second while the bridge runs, and once when it ends: browser messages since
        the last look are activity (``on_browser_message``)."""
        messages = self._directions[0].scanner.messages
        if messages != self._messages_seen:
            self._messages_seen = messages
            self._on_browser_message()
        if not self.finished.done():
            self._activity = self._loop.call_later(ACTIVITY_INTERVAL, self._watch_activity)

    def _finish(self) -> None:
        if self._activity is not None:
            self._activity.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for thread in self._threads:  # both have ended their work: only returns remain
            thread.join(CLOSE_FLUSH_TIMEOUT)
        if not self.finished.done():
            self.finished.set_result(None)
        self._watch_activity()  # the last second's messages (finished: not looked at again)

    def _shut_all(self) -> None:
        with self._lock:  # never on a closed socket (its descriptor may be reused already)
            if not self._closed:
                for sock in self._socks:
                    _shutdown(sock)


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # not connected any more
