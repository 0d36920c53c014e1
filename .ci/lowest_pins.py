#!/usr/bin/env python3
"""Print ``name==X`` for every runtime dependency of pyproject.toml that has a ``>=X`` floor.

``make test-lowest`` installs these into a second venv so the lifecycle tests also run against
the OLDEST versions the package claims to support (tornado 6.2 answers a cancelled handler
differently from 6.6: issue 13). Dependencies without a floor are left to pip.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

root = Path(__file__).resolve().parent.parent
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
pins = []
for requirement in project["dependencies"]:
    match = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", requirement)
    if match is None:
        sys.exit(f"cannot read the requirement {requirement!r}")
    name, spec = match.groups()
    floor = re.search(r">=\s*([0-9][^,;\s]*)", spec)
    pins.append(f"{name}=={floor.group(1)}" if floor else requirement)
print(" ".join(pins))
