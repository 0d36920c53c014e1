"""How long a user waits after pressing Shutdown: request -> GUI index served again.

Runs a real ``jupyter server`` with this extension and the real ``libertem-server`` (it must be
on PATH), then repeats: load the GUI index, press Shutdown (``DELETE api/shutdown/``), wait
for the server to exit, and time the next ``GET /libertem/`` until it answers 200 with the
index. For comparison it also reports libertem-server's own start-to-ready time measured by
the proxy (its readiness poll), so the proxy's share is visible. Medians of ``--reps`` runs.

    python bench/restart_time.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from libertem_jupyter_proxy.backend_run import free_port

TOKEN = "bench-restart-token"


def _req(url: str, method: str = "GET", accept: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, method=method, headers={"Authorization": f"token {TOKEN}", "Accept": accept}
    )
    try:
        with urllib.request.urlopen(req, timeout=180) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("libertem-server") is None:
        sys.exit("libertem-server is not on PATH (pip install libertem)")
    tmp = Path(tempfile.mkdtemp(prefix="ljp-bench-"))
    port = free_port()
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(tmp),
        JUPYTER_DATA_DIR=str(tmp),
        JUPYTER_RUNTIME_DIR=str(tmp),
        HOME=str(tmp),
    )
    log = open(tmp / "jupyter.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            f"--IdentityProvider.token={TOKEN}",
            "--ServerApp.open_browser=False",
            "--ServerApp.allow_root=True",
            "--ServerApp.jpserver_extensions=libertem_jupyter_proxy=True",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _req(base + "api/status")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("jupyter did not start")
            time.sleep(0.1)
        t0 = time.monotonic()
        code, body = _req(base + "libertem/")
        first = time.monotonic() - t0
        assert code == 200 and b"LiberTEM" in body, (code, body[:200])
        restarts, readiness = [], []
        for _ in range(args.reps):
            code, _ = _req(base + "libertem/api/shutdown/", method="DELETE")
            assert code == 200
            while json.loads(_req(base + "libertem-proxy/api/status")[1])["state"] != "stopped":
                time.sleep(0.02)
            t0 = time.monotonic()
            code, body = _req(base + "libertem/")
            restarts.append(time.monotonic() - t0)
            assert code == 200 and b"LiberTEM" in body, (code, body[:200])
        text = (tmp / "jupyter.log").read_text()
        readiness = [
            float(x) for x in re.findall(r"LiberTEM is ready on .* after ([0-9.]+) s", text)
        ]
        print(f"first start (cold, incl. imports):  {first:.2f} s")
        print(
            f"restart after Shutdown, n={len(restarts)}: median {statistics.median(restarts):.2f} s"
            f"  (min {min(restarts):.2f}, max {max(restarts):.2f})"
        )
        print(
            f"libertem-server start->ready as polled by the proxy: median "
            f"{statistics.median(readiness[1:]):.2f} s"
        )
        print(
            f"proxy overhead (median restart - median readiness): "
            f"{(statistics.median(restarts) - statistics.median(readiness[1:])) * 1000:.0f} ms"
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
