#!/usr/bin/env python3
"""The proxy's own cost on LiberTEM's hot paths: direct vs proxied, a tornado backend (issue 17).

``bench/run.py`` compares three targets over the test suite's fake backend, which is itself
slow enough per byte to hide part of the proxy's cost. This runner uses
``bench/tornado_backend.py`` (what libertem-server does on these paths and nothing more) and an
aiohttp client, and measures the workloads of issue 17's table, direct and through this
extension, interleaved in one run (direct, ours, then ours, direct, ...), medians of ``--reps``.
A third target, ``relay`` (``bench/tcp_relay.py``: a TCP relay in Python that parses nothing),
shows the floor any userspace proxy process has on this machine (``--no-relay`` leaves it out):

==============  ====================================================================
ws_echo         1 MiB binary messages, one at a time: send, await the echo (MiB/s one way)
ws_push         the backend pushes 1 MiB on request (``push``), ms a message
ws_send         the browser sends 1 MiB, the backend answers its length as text, ms
download_cl     GET 256 MiB with Content-Length (tornado writes 64 KiB + flush), MiB/s
download_chunk  the same without Content-Length (chunked), MiB/s
upload          POST 128 MiB with Content-Length, MiB/s
ws_rt           1 KiB text round trips on one websocket, per second
get_c1          small GET (``api/config/``) at concurrency 1, per second; also Jupyter's own
                ``/api/status`` (the floor: jupyter_floor.py) and Jupyter CPU per request
==============  ====================================================================

    python bench/hotpath.py                  # all, 5 repetitions (~2 minutes)
    python bench/hotpath.py --only ws_send --only ws_push --reps 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import profiling
import setups
from setups import Target
from workloads import cpu_seconds

MiB = 1 << 20
PROGRAM = Path(__file__).resolve().parent / "tornado_backend.py"
Sample = dict[str, float]


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120),
    )


async def _ws(s: aiohttp.ClientSession, t: Target) -> aiohttp.ClientWebSocketResponse:
    return await s.ws_connect(
        t.ws_base + "api/events/", headers=t.headers, max_msg_size=0, compress=0
    )


def _cpu(t: Target) -> tuple[float, float]:
    return cpu_seconds(t.jupyter), cpu_seconds(t.backend())


def _cpu_result(t: Target, before: tuple[float, float], n: float) -> Sample:
    jup, be = _cpu(t)
    out = {"be_cpu_us": (be - before[1]) * 1e6 / n}
    if t.jupyter is not None:
        out["jup_cpu_us"] = (jup - before[0]) * 1e6 / n
    return out


async def ws_echo(t: Target, duration: float) -> Sample:
    payload = bytes(MiB)
    async with session() as s, await _ws(s, t) as ws:
        for _ in range(3):
            await ws.send_bytes(payload)
            await ws.receive_bytes()
        n, c0, t0 = 0, _cpu(t), time.perf_counter()
        while time.perf_counter() - t0 < duration:
            await ws.send_bytes(payload)
            if len(await ws.receive_bytes()) != MiB:
                raise RuntimeError("short echo")
            n += 1
        elapsed = time.perf_counter() - t0
    return {"MiB/s": n / elapsed, **_cpu_result(t, c0, n)}


async def ws_push(t: Target, duration: float) -> Sample:
    async with session() as s, await _ws(s, t) as ws:
        for _ in range(3):
            await ws.send_str(f"push {MiB}")
            await ws.receive_bytes()
        n, c0, t0 = 0, _cpu(t), time.perf_counter()
        while time.perf_counter() - t0 < duration:
            await ws.send_str(f"push {MiB}")
            if len(await ws.receive_bytes()) != MiB:
                raise RuntimeError("short push")
            n += 1
        elapsed = time.perf_counter() - t0
    return {"ms/msg": elapsed * 1e3 / n, **_cpu_result(t, c0, n)}


async def ws_send(t: Target, duration: float) -> Sample:
    payload = bytes(MiB)
    async with session() as s, await _ws(s, t) as ws:
        await ws.send_str("ack")
        await ws.receive_str()
        for _ in range(3):
            await ws.send_bytes(payload)
            await ws.receive_str()
        n, c0, t0 = 0, _cpu(t), time.perf_counter()
        while time.perf_counter() - t0 < duration:
            await ws.send_bytes(payload)
            if await ws.receive_str() != str(MiB):
                raise RuntimeError("wrong ack")
            n += 1
        elapsed = time.perf_counter() - t0
    return {"ms/msg": elapsed * 1e3 / n, **_cpu_result(t, c0, n)}


async def ws_rt(t: Target, duration: float) -> Sample:
    text = "x" * 1024
    async with session() as s, await _ws(s, t) as ws:
        for _ in range(50):
            await ws.send_str(text)
            await ws.receive_str()
        n, c0, t0 = 0, _cpu(t), time.perf_counter()
        while time.perf_counter() - t0 < duration:
            await ws.send_str(text)
            await ws.receive_str()
            n += 1
        elapsed = time.perf_counter() - t0
    return {"rt/s": n / elapsed, **_cpu_result(t, c0, n)}


async def download(t: Target, size: int, chunked: bool) -> Sample:
    url = f"{t.base}dl?size={size}&chunked={int(chunked)}"
    async with session() as s:
        c0, t0 = _cpu(t), time.perf_counter()
        async with s.get(url, headers=t.headers) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")
            got = 0
            async for chunk in r.content.iter_any():
                got += len(chunk)
        elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"got {got} of {size} bytes")
    return {"MiB/s": size / MiB / elapsed, **_cpu_result(t, c0, size / MiB)}


async def upload(t: Target, size: int) -> Sample:
    block = bytes(MiB)

    async def body() -> Any:
        for _ in range(size // MiB):
            yield block

    headers = {**t.headers, "Content-Length": str(size)}
    async with session() as s:
        c0, t0 = _cpu(t), time.perf_counter()
        async with s.post(t.base + "up", data=body(), headers=headers) as r:
            answer = await r.json(content_type=None)
        elapsed = time.perf_counter() - t0
    if answer.get("received") != size:
        raise RuntimeError(f"backend got {answer}")
    return {"MiB/s": size / MiB / elapsed, **_cpu_result(t, c0, size / MiB)}


async def _get_rate(url: str, headers: dict[str, str], duration: float) -> tuple[float, int]:
    async with session() as s:
        for _ in range(50):
            async with s.get(url, headers=headers) as r:
                await r.read()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            async with s.get(url, headers=headers) as r:
                await r.read()
            n += 1
        return n / (time.perf_counter() - t0), n


async def get_c1(t: Target, duration: float) -> Sample:
    c0 = _cpu(t)
    base = str(t.extra.get("get_base", t.base))  # the bound: bench_probe's least proxy
    rate, n = await _get_rate(base + "api/config/", t.headers, duration)
    out: Sample = {"req/s": rate, **_cpu_result(t, c0, n + 50)}
    if t.name == "ours":  # Jupyter's own cheapest authenticated handler, same moment
        c1 = _cpu(t)
        floor, m = await _get_rate(f"{t.extra['jupyter_base']}api/status", t.headers, duration)
        out["floor req/s"] = floor
        out["floor_cpu_us"] = (cpu_seconds(t.jupyter) - c1[0]) * 1e6 / (m + 50)
    return out


WORKLOADS: dict[str, Callable[[Target, argparse.Namespace], Awaitable[Sample]]] = {
    "ws_echo": lambda t, a: ws_echo(t, a.duration),
    "ws_push": lambda t, a: ws_push(t, a.duration),
    "ws_send": lambda t, a: ws_send(t, a.duration),
    "download_cl": lambda t, a: download(t, a.download * MiB, chunked=False),
    "download_chunk": lambda t, a: download(t, a.download * MiB, chunked=True),
    "upload": lambda t, a: upload(t, a.upload * MiB),
    "ws_rt": lambda t, a: ws_rt(t, a.duration),
    "get_c1": lambda t, a: get_c1(t, a.duration),
}
# the figure each row is judged on, and whether bigger is better
MAIN = {
    "ws_echo": "MiB/s",
    "ws_push": "ms/msg",
    "ws_send": "ms/msg",
    "download_cl": "MiB/s",
    "download_chunk": "MiB/s",
    "upload": "MiB/s",
    "ws_rt": "rt/s",
    "get_c1": "req/s",
}


def median(samples: list[Sample], key: str) -> float | None:
    values = [s[key] for s in samples if key in s]
    return statistics.median(values) if values else None


def _ratio(key: str, direct: float | None, value: float | None) -> float | None:
    """``value`` against ``direct``, so that "as fast as direct" is always 1."""
    if not direct or not value:
        return None
    return direct / value if key == "ms/msg" else value / direct


def report(results: dict[str, dict[str, list[Sample]]]) -> list[dict[str, Any]]:
    rows = []
    for name, per in results.items():
        key = MAIN[name]
        d, o = median(per["direct"], key), median(per["ours"], key)
        r = median(per["relay"], key) if "relay" in per else None
        b = median(per["bound"], key) if "bound" in per else None

        row = {"workload": name, "unit": key, "direct": d, "ours": o, "ratio": _ratio(key, d, o)}
        row |= {"relay": r, "relay ratio": _ratio(key, d, r)}
        if b is not None:
            row |= {"bound": b, "bound ratio": _ratio(key, d, b)}
            v = median(per["bound"], "jup_cpu_us")
            if v is not None:
                row["bound jup_cpu_us"] = v
        for extra in ("jup_cpu_us", "be_cpu_us", "floor req/s", "floor_cpu_us"):
            v = median(per["ours"], extra)
            if v is not None:
                row[f"ours {extra}"] = v
        v = median(per["direct"], "be_cpu_us")
        if v is not None:
            row["direct be_cpu_us"] = v
        v = median(per.get("relay", []), "jup_cpu_us")
        if v is not None:
            row["relay cpu_us"] = v
        errors = [s["error"] for p in per.values() for s in p if "error" in s]
        if errors:
            row["errors"] = errors[:3]
        rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'workload':15} {'unit':7} {'direct':>9} {'ours':>9} {'ratio':>6} "
        f"{'relay':>9} {'ratio':>6}  extra"
    )
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:9.4g}"  # noqa: E731
        rfmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        extra = ", ".join(
            f"{k}={v:.4g}"
            for k, v in r.items()
            if k.startswith(("ours ", "direct ", "relay cpu", "bound ")) and v
        )
        print(
            f"{r['workload']:15} {r['unit']:7} {fmt(r['direct'])} {fmt(r['ours'])} "
            f"{rfmt(r['ratio']):>6} {fmt(r.get('relay'))} {rfmt(r.get('relay ratio')):>6}  {extra}"
        )
        if "errors" in r:
            print(f"   errors: {r['errors']}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = setups.make_workdir()
    targets: list[Target] = []
    try:
        targets.append(await setups.start_direct(work / "direct", None, PROGRAM))
        ours = await setups.start_jupyter("ours", work / "ours", None, None, PROGRAM)
        targets.append(ours)
        await setups.wait_http(ours.base + "api/config/", ours.headers, 60, 0.05)
        if not args.no_relay:
            targets.append(await setups.start_relay(targets[0], args.relay_threads))
        if args.bounds:
            bound = await setups.start_jupyter(
                "ours",
                work / "bound",
                None,
                None,
                PROGRAM,
                extra_lines=("import bench_probe; bench_probe.relay_websockets_bare()",),
            )
            bound.name = "bound"
            bound.extra["get_base"] = f"{bound.extra['jupyter_base']}_bench/minproxy/"
            await setups.wait_http(bound.base + "api/config/", bound.headers, 60, 0.05)
            targets.append(bound)
        names = args.only or list(WORKLOADS)
        results: dict[str, dict[str, list[Sample]]] = {}
        profiles: dict[str, Any] = {}
        for name in names:
            per: dict[str, list[Sample]] = {t.name: [] for t in targets}
            recorder = profiling.start(ours, name, work) if args.profile else None
            for rep in range(args.reps):
                order = targets if rep % 2 == 0 else targets[::-1]
                for t in order:
                    try:
                        sample = await asyncio.wait_for(WORKLOADS[name](t, args), 300)
                    except Exception as e:
                        sample = {"error": f"{type(e).__name__}: {e}"[:200]}  # type: ignore[dict-item]
                    per[t.name].append(sample)
            results[name] = per
            if recorder is not None:
                profiles[name] = profiling.finish(recorder)
            row = report({name: per})[0]
            r = row["ratio"]
            print(
                f"[{time.strftime('%H:%M:%S')}] {name}: direct {row['direct']} ours {row['ours']}"
                f" ratio {'-' if r is None else round(r, 3)}",
                file=sys.stderr,
                flush=True,
            )
        return {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reps": args.reps,
            "git": __import__("run").git_state(),
            "rows": report(results),
            "samples": results,
            "profiles": profiles,
        }
    finally:
        for t in targets:
            setups.stop(t)
        setups.cleanup_dir(work)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", action="append", choices=list(WORKLOADS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--duration", type=float, default=1.0, help="seconds per timed loop")
    p.add_argument("--download", type=int, default=256, help="MiB")
    p.add_argument("--upload", type=int, default=128, help="MiB")
    p.add_argument(
        "--no-relay",
        action="store_true",
        help="leave out the third target, bench/tcp_relay.py (the floor of a userspace relay)",
    )
    p.add_argument(
        "--relay-threads",
        action="store_true",
        help="run the relay with a blocking thread per direction instead of an event loop",
    )
    p.add_argument(
        "--bounds",
        action="store_true",
        help="add a fourth target, 'bound': a Jupyter whose websocket threads copy bytes only "
        "and whose small GETs go through bench_probe's least proxy (lower bounds, no rules)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy record our Jupyter during each workload (both targets' repetitions run; "
        "only Jupyter is sampled)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    print_rows(result["rows"])
    if result["profiles"]:
        profiling.print_summary(result["profiles"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-hotpath.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
