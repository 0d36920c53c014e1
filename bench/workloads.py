"""One repetition of each measurement against one target; each returns a flat dict of numbers.

Every function measures the cost in the processes that serve the request: CPU seconds of the
Jupyter process (``jup_cpu``) and of the backend (``be_cpu``) from psutil deltas, and the peak
RSS growth of the Jupyter process sampled while the operation runs. The load generator is this
process, separate from both.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from setups import Target

MiB = 1 << 20
Sample = dict[str, Any]


def cpu_seconds(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def rss(proc: psutil.Process | None) -> int:
    if proc is None:
        return 0
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


@dataclass
class Meter:
    """CPU deltas of Jupyter and backend, and Jupyter's peak RSS growth, around one operation.

    RSS is sampled every 10 ms by a task of this (load generator) process; the peak minus the
    value before is what a browser download or upload costs Jupyter in memory."""

    target: Target
    jup0: float = 0.0
    be0: float = 0.0
    rss0: int = 0
    peak: int = 0
    t0: float = 0.0
    _task: asyncio.Task[None] | None = None
    backend: psutil.Process | None = None
    result: Sample = field(default_factory=dict)

    async def __aenter__(self) -> Meter:
        self.backend = self.target.backend()
        self.jup0 = cpu_seconds(self.target.jupyter)
        self.be0 = cpu_seconds(self.backend)
        self.rss0 = self.peak = rss(self.target.jupyter)
        self._task = asyncio.ensure_future(self._sample())
        self.t0 = time.perf_counter()
        return self

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss(self.target.jupyter))
            await asyncio.sleep(0.01)

    async def __aexit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.t0
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, rss(self.target.jupyter))
        self.result = {
            "elapsed": elapsed,
            "jup_cpu": cpu_seconds(self.target.jupyter) - self.jup0
            if self.target.jupyter
            else None,
            "be_cpu": cpu_seconds(self.backend) - self.be0,
            "rss_growth_mib": (self.peak - self.rss0) / MiB if self.target.jupyter else None,
        }


def session(limit: int = 32) -> aiohttp.ClientSession:
    """The load generator's client: pooled keep-alive connections, raw (undecoded) bodies."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120),
    )


def per_gib(cpu: float | None, size: int) -> float | None:
    return None if cpu is None else cpu / (size / (1 << 30))


class BadStatus(Exception):
    pass


def check(resp: aiohttp.ClientResponse) -> None:
    if resp.status != 200:
        raise BadStatus(f"HTTP {resp.status}")


# ---------------------------------------------------------------- small requests


async def small_gets(target: Target, concurrency: int, duration: float) -> Sample:
    """``GET api/config/`` (a small JSON answer) in a closed loop from ``concurrency`` tasks
    over one shared connector, for ``duration`` seconds."""
    url = target.base + "api/config/"
    latencies: list[float] = []
    async with session(limit=concurrency) as s:
        for _ in range(concurrency):  # open the pooled connections before measuring
            async with s.get(url, headers=target.headers) as r:
                check(r)
                await r.read()
        async with Meter(target) as meter:
            deadline = time.perf_counter() + duration

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    t = time.perf_counter()
                    async with s.get(url, headers=target.headers) as r:
                        check(r)
                        await r.read()
                    latencies.append(time.perf_counter() - t)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    m = meter.result
    n = len(latencies)
    return {
        "rps": n / m["elapsed"],
        "p50_ms": statistics.median(latencies) * 1000,
        "jup_cpu_us": m["jup_cpu"] / n * 1e6 if m["jup_cpu"] is not None else None,
        "be_cpu_us": m["be_cpu"] / n * 1e6,
        "cpu_ratio": (m["jup_cpu"] / m["be_cpu"]) if m["jup_cpu"] and m["be_cpu"] else None,
        "requests": n,
    }


# ---------------------------------------------------------------- large bodies


async def download(target: Target, size: int, chunk: int = 256 * 1024) -> Sample:
    """One ``size``-byte download, read as fast as the client can, body discarded."""
    url = f"{target.base}_fake/download?size={size}&chunk={chunk}"
    async with session() as s, Meter(target) as meter:
        async with s.get(url, headers=target.headers) as r:
            check(r)
            got = 0
            while data := await r.content.readany():
                got += len(data)
    if got != size:
        raise BadStatus(f"short body: {got} of {size}")
    return _transfer_sample(meter, size)


