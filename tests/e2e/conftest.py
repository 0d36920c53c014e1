"""Real-world end-to-end fixtures: nginx -> JupyterHub -> user servers -> libertem-server.

Everything runs on 127.0.0.1 and is started and stopped here:

- ``nginx`` (Debian) with ``docs/snippets/nginx-jupyterhub.conf``, the file the docs tell admins
  to use, placeholders filled in;
- JupyterHub with configurable-http-proxy (npm, ``.e2e/node``), DummyAuthenticator with a
  password, SimpleLocalProcessSpawner, users alice and bob (homes in a temp dir);
- the user servers run ``jupyterhub-singleuser`` from ``.e2e/jupyter-venv``, which has this
  package but no LiberTEM; their PATH has no libertem-server either. They find LiberTEM's own
  environment (``.e2e/libertem-venv``) only through
  ``$LIBERTEM_ROOT/etc/libertem_jupyter_proxy.json`` (the documented alternative to
  ``<sys.prefix>/etc/...``).

``tests/e2e/setup.sh`` (run by ``make test-e2e``) builds ``.e2e/``. Without it these tests are
skipped, unless ``LTJP_E2E_REQUIRED=1`` (set by ``make test-e2e``) turns that into a failure.

Every process started for a run carries ``LTJP_E2E_RUN=<id>`` in its environment (inherited by
libertem-server and its dask workers), which is how the tests find leftovers without mistaking
other people's processes on the same machine for ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..helpers import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = Path(os.environ.get("E2E_DIR", REPO / ".e2e"))
LIBERTEM_VENV = E2E_DIR / "libertem-venv"
JUPYTER_VENV = E2E_DIR / "jupyter-venv"
CHP = E2E_DIR / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
NGINX = Path("/usr/sbin/nginx")
CHROMIUM = Path("/usr/bin/chromium")
NGINX_SNIPPET = REPO / "docs" / "snippets" / "nginx-jupyterhub.conf"
ARTIFACTS = Path(os.environ.get("E2E_ARTIFACTS", REPO / "e2e-artifacts")).resolve()

USERS = ("alice", "bob")  # the scenario's users
# A third user who opens the GUI by its URL: the first visit shows the proxy's loading page while
# LiberTEM starts, whose status polls must pass JupyterHub's XSRF rule (they once got 403).
LOADING_PAGE_USER = "carol"
PASSWORD = "e2e-password-not-secret"
RUN_MARKER = "LTJP_E2E_RUN"
HUB_START_TIMEOUT = 90.0
HUB_STOP_TIMEOUT = 90.0  # the hub stops each user server: SIGINT, up to 10 s, then SIGTERM...
# the system dirs only: no venv, no pyenv shim, nothing that could hold a libertem-server
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---------------------------------------------------------------------------- reporting


@dataclass
class Timings:
    """Step durations of the scenario, per user; printed at the end and saved as JSON."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def add(self, who: str, step: str, start: float, end: float) -> None:
        self.steps.append(
            {
                "who": who,
                "step": step,
                "seconds": round(end - start, 2),
                "at": round(start - self.t0, 2),
            }
        )

    def table(self) -> str:
        lines = [f"{'who':<8} {'step':<44} {'seconds':>8} {'at':>8}"]
        for s in self.steps:
            lines.append(f"{s['who']:<8} {s['step']:<44} {s['seconds']:>8.2f} {s['at']:>8.2f}")
        return "\n".join(lines)


TIMINGS = Timings()
_RESULTS: dict[str, Any] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    TIMINGS.t0 = time.monotonic()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS.get("artifacts_used"):
        return
    tr = terminalreporter
    tr.section("end-to-end: step timings")
    tr.write_line(TIMINGS.table())
    total = _RESULTS.get("total")
    if total is not None:
        tr.write_line(f"total end-to-end time (stack up to stack down): {total:.1f} s")
    (ARTIFACTS / "timings.json").write_text(
        json.dumps({"steps": TIMINGS.steps, "total_seconds": total}, indent=2)
    )
    tr.write_line(f"end-to-end screenshots, logs and timings.json: {ARTIFACTS}")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """A clean folder for screenshots, logs and timings.json (printed at the end of the run)."""
    _require_setup()  # a skipped run leaves an earlier run's artifacts alone
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    _RESULTS["artifacts_used"] = True
    return ARTIFACTS


