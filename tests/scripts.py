"""Building the scripts that ``tests/raw_backend.py`` runs (see its docstring)."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from typing import Any

from .raw_backend import pattern

_ids = itertools.count()


def new_id() -> str:
    return f"s{next(_ids)}"


def send(data: bytes) -> list[Any]:
    return ["send", base64.b64encode(data).decode()]


def body(seed: int, size: int, piece: int = 65536, pause: float = 0.0, framing: str = "length"):
    return ["body", seed, size, piece, pause, framing]


def header(steps: list[list[Any]], script_id: str, close: bool = False) -> tuple[str, str]:
    """The ``X-Raw-Script`` header that makes the backend run ``steps``."""
    doc = {"id": script_id, "steps": steps, "close": close}
    return ("X-Raw-Script", base64.b64encode(json.dumps(doc).encode()).decode())


def response_head(status: str, headers: list[tuple[str | bytes, str | bytes]]) -> bytes:
    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else x.encode("latin-1")

    lines = [b"HTTP/1.1 " + status.encode()] + [b(n) + b": " + b(v) for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def sha(seed: int, size: int) -> str:
    return hashlib.sha256(pattern(seed, size)).hexdigest()
