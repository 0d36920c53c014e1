#!/usr/bin/env python3
"""Where Jupyter's CPU goes for one small proxied GET, against Jupyter's own cheapest request.

Issue 17 asks that the proxy's own share of a small request stay within 10% of what Jupyter
spends on its own cheapest authenticated handler, and where the rest goes. This script starts
our Jupyter with ``bench/tornado_backend.py`` (as ``bench/hotpath.py`` does), then for
``{prefix}api/config/`` (proxied), ``{prefix}small`` (proxied, not rewritten) and Jupyter's
``/api/status``:

1. psutil CPU microseconds of the Jupyter process per request, at concurrency 1;
2. a cProfile of the same loop (``bench/bench_probe.py``), its cumulative time per request
   of: Jupyter's authentication, our ``prepare``, the request to the backend (aiohttp), our
   relay of the answer, tornado writing the answer, the access log. cProfile's overhead
   inflates every figure, so they are compared with each other only;
3. the proxy's own share: Jupyter CPU per proxied request minus per ``/api/status`` request
   (psutil), as a percentage of the latter, and how our steps split it (cProfile).

    python bench/get_breakdown.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

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


async def measure(t: setups.Target, url: str, n: int) -> dict[str, Any]:
    await loop(url, t.headers, 200)
    c0 = cpu_seconds(t.jupyter)
    await loop(url, t.headers, n)
    cpu_us = (cpu_seconds(t.jupyter) - c0) * 1e6 / n
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
    groups = {k: v * 1e6 / n for k, v in groups_of(cum).items()}
    return {"cpu_us": cpu_us, "profiled_us": groups}


async def main(args: argparse.Namespace) -> None:
    work = setups.make_workdir()
    t = await setups.start_jupyter("ours", work / "ours", None, None, PROGRAM)
    try:
        await setups.wait_http(t.base + "api/config/", t.headers, 60, 0.05)
        results = {}
        for label, url in [
            ("proxied api/config/ (rewritten)", t.base + "api/config/"),
            ("proxied small JSON", t.base + "small"),
            ("Jupyter's own /api/status", t.extra["jupyter_base"] + "api/status"),
        ]:
            m = results[label] = await measure(t, url, args.requests)
            print(f"\n{label}: {m['cpu_us']:.0f} us of Jupyter CPU per request (psutil)")
            print("  cProfile, cumulative per request (with cProfile's overhead):")
            for name, us in m["profiled_us"].items():
                if us:
                    print(f"    {us:8.0f} us  {name}")
        floor = results["Jupyter's own /api/status"]["cpu_us"]
        for label in list(results)[:2]:
            m = results[label]
            own = m["cpu_us"] - floor
            ours = {k: v for k, v in m["profiled_us"].items() if k.startswith("ours")}
            total = sum(ours.values()) or 1.0
            split = ", ".join(f"{k[6:]} {100 * v / total:.0f}%" for k, v in ours.items())
            print(
                f"\n{label}: own share {own:.0f} us = {100 * own / floor:.0f}% of the floor "
                f"({floor:.0f} us); by cProfile: {split}"
            )
    finally:
        setups.stop(t)
        setups.cleanup_dir(work)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    asyncio.run(main(p.parse_args()))
