"""Cost of the status API's resource figures (resources.py) on the real libertem-server.

Starts ``libertem-server`` (from PATH) in its own process group, gives it a LOCAL dask cluster
(``PUT api/config/connection/``, as the GUI's Connect button does), then times
:func:`libertem_jupyter_proxy.resources.measure_group` with and without PSS. CPU is this
process's user + system time (reading ``/proc`` is kernel work done on our behalf), wall is
elapsed time; both per call, as the median of ``--calls`` calls. Prints one JSON object.

    .venv/bin/python bench/status_cost.py [--workers 2] [--calls 50]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libertem_jupyter_proxy.backend_run import free_port
from libertem_jupyter_proxy.resources import measure_group


def _request(url: str, token: str, method: str = "GET", body: object = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"X-Api-Key": token, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return resp.read()


def _time_calls(pgid: int, calls: int, pss: bool) -> dict[str, float]:
    cpu, wall = [], []
    for _ in range(calls):
        c0, w0 = time.process_time(), time.perf_counter()
        measure_group(pgid, pss=pss)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {
        "cpu_ms": round(statistics.median(cpu) * 1e3, 2),
        "wall_ms": round(statistics.median(wall) * 1e3, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    server = shutil.which("libertem-server")
    if server is None:
        print("libertem-server not on PATH (make install-demo)", file=sys.stderr)
        return 2
    rundir = tempfile.mkdtemp(prefix="status-cost-")
    token = secrets.token_urlsafe(16)
    Path(rundir, "token").write_text(token)
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen(
        [
            server,
            "--no-browser",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--token-path={rundir}/token",
            f"--local-directory={rundir}/dask",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _request(base, token)
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("libertem-server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        started = time.perf_counter()
        _request(
            base + "api/config/connection/",
            token,
            "PUT",
            {"connection": {"type": "LOCAL", "numWorkers": args.workers, "cudas": {}}},
        )
        cluster_s = time.perf_counter() - started
        figures = measure_group(proc.pid)
        result = {
            "libertem_workers_requested": args.workers,
            "cluster_start_s": round(cluster_s, 1),
            "group": figures.to_dict(),
            "calls": args.calls,
            "with_pss": _time_calls(proc.pid, args.calls, pss=True),
            "without_pss": _time_calls(proc.pid, args.calls, pss=False),
            "processes_on_machine": sum(1 for e in os.listdir("/proc") if e.isdigit()),
            "loadavg_1min": os.getloadavg()[0],
        }
        print(json.dumps(result, indent=1))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
