"""Fixtures: a real Jupyter ServerApp with the extension, served by pytest-tornasync.

Each test gets its own isolated Jupyter (HOME, config, data and runtime dirs, token) and, by
default, the fake libertem-server from ``tests/fake_libertem_server.py`` as the backend. A test
changes the extension's options with ``@pytest.mark.proxy_config(...)`` and the base URL with
``@pytest.mark.base_url("/")``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from jupyter_server.serverapp import ServerApp
from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect
from traitlets.config import Config

from .helpers import OTHER_EXTENSIONS

HERE = Path(__file__).parent
FAKE_SERVER = HERE / "fake_libertem_server.py"
TOKEN = "test-jupyter-token-c0ffee"
DEFAULT_BASE_URL = "/user/alice/"


def fake_command() -> list[str]:
    return [sys.executable, str(FAKE_SERVER)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "proxy_config(**options): LiberTEMProxy options")
    config.addinivalue_line("markers", "base_url(url): Jupyter's base_url for the test")


@pytest.fixture
def jp_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Isolate everything Jupyter reads or writes, so the developer's setup cannot leak in."""
    dirs = {}
    for name in ("home", "config", "data", "runtime", "root", "prefix"):
        d = tmp_path / name
        d.mkdir()
        dirs[name] = d
    monkeypatch.setenv("HOME", str(dirs["home"]))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(dirs["config"]))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(dirs["data"]))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(dirs["runtime"]))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    # the JSON file lookup must not find a file in the test environment's own sys.prefix
    monkeypatch.setenv("LIBERTEM_ROOT", str(dirs["prefix"]))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return dirs


@pytest.fixture
def base_url(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("base_url")
    return marker.args[0] if marker else DEFAULT_BASE_URL


@pytest.fixture
def proxy_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    options: dict[str, Any] = {
        "command": fake_command(),
        "start_timeout": 20.0,
        "stop_timeout": 3.0,
        "restart_backoff": 0.05,
    }
    for marker in reversed(list(request.node.iter_markers("proxy_config"))):
        options.update(marker.kwargs)
    return options


@pytest.fixture(params=["threads", "event-loop"])
def both_websocket_relays(request: pytest.FixtureRequest, proxy_options: dict[str, Any]) -> str:
    """Run a test once with websockets relayed on threads (the default) and once on Jupyter's
    event loop (what websockets beyond ``websocket_threads`` get): same rules, same results."""
    proxy_options.setdefault("websocket_threads", 16 if request.param == "threads" else 0)
    return str(request.param)


@pytest.fixture
def serverapp(
    io_loop: Any, jp_dirs: dict[str, Path], base_url: str, proxy_options: dict[str, Any]
) -> Iterator[ServerApp]:
    config = Config()
    # only our extension: others installed in the environment (lab, lsp, terminals) are noise
    config.ServerApp.jpserver_extensions = {
        "libertem_jupyter_proxy": True,
        **{name: False for name in OTHER_EXTENSIONS},
    }
    config.ServerApp.reraise_server_extension_failures = True
    config.ServerApp.base_url = base_url
    config.ServerApp.root_dir = str(jp_dirs["root"])
    config.ServerApp.open_browser = False
    config.IdentityProvider.token = TOKEN
    for key, value in proxy_options.items():
        setattr(config.LiberTEMProxy, key, value)
    app = ServerApp(config=config)
    app.initialize(argv=[], new_httpserver=False)
    yield app
    io_loop.run_sync(app._cleanup, timeout=60)
    ServerApp.clear_instance()


@pytest.fixture
def app(serverapp: ServerApp) -> Any:
    return serverapp.web_app


@pytest.fixture
def supervisor(serverapp: ServerApp) -> Any:
    return serverapp.web_app.settings["libertem_proxy"].supervisor


class Client:
    """Talks to the test Jupyter like a browser (cookie) or a script (token header)."""

    def __init__(self, http_client: Any, base_url: str, port: int) -> None:
        self.http = http_client
        self.base_url = base_url
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"
        self.cookie: str | None = None

    def url(self, path: str) -> str:
        """Server-relative URL (the pytest-tornasync client adds scheme, host and port)."""
        return f"{self.base_url}{path}"

    async def login(self) -> str:
        """Log in with the token the way a user does once (``?token=``); keep the cookie."""
        resp = await self.http.fetch(
            self.url("api/status?" + urlencode({"token": TOKEN})), raise_error=False
        )
        cookies = [c.split(";", 1)[0] for c in resp.headers.get_list("Set-Cookie")]
        self.cookie = "; ".join(c for c in cookies if not c.startswith("_xsrf"))
        assert self.cookie, f"no login cookie in {resp.headers}"
        return self.cookie

    async def _credentials(self, auth: str) -> dict[str, str]:
        """Headers that authenticate like a browser ("cookie"), a script ("token") or not at
        all ("none")."""
        if auth == "cookie":
            if self.cookie is None:
                await self.login()
            assert self.cookie is not None
            return {"Cookie": self.cookie}
        if auth == "token":
            return {"Authorization": f"token {TOKEN}"}
        return {}

    async def fetch(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | str | None = None,
        auth: str = "cookie",
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> HTTPResponse:
        """``auth``: "cookie" (browser, sends a same-origin Origin on unsafe methods), "token"
        (script, Authorization header) or "none"."""
        h = await self._credentials(auth)
        if auth == "cookie" and method not in ("GET", "HEAD"):
            h["Origin"] = self.origin
        h.update(headers or {})
        h = {k: v for k, v in h.items() if v is not None}
        if body is None and method in ("POST", "PUT", "PATCH") and "body_producer" not in kwargs:
            body = b""
        kwargs.setdefault("request_timeout", 60)
        kwargs.setdefault("follow_redirects", False)
        kwargs.setdefault("allow_nonstandard_methods", True)  # DELETE with a body
        return await self.http.fetch(
            self.url(path), method=method, body=body, headers=h, raise_error=False, **kwargs
        )

    async def json(self, path: str, **kwargs: Any) -> Any:
        resp = await self.fetch(path, **kwargs)
        assert resp.code == 200, (resp.code, resp.body[:500])
        return json.loads(resp.body)

    async def websocket(
        self,
        path: str = "libertem/api/events/",
        *,
        auth: str = "cookie",
        origin: str | None = "same",
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> WebSocketClientConnection:
        h = await self._credentials(auth)
        if origin == "same":
            h["Origin"] = self.origin
        elif origin is not None:
            h["Origin"] = origin
        h.update(headers or {})
        url = f"ws://127.0.0.1:{self.port}{self.base_url}{path}"
        return await websocket_connect(HTTPRequest(url, headers=h), **kwargs)


@pytest.fixture
def client(http_server_client: Any, http_server_port: Any, base_url: str) -> Client:
    return Client(http_server_client, base_url, http_server_port[1])


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def descendants_by_marker(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if marker in cmdline and process_alive(int(entry)):
            found.append(int(entry))
    return found
