"""The three things under test, each reachable at a base URL with its own credentials.

- ``direct``: ``bench/backend.py`` started by us with a known token (``X-Api-Key``).
- ``ours``: a ``jupyter server`` subprocess with only this extension (and the probe) enabled,
  configured to start ``bench/backend.py`` exactly as it starts libertem-server.
- ``jsp``: a ``jupyter server`` subprocess from a separate venv with jupyter-server-proxy 4.6.0,
  configured as the old libertem-jupyter-proxy 0.1.2 entry point did (command with ``{port}``
  and ``--token-path``, ``X-Api-Key`` through ``request_headers_override``).

Jupyter runs in its own process so that psutil can read its CPU time and RSS apart from the
load generator (this process) and from the backend (its child).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
from libertem_jupyter_proxy.backend_run import free_port

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BACKEND = BENCH / "backend.py"
JSP_VENV = BENCH / ".venv-jsp"
CACHE = BENCH / ".cache"
JSP_VERSION = "4.6.0"
LIBERTEM_VERSION = "0.16.0"
# extensions that may be installed next to Jupyter and would only add noise (tests/conftest.py)
OTHER_EXTENSIONS = (
    "jupyterlab",
    "notebook",
    "notebook_shim",
    "jupyter_lsp",
    "jupyter_server_terminals",
    "nbclassic",
    "jupyter_server_proxy",
    "libertem_jupyter_proxy",
)


@dataclass
class Target:
    """One way of reaching the backend, and the processes whose cost we attribute to it."""

    name: str
    base: str  # ends with "/"; the backend's "/" lives here
    headers: dict[str, str]
    jupyter: psutil.Process | None = None  # None for direct
    direct_backend: psutil.Process | None = None
    popen: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    program: Path = BACKEND  # the backend program this target runs
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ws_base(self) -> str:
        return "ws" + self.base[len("http") :]

    def backend(self) -> psutil.Process | None:
        """The backend process now (it changes when a proxy restarts it)."""
        if self.direct_backend is not None:
            return self.direct_backend
        if self.jupyter is None:
            return None
        with contextlib.suppress(psutil.Error):
            for child in self.jupyter.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if str(self.program) in " ".join(child.cmdline()):
                        return child
        return None


# ---------------------------------------------------------------- environment


def ensure_jsp_venv(log: callable) -> Path:  # type: ignore[valid-type]
    """A separate venv with jupyter-server-proxy, never the main one (it would register itself
    there). jupyter_server and tornado are pinned to the versions this interpreter runs, so the
    two Jupyters differ only in the proxy."""
    python = JSP_VENV / "bin" / "python"
    marker = JSP_VENV / f".ready-{JSP_VERSION}"
    if marker.exists():
        return python
    import jupyter_server
    import tornado

    log(f"creating {JSP_VENV} with jupyter-server-proxy=={JSP_VERSION} (once, ~1 min)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(JSP_VENV)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            f"jupyter-server-proxy=={JSP_VERSION}",
            f"jupyter_server=={jupyter_server.__version__}",
            f"tornado=={tornado.version}",
        ],
        check=True,
    )
    marker.touch()
    return python


def ensure_client_dir(log: callable) -> Path | None:  # type: ignore[valid-type]
    """LiberTEM's built web client, for the first-load metric: from an installed libertem,
    else extracted from the libertem wheel (downloaded once with pip, no dependencies)."""
    with contextlib.suppress(ImportError):
        import libertem  # type: ignore[import-not-found]

        installed = Path(libertem.__file__).parent / "web" / "client"
        if (installed / "index.html").is_file():
            return installed
    target = CACHE / f"libertem-{LIBERTEM_VERSION}-client"
    if (target / "index.html").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE.glob(f"libertem-{LIBERTEM_VERSION}-*.whl"))
    if not wheels:
        log(f"downloading the libertem {LIBERTEM_VERSION} wheel for its GUI files (once)")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "-d",
                str(CACHE),
                f"libertem=={LIBERTEM_VERSION}",
            ],
            check=False,
        )
        wheels = list(CACHE.glob(f"libertem-{LIBERTEM_VERSION}-*.whl"))
        if result.returncode != 0 or not wheels:
            log("could not get the libertem wheel: the GUI first-load metric uses the fake's files")
            return None
    prefix = "libertem/web/client/"
    with zipfile.ZipFile(wheels[0]) as z:
        for info in z.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                dest = target / info.filename[len(prefix) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(info))
    return target


def base_env(workdir: Path, client_dir: Path | None) -> dict[str, str]:
    """Jupyter's config, data and runtime dirs isolated like in tests/conftest.py."""
    env = dict(os.environ)
    for name in ("home", "config", "data", "runtime", "root", "prefix"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(workdir / "home"),
        JUPYTER_CONFIG_DIR=str(workdir / "config"),
        JUPYTER_DATA_DIR=str(workdir / "data"),
        JUPYTER_RUNTIME_DIR=str(workdir / "runtime"),
        JUPYTER_PLATFORM_DIRS="1",
        LIBERTEM_ROOT=str(workdir / "prefix"),
        PYTHONPATH=str(BENCH),
        PYTHONUNBUFFERED="1",
    )
    if client_dir is not None:
        env["LIBERTEM_BENCH_CLIENT_DIR"] = str(client_dir)
    return env


