"""How fast can anything inside Jupyter answer? The floor under the small-GET ratio.

Measures, at concurrency 1 and in one interleaved run: the backend directly
(``GET /api/config/``), Jupyter's own cheapest authenticated API route with no proxying at all
(``GET /api/status``), and the same backend route through this extension. If Jupyter alone
reaches only a fraction ``j`` of the backend's rate, a proxy inside Jupyter that cost nothing
would still put the two in series: at most ``1 / (1/j + 1)`` of the direct rate.

    python bench/jupyter_floor.py --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from setups import make_workdir, start_direct, start_jupyter, stop


async def rate(url: str, headers: dict[str, str], n: int) -> float:
    """Requests per second, one at a time, after a warm-up."""
    async with aiohttp.ClientSession(headers=headers) as s:
        for _ in range(100):
            async with s.get(url) as r:
                await r.read()
        t0 = time.perf_counter()
        for _ in range(n):
            async with s.get(url) as r:
                await r.read()
        return n / (time.perf_counter() - t0)


async def main(reps: int, n: int) -> None:
    work = make_workdir()
    direct = await start_direct(work / "direct", None)
    ours = await start_jupyter("ours", work / "ours", None, None)
    jupyter = str(ours.extra["jupyter_base"])
    try:
        for _ in range(reps):
            d = await rate(direct.base + "api/config/", direct.headers, n)
            j = await rate(jupyter + "api/status", ours.headers, n)
            p = await rate(ours.base + "api/config/", ours.headers, n)
            floor = 1 / (d / j + 1)
            print(
                f"direct {d:6.0f}/s | Jupyter alone {j:6.0f}/s ({j / d:.2f}x) | "
                f"zero-cost proxy bound {floor:.2f}x | ours {p:6.0f}/s ({p / d:.2f}x)"
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
