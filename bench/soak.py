"""Soak: mixed traffic from several clients while the backend is shut down and crashed.

A ``jupyter server`` with this extension (and the bench backend, which takes libertem-server's
command line) serves several concurrent clients doing page loads, API calls, downloads, uploads
and websocket sessions. Every ``--chaos-interval`` seconds the backend is stopped, alternately
the way the GUI's Shutdown button does it and by SIGKILL (a crash). The run is bounded by
``--minutes`` and stops by itself.

It reports the requests served, the errors inside the restart windows (expected: a request
that was in flight when the backend died) and outside them (target: 0), and the Jupyter
process's open file descriptors, asyncio tasks and RSS at the start and at the end.

    python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from setups import BACKEND, base_env, free_port, make_workdir, spawn_jupyter, wait_http

GRACE = 2.0  # seconds after a restart in which in-flight failures still count as expected


@dataclass
class Tally:
    ok: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[float, float, str, str]] = field(default_factory=list)
    windows: list[list[float]] = field(default_factory=list)  # [start, end]

    def success(self, op: str) -> None:
        self.ok[op] = self.ok.get(op, 0) + 1

    def failure(self, start: float, end: float, op: str, detail: str) -> None:
        self.errors.append((start, end, op, detail))

    def in_window(self, start: float, end: float) -> bool:
        return any(start <= w[1] + GRACE and end >= w[0] for w in self.windows)


def write_config(workdir: Path, port: int, token: str) -> Path:
    config = workdir / "jupyter_server_config.py"
    config.write_text(
        "\n".join(
            [
                "c.ServerApp.ip = '127.0.0.1'",
                f"c.ServerApp.port = {port}",
                "c.ServerApp.open_browser = False",
                "c.ServerApp.allow_root = True",
                f"c.ServerApp.root_dir = {str(workdir / 'root')!r}",
                f"c.IdentityProvider.token = {token!r}",
                "c.ServerApp.jpserver_extensions = {'libertem_jupyter_proxy': True, "
                "'bench_probe': True, 'jupyterlab': False, 'jupyter_lsp': False, "
                "'jupyter_server_terminals': False, 'notebook': False, 'notebook_shim': False}",
                f"c.LiberTEMProxy.command = {[sys.executable, str(BACKEND)]!r}",
                # crashes are deliberate here: don't let the crash-loop guard stop the soak
                "c.LiberTEMProxy.max_crashes = 1000",
                "c.LiberTEMProxy.restart_backoff = 0.2",
                "c.LiberTEMProxy.stop_timeout = 5",
            ]
        )
        + "\n"
    )
    return config


async def snapshot(jupyter: psutil.Process, session: aiohttp.ClientSession, base: str) -> dict:
    async with session.get(base + "_bench/probe") as r:
        probe = await r.json()
    return {
        "fds": jupyter.num_fds(),
        "rss_mib": round(jupyter.memory_info().rss / 2**20, 1),
        "tasks": probe["tasks"],
    }


async def op_page(s: aiohttp.ClientSession, base: str) -> None:
    async with s.get(base + "libertem/", headers={"Accept": "text/html"}) as r:
        body = await r.read()
        assert r.status == 200 and b"LiberTEM" in body, r.status


async def op_api(s: aiohttp.ClientSession, base: str) -> None:
    async with s.get(base + "libertem/api/config/") as r:
        data = await r.json()
        assert r.status == 200 and data["status"] == "ok", r.status


async def op_download(s: aiohttp.ClientSession, base: str) -> None:
    size = 8 * 2**20
    async with s.get(base + f"libertem/_fake/download?size={size}") as r:
        got = 0
        async for chunk in r.content.iter_any():
            got += len(chunk)
        assert r.status == 200 and got == size, (r.status, got)


async def op_upload(s: aiohttp.ClientSession, base: str) -> None:
    body = os.urandom(4 * 2**20)
    async with s.put(base + "libertem/_fake/echo?summary=1", data=body) as r:
        data = await r.json()
        assert r.status == 200 and data["length"] == len(body), (r.status, data)


async def op_websocket(s: aiohttp.ClientSession, base: str) -> None:
    async with s.ws_connect("ws" + base[4:] + "libertem/api/events/", max_msg_size=0) as ws:
        for i in range(20):
            await ws.send_str(f"soak {i}")
            msg = await ws.receive(timeout=30)
            assert msg.type is aiohttp.WSMsgType.TEXT and msg.data == f"soak {i}", msg
        blob = os.urandom(65536)
        for _ in range(5):
            await ws.send_bytes(blob)
            msg = await ws.receive(timeout=30)
            assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == blob, msg.type


OPS = {
    "page": (op_page, 3),
    "api": (op_api, 5),
    "download": (op_download, 2),
    "upload": (op_upload, 2),
    "websocket": (op_websocket, 2),
}


async def client_loop(s: aiohttp.ClientSession, base: str, tally: Tally, stop_at: float) -> None:
    names = list(OPS)
    weights = [OPS[n][1] for n in names]
    while time.monotonic() < stop_at:
        name = random.choices(names, weights)[0]
        start = time.monotonic()
        try:
            await asyncio.wait_for(OPS[name][0](s, base), 120)
        except (AssertionError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            tally.failure(start, time.monotonic(), name, repr(e)[:200])
        else:
            tally.success(name)


async def status(s: aiohttp.ClientSession, base: str) -> dict:
    async with s.get(base + "libertem-proxy/api/status") as r:
        return await r.json()


async def chaos_loop(
    s: aiohttp.ClientSession, base: str, tally: Tally, stop_at: float, interval: float
) -> None:
    n = 0
    while time.monotonic() + interval < stop_at:
        await asyncio.sleep(interval)
        before = await status(s, base)
        if before["state"] != "running":
            continue
        window = [time.monotonic(), float("inf")]
        tally.windows.append(window)
        if n % 2 == 0:
            async with s.delete(base + "libertem/api/shutdown/") as r:
                await r.read()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(before["pid"], signal.SIGKILL)
        n += 1
        # the window closes when a new backend answers (the clients' requests start it)
        while True:
            now = await status(s, base)
            if now["state"] == "running" and now["pid"] != before["pid"]:
                window[1] = time.monotonic()
                break
            if now["state"] == "stopped" and now.get("stop_reason"):
                # a Shutdown stays shut until a person opens the GUI again (issue 13)
                page = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
                async with s.get(base + "libertem/", headers=page) as r:
                    await r.read()
            if time.monotonic() > stop_at + 60:
                window[1] = time.monotonic()
                break
            await asyncio.sleep(0.05)


async def run(minutes: float, clients: int, interval: float) -> dict:
    workdir = make_workdir()
    port = free_port()
    token = "soak-" + os.urandom(8).hex()
    config = write_config(workdir, port, token)
    env = base_env(workdir, None)
    proc = spawn_jupyter(sys.executable, config, workdir, env)  # once, before any traffic
    base = f"http://127.0.0.1:{port}/"
    headers = {"Authorization": f"token {token}"}
    tally = Tally()
    try:
        await wait_http(base + "api/status", headers, 60, 0.05)
        jupyter = psutil.Process(proc.pid)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)

        def session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(
                headers=headers, connector=aiohttp.TCPConnector(limit=0), timeout=timeout
            )

        # Measurements are taken with no client connected (idle keep-alive connections and
        # their handlers would otherwise count as fds and tasks): after a warm-up, in which
        # every client does every kind of traffic once, and after the soak.
        async with session() as s:
            await asyncio.gather(*(op(s, base) for op, _ in OPS.values() for _ in range(clients)))
        async with session() as probe:
            await asyncio.sleep(1.0)
            start = await snapshot(jupyter, probe, base)
        async with session() as s:
            t0 = time.monotonic()
            stop_at = t0 + minutes * 60
            await asyncio.gather(
                *(client_loop(s, base, tally, stop_at) for _ in range(clients)),
                chaos_loop(s, base, tally, stop_at, interval),
            )
            duration = time.monotonic() - t0
            await op_api(s, base)  # the end state: a running backend
        async with session() as probe:
            await asyncio.sleep(1.0)
            end = await snapshot(jupyter, probe, base)
        inside = [e for e in tally.errors if tally.in_window(e[0], e[1])]
        outside = [e for e in tally.errors if not tally.in_window(e[0], e[1])]
        return {
            "minutes": minutes,
            "duration_s": round(duration, 1),
            "clients": clients,
            "served": tally.ok,
            "served_total": sum(tally.ok.values()),
            "restarts": len(tally.windows),
            "restart_window_s": [round(w[1] - w[0], 2) for w in tally.windows],
            "errors_in_restart_windows": len(inside),
            "errors_outside_windows": len(outside),
            "outside_examples": [e[2:] for e in outside[:10]],
            "start": start,
            "end": end,
        }
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--chaos-interval", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = asyncio.run(run(args.minutes, args.clients, args.chaos_interval))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
