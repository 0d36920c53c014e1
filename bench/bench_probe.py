"""A tiny Jupyter server extension loaded only by the benchmark: asyncio tasks and GC counts.

Open file descriptors and RSS can be read from outside with psutil, but a leak of asyncio tasks
(a relay that never ends after a client abort) is only visible inside the Jupyter process. The
benchmark enables this module (``bench/`` on ``PYTHONPATH``) in every Jupyter it starts, ours and
jupyter-server-proxy's alike, and reads ``GET {base_url}_bench/probe`` with the Jupyter token.
``?profile=start`` / ``?profile=stop`` wrap a workload in cProfile (``bench/get_breakdown.py``).

``GET {base_url}_bench/minproxy/<path>`` is the least any proxy inside Jupyter must do for a
small GET to the running libertem-server (issue 17's small-GET target; get_breakdown.py): an
authenticated Jupyter handler that sends the request on one kept-open socket, whose reader stays
registered with the event loop, waits for the whole answer (``Content-Length`` only) and writes
its status, type and body back. No header is checked, filtered or rewritten, nothing is
retried, no timeout is kept; it is a lower bound to compare with, not a proxy to use.

:func:`relay_websockets_bare`, called from a benchmark Jupyter's config (``hotpath.py
--bounds``), is the same for websockets: the threads copy bytes and follow no frames.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import pstats
import re
import socket
import threading
import time
from typing import Any

from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web

_PROFILE: list[cProfile.Profile] = []


def _profile(action: str) -> dict[str, Any]:
    """``start``: a deterministic profile of everything this Jupyter runs from now on;
    ``stop``: end it and return its functions with the most own and cumulative time (seconds,
    with cProfile's own overhead, so compare them with each other, not with psutil's)."""
    if action == "start":
        prof = cProfile.Profile(time.process_time)  # CPU, not wall time (a busy machine)
        _PROFILE[:] = [prof]
        prof.enable()
        return {"profile": "started"}
    if not _PROFILE:
        return {"profile": "not started"}
    prof = _PROFILE.pop()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = [
        {
            "function": f"{file.rsplit('/', 1)[-1]}:{line}:{name}",
            "calls": calls,
            "own_s": round(own, 4),
            "cum_s": round(cum, 4),
        }
        for (file, line, name), (_, calls, own, cum, _) in stats.stats.items()  # type: ignore[attr-defined]
    ]
    return {
        "by_own": sorted(rows, key=lambda r: -r["own_s"])[:60],
        "by_cum": sorted(rows, key=lambda r: -r["cum_s"])[:120],
    }


class ProbeHandler(APIHandler):
    _track_activity = False

    @web.authenticated
    def get(self) -> None:
        if action := self.get_argument("profile", ""):
            self.finish(json.dumps(_profile(action)))
            return
        collect = self.get_argument("gc", "0") == "1"
        collect_ms = None
        if collect:  # how long one full collection of this Jupyter's heap takes
            t = time.perf_counter()
            gc.collect()
            collect_ms = (time.perf_counter() - t) * 1000
        self.finish(
            json.dumps(
                {
                    "tasks": len(asyncio.all_tasks()),
                    "threads": threading.active_count(),
                    "gc_objects": len(gc.get_objects()) if collect else None,
                    "gc_collect_ms": collect_ms,
                    "gc_stats": gc.get_stats(),  # collections so far, per generation
                }
            )
        )


_LENGTH = re.compile(rb"\r\ncontent-length: *([0-9]+)", re.IGNORECASE)
_TYPE = re.compile(rb"\r\ncontent-type: *([^\r]*)", re.IGNORECASE)


class _KeptSocket:
    """One socket to the backend, its reader registered once; ``answer()`` waits for the next
    whole answer (head and ``Content-Length`` body)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ConnectionError("backend closed"))
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = _LENGTH.search(self.buf, 0, end)
        total = end + 4 + (int(m.group(1)) if m else 0)
        if len(self.buf) >= total and self.waiter is not None:
            answer, self.buf = bytes(self.buf[:total]), self.buf[total:]
            self.waiter.set_result(answer)

    async def answer(self, request: bytes) -> bytes:
        self.waiter = asyncio.get_running_loop().create_future()
        self.sock.send(request)
        return await self.waiter


_KEPT: dict[int, _KeptSocket] = {}


class MinimalProxyHandler(JupyterHandler):
    """The lower bound of a small proxied GET inside Jupyter (see the module doc)."""

    @web.authenticated
    async def get(self, path: str) -> None:
        run = self.settings["libertem_proxy"].supervisor.run
        if run is None:
            raise web.HTTPError(503, "start LiberTEM through /libertem/ first")
        kept = _KEPT.get(run.port) or _KEPT.setdefault(run.port, _KeptSocket(run.port))
        request = (
            f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1:{run.port}\r\nX-Api-Key: {run.token}\r\n\r\n"
        ).encode()
        answer = await kept.answer(request)
        end = answer.find(b"\r\n\r\n")
        self.set_status(int(answer[9:12]))
        kind = _TYPE.search(answer, 0, end)
        if kind:
            self.set_header("Content-Type", kind.group(1).decode("latin-1"))
        self.finish(answer[end + 4 :])


def relay_websockets_bare() -> None:
    """Make this Jupyter's websocket relay threads copy bytes only: no frame headers followed,
    no lock, no activity, no close rules. The least a relay on threads inside Jupyter costs
    per message (a lower bound for ``ws_rt``; never for use)."""
    from libertem_jupyter_proxy import ws_threads

    def _relay(self: ws_threads.ThreadBridge, d: Any) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        if d.early:
            d.dst.sendall(d.early)
        recv_into, sendall = d.src.recv_into, d.dst.sendall
        while n := recv_into(buf):
            sendall(view[:n])

    ws_threads.ThreadBridge._relay = _relay  # type: ignore[method-assign]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "bench_probe"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    web_app = serverapp.web_app
    route = url_path_join(web_app.settings["base_url"], "_bench/probe")
    minimal = url_path_join(web_app.settings["base_url"], "_bench/minproxy/(.*)")
    web_app.add_handlers(".*$", [(route, ProbeHandler), (minimal, MinimalProxyHandler)])
