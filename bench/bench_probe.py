"""A tiny Jupyter server extension loaded only by the benchmark: asyncio tasks and GC counts.

Open file descriptors and RSS can be read from outside with psutil, but a leak of asyncio tasks
(a relay that never ends after a client abort) is only visible inside the Jupyter process. The
benchmark enables this module (``bench/`` on ``PYTHONPATH``) in every Jupyter it starts, ours and
jupyter-server-proxy's alike, and reads ``GET {base_url}_bench/probe`` with the Jupyter token.
``?profile=start`` / ``?profile=stop`` wrap a workload in cProfile (``bench/get_breakdown.py``).
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import pstats
import threading
import time
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

_PROFILE: list[cProfile.Profile] = []


def _profile(action: str) -> dict[str, Any]:
    """``start``: a deterministic profile of everything this Jupyter runs from now on;
    ``stop``: end it and return its functions with the most own and cumulative time (seconds,
    with cProfile's own overhead, so compare them with each other, not with psutil's)."""
    if action == "start":
        prof = cProfile.Profile(time.process_time)  # CPU, not wall time (a busy machine)
        _PROFILE[:] = [prof]
        prof.enable()
        return {"profile": "started"}
    if not _PROFILE:
        return {"profile": "not started"}
    prof = _PROFILE.pop()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = [
        {
            "function": f"{file.rsplit('/', 1)[-1]}:{line}:{name}",
            "calls": calls,
            "own_s": round(own, 4),
            "cum_s": round(cum, 4),
        }
        for (file, line, name), (_, calls, own, cum, _) in stats.stats.items()  # type: ignore[attr-defined]
    ]
    return {
        "by_own": sorted(rows, key=lambda r: -r["own_s"])[:60],
        "by_cum": sorted(rows, key=lambda r: -r["cum_s"])[:120],
    }


class ProbeHandler(APIHandler):
    _track_activity = False

    @web.authenticated
    def get(self) -> None:
        if action := self.get_argument("profile", ""):
            self.finish(json.dumps(_profile(action)))
            return
        collect = self.get_argument("gc", "0") == "1"
        collect_ms = None
        if collect:  # how long one full collection of this Jupyter's heap takes
            t = time.perf_counter()
            gc.collect()
            collect_ms = (time.perf_counter() - t) * 1000
        self.finish(
            json.dumps(
                {
                    "tasks": len(asyncio.all_tasks()),
                    "threads": threading.active_count(),
                    "gc_objects": len(gc.get_objects()) if collect else None,
                    "gc_collect_ms": collect_ms,
                    "gc_stats": gc.get_stats(),  # collections so far, per generation
                }
            )
        )


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "bench_probe"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    web_app = serverapp.web_app
    route = url_path_join(web_app.settings["base_url"], "_bench/probe")
    web_app.add_handlers(".*$", [(route, ProbeHandler)])
