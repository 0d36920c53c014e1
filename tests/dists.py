"""This repository's sdist and wheel, built once per test session for the release and upgrade
tests (``python -m build`` from the working tree, as ``make release-check`` does from HEAD).

The labextension is already built by the editable install, so hatch-jupyter-builder skips the
npm step here and a build takes about 20 s (an isolated build environment from PyPI).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .helpers import missing

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


_built: list[Dists] = []


def build_dists(outdir: Path) -> Dists:
    """Build (once per session) and return the sdist and wheel; ``outdir`` is used the first
    time only. Skips (fails in CI) without the ``build`` package (``pip install -e .[release]``)."""
    if _built:
        return _built[0]
    if importlib.util.find_spec("build") is None:
        missing("the 'build' package is not installed (pip install -e '.[release]')")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(outdir), str(REPO)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=900,
    )
    dists = Dists(next(outdir.glob("*.tar.gz")), next(outdir.glob("*.whl")))
    _built.append(dists)
    return dists
