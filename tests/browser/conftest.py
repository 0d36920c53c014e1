"""Browser fixtures: a real ``jupyter lab`` / ``jupyter notebook`` subprocess and headless Chromium.

Chromium is Debian's (``apt-get install chromium``), driven by PyPI ``playwright`` through
``executable_path``; ``playwright install`` (which downloads its own browser) is never used.
Outside CI a missing browser or playwright skips these tests; in CI (``CI`` set) it fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..helpers import CHROMIUM, CHROMIUM_ARGS, free_port, missing

REPO = Path(__file__).resolve().parents[2]
FAKE_SERVER = REPO / "tests" / "fake_libertem_server.py"
BASE_URL = "/user/alice/"
TOKEN = "browser-test-token-5eed"
START_TIMEOUT = 90.0  # a cold JupyterLab start on a busy 2-core CI machine


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives a real browser (headless Chromium)")


@dataclass
class JupyterProcess:
    """A running Jupyter server subprocess, as seen from the tests."""

    app: str  # "lab" or "notebook"
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        return self.origin + BASE_URL

    @property
    def gui_url(self) -> str:
        return self.base + "libertem/"

    def url(self, path: str) -> str:
        """``path`` below base_url, with the token that logs the browser in."""
        sep = "&" if "?" in path else "?"
        return f"{self.base}{path}{sep}token={TOKEN}"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait_ready(server: JupyterProcess) -> None:
    """Poll the status API until the server answers; fail at once if it exits."""
    deadline = time.monotonic() + START_TIMEOUT
    status = server.base + "api/status"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"jupyter {server.app} exited with {server.proc.returncode}:\n{server.log()}"
            )
        try:
            req = urllib.request.Request(status, headers={"Authorization": f"token {TOKEN}"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)  # polling interval of a readiness probe, not a wait for the UI
    raise RuntimeError(f"jupyter {server.app} not ready in {START_TIMEOUT}s:\n{server.log()}")


def _stop(server: JupyterProcess) -> None:
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # twice: Jupyter asks for confirmation on the first
        try:
            proc.wait(1)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def jupyter_server(tmp_path: Path) -> Iterator[Callable[..., JupyterProcess]]:
    """Factory: ``jupyter_server("lab")`` or ``jupyter_server("notebook")``, ready to browse.

    HOME and the Jupyter config/data/runtime dirs are private to the test; the labextension
    is still found in ``sys.prefix/share/jupyter/labextensions`` (installed by pip).
    ``lab_overrides`` writes ``labconfig/default_setting_overrides.json`` into the private
    config dir, the way an admin sets defaults. ``command`` replaces the fake backend.
    """
    started: list[JupyterProcess] = []

    def start(
        app: str,
        lab_overrides: dict[str, Any] | None = None,
        env_overrides: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> JupyterProcess:
        module = {"lab": "jupyterlab", "notebook": "notebook"}[app]
        if importlib.util.find_spec(module) is None:
            missing(f"{module} not installed")
        root = tmp_path / f"{app}-{len(started)}"
        dirs = {n: root / n for n in ("home", "config", "data", "runtime", "notebooks")}
        for d in dirs.values():
            d.mkdir(parents=True)
        if lab_overrides:
            labconfig = dirs["config"] / "labconfig"
            labconfig.mkdir()
            (labconfig / "default_setting_overrides.json").write_text(json.dumps(lab_overrides))
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("JUPYTER", "JUPYTERLAB", "JPY_"))
        }
        env.update(
            HOME=str(dirs["home"]),
            JUPYTER_CONFIG_DIR=str(dirs["config"]),
            JUPYTER_DATA_DIR=str(dirs["data"]),
            JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
            JUPYTER_PLATFORM_DIRS="0",
        )
        # LIBERTEM_FAKE_* variables reach the fake backend through Jupyter's environment
        env.update(env_overrides or {})
        port = free_port()
        # the fake backend unless a test names another command (e.g. the real libertem-server)
        command = command or [sys.executable, str(FAKE_SERVER)]
        argv = [
            sys.executable,
            "-m",
            module,
            f"--ServerApp.base_url={BASE_URL}",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={TOKEN}",
            "--ServerApp.open_browser=False",
            "--ServerApp.allow_root=True",  # CI runs as root
            f"--ServerApp.root_dir={dirs['notebooks']}",
            "--ServerApp.reraise_server_extension_failures=True",
            # traitlets' list syntax: one flag per item (a single '["a", "b"]' value is
            # taken as a one-item list for an ExtensionApp's traits)
            *(f"--LiberTEMProxy.command={part}" for part in command),
            # window.jupyterapp, so a test can ask the page to re-fetch the kernelspecs
            "--LabApp.expose_app_in_browser=True"
            if app == "lab"
            else "--JupyterNotebookApp.expose_app_in_browser=True",
        ]
        log_path = root / "jupyter.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=dirs["notebooks"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # same process group as pytest: a Ctrl-C or a killed run stops it too
            )
        server = JupyterProcess(app, port, proc, log_path, dirs)
        started.append(server)
        _wait_ready(server)
        return server

    yield start
    for server in started:
        _stop(server)


@pytest.fixture
def browser_context(tmp_path: Path) -> Iterator[Any]:
    """A fresh headless Chromium (own user-data dir) with one Playwright context."""
    if not os.path.exists(CHROMIUM):
        missing(f"{CHROMIUM} not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright not installed (pip install playwright)")
    user_data = tmp_path / "chromium-profile"
    user_data.mkdir()
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(user_data),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()


@dataclass
class ConsoleLog:
    """Console errors and uncaught exceptions of every page in a context."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        def on_console(msg: Any) -> None:
            if msg.type == "error":
                self.errors.append(f"{msg.text} @ {msg.location}")
            elif msg.type == "warning":
                self.warnings.append(msg.text)

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))


@pytest.fixture
def console(browser_context: Any) -> ConsoleLog:
    log = ConsoleLog()
    for page in browser_context.pages:
        log.watch(page)
    browser_context.on("page", log.watch)
    return log


@pytest.fixture(scope="session", autouse=True)
def _labextension_installed() -> None:
    """The tests need the built extension where pip puts it, not just the sources."""
    target = Path(sys.prefix, "share", "jupyter", "labextensions", "libertem-jupyter-proxy")
    if not (target / "package.json").exists():
        pytest.fail(
            f"{target} is missing: install the package (pip install -e .) so the labextension "
            "is built and installed"
        )
