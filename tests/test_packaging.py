"""What `pip install` gives a user: the extension enabled and listed, the frontend inside the
wheel, no jupyter-server-proxy."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from libertem_jupyter_proxy import __version__

REPO = Path(__file__).parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _jupyter(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "jupyter", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return ANSI.sub("", out.stdout + out.stderr)


def test_server_extension_listed_ok_with_version():
    text = _jupyter("server", "extension", "list")
    assert re.search(r"libertem_jupyter_proxy\s+enabled", text), text
    assert re.search(rf"libertem_jupyter_proxy {re.escape(__version__)} OK", text), text


def test_labextension_listed_enabled():
    pytest.importorskip("jupyterlab")
    text = _jupyter("labextension", "list")
    assert re.search(r"libertem-jupyter-proxy v\S+ enabled\s+OK", text), text


@pytest.mark.slow
def test_wheel_contents(tmp_path: Path):
    """Build the wheel as pip would (the labextension build runs through jlpm) and look in."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=900,
    )
    wheel = next(tmp_path.glob("libertem_jupyter_proxy-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    data = next(n.split("/", 1)[0] for n in names if ".data/" in n)
    assert f"{data}/data/etc/jupyter/jupyter_server_config.d/libertem_jupyter_proxy.json" in names
    labext = f"{data}/data/share/jupyter/labextensions/libertem-jupyter-proxy/"
    assert labext + "package.json" in names
    assert any(n.startswith(labext + "static/") and n.endswith(".js") for n in names)
    assert "libertem_jupyter_proxy/templates/loading.html" in names
    assert "libertem_jupyter_proxy/templates/error.html" in names
    requires = [ln for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")]
    assert not any("jupyter-server-proxy" in r or "jupyter_server_proxy" in r for r in requires)
    for dep in ("jupyter-server", "tornado", "simpervisor", "aiohttp"):
        assert any(dep in r.replace("_", "-") for r in requires), (dep, requires)


def _npm_version(python_version: str) -> str:
    """PEP 440 to the npm semver that the labextension uses: ``0.2.0.dev0`` -> ``0.2.0-dev.0``,
    ``0.2.0rc1`` -> ``0.2.0-rc.1``, ``0.2.0`` -> ``0.2.0``."""
    m = re.fullmatch(r"(\d+\.\d+\.\d+)(?:\.?(dev|a|b|rc)(\d+))?", python_version)
    assert m, f"unexpected version {python_version!r}"
    release, tag, n = m.groups()
    names = {"dev": "dev", "a": "alpha", "b": "beta", "rc": "rc"}
    return release if tag is None else f"{release}-{names[tag]}.{n}"


def test_labextension_version_matches_python_version():
    """The two versions are kept in step by hand; this catches a release that forgets one."""
    import json

    package = json.loads((REPO / "labextension" / "package.json").read_text())
    assert package["version"] == _npm_version(__version__), (package["version"], __version__)