# ---------------------------------------------------------------- direct


def backend_argv(port: int, token_path: Path, program: Path = BACKEND) -> list[str]:
    return [
        sys.executable,
        str(program),
        "--no-browser",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--token-path={token_path}",
    ]


async def wait_http(url: str, headers: dict[str, str], timeout: float, interval: float) -> float:
    """Poll ``url`` until it answers 200; returns the monotonic time of that answer."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        return time.monotonic()
            except (aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer 200 within {timeout} s")
            await asyncio.sleep(interval)


def spawn_backend(
    workdir: Path, client_dir: Path | None, program: Path = BACKEND
) -> tuple[subprocess.Popen[bytes], int, str]:
    """Start the backend like the proxy would: free port, token file, stdin not a tty."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    token_path = workdir / f"token-{token[:6]}"
    token_path.write_text(token)
    port = free_port()
    # its log goes to a file: the backend pays for writing each access-log line, as it does
    # when a proxy reads its stderr through a pipe
    with open(workdir / f"backend-{port}.log", "wb") as log:
        proc = subprocess.Popen(
            [*backend_argv(port, token_path, program), f"--local-directory={workdir / 'dask'}"],
            env=base_env(workdir, client_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, port, token


async def start_direct(workdir: Path, client_dir: Path | None, program: Path = BACKEND) -> Target:
    proc, port, token = spawn_backend(workdir, client_dir, program)
    headers = {"X-Api-Key": token}
    base = f"http://127.0.0.1:{port}/"
    await wait_http(base + "api/config/", headers, 30, 0.02)
    return Target(
        "direct",
        base,
        headers,
        direct_backend=psutil.Process(proc.pid),
        popen=proc,
        program=program,
    )


async def start_relay(direct: Target, threads: bool = False) -> Target:
    """``bench/tcp_relay.py`` in front of ``direct``'s backend: the floor of any userspace
    proxy (see that file; ``threads``: its thread-per-direction mode). Its CPU is reported
    where a proxy's Jupyter CPU would be."""
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (before any measurement; waits for one line)
        [
            sys.executable,
            str(Path(__file__).parent / "tcp_relay.py"),
            str(port),
            direct.base.split(":")[-1].rstrip("/"),
            *(["--threads"] if threads else []),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise RuntimeError("bench/tcp_relay.py did not start")
    return Target(
        "relay",
        f"http://127.0.0.1:{port}/",
        direct.headers,
        jupyter=psutil.Process(proc.pid),
        direct_backend=direct.direct_backend,
        popen=proc,
        program=direct.program,
    )


# ---------------------------------------------------------------- Jupyter


def jupyter_config(
    kind: str,
    port: int,
    token: str,
    root: Path,
    jsp_token_file: Path,
    program: Path = BACKEND,
    extra_lines: tuple[str, ...] = (),
) -> str:
    """The ``jupyter_server_config.py`` for ``ours`` or ``jsp``."""
    extensions = {name: False for name in OTHER_EXTENSIONS}
    extensions["bench_probe"] = True
    lines = [
        "c.ServerApp.ip = '127.0.0.1'",
        f"c.ServerApp.port = {port}",
        "c.ServerApp.port_retries = 0",
        "c.ServerApp.open_browser = False",
        "c.ServerApp.allow_root = True",
        f"c.ServerApp.root_dir = {str(root)!r}",
        f"c.IdentityProvider.token = {token!r}",
    ]
    if kind == "ours":
        extensions["libertem_jupyter_proxy"] = True
        lines.append(f"c.LiberTEMProxy.command = {[sys.executable, str(program)]!r}")
    else:
        extensions["jupyter_server_proxy"] = True
        backend_token = secrets.token_urlsafe(32)
        jsp_token_file.write_text(backend_token)
        servers = {
            "libertem": {
                # what libertem-jupyter-proxy 0.1.2 registered (see the peer reference)
                "command": [
                    sys.executable,
                    str(program),
                    "--no-browser",
                    "--port={port}",
                    f"--token-path={jsp_token_file}",
                ],
                "timeout": 90,
                "request_headers_override": {"X-Api-Key": backend_token},
                "new_browser_tab": True,
            }
        }
        lines.append(f"c.ServerProxy.servers = {servers!r}")
    lines.append(f"c.ServerApp.jpserver_extensions = {extensions!r}")
    lines.extend(extra_lines)
    return "\n".join(lines) + "\n"


def launch_jupyter(
    kind: str,
    workdir: Path,
    client_dir: Path | None,
    jsp_python: Path | None,
    program: Path = BACKEND,
    extra_lines: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], int, str]:
    """Write the config and start ``jupyter server``; returns (process, port, token)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = base_env(workdir, client_dir)
    port = free_port()
    token = secrets.token_urlsafe(24)
    config = workdir / "jupyter_server_config.py"
    config.write_text(
        jupyter_config(
            kind, port, token, workdir / "root", workdir / "jsp-token", program, extra_lines
        )
    )
    python = sys.executable if kind == "ours" else str(jsp_python)
    return spawn_jupyter(python, config, workdir, env), port, token


def spawn_jupyter(
    python: str, config: Path, workdir: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``jupyter server`` with ``config``, in its own session, logging to workdir/jupyter.log
    (the child keeps the log open; our handle is closed at once)."""
    with open(workdir / "jupyter.log", "wb") as log:
        return subprocess.Popen(
            [python, "-m", "jupyter_server", f"--config={config}"],
            env=env,
            cwd=str(workdir / "root"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def start_jupyter(
    kind: str,
    workdir: Path,
    client_dir: Path | None,
    jsp_python: Path | None,
    program: Path = BACKEND,
    extra_lines: tuple[str, ...] = (),
) -> Target:
    """Start ``ours`` or ``jsp`` Jupyter and wait until its own API answers."""
    proc, port, token = launch_jupyter(kind, workdir, client_dir, jsp_python, program, extra_lines)
    headers = {"Authorization": f"token {token}"}
    base_url = f"http://127.0.0.1:{port}/"
    try:
        await wait_http(base_url + "api/status", headers, 60, 0.05)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"{kind} Jupyter did not start; see {workdir / 'jupyter.log'}") from None
    return Target(
        kind,
        base_url + "libertem/",
        headers,
        jupyter=psutil.Process(proc.pid),
        popen=proc,
        workdir=workdir,
        program=program,
        extra={"jupyter_base": base_url},
    )


def stop(target: Target, timeout: float = 15.0) -> None:
    """SIGTERM (Jupyter then runs its extensions' stop hooks), SIGKILL after ``timeout``; any
    backend left behind by the target is killed by pid."""
    proc = target.popen
    if proc is None:
        return
    leftovers = []
    if target.jupyter is not None:
        with contextlib.suppress(psutil.Error):
            leftovers = target.jupyter.children(recursive=True)
    sig = signal.SIGINT if target.name == "direct" else signal.SIGTERM
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in leftovers:
        with contextlib.suppress(psutil.Error):
            child.kill()


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ljp-bench-"))
