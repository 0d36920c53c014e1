"""Self-test of tests/fake_libertem_server.py: the fake must behave like libertem-server where the
proxy can see it (see shared/reference/libertem-server.md). Plain sync pytest; every spawned
process runs in its own session and is killed (with its group) in a ``finally``."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tornado.httpclient
import tornado.websocket

from .helpers import free_port

FAKE = Path(__file__).with_name("fake_libertem_server.py")
TOKEN = "s3cret-token"
DEADLINE = 10.0


class Fake:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, tmp: Path) -> None:
        self.proc, self.port, self.tmp = proc, port, tmp

    @property
    def stderr(self) -> str:
        return (self.tmp / "stderr.txt").read_text()

    @property
    def stdout(self) -> str:
        return (self.tmp / "stdout.txt").read_text()

    def wait_ready(self) -> None:
        """Poll the port until it accepts connections (or the process dies)."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"fake exited early:\n{self.stderr}"
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.02)
        raise AssertionError(f"fake not ready in time:\n{self.stderr}")

    def wait(self) -> int:
        return self.proc.wait(timeout=DEADLINE)

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        token: bool = True,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)
        try:
            hdrs = {"X-Api-Key": TOKEN} if token else {}
            hdrs.update(headers or {})
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen[bytes]] = []
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    def _start(
        *extra: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        token_path: str | None = None,
        default_args: bool = True,
    ) -> Fake:
        port = free_port() if port is None else port
        args = (
            [
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-n",
                "-t",
                token_path or str(token_file),
                "-d",
                str(tmp_path / "dask"),
            ]
            if default_args
            else []
        )
        run_dir = tmp_path / f"run{len(procs)}"
        run_dir.mkdir()
        with open(run_dir / "stdout.txt", "wb") as out, open(run_dir / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(FAKE), *args, *extra],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                cwd=run_dir,
            )
        procs.append(proc)
        return Fake(proc, port, run_dir)

    try:
        yield _start
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: fake workers too
            proc.wait()


def test_token_enforced_everywhere(start) -> None:
    fake = start()
    fake.wait_ready()
    for path in ("/", "/assets/main.js", "/api/config/", "/no/such/path", "/_fake/pid"):
        status, _, body = fake.request("GET", path, token=False)
        assert status == 403, path
        assert body == b"<html><title>403: Forbidden</title><body>403: Forbidden</body></html>"
    assert fake.request("GET", "/", headers={"X-Api-Key": "wrong"}, token=False)[0] == 403
    status, headers, body = fake.request("GET", "/")
    assert status == 200 and b"<title>LiberTEM</title>" in body
    assert "ETag" in headers and "Set-Cookie" not in headers
    assert fake.request("GET", f"/?token={TOKEN}", token=False)[0] == 200
    # a non-empty ?token= wins over the header
    assert fake.request("GET", "/?token=wrong")[0] == 403
    assert fake.request("GET", "/no/such/path")[0] == 404
    assert fake.request("HEAD", "/")[0] == 405
    status, _, body = fake.request("GET", "/api/config/")
    assert status == 200 and json.loads(body)["messageType"] == "CONFIG"
    assert "LiberTEM listening on http://127.0.0.1:" in fake.stderr
    assert fake.stdout == ""


