"""One start of libertem-server: its private directory and token, port, HTTP client, process.

Everything here belongs to exactly one run and goes away with it; nothing is reused between
starts (a new port, a new token, a new client each time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import tempfile
import time

import aiohttp
import aiohttp.abc

from . import dask_tls, port_owner, process, upstream
from .errors import BackendError


class BackendRun:
    """Everything that belongs to one start of libertem-server."""

    def __init__(self, generation: int, port: int, token: str, tmpdir: str) -> None:
        self.generation = generation
        self.port = port
        self.token = token
        self.tmpdir = tmpdir
        self.proc: process.OneShotProcess | None = None
        self.guard: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self.started_at = time.monotonic()
        self.ready_at: float | None = None
        self.session: aiohttp.ClientSession | None = None
        # keep-alive sockets for the body-less requests (upstream.py)
        self.pool: upstream.Pool | None = None
        self.reader: asyncio.Task[None] | None = None
        self.idle_watch: asyncio.Task[None] | None = None
        self.stopping = False
        # the listener on ``port`` was proved to be libertem-server's (port_owner.check)
        self.port_proven = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LoopbackResolver(aiohttp.abc.AbstractResolver):
    """Resolves only ``127.0.0.1``, at once.

    aiohttp's default resolver runs ``getaddrinfo`` in a thread for every new connection, even
    for an IP literal; that thread hop showed up as milliseconds of time-to-first-byte. The
    backend's address is fixed, so there is nothing to resolve - and nothing else may be.
    """

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        if host != "127.0.0.1":
            raise OSError(f"libertem-jupyter-proxy only connects to 127.0.0.1, not {host!r}")
        return [
            {
                "hostname": host,
                "host": host,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def free_port() -> int:
    """A port that was free a moment ago; a lost race shows up as an early exit and is retried."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_run_dir() -> tuple[str, str, str]:
    """A fresh 0700 directory with a fresh token in a 0600 file: (dir, token, token path)."""
    try:
        tmpdir = tempfile.mkdtemp(prefix="libertem-proxy-")  # mode 0700
        token = secrets.token_urlsafe(32)
        token_path = os.path.join(tmpdir, "token")
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
    except OSError as e:
        raise BackendError(
            "not-found",
            f"Could not create the token directory for LiberTEM in {tempfile.gettempdir()}: "
            f"{e.strerror or e}.",
            hint="Check that the temporary directory exists, is writable and not full "
            "(TMPDIR selects another one).",
        ) from None
    return tmpdir, token, token_path


def new_session() -> aiohttp.ClientSession:
    """The pooled HTTP client of one run (it only ever talks to 127.0.0.1:<port>)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, resolver=LoopbackResolver()),
        auto_decompress=False,
        read_bufsize=1024 * 1024,  # fewer, larger reads on big downloads
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
    )


def cluster_environment(run_dir: str, tls: bool) -> dict[str, str]:
    """The ``DASK_*`` variables of one run (see :mod:`.dask_tls`); with ``tls``, a fresh CA,
    certificate and key in ``run_dir``; dask's temporary directory is ``run_dir`` in any case.
    Raises BackendError if the keys cannot be written."""
    try:
        creds = dask_tls.make_credentials(run_dir) if tls else None
    except OSError as e:
        raise BackendError(
            "not-found",
            f"Could not write the TLS keys for LiberTEM's dask cluster in {run_dir}: "
            f"{e.strerror or e}.",
            hint="Check that the temporary directory is writable and not full; "
            "c.LiberTEMProxy.dask_tls = False turns the cluster's TLS off.",
        ) from None
    env = dask_tls.cluster_environment(creds)
    # dask's own scratch space (``<temporary-directory>/dask-scratch-space``): the scheduler
    # puts its work directory there FIRST on ``sys.path``, and workers inherit that path. Under
    # a shared /tmp another user can create that directory before us (dask accepts an
    # existing writable one) and plant modules that LiberTEM then imports: code execution as
    # the user. In the run's 0700 directory nobody else can. ``--local-directory`` covers only
    # the workers' space, not the scheduler's.
    env["DASK_TEMPORARY_DIRECTORY"] = run_dir
    return env


_unverifiable_warned = False


def prove_port(run: BackendRun, log: logging.Logger) -> bool:
    """May the proxy talk to ``run``'s port yet? Call before every request until it says so.

    False while nobody listens there; True once every listener that ``127.0.0.1:port``
    reaches is held by the run's process group (and from then on, without looking again:
    the kernel keeps the port ours while libertem-server holds the socket). Raises
    :class:`.port_owner.PortSquatted` when someone else listens there.
    """
    global _unverifiable_warned
    if run.port_proven:
        return True
    if run.pid is None:
        return False
    verdict = port_owner.check(run.port, run.pid)
    if verdict.owner is port_owner.Owner.NONE:
        return False
    if verdict.owner is port_owner.Owner.FOREIGN:
        log.warning(
            "Port %d, chosen for LiberTEM, is held by %s, not by LiberTEM's process group %d: "
            "nothing is sent there; LiberTEM is started again on another port.",
            run.port,
            port_owner.describe(verdict),
            run.pid,
        )
        raise port_owner.PortSquatted(run.port, verdict)
    if verdict.owner is port_owner.Owner.UNVERIFIABLE and not _unverifiable_warned:
        _unverifiable_warned = True
        log.warning(
            "This system has no /proc/net/tcp: the proxy cannot check that the port it talks to "
            "belongs to LiberTEM (see the security model in the documentation)."
        )
    run.port_proven = True
    return True