def _transfer_sample(meter: Meter, size: int) -> Sample:
    """Throughput, RSS growth and CPU per GiB of one ``size``-byte download or upload."""
    m = meter.result
    return {
        "mib_s": size / MiB / m["elapsed"],
        "rss_growth_mib": m["rss_growth_mib"],
        "jup_cpu_s_per_gib": per_gib(m["jup_cpu"], size),
        "be_cpu_s_per_gib": per_gib(m["be_cpu"], size),
    }


async def _body(size: int, chunk: int) -> AsyncIterator[bytes]:
    block = bytes(range(256)) * (chunk // 256)
    sent = 0
    while sent < size:
        n = min(chunk, size - sent)
        yield block if n == chunk else block[:n]
        sent += n


async def upload(target: Target, size: int, chunk: int = 1 * MiB) -> Sample:
    """One ``size``-byte POST with a Content-Length (as a browser sends a file) to the fake's
    streaming echo, which answers with the length and hash only."""
    url = target.base + "_fake/echo?summary=1"
    headers = {
        **target.headers,
        "Content-Length": str(size),
        "Content-Type": "application/octet-stream",
    }
    async with session() as s, Meter(target) as meter:
        async with s.post(url, headers=headers, data=_body(size, chunk)) as r:
            check(r)
            answer = await r.json(content_type=None)
    if answer.get("length") != size:
        raise BadStatus(f"backend got {answer.get('length')} of {size} bytes")
    return _transfer_sample(meter, size)


async def ttfb(target: Target, size: int) -> Sample:
    """Time from sending a large download's request to its first body byte; then abort."""
    url = f"{target.base}_fake/download?size={size}"
    async with session() as s:
        t = time.perf_counter()
        async with s.get(url, headers=target.headers) as r:
            check(r)
            await r.content.readany()
            first = time.perf_counter() - t
            r.close()
    return {"ms": first * 1000}


async def sse_first(target: Target, interval: float = 0.25) -> Sample:
    """First server-sent event with ``Accept: */*`` (what fetch() sends), then abort."""
    url = f"{target.base}_fake/sse?count=3&interval={interval}"
    async with session() as s:
        t = time.perf_counter()
        async with s.get(url, headers={**target.headers, "Accept": "*/*"}) as r:
            check(r)
            buf = b""
            while b"\n\n" not in buf:
                data = await r.content.readany()
                if not data:
                    raise BadStatus("stream ended before the first event")
                buf += data
            first = time.perf_counter() - t
            r.close()
    return {"ms": first * 1000}


# ---------------------------------------------------------------- websockets


async def _ws(s: aiohttp.ClientSession, target: Target) -> aiohttp.ClientWebSocketResponse:
    return await s.ws_connect(
        target.ws_base + "api/events/", headers=target.headers, max_msg_size=0, autoping=True
    )


async def ws_round_trips(target: Target, duration: float, size: int = 1024) -> Sample:
    """1 KiB text message, wait for its echo, repeat, on one connection."""
    message = "x" * size
    async with session() as s, await _ws(s, target) as ws:
        for _ in range(10):
            await ws.send_str(message)
            await ws.receive()
        n = 0
        async with Meter(target) as meter:
            deadline = time.perf_counter() + duration
            while time.perf_counter() < deadline:
                await ws.send_str(message)
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT or len(msg.data) != size:
                    raise BadStatus(f"bad echo: {msg.type}")
                n += 1
    m = meter.result
    return {
        "per_s": n / m["elapsed"],
        "jup_cpu_us": m["jup_cpu"] / n * 1e6 if m["jup_cpu"] is not None else None,
        "be_cpu_us": m["be_cpu"] / n * 1e6,
    }


async def ws_binary(target: Target, duration: float, size: int = MiB, window: int = 4) -> Sample:
    """1 MiB binary messages echoed, ``window`` in flight; payload MiB/s one way."""
    payload = bytes(range(256)) * (size // 256)
    async with session() as s, await _ws(s, target) as ws:
        received = sent = 0
        async with Meter(target) as meter:
            deadline = time.perf_counter() + duration
            for _ in range(window):
                await ws.send_bytes(payload)
                sent += 1
            while received < sent:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY or len(msg.data) != size:
                    raise BadStatus(f"bad echo: {msg.type}")
                received += 1
                if time.perf_counter() < deadline:
                    await ws.send_bytes(payload)
                    sent += 1
    m = meter.result
    return {
        "mib_s": received * size / MiB / m["elapsed"],
        "rss_growth_mib": m["rss_growth_mib"],
    }


async def ws_big_message(target: Target, size: int = 64 * MiB) -> Sample:
    """One ``size``-byte binary message to the backend and its echo back, compared byte-wise."""
    payload = (bytes(range(251)) * (size // 251 + 1))[:size]
    async with session() as s, await _ws(s, target) as ws, Meter(target) as meter:
        await ws.send_bytes(payload)
        msg = await ws.receive()
    ok = msg.type is aiohttp.WSMsgType.BINARY and msg.data == payload
    detail = "" if ok else f"{msg.type.name} {msg.data!r}"[:80]
    return {
        "pass": 1.0 if ok else 0.0,
        "s": meter.result["elapsed"],
        "rss_growth_mib": meter.result["rss_growth_mib"],
        "detail": detail,
    }


# ---------------------------------------------------------------- cold start


async def cold_start_direct(workdir: Path, client_dir: Path | None) -> Sample:
    """The backend's own readiness: from spawning it to its first 200 (polled every 2 ms)."""
    from setups import spawn_backend, wait_http

    t = time.monotonic()
    proc, port, token = spawn_backend(workdir, client_dir)
    try:
        ready = await wait_http(
            f"http://127.0.0.1:{port}/api/config/", {"X-Api-Key": token}, 30, 0.002
        )
    finally:
        proc.kill()
        proc.wait()
    return {"ms": (ready - t) * 1000}


async def cold_start_proxy(target: Target) -> Sample:
    """From the first request to a Jupyter whose backend is not running to its 200."""
    async with session() as s:
        t = time.monotonic()
        async with s.get(target.base + "api/config/", headers=target.headers) as r:
            check(r)
            await r.read()
        return {"ms": (time.monotonic() - t) * 1000}


# ---------------------------------------------------------------- GUI first load

_LINK = re.compile(r'(?:src|href)="\./([^"]+)"')
_CSS_URL = re.compile(r"url\(\s*['\"]?\./([^)'\"?#]+\.woff2)")
_TEXT_TYPES = ("text/", "application/javascript", "application/json", "image/svg+xml")


def first_load_files(index: bytes, fetched: dict[str, bytes]) -> list[str]:
    """What a browser fetches on first load: the index, what it links, the woff2 fonts the CSS
    names (browsers take the first supported format) and PNGs the JS bundle names."""
    links = _LINK.findall(index.decode("utf-8", "replace"))
    extra: list[str] = []
    for name in links:
        body = fetched.get(name, b"").decode("utf-8", "replace")
        if name.endswith(".css"):
            extra += ["assets/" + u for u in _CSS_URL.findall(body)]
        if name.endswith(".js"):
            extra += sorted({"assets/" + u for u in re.findall(r"[\w\- ]+\.png", body)})
    return list(dict.fromkeys(links + extra))


async def gui_first_load(target: Target) -> Sample:
    """Bytes on the wire (status line + headers + body as sent, gzip if the server chose it)
    for the GUI's first load, requested with ``Accept-Encoding: gzip`` like a browser."""
    headers = {**target.headers, "Accept-Encoding": "gzip"}
    wire = body_total = ideal = 0
    files: dict[str, Any] = {}

    async def get(s: aiohttp.ClientSession, name: str) -> bytes:
        nonlocal wire, body_total, ideal
        async with s.get(target.base + name, headers=headers) as r:
            raw = await r.read()
            head = sum(len(k) + len(v) + 4 for k, v in r.raw_headers) + 17
            wire += head + len(raw)
            body_total += len(raw)
            ctype = r.headers.get("Content-Type", "")
            encoding = r.headers.get("Content-Encoding", "")
            plain = gzip.decompress(raw) if encoding == "gzip" else raw
            text = ctype.startswith(_TEXT_TYPES)
            ideal += len(gzip.compress(plain, 6)) if text else len(plain)
            files[name] = {"status": r.status, "bytes": len(raw), "encoding": encoding}
            return plain

    async with session() as s:
        index = await get(s, "")
        fetched: dict[str, bytes] = {}
        for name in _LINK.findall(index.decode("utf-8", "replace")):
            fetched[name] = await get(s, name)
        for name in first_load_files(index, fetched):
            if name not in fetched:
                await get(s, name)
    return {
        "wire_kib": wire / 1024,
        "body_kib": body_total / 1024,
        "gzip6_kib": ideal / 1024,
        "files": len(files),
        "detail": files,
    }


# ---------------------------------------------------------------- aborts


async def _raw_request(
    target: Target, head: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = target.base.split("//", 1)[1].split("/", 1)[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    path = "/" + target.base.split("//", 1)[1].split("/", 1)[1]
    auth = "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
    writer.write(head.replace("{path}", path).replace("{auth}", auth).encode())
    return reader, writer


async def abort_download(target: Target, size: int = 64 * MiB) -> None:
    """Start a download, read a little of its body, then drop the connection (RST)."""
    reader, writer = await _raw_request(
        target,
        f"GET {{path}}_fake/download?size={size} HTTP/1.1\r\nHost: bench\r\n{{auth}}\r\n",
    )
    got = 0
    try:
        while got < 256 * 1024:
            data = await reader.read(65536)
            if not data:
                break
            got += len(data)
    finally:
        writer.transport.abort()


async def abort_upload(target: Target, size: int = 64 * MiB) -> None:
    """Announce a large upload, send 1 MiB of it, then drop the connection."""
    _, writer = await _raw_request(
        target,
        "POST {path}_fake/echo?summary=1 HTTP/1.1\r\nHost: bench\r\n{auth}"
        f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n",
    )
    try:
        block = b"\0" * (256 * 1024)
        for _ in range(4):
            writer.write(block)
            await writer.drain()
        await asyncio.sleep(0.005)
    finally:
        writer.transport.abort()


async def probe(target: Target) -> dict[str, Any]:
    """Open fds and RSS from psutil; asyncio task count from the bench probe extension."""
    proc = target.jupyter or target.direct_backend
    assert proc is not None
    out: dict[str, Any] = {"fds": proc.num_fds(), "rss_mib": rss(proc) / MiB, "tasks": None}
    if target.jupyter is not None:
        url = str(target.extra["jupyter_base"]) + "_bench/probe"
        async with session() as s, s.get(url, headers=target.headers) as r:
            out["tasks"] = (await r.json())["tasks"]
    return out


async def aborts(
    target: Target, count: int, concurrency: int = 8, settle: float = 2.0, give_up: int = 16
) -> Sample:
    """``count`` client aborts (half mid-download, half mid-upload), ``concurrency`` at a time;
    fds, tasks and RSS of the serving process before (after a warm-up) and after (settled).

    An abort whose request gets no answer within 3 s counts as ``hung``; after ``give_up`` of
    them the run stops early (a proxy that stops serving would otherwise take hours)."""
    sem = asyncio.Semaphore(concurrency)
    counts = {"done": 0, "hung": 0, "errors": 0}

    async def one(i: int) -> None:
        async with sem:
            if counts["hung"] >= give_up:
                return
            try:
                await asyncio.wait_for((abort_download if i % 2 else abort_upload)(target), 3)
                counts["done"] += 1
            except asyncio.TimeoutError:
                counts["hung"] += 1
            except OSError:
                counts["errors"] += 1

    async def batch(n: int) -> None:
        await asyncio.gather(*(one(i) for i in range(n)))

    await batch(40)
    if counts["hung"] >= give_up:  # already stuck in the warm-up: do not wait for more
        count = 0
    await asyncio.sleep(settle)
    before = await probe(target)
    warmup_hung = counts["hung"]
    counts.update(done=0, hung=0, errors=0)
    t = time.perf_counter()
    await batch(count)
    elapsed = time.perf_counter() - t
    await asyncio.sleep(settle)
    after = await probe(target)
    async with session() as s:
        try:
            r = await asyncio.wait_for(
                s.get(target.base + "api/config/", headers=target.headers), 10
            )
            healthy = r.status == 200
            r.release()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            healthy = False
    return {
        "fd_growth": after["fds"] - before["fds"],
        "task_growth": (after["tasks"] - before["tasks"]) if after["tasks"] is not None else None,
        "rss_growth_mib": after["rss_mib"] - before["rss_mib"],
        "healthy_after": 1.0 if healthy else 0.0,
        "aborted": counts["done"],
        "hung": counts["hung"] + warmup_hung,
        "client_errors": counts["errors"],
        "s": elapsed,
        "detail": {"before": before, "after": after},
    }


Measure = Callable[[Target], Awaitable[Sample]]
