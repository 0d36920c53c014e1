"""How fast can anything inside Jupyter answer? The floor under the small-GET ratio.

Measures, at concurrency 1 and in one interleaved run: the backend directly
(``GET /api/config/``), Jupyter's own cheapest authenticated API route with no proxying at all
(``GET /api/status``), and the same backend route through this extension. If Jupyter alone
reaches only a fraction ``j`` of the backend's rate, a proxy inside Jupyter that cost nothing
would still put the two in series: at most ``1 / (1/j + 1)`` of the direct rate.

It also prints CPU seconds per request (psutil): Jupyter's for its own ``/api/status`` against
the backend's for ``/api/config/``. That quotient is what Jupyter's handler stack (HTTP parsing,
authentication, logging) costs before any proxying, i.e. the floor under the issue's "Jupyter
CPU per request / backend CPU per request" metric, to which a proxy must add at least one
upstream request and response on a socket.

    python bench/jupyter_floor.py --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import psutil

from setups import make_workdir, start_direct, start_jupyter, stop


async def rate(
    url: str, headers: dict[str, str], n: int, proc: psutil.Process | None = None
) -> tuple[float, float]:
    """Requests per second, one at a time, after a warm-up; and ``proc``'s CPU microseconds
    per request (0 without ``proc``)."""
    async with aiohttp.ClientSession(headers=headers) as s:
        for _ in range(100):
            async with s.get(url) as r:
                await r.read()
        c0 = _cpu(proc)
        t0 = time.perf_counter()
        for _ in range(n):
            async with s.get(url) as r:
                await r.read()
        elapsed = time.perf_counter() - t0
        return n / elapsed, (_cpu(proc) - c0) * 1e6 / n


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


async def main(reps: int, n: int) -> None:
    work = make_workdir()
    direct = await start_direct(work / "direct", None)
    ours = await start_jupyter("ours", work / "ours", None, None)
    jupyter = str(ours.extra["jupyter_base"])
    try:
        for _ in range(reps):
            d, d_cpu = await rate(direct.base + "api/config/", direct.headers, n, direct.backend())
            j, j_cpu = await rate(jupyter + "api/status", ours.headers, n, ours.jupyter)
            p, p_cpu = await rate(ours.base + "api/config/", ours.headers, n, ours.jupyter)
            floor = 1 / (d / j + 1)
            print(
                f"direct {d:6.0f}/s | Jupyter alone {j:6.0f}/s ({j / d:.2f}x) | "
                f"zero-cost proxy bound {floor:.2f}x | ours {p:6.0f}/s ({p / d:.2f}x)\n"
                f"  CPU per request: backend {d_cpu:5.0f} us | Jupyter alone {j_cpu:5.0f} us "
                f"({j_cpu / d_cpu:.2f}x) | Jupyter proxying {p_cpu:5.0f} us ({p_cpu / d_cpu:.2f}x)"
            )
    finally:
        stop(ours)
        stop(direct)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.reps, args.requests))