@pytest.fixture(scope="session")
def timings() -> Timings:
    return TIMINGS


# ---------------------------------------------------------------------------- prerequisites


def _require_setup() -> None:
    missing = [
        str(p)
        for p in (
            LIBERTEM_VENV / "bin" / "libertem-server",
            JUPYTER_VENV / "bin" / "jupyterhub",
            JUPYTER_VENV / "bin" / "jupyterhub-singleuser",
            CHP,
            NGINX,
            CHROMIUM,
        )
        if not p.exists()
    ]
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("python package playwright")
    if missing:
        msg = "end-to-end setup missing (run `make test-e2e` or tests/e2e/setup.sh): " + ", ".join(
            missing
        )
        if os.environ.get("LTJP_E2E_REQUIRED"):
            pytest.fail(msg)
        pytest.skip(msg)


# ---------------------------------------------------------------------------- processes


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


@dataclass
class Proc:
    """A process seen in /proc."""

    pid: int
    cmdline: list[str]
    env: dict[str, str]

    @property
    def command(self) -> str:
        return " ".join(self.cmdline)

    @property
    def is_libertem_server(self) -> bool:
        return any(part.endswith("/libertem-server") for part in self.cmdline[:2])

    @property
    def is_dask_worker(self) -> bool:
        """LiberTEM's local cluster: multiprocessing-spawned python processes of its venv."""
        return (
            bool(self.cmdline)
            and self.cmdline[0].startswith(str(LIBERTEM_VENV))
            and ("multiprocessing" in self.command or "distributed" in self.command)
        )

    @property
    def is_user_server(self) -> bool:
        return any("jupyterhub-singleuser" in part for part in self.cmdline[:2])


def alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def processes(run_id: str) -> list[Proc]:
    """Live (non-zombie) processes whose environment carries this run's marker."""
    needle = f"{RUN_MARKER}={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        environ = _read(f"/proc/{entry}/environ")
        if needle not in environ.split(b"\0"):
            continue
        if not alive(int(entry)):
            continue
        cmdline = _read(f"/proc/{entry}/cmdline").decode("utf-8", "replace").split("\0")
        env = dict(
            kv.split("=", 1) for kv in environ.decode("utf-8", "replace").split("\0") if "=" in kv
        )
        found.append(Proc(int(entry), [c for c in cmdline if c], env))
    return found


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when pytest dies (even by SIGKILL), so an interrupted
    run does not leave a hub (and through it user servers and LiberTEM) or nginx behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# ---------------------------------------------------------------------------- the stack

HUB_CONFIG = """\
# JupyterHub for the end-to-end tests (written by tests/e2e/conftest.py)
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{chp_port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{chp_api_port}"
c.ConfigurableHTTPProxy.pid_file = {chp_pid!r}
c.JupyterHub.db_url = "sqlite:///{db}"
c.JupyterHub.cookie_secret_file = {cookie_secret!r}
c.JupyterHub.pid_file = {hub_pid!r}
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True

c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {password!r}
c.Authenticator.allowed_users = {all_users!r}

# a test-only admin service: reads server state, makes API tokens for the users
c.JupyterHub.services = [{{"name": "e2e", "api_token": {service_token!r}}}]
c.JupyterHub.load_roles = [
    {{
        "name": "e2e-service",
        "services": ["e2e"],
        "scopes": ["admin:users", "admin:servers", "admin:server_state", "tokens",
                   "access:servers", "read:users"],
    }}
]

c.JupyterHub.spawner_class = "simple"  # SimpleLocalProcessSpawner: no system users
c.SimpleLocalProcessSpawner.home_dir_template = {home_template!r}
c.Spawner.cmd = [{singleuser!r}]
# CI runs as root; Jupyter refuses root without this
c.Spawner.args = ["--allow-root"]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
# nothing of the hub's environment leaks into the user servers: all they get is below
c.Spawner.env_keep = ["LANG", "LC_ALL"]
c.Spawner.environment = {{
    # the Jupyter env first, then system dirs: no libertem-server anywhere on this PATH
    "PATH": {spawn_path!r},
    # where the proxy reads etc/libertem_jupyter_proxy.json (instead of sys.prefix)
    "LIBERTEM_ROOT": {libertem_root!r},
    "TMPDIR": lambda spawner: {tmp_root!r} + "/" + spawner.user.name,
    "JUPYTER_PLATFORM_DIRS": "1",
    {marker!r}: {run_id!r},
}}
"""

