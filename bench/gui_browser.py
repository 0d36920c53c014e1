#!/usr/bin/env python3
"""The real LiberTEM GUI in headless Chromium: cold and warm load, direct vs through the proxy.

What a scientist waits for when opening the GUI: navigation start -> the cluster dialog's
Connect button (the first thing the GUI shows that needs its JS, CSS, fonts and the API).
Measured with the real ``libertem-server`` (``make install-demo``) and Debian's Chromium via
playwright (``executable_path=/usr/bin/chromium``, never ``playwright install``):

- **cold**: a fresh browser context (empty cache), first load;
- **warm**: the same context, a second navigation to the same URL (what a returning user does);
- **reload**: then the browser's reload (F5), which revalidates whatever is not ``immutable``.

For each: time to the Connect button, requests that went to the network (Chrome DevTools
Protocol ``Network`` events: a response from the memory or disk cache is not counted) and bytes
on the wire (``encodedDataLength``: headers and body as transferred, i.e. after gzip), direct
and proxied, in alternation (``--reps``, medians).

``--latency MS`` adds a round-trip latency to every network request with Chromium's own
network emulation (``Network.emulateNetworkConditions``, what DevTools' throttling uses): a hub
reached over a real network. ``tc netem`` on a loopback in a network namespace would be closer
to the wire, but this machine's kernel has no netem qdisc (``tc qdisc add dev lo root netem``:
"Specified qdisc kind is unknown"; ``tbf`` works, it only limits the rate).

    python bench/gui_browser.py --reps 3
    python bench/gui_browser.py --reps 3 --latency 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import CHROMIUM, CHROMIUM_ARGS

import setups
from setups import Target

GUI_TIMEOUT = 120_000  # ms: the first load also starts libertem-server's dask cluster setup


class Recorder:
    """Network requests of one page load as Chromium's DevTools protocol reports them."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}
        self.cached: set[str] = set()
        self.wire = 0

    def attach(self, cdp: Any) -> None:
        cdp.on("Network.requestWillBeSent", self._sent)
        cdp.on("Network.requestServedFromCache", lambda e: self.cached.add(e["requestId"]))
        cdp.on("Network.responseReceived", self._response)
        cdp.on("Network.loadingFinished", self._finished)

    def _sent(self, e: dict[str, Any]) -> None:
        self.urls[e["requestId"]] = e["request"]["url"]

    def _response(self, e: dict[str, Any]) -> None:
        r = e["response"]
        if r.get("fromDiskCache") or r.get("fromPrefetchCache") or r.get("fromServiceWorker"):
            self.cached.add(e["requestId"])

    def _finished(self, e: dict[str, Any]) -> None:
        if e["requestId"] not in self.cached:
            self.wire += int(e.get("encodedDataLength", 0))

    def network(self, origin: str) -> list[str]:
        """URLs of ``origin`` that went to the network (not ``data:``, not the Google Fonts
        stylesheet the GUI links, which this offline machine cannot reach anyway)."""
        return [
            u for rid, u in self.urls.items() if rid not in self.cached and u.startswith(origin)
        ]

    def reset(self) -> None:
        self.urls.clear()
        self.cached.clear()
        self.wire = 0


def _origin(url: str) -> str:
    scheme, _, host = url.split("/", 3)[:3]
    return f"{scheme}//{host}"


async def load(page: Any, url: str, rec: Recorder) -> dict[str, Any]:
    rec.reset()
    t0 = time.perf_counter()
    await page.goto(url, timeout=GUI_TIMEOUT)
    await page.get_by_role("button", name="Connect").wait_for(timeout=GUI_TIMEOUT)
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(0.3)  # late requests of this load (fonts, websocket) are counted too
    urls = rec.network(_origin(url))
    return {
        "ms": elapsed * 1e3,
        "requests": len(urls),
        "asset_requests": sum("/assets/" in u for u in urls),
        "wire_kB": rec.wire / 1e3,
        "urls": [u.split("?")[0] for u in urls],
    }


