#!/usr/bin/env python3
"""Where Jupyter's CPU goes for one small proxied GET, against Jupyter's own cheapest request.

Issue 17 asks that the proxy's own share of a small request stay within 10% of what Jupyter
spends on its own cheapest authenticated handler, and where the rest goes. This script starts
our Jupyter with ``bench/tornado_backend.py`` (as ``bench/hotpath.py`` does), then for
``{prefix}api/config/`` (proxied), ``{prefix}small`` (proxied, not rewritten), the least any
proxy inside Jupyter must do (``bench_probe.py``'s ``_bench/minproxy/``, a lower bound) and
Jupyter's ``/api/status``:

1. psutil CPU microseconds of the Jupyter process per request, at concurrency 1, in blocks of
   ``--requests`` that take turns for ``--rounds`` rounds;
2. a cProfile of the same loop (``bench/bench_probe.py``), its cumulative time per request
   of: Jupyter's authentication, our ``prepare``, the request to the backend (aiohttp), our
   relay of the answer, tornado writing the answer, the access log. cProfile's overhead
   inflates every figure, so they are compared with each other only;
3. the proxy's own share: Jupyter CPU per proxied request minus per ``/api/status`` request
   in the same round (psutil), as a percentage of the latter (median and range over the
   rounds), and how our steps split it (cProfile).

    python bench/get_breakdown.py [--requests 500] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import setups
from hotpath import PROGRAM
from workloads import cpu_seconds


# cProfile keys functions by file and name (no class); each step is the cumulative time of the
# frame that contains it, minus the steps nested in it
def groups_of(cum: dict[str, float]) -> dict[str, float]:
    """Per-request seconds of each step, from cumulative seconds keyed ``file:function``."""
    auth = cum.get("handlers.py:prepare", 0.0)
    prepare = cum.get("http_proxy.py:prepare", 0.0)
    finish = cum.get("web.py:finish", 0.0)
    log = cum.get("web.py:log_request", 0.0)
    relay = cum.get("http_proxy.py:_relay", 0.0)
    return {
        "Jupyter: authentication (JupyterHandler.prepare)": auth,
        "ours: prepare without authentication": max(prepare - auth, 0.0),
        "ours: request to the backend until its headers": cum.get("http_proxy.py:_send", 0.0)
        + cum.get("http_proxy.py:_send_fast", 0.0),
        "ours: relaying the answer (headers, body)": max(relay - finish, 0.0) if relay else 0.0,
        "tornado: writing the answer (finish, without the log)": finish - log,
        "Jupyter: access log": log,
    }


async def loop(url: str, headers: dict[str, str], n: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(url, headers=headers) as r:
                await r.read()


async def cpu_per_request(t: setups.Target, url: str, n: int) -> float:
    """Jupyter's CPU microseconds per request (psutil) over ``n`` requests at concurrency 1."""
    await loop(url, t.headers, 20)
    c0 = cpu_seconds(t.jupyter)
    await loop(url, t.headers, n)
    return (cpu_seconds(t.jupyter) - c0) * 1e6 / n


async def profiled(t: setups.Target, url: str, n: int) -> dict[str, float]:
    """The cProfile steps of ``groups_of``, microseconds per request (with cProfile's cost)."""
    await loop(url, t.headers, 200)
    probe = t.extra["jupyter_base"] + "_bench/probe"
    async with aiohttp.ClientSession() as s:
        await (await s.get(probe + "?profile=start", headers=t.headers)).read()
        await loop(url, t.headers, n)
        r = await s.get(probe + "?profile=stop", headers=t.headers)
        stats = json.loads(await r.read())
    cum = {}
    for row in stats["by_cum"]:
        file, _, name = row["function"].split(":", 2)
        cum.setdefault(f"{file}:{name}", row["cum_s"])
    return {k: v * 1e6 / n for k, v in groups_of(cum).items()}


FLOOR = "Jupyter's own /api/status"


async def main(args: argparse.Namespace) -> None:
    work = setups.make_workdir()
    t = await setups.start_jupyter("ours", work / "ours", None, None, PROGRAM)
    try:
        await setups.wait_http(t.base + "api/config/", t.headers, 60, 0.05)
        jupyter = t.extra["jupyter_base"]
        urls = {
            "proxied api/config/ (rewritten)": t.base + "api/config/",
            "proxied small JSON": t.base + "small",
            "least possible proxy, api/config/": jupyter + "_bench/minproxy/api/config/",
            FLOOR: jupyter + "api/status",
        }
        # The machine drifts over minutes: the four loops take turns in short blocks, and each
        # own share is taken against the floor of the same round, then the median over rounds.
        cpu: dict[str, list[float]] = {label: [] for label in urls}
        for r in range(args.rounds):
            order = list(urls) if r % 2 == 0 else list(urls)[::-1]
            for label in order:
                cpu[label].append(await cpu_per_request(t, urls[label], args.requests))
        for label, url in urls.items():
            steps = await profiled(t, url, args.requests)
            print(
                f"\n{label}: {statistics.median(cpu[label]):.0f} us of Jupyter CPU per request"
                f" (psutil, median of {args.rounds} rounds)"
            )
            print("  cProfile, cumulative per request (with cProfile's overhead):")
            for name, us in steps.items():
                if us:
                    print(f"    {us:8.0f} us  {name}")
            if label == FLOOR:
                continue
            shares = [(c - f) / f for c, f in zip(cpu[label], cpu[FLOOR], strict=True)]
            ours = {k: v for k, v in steps.items() if k.startswith("ours")}
            total = sum(ours.values()) or 1.0
            split = ", ".join(f"{k[6:]} {100 * v / total:.0f}%" for k, v in ours.items() if v)
            print(
                f"  own share: median {100 * statistics.median(shares):.0f}% of the floor, "
                f"rounds {min(shares) * 100:.0f}% to {max(shares) * 100:.0f}%"
                + (f"; by cProfile: {split}" if split else "")
            )
    finally:
        setups.stop(t)
        setups.cleanup_dir(work)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=500, help="per block and per profile")
    p.add_argument("--rounds", type=int, default=9)
    asyncio.run(main(p.parse_args()))