def test_asset_with_space_and_raw_path(start) -> None:
    fake = start()
    fake.wait_ready()
    status, headers, body = fake.request("GET", "/assets/LiberTEM%20logo.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body.startswith(b"\x89PNG")
    etag = headers["ETag"]
    assert fake.request("GET", "/assets/LiberTEM%20logo.png", {"If-None-Match": etag})[0] == 304
    assert fake.request("GET", "/assets/LiberTEM%20style.css")[0] == 200
    status, _, body = fake.request("GET", "/_fake/headers?a=%20b", {"X-Extra": "1"})
    info = json.loads(body)
    assert info["path"] == "/_fake/headers" and info["query"] == "a=%20b"
    assert info["headers"]["X-Extra"] == "1" and info["headers"]["X-Api-Key"] == TOKEN


def test_shutdown_exits_zero(start) -> None:
    fake = start()
    fake.wait_ready()
    status, _, body = fake.request("DELETE", "/api/shutdown/")
    assert status == 200
    assert json.loads(body) == {"status": "ok", "messageType": "SERVER_SHUTDOWN"}
    assert fake.wait() == 0


def test_signals(start) -> None:
    fake = start()
    fake.wait_ready()
    fake.proc.send_signal(signal.SIGINT)
    assert fake.wait() == 0
    fake = start()
    fake.wait_ready()
    fake.proc.terminate()
    assert fake.wait() == -signal.SIGTERM


def test_crash_mode(start) -> None:
    fake = start(env={"LIBERTEM_FAKE_CRASH": "3"})
    assert fake.wait() == 3
    assert "Traceback (most recent call last)" in fake.stderr
    assert "SimulatedCrash: LIBERTEM_FAKE_CRASH" in fake.stderr
    assert fake.stdout == ""


def test_crash_count_file(start, tmp_path: Path) -> None:
    counter = tmp_path / "crashes"
    counter.write_text("1")
    env = {"LIBERTEM_FAKE_CRASH_COUNT_FILE": str(counter), "LIBERTEM_FAKE_CRASH_CODE": "7"}
    assert start(env=env).wait() == 7
    assert counter.read_text().strip() == "0"
    start(env=env).wait_ready()  # the second start serves


def test_busy_port_exits_one(start) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fake = start(port=busy.getsockname()[1])
        assert fake.wait() == 1
    assert "Traceback" in fake.stderr and "Address already in use" in fake.stderr


def test_usage_errors_exit_two(start, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    fake = start(token_path=str(empty))
    assert fake.wait() == 2
    assert "Error:" in fake.stderr and "is empty" in fake.stderr
    assert start(token_path=str(tmp_path / "missing")).wait() == 2
    fake = start("-h", "0.0.0.0", "-p", str(free_port()), default_args=False)
    assert fake.wait() == 2 and "--insecure" in fake.stderr


def test_websocket_echo_and_origin(start) -> None:
    fake = start()
    fake.wait_ready()
    url = f"ws://127.0.0.1:{fake.port}/api/events/"

    def req(headers: dict[str, str]) -> tornado.httpclient.HTTPRequest:
        return tornado.httpclient.HTTPRequest(url, headers=headers, request_timeout=DEADLINE)

    async def scenario() -> None:
        ws = await tornado.websocket.websocket_connect(req({"X-Api-Key": TOKEN}))
        await ws.write_message("hello")
        assert await ws.read_message() == "hello"
        await ws.write_message(b"\x00\x01\xff", binary=True)
        assert await ws.read_message() == b"\x00\x01\xff"
        await ws.write_message("!binary 1000")
        data = await ws.read_message()
        assert isinstance(data, bytes) and len(data) == 1000
        await ws.write_message("!close 4001 bye")
        assert await ws.read_message() is None
        assert (ws.close_code, ws.close_reason) == (4001, "bye")

        for headers in ({"X-Api-Key": TOKEN, "Origin": "http://evil.example"}, {}):
            with pytest.raises(tornado.httpclient.HTTPClientError) as err:
                await tornado.websocket.websocket_connect(req(headers))
            assert err.value.code == 403

        ok_origin = {"X-Api-Key": TOKEN, "Origin": f"http://127.0.0.1:{fake.port}"}
        ws = await tornado.websocket.websocket_connect(req(ok_origin))
        ws.close()

    asyncio.run(scenario())


def test_helpers_echo_download_and_orphan_workers(start) -> None:
    sys.path.insert(0, str(FAKE.parent))
    from fake_libertem_server import pattern_bytes

    fake = start(env={"LIBERTEM_FAKE_WORKERS": "2"})
    fake.wait_ready()
    payload = os.urandom(300_000)
    status, headers, body = fake.request("POST", "/_fake/echo", body=payload)
    assert status == 200 and body == payload and headers["X-Fake-Body-Length"] == "300000"
    status, _, body = fake.request("GET", "/_fake/download?size=1000003&chunk=4099")
    assert status == 200 and body == pattern_bytes(0, 1_000_003)
    workers = json.loads(fake.request("GET", "/_fake/pid")[2])["workers"]
    assert len(workers) == 2
    fake.proc.terminate()
    assert fake.wait() == -signal.SIGTERM
    for pid in workers:  # they outlive the fake; the fixture kills the group
        os.kill(pid, 0)
