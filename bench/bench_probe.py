"""A tiny Jupyter server extension loaded only by the benchmark: asyncio tasks and GC counts.

Open file descriptors and RSS can be read from outside with psutil, but a leak of asyncio tasks
(a relay that never ends after a client abort) is only visible inside the Jupyter process. The
benchmark enables this module (``bench/`` on ``PYTHONPATH``) in every Jupyter it starts, ours and
jupyter-server-proxy's alike, and reads ``GET {base_url}_bench/probe`` with the Jupyter token.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web


class ProbeHandler(APIHandler):
    _track_activity = False

    @web.authenticated
    def get(self) -> None:
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
