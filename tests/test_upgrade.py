"""The upgrade users will make: from ``libertem-jupyter-proxy==0.1.2`` (a plugin of
jupyter-server-proxy, both from PyPI) to this package's wheel, in one venv, the way
``pip install --upgrade libertem-jupyter-proxy`` does it.

After the upgrade our server extension is listed OK, ``{base_url}libertem/`` is answered by it
(the status API exists, the loading page or the GUI comes back), jupyter-server-proxy offers no
``libertem`` server any more (no second launcher tile: its launcher reads
``server-proxy/servers-info``, which lists the ``jupyter_serverproxy_servers`` entry points), and
the 0.1.x configuration file ``<prefix>/etc/libertem_jupyter_proxy.json`` still decides which
``libertem-server`` runs: the real one of the test environment, which the upgraded venv could not
find otherwise (it is not on the PATH given to Jupyter, and LiberTEM is not installed there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from libertem_jupyter_proxy import __version__

from .dists import Dists, build_dists
from .helpers import free_port, missing

pytestmark = pytest.mark.slow

TOKEN = "upgrade-test-token-0a1b"
BASE_URL = "/user/alice/"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
START_TIMEOUT = 90.0  # a cold Jupyter start on a busy 2-core CI machine


@dataclass
class Venv:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def run(self, *argv: str, env: dict[str, str]) -> str:
        out = subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=False,
        )
        text = ANSI.sub("", out.stdout + out.stderr)
        assert out.returncode == 0, f"{argv} exited with {out.returncode}:\n{text[-3000:]}"
        return text

    def serverproxy_entry_points(self, env: dict[str, str]) -> list[str]:
        code = (
            "from importlib.metadata import entry_points; "
            "print(sorted(e.name for e in entry_points(group='jupyter_serverproxy_servers')))"
        )
        return json.loads(self.run("python", "-c", code, env=env).strip().replace("'", '"'))


def _system_path() -> str:
    """PATH without any virtualenv: the upgraded Jupyter must not find libertem-server there."""
    keep = [
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and not (Path(p).parent / "pyvenv.cfg").exists()
    ]
    return os.pathsep.join(keep)


def _env(home: Path, venv: Venv) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JUPYTER", "VIRTUAL_ENV", "LIBERTEM", "PYTHON"))
    }
    env.update(
        PATH=os.pathsep.join([str(venv.bin), _system_path()]),
        HOME=str(home),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    return env


class Client:
    """Requests to one Jupyter server, authenticated with its token header."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}{BASE_URL}"

    def get(self, path: str, accept: str = "application/json") -> tuple[int, str]:
        return self._send("GET", path, accept)

    def post(self, path: str) -> tuple[int, str]:
        return self._send("POST", path, "application/json", b"")

    def _send(self, method: str, path: str, accept: str, body: bytes | None = None):
        req = urllib.request.Request(
            self.base + path,
            data=body,
            method=method,
            headers={"Authorization": f"token {TOKEN}", "Accept": accept},
        )
        try:
            with urllib.request.urlopen(req, timeout=150) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def json(self, path: str) -> dict:
        code, body = self.get(path)
        assert code == 200, (path, code, body[:500])
        return json.loads(body)


@contextmanager
def jupyter_server(venv: Venv, env: dict[str, str], workdir: Path) -> Iterator[Client]:
    """``<venv>/bin/jupyter server`` on a free port until the block ends (SIGINT twice, then
    SIGKILL after 30 s)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "jupyter.log"
    argv = [
        str(venv.bin / "jupyter"),
        "server",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.base_url={BASE_URL}",
        f"--IdentityProvider.token={TOKEN}",
        "--ServerApp.open_browser=False",
        "--ServerApp.allow_root=True",
        f"--ServerApp.root_dir={workdir}",
        "--ServerApp.reraise_server_extension_failures=True",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    client = Client(port)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"jupyter server exited with {proc.returncode}:\n{log_path.read_text()}"
                )
            try:
                if client.get("api/status")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"jupyter server not ready in {START_TIMEOUT} s:\n{log_path.read_text()}"
                )
            time.sleep(0.1)  # the polling interval of a readiness probe
        yield client
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(1)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _server_names(client: Client) -> list[str]:
    code, body = client.get("server-proxy/servers-info")
    assert code == 200, (code, body[:300])
    return [s["name"] for s in json.loads(body)["server_processes"]]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    return build_dists(tmp_path_factory.mktemp("dists"))


def test_upgrade_from_0_1_2_with_jupyter_server_proxy(tmp_path: Path, dists: Dists):
    libertem_server = shutil.which("libertem-server")
    if libertem_server is None:
        missing("LiberTEM is not installed (make install-demo)")
    venv = Venv(tmp_path / "venv")
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv.root)],
        check=True,
    )
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, venv)

    # --- what users have today: 0.1.2 + jupyter-server-proxy from PyPI, and the JSON file
    venv.run(
        "python",
        "-m",
        "pip",
        "install",
        "--quiet",
        "libertem-jupyter-proxy==0.1.2",
        "jupyter-server-proxy",
        env=env,
    )
    (venv.root / "etc").mkdir(exist_ok=True)
    config_file = venv.root / "etc" / "libertem_jupyter_proxy.json"
    config_file.write_text(json.dumps({"libertem_server_path": libertem_server}))
    assert venv.serverproxy_entry_points(env) == ["libertem"]
    with jupyter_server(venv, env, tmp_path / "before") as client:
        # the old launcher tile comes from here; and there is no status API yet
        assert "libertem" in _server_names(client)
        assert client.get("libertem-proxy/api/status")[0] == 404

    # --- the upgrade
    venv.run("python", "-m", "pip", "install", "--quiet", "--upgrade", str(dists.wheel), env=env)
    assert venv.serverproxy_entry_points(env) == []
    listed = venv.run("jupyter", "server", "extension", "list", env=env)
    assert re.search(rf"libertem_jupyter_proxy {re.escape(__version__)} OK", listed), listed
    assert re.search(r"libertem_jupyter_proxy\s+enabled", listed), listed
    assert not list(venv.root.glob("lib/python*/site-packages/libertem_jupyter_proxy/icons"))

    with jupyter_server(venv, env, tmp_path / "after") as client:
        # jupyter-server-proxy (still installed) offers no libertem server: no second tile
        assert "libertem" not in _server_names(client)
        status = client.json("libertem-proxy/api/status")
        assert status["state"] in ("stopped", "starting", "running"), status

        # a browser visit is answered by this extension: the loading page or the GUI
        code, page = client.get("libertem/", accept="text/html")
        assert code == 200, page[:500]
        assert "Starting LiberTEM" in page or "<title>LiberTEM</title>" in page, page[:500]

        # the start API waits until LiberTEM answers; it is the one the JSON file names
        code, body = client.post("libertem-proxy/api/start")
        assert code == 200, body[:2000]
        status = client.json("libertem-proxy/api/status")
        assert status["state"] == "running", status
        pid = status["pid"]
        cmdline = psutil.Process(pid).cmdline()
        assert libertem_server in cmdline[:2], cmdline
        code, page = client.get("libertem/", accept="text/html")
        assert code == 200 and "<title>LiberTEM</title>" in page, page[:500]
        backend = psutil.Process(pid)

    # stopping Jupyter stops LiberTEM
    backend.wait(30)
