"""Set the package version: ``python tools/set_version.py 0.2.0``.

The version is decided in one place, ``libertem_jupyter_proxy/_version.py`` (hatchling reads it
for the wheel and sdist, ``jupyter server extension list`` shows it). The labextension's
``labextension/package.json`` must carry the same version in npm's spelling
(``0.2.0.dev0`` -> ``0.2.0-dev.0``); this script writes both, and
``tests/test_packaging.py::test_labextension_version_matches_python_version`` fails if they
ever differ. Raises SystemExit for a version that is not ``X.Y.Z`` with an optional
``.devN``/``aN``/``bN``/``rcN``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSION_PY = REPO / "libertem_jupyter_proxy" / "_version.py"
PACKAGE_JSON = REPO / "labextension" / "package.json"
PEP440 = re.compile(r"(\d+\.\d+\.\d+)(?:\.?(dev|a|b|rc)(\d+))?")


def npm_version(version: str) -> str:
    """PEP 440 -> npm semver: ``0.2.0rc1`` -> ``0.2.0-rc.1``, ``0.2.0`` -> ``0.2.0``."""
    m = PEP440.fullmatch(version)
    if not m:
        raise SystemExit(f"not a version this project uses: {version!r} (X.Y.Z[.devN|aN|bN|rcN])")
    release, tag, n = m.groups()
    names = {"dev": "dev", "a": "alpha", "b": "beta", "rc": "rc"}
    return release if tag is None else f"{release}-{names[tag]}.{n}"


def set_version(
    version: str, version_py: Path = VERSION_PY, package_json: Path = PACKAGE_JSON
) -> None:
    """Write ``version`` into both files (paths are parameters for the tests)."""
    npm = npm_version(version)
    version_py.write_text(f'__version__ = "{version}"\n')
    # keep package.json's layout: replace only the version line
    text = package_json.read_text()
    new, count = re.subn(r'("version":\s*)"[^"]*"', rf'\g<1>"{npm}"', text, count=1)
    if count != 1 or json.loads(new)["version"] != npm:
        raise SystemExit(f"could not set the version in {package_json}")
    package_json.write_text(new)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[0])
    set_version(sys.argv[1])
    print(f"{VERSION_PY.relative_to(REPO)}: {sys.argv[1]}")
    print(f"{PACKAGE_JSON.relative_to(REPO)}: {npm_version(sys.argv[1])}")
