"""Sphinx configuration for the libertem-jupyter-proxy documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (``make docs``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
# the package itself, for the configuration reference (an installed copy works just as well)
sys.path.insert(0, str(HERE.parent))

from libertem_jupyter_proxy import __version__  # noqa: E402

project = "libertem-jupyter-proxy"
author = "LiberTEM developers"
copyright = "LiberTEM developers"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "ljp_config_reference",  # docs/_ext: the reference generated from LiberTEMProxy's traits
]

root_doc = "index"
exclude_patterns = ["_build", "snippets/README.rst"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_theme = "furo"
html_title = f"libertem-jupyter-proxy {release}"
# Offline builds: no intersphinx, no external images.
nitpicky = False
highlight_language = "none"
# Commands and options must appear exactly as typed: no "--" -> en dash, no curly quotes.
smartquotes = False