async def cold_and_warm(browser: Any, target: Target, latency: float) -> dict[str, Any]:
    """One fresh context: its first load (cold) and a second one (warm)."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        cdp = await context.new_cdp_session(page)
        rec = Recorder()
        rec.attach(cdp)
        await cdp.send("Network.enable")
        if latency:
            await cdp.send(
                "Network.emulateNetworkConditions",
                {
                    "offline": False,
                    "latency": latency,
                    "downloadThroughput": -1,
                    "uploadThroughput": -1,
                },
            )
        if target.name != "direct":  # log in once with Jupyter's token (sets the cookie)
            token = target.headers["Authorization"].split()[1]
            await page.goto(f"{target.extra['jupyter_base']}api/status?token={token}")
        cold = await load(page, target.base, rec)
        await page.goto("about:blank")
        warm = await load(page, target.base, rec)
        rec.reset()
        t0 = time.perf_counter()
        await page.reload(timeout=GUI_TIMEOUT)  # F5: revalidates what is not immutable
        await page.get_by_role("button", name="Connect").wait_for(timeout=GUI_TIMEOUT)
        reload = {"ms": (time.perf_counter() - t0) * 1e3}
        await asyncio.sleep(0.3)
        urls = rec.network(_origin(target.base))
        reload.update(
            requests=len(urls),
            asset_requests=sum("/assets/" in u for u in urls),
            wire_kB=rec.wire / 1e3,
            urls=[u.split("?")[0] for u in urls],
        )
        return {"cold": cold, "warm": warm, "reload": reload}
    finally:
        await context.close()


def spawn_without_token(
    workdir: Path, program: Path, client_dir: Path | None
) -> tuple[subprocess.Popen[bytes], int]:
    """libertem-server as a user runs it on their own machine (no token: the browser's
    websocket could not carry one), on a free port of 127.0.0.1."""
    workdir.mkdir(parents=True)
    port = setups.free_port()
    with open(workdir / "libertem.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(program),
                "--no-browser",
                "--host=127.0.0.1",
                f"--port={port}",
                f"--local-directory={workdir / 'dask'}",
            ],
            env=setups.base_env(workdir, client_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, port


async def start_direct_without_token(
    workdir: Path, program: Path, client_dir: Path | None
) -> Target:
    proc, port = spawn_without_token(workdir, program, client_dir)
    base = f"http://127.0.0.1:{port}/"
    await setups.wait_http(base + "api/config/", {}, 180, 0.1)
    return Target("direct", base, {}, direct_backend=psutil.Process(proc.pid), popen=proc)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    program = shutil.which("libertem-server", path=str(Path(sys.executable).parent))
    program = program or shutil.which("libertem-server")
    if program is None:
        raise SystemExit("libertem-server not found: make install-demo")
    client_dir = None
    if args.backend == "bench":  # the same GUI files, served without Last-Modified
        client_dir = setups.ensure_client_dir(lambda m: print(m, file=sys.stderr))
        program = str(setups.BACKEND)
    work = setups.make_workdir()
    targets: list[Target] = []
    samples: dict[str, list[dict[str, Any]]] = {}
    try:
        targets.append(await start_direct_without_token(work / "direct", Path(program), client_dir))
        ours = await setups.start_jupyter("ours", work / "ours", client_dir, None, Path(program))
        targets.append(ours)
        await setups.wait_http(ours.base + "api/config/", ours.headers, 180, 0.2)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                for rep in range(args.reps):
                    for t in targets if rep % 2 == 0 else targets[::-1]:
                        sample = await cold_and_warm(browser, t, args.latency)
                        samples.setdefault(t.name, []).append(sample)
                        print(
                            f"[{time.strftime('%H:%M:%S')}] {t.name}: "
                            + ", ".join(
                                f"{k} {v['ms']:.0f} ms {v['requests']} req "
                                f"({v['asset_requests']} assets) {v['wire_kB']:.0f} kB"
                                for k, v in sample.items()
                            ),
                            file=sys.stderr,
                            flush=True,
                        )
            finally:
                await browser.close()
    finally:
        for t in targets:
            setups.stop(t)
        setups.cleanup_dir(work)
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "latency_ms": args.latency,
        "backend": args.backend,
        "rows": summary(samples),
        "samples": samples,
    }


def summary(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for phase in ("cold", "warm", "reload"):
        for name, per in samples.items():
            rows.append(
                {
                    "load": phase,
                    "target": name,
                    **{
                        key: statistics.median(s[phase][key] for s in per)
                        for key in ("ms", "requests", "asset_requests", "wire_kB")
                    },
                    "urls": per[-1][phase]["urls"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--latency", type=float, default=0.0, help="added latency per request, ms")
    p.add_argument(
        "--backend",
        choices=("libertem", "bench"),
        default="libertem",
        help="libertem: the real libertem-server; bench: bench/backend.py serving the same "
        "GUI files with an ETag but no Last-Modified (no heuristic freshness)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    print(
        f"\nGUI load, {args.backend} backend, medians of {args.reps} (latency {args.latency:g} ms)"
    )
    print(f"{'load':5} {'target':7} {'ms':>7} {'requests':>8} {'assets':>6} {'kB wire':>8}")
    for r in result["rows"]:
        print(
            f"{r['load']:5} {r['target']:7} {r['ms']:7.0f} {r['requests']:8.0f} "
            f"{r['asset_requests']:6.0f} {r['wire_kB']:8.0f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-gui-browser.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
