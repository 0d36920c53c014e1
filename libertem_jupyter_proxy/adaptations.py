"""Known limitations of LiberTEM that the proxy adapts on purpose: the one response it edits.

LiberTEM 0.16's ``GET /api/config/`` answers ``{"config": {"localCores": N, "devices":
{"cpus": [0, ..., N-1], "cudas": [...], "has_cupy": ...}, ...}, ...}`` with
``N = psutil.cpu_count(logical=False)`` (``libertem/web/state.py`` ``get_local_cores`` and
``libertem/utils/devices.py`` ``detect``): the host's physical cores, whatever this process may
use. The GUI's cluster dialog proposes ``localCores`` workers. On a shared node that is the
wrong number (see :mod:`.sizing`), so the proxy replaces exactly these two values:

- ``config.localCores`` becomes the figure of :func:`.sizing.cpu_figure`;
- ``config.devices.cpus`` becomes ``[0, ..., figure-1]`` (LiberTEM's own convention: ids that
  name the workers; its dask executor does not pin them to those CPUs).

Everything else of the JSON (GPUs included) stays as LiberTEM sent it. Only a 200 answer to
GET of exactly that path with a JSON body is touched; a body that does not parse or lacks
those keys passes unchanged (a future LiberTEM may change its answer). The backend's
``ETag`` and ``Content-Length`` no longer describe the new body, so they are dropped (tornado
computes the new length; without an ETag the browser does not revalidate this ~2 KiB answer).
With ``c.LiberTEMProxy.cpus = "host"`` nothing is rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from . import contract

# what is edited, and which headers go with it, is declared in the HTTP contract
CONFIG_PATH = contract.CONFIG_PATH
DROPPED_HEADERS = contract.CONFIG_ANSWER_REMOVED
CONDITIONAL_HEADERS = contract.CONFIG_REQUEST_REMOVED


class ConfigRewrite:
    """Rewrites LiberTEM's ``api/config/`` answer to propose ``cpus`` workers."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus

    def headers(self, raw: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The backend's headers without those that describe the old body."""
        return [(k, v) for k, v in raw if k.lower() not in DROPPED_HEADERS]

    def body(self, body: bytes) -> bytes:
        """The new body; ``body`` unchanged if it is not the config answer we know."""
        try:
            doc = json.loads(body)
        except ValueError:
            return body
        config = doc.get("config") if isinstance(doc, dict) else None
        devices = config.get("devices") if isinstance(config, dict) else None
        if not isinstance(devices, dict) or "localCores" not in config or "cpus" not in devices:
            return body
        config["localCores"] = self.cpus
        devices["cpus"] = list(range(self.cpus))
        # tornado's json_encode (what libertem-server used): json.dumps with "</" escaped
        return json.dumps(doc).replace("</", "<\\/").encode()


def for_response(
    method: str | None, upstream_path: str, status: int, cpus: int | None
) -> ConfigRewrite | None:
    """The adaptation for this response, or None (nearly always: every other response)."""
    if cpus is None or method != "GET" or status != 200 or upstream_path != CONFIG_PATH:
        return None
    return ConfigRewrite(cpus)


def request_drop(method: str | None, upstream_path: str, cpus: int | None) -> frozenset[str]:
    """Request headers not to forward for this request: the conditional ones when its answer
    will be rewritten (red-team finding: a browser that cached ``api/config/`` before got a 304
    and kept the old count), nothing otherwise."""
    if cpus is None or method != "GET" or upstream_path != CONFIG_PATH:
        return frozenset()
    return CONDITIONAL_HEADERS