NGINX_MAIN = """\
# nginx main config for the end-to-end tests (written by tests/e2e/conftest.py); the server
# block is docs/snippets/nginx-jupyterhub.conf with its placeholders filled in.
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    include {dir}/jupyterhub.conf;
}}
"""


def render_nginx_snippet(listen: str, server_name: str, hub: str) -> str:
    text = NGINX_SNIPPET.read_text()
    for placeholder in ("@LISTEN@", "@SERVER_NAME@", "@JUPYTERHUB@"):
        assert placeholder in text, f"{placeholder} missing in {NGINX_SNIPPET}"
    return (
        text.replace("@LISTEN@", listen)
        .replace("@SERVER_NAME@", server_name)
        .replace("@JUPYTERHUB@", hub)
    )


@dataclass
class Stack:
    """nginx + JupyterHub + configurable-http-proxy, as the tests see them."""

    root: Path
    run_id: str
    port: int  # nginx: what browsers use
    chp_port: int
    service_token: str
    homes: dict[str, Path]
    user_tmp: dict[str, Path]
    libertem_root: Path
    spawn_path: str
    hub_proc: subprocess.Popen[bytes] | None = None
    nginx_proc: subprocess.Popen[bytes] | None = None
    hub_log: Path | None = None
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.origin + path

    def hub_api(self, method: str, path: str, body: Any = None) -> Any:
        """The hub's REST API as the test service (through nginx)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url("/hub/api/" + path.lstrip("/")),
            data=data,
            method=method,
            headers={"Authorization": f"token {self.service_token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def user_token(self, user: str) -> str:
        """An API token of ``user`` (as a script of theirs would have)."""
        if user not in self._tokens:
            reply = self.hub_api(
                "POST", f"users/{user}/tokens", {"note": "e2e", "expires_in": 3600}
            )
            self._tokens[user] = reply["token"]
        return self._tokens[user]

    def processes(self) -> list[Proc]:
        return processes(self.run_id)

    def user_processes(self, user: str) -> list[Proc]:
        return [p for p in self.processes() if p.env.get("JUPYTERHUB_USER") == user]

    def hub_log_text(self) -> str:
        return self.hub_log.read_text(errors="replace") if self.hub_log else ""

    # -------------------------------------------------------------------- start

    def start(self) -> None:
        self._start_hub()
        self._start_nginx()

    def _start_hub(self) -> None:
        hub_dir = self.root / "hub"
        hub_dir.mkdir()
        config = HUB_CONFIG.format(
            chp_port=self.chp_port,
            hub_port=free_port(),
            chp=str(CHP),
            chp_api_port=free_port(),
            chp_pid=str(hub_dir / "chp.pid"),
            hub_pid=str(hub_dir / "hub.pid"),
            db=hub_dir / "jupyterhub.sqlite",
            cookie_secret=str(hub_dir / "cookie_secret"),
            password=PASSWORD,
            all_users={*USERS, LOADING_PAGE_USER},
            service_token=self.service_token,
            home_template=str(self.root / "home" / "{username}"),
            singleuser=str(JUPYTER_VENV / "bin" / "jupyterhub-singleuser"),
            spawn_path=self.spawn_path,
            libertem_root=str(self.libertem_root),
            tmp_root=str(self.root / "tmp"),
            marker=RUN_MARKER,
            run_id=self.run_id,
        )
        (hub_dir / "jupyterhub_config.py").write_text(config)
        env = {
            "PATH": f"{JUPYTER_VENV / 'bin'}:{SYSTEM_PATH}",  # node for configurable-http-proxy
            "HOME": str(hub_dir),
            "LANG": "C.UTF-8",
            RUN_MARKER: self.run_id,
        }
        self.hub_log = self.root / "hub.log"
        with open(self.hub_log, "wb") as log:
            self.hub_proc = subprocess.Popen(
                [
                    str(JUPYTER_VENV / "bin" / "jupyterhub"),
                    "-f",
                    str(hub_dir / "jupyterhub_config.py"),
                ],
                cwd=hub_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        url = f"http://127.0.0.1:{self.chp_port}/hub/api/"

        def ready() -> bool:
            if self.hub_proc is not None and self.hub_proc.poll() is not None:
                raise RuntimeError(
                    f"jupyterhub exited with {self.hub_proc.returncode}:\n{self.hub_log_text()}"
                )
            return _http_ok(url)

        wait_until(ready, HUB_START_TIMEOUT, "JupyterHub to answer", interval=0.1)

    def _start_nginx(self) -> None:
        d = self.root / "nginx"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / "tmp" / sub).mkdir(parents=True)
        (d / "jupyterhub.conf").write_text(
            render_nginx_snippet(
                f"127.0.0.1:{self.port}", "127.0.0.1", f"127.0.0.1:{self.chp_port}"
            )
        )
        (d / "nginx.conf").write_text(NGINX_MAIN.format(dir=d))
        argv = [str(NGINX), "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
        assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}"
        self.nginx_proc = subprocess.Popen(
            argv,
            env={"PATH": SYSTEM_PATH, RUN_MARKER: self.run_id},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

        def ready() -> bool:
            if self.nginx_proc is not None and self.nginx_proc.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with {self.nginx_proc.returncode}:\n"
                    + (d / "error.log").read_text(errors="replace")
                )
            return _http_ok(self.url("/hub/api/"))

        wait_until(ready, 30, "nginx to answer", interval=0.05)

    # -------------------------------------------------------------------- stop

    def stop_hub(self) -> float:
        """SIGTERM to the hub, as an init system would send; it stops the user servers and
        configurable-http-proxy itself. Returns how long that took."""
        t = time.monotonic()
        if self.hub_proc is not None and self.hub_proc.poll() is None:
            self.hub_proc.send_signal(signal.SIGTERM)
            try:
                self.hub_proc.wait(HUB_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        return time.monotonic() - t

    def stop_all(self) -> list[str]:
        """Stop everything that is left, by PID; return what had to be killed."""
        killed = []
        if self.nginx_proc is not None:
            _stop_process(self.nginx_proc, signal.SIGQUIT, 10)
        if self.hub_proc is not None and self.hub_proc.poll() is None:
            self.stop_hub()
            if self.hub_proc.poll() is None:
                killed.append(f"jupyterhub (pid {self.hub_proc.pid})")
                _stop_process(self.hub_proc, signal.SIGKILL, 10)
        # user servers live in sessions of their own (and libertem-server in yet another)
        for p in self.processes():
            killed.append(f"{p.pid}: {p.command}")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)
        return killed

    def save_logs(self, dest: Path) -> None:
        if self.hub_log and self.hub_log.exists():
            shutil.copy(self.hub_log, dest / "jupyterhub.log")
        for name in ("error.log", "access.log"):
            src = self.root / "nginx" / name
            if src.exists():
                shutil.copy(src, dest / f"nginx-{name}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Iterator[Stack]:
    """The whole hub behind nginx, up for the module; torn down (and logs saved) after it."""
    _require_setup()
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("hub")
    libertem_root = root / "libertem-root"
    (libertem_root / "etc").mkdir(parents=True)
    (libertem_root / "etc" / "libertem_jupyter_proxy.json").write_text(
        json.dumps({"libertem_server_path": str(LIBERTEM_VENV / "bin" / "libertem-server")})
    )
    spawn_path = f"{JUPYTER_VENV / 'bin'}:{SYSTEM_PATH}"
    homes = {u: root / "home" / u for u in (*USERS, LOADING_PAGE_USER)}
    user_tmp = {u: root / "tmp" / u for u in (*USERS, LOADING_PAGE_USER)}
    for d in (*homes.values(), *user_tmp.values()):
        d.mkdir(parents=True)
    s = Stack(
        root=root,
        run_id=secrets.token_hex(8),
        port=free_port(),
        chp_port=free_port(),
        service_token=secrets.token_hex(24),
        homes=homes,
        user_tmp=user_tmp,
        libertem_root=libertem_root,
        spawn_path=spawn_path,
    )
    try:
        s.start()
        TIMINGS.add("stack", "start JupyterHub + nginx", t0, time.monotonic())
        yield s
    finally:
        killed = s.stop_all()
        s.save_logs(artifacts)
        _RESULTS["total"] = time.monotonic() - t0
        if killed:
            print("e2e teardown had to kill:\n  " + "\n  ".join(killed))
