"""Where and how to start ``libertem-server``.

The lookup order keeps users of libertem-jupyter-proxy 0.1.x working:

1. ``c.LiberTEMProxy.command`` (a full command list) or ``c.LiberTEMProxy.libertem_server_path``;
2. the JSON file ``<prefix>/etc/libertem_jupyter_proxy.json`` with key ``libertem_server_path``,
   where ``<prefix>`` is ``$LIBERTEM_ROOT`` if set, else ``sys.prefix``;
3. ``libertem-server`` on ``PATH``;
4. ``libertem-server`` next to the Python that runs Jupyter (same environment, not activated:
   ``/opt/venv/bin/jupyter lab`` started without ``/opt/venv/bin`` on ``PATH``).

Every failure raises :class:`CommandError` whose message names exactly what was tried and where, so
the error page can tell an admin which setting or file to fix.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE_NAME = "libertem_jupyter_proxy.json"
CONFIG_KEY = "libertem_server_path"
DEFAULT_EXECUTABLE = "libertem-server"


class CommandError(Exception):
    """libertem-server cannot be found or the configuration that names it is broken.

    ``tried`` lists, in order, each place that was looked at and what was found there.
    """

    def __init__(self, message: str, tried: Sequence[str] = (), hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.tried = list(tried)
        self.hint = hint


@dataclass
class ResolvedCommand:
    """The executable part of the command and where it came from (for logs and error pages)."""

    argv: list[str]
    source: str
    tried: list[str] = field(default_factory=list)


def config_file_path(environ: Mapping[str, str] | None = None) -> Path:
    """The JSON file the 0.1.x package read: ``$LIBERTEM_ROOT`` or ``sys.prefix`` + ``/etc/...``."""
    env = os.environ if environ is None else environ
    prefix = env.get("LIBERTEM_ROOT") or sys.prefix
    return Path(prefix) / "etc" / CONFIG_FILE_NAME


def _check_executable(path: str, where: str, tried: list[str]) -> str:
    """Return ``path`` if it is an executable file; else raise, naming ``where`` it came from."""
    p = Path(path).expanduser()
    if not p.is_absolute() and os.sep not in path:
        found = shutil.which(path)
        if found is None:
            tried.append(f"{where}: '{path}' was not found on PATH")
            raise CommandError(
                f"The program '{path}' named by {where} was not found on PATH.",
                tried,
                "Give the full path to libertem-server (or to a wrapper script) instead.",
            )
        return found
    if not p.exists():
        tried.append(f"{where}: '{p}' does not exist")
        raise CommandError(
            f"The file '{p}' named by {where} does not exist.",
            tried,
            "Check the path; it must point at libertem-server or at a wrapper script.",
        )
    if p.is_dir():
        tried.append(f"{where}: '{p}' is a directory")
        raise CommandError(
            f"'{p}' named by {where} is a directory, not a program.",
            tried,
            "Point it at the libertem-server program itself, e.g. <venv>/bin/libertem-server.",
        )
    if not os.access(p, os.X_OK):
        tried.append(f"{where}: '{p}' is not executable")
        raise CommandError(
            f"The file '{p}' named by {where} is not executable.",
            tried,
            f"Make it executable (chmod +x '{p}') or point the setting at another file.",
        )
    return str(p)


def _from_config_file(path: Path, tried: list[str]) -> str | None:
    """Read ``libertem_server_path`` from the JSON file, or None if the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        tried.append(f"config file {path}: not present")
        return None
    except OSError as e:
        tried.append(f"config file {path}: unreadable ({e.strerror or e})")
        raise CommandError(
            f"The configuration file {path} exists but cannot be read: {e.strerror or e}.",
            tried,
            "Fix its permissions or remove it.",
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        tried.append(f"config file {path}: invalid JSON")
        raise CommandError(
            f"The configuration file {path} is not valid JSON: {e.msg} at line {e.lineno}, "
            f"column {e.colno}.",
            tried,
            f'It should look like {{"{CONFIG_KEY}": "/path/to/libertem-server"}}.',
        ) from None
    value = data.get(CONFIG_KEY) if isinstance(data, dict) else None
    if not isinstance(value, str) or not value.strip():
        tried.append(f"config file {path}: no string '{CONFIG_KEY}'")
        raise CommandError(
            f"The configuration file {path} has no '{CONFIG_KEY}' string.",
            tried,
            f'It should look like {{"{CONFIG_KEY}": "/path/to/libertem-server"}}.',
        )
    return value.strip()


def resolve_command(
    command: Sequence[str] = (),
    server_path: str = "",
    environ: Mapping[str, str] | None = None,
) -> ResolvedCommand:
    """Find the program to run, following the documented lookup order.

    ``command`` and ``server_path`` are the two traitlets; the returned argv has no
    libertem-server options yet (the supervisor appends host, port and token path).
    """
    tried: list[str] = []
    if command:
        argv = list(command)
        argv[0] = _check_executable(argv[0], "c.LiberTEMProxy.command", tried)
        return ResolvedCommand(argv, "c.LiberTEMProxy.command", tried)
    if server_path:
        exe = _check_executable(server_path, "c.LiberTEMProxy.libertem_server_path", tried)
        return ResolvedCommand([exe], "c.LiberTEMProxy.libertem_server_path", tried)
    cfg = config_file_path(environ)
    value = _from_config_file(cfg, tried)
    if value is not None:
        exe = _check_executable(value, f"'{CONFIG_KEY}' in {cfg}", tried)
        return ResolvedCommand([exe], str(cfg), tried)
    found = shutil.which(DEFAULT_EXECUTABLE)
    if found is not None:
        return ResolvedCommand([found], "PATH", tried)
    tried.append(f"PATH: no '{DEFAULT_EXECUTABLE}' found")
    beside = Path(sys.executable).parent / DEFAULT_EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return ResolvedCommand([str(beside)], "Jupyter's environment", tried)
    tried.append(f"Jupyter's environment: no {beside}")
    raise CommandError(
        "libertem-server was not found.",
        tried,
        "Install LiberTEM (pip install libertem) in this environment, or write "
        f'{{"{CONFIG_KEY}": "/path/to/libertem-server"}} into {cfg}, or set '
        "c.LiberTEMProxy.libertem_server_path.",
    )
