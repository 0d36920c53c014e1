"""Serve the LiberTEM web GUI inside Jupyter at ``{base_url}libertem/``.

A Jupyter server extension: it starts ``libertem-server`` on demand and reverse-proxies it
(HTTP and websockets) behind Jupyter's own authentication.
"""

from __future__ import annotations

from ._version import __version__

__all__ = ["__version__"]


def _jupyter_server_extension_points() -> list[dict[str, object]]:
    from .extension import LiberTEMProxy

    return [{"module": "libertem_jupyter_proxy", "app": LiberTEMProxy}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "libertem-jupyter-proxy"}]
