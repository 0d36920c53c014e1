"""Each way of stopping a real ``jupyter server`` process leaves no LiberTEM process behind.

These run Jupyter as a subprocess (not in-process) because signals and process exit are the
point of the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from libertem_jupyter_proxy.guard import group_members

from .conftest import FAKE_SERVER, OTHER_EXTENSIONS, TOKEN, process_alive
from .helpers import free_port


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class JupyterProcess:
    def __init__(
        self,
        tmp_path: Path,
        extra_env: dict[str, str],
        tty: bool = False,
        command: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/user/alice/"
        for d in ("home", "config", "data", "runtime", "root", "tmp"):
            (tmp_path / d).mkdir(exist_ok=True)
        self.tmp = tmp_path / "tmp"
        config = {
            "ServerApp": {
                "jpserver_extensions": {
                    "libertem_jupyter_proxy": True,
                    **{name: False for name in OTHER_EXTENSIONS},
                },
                "port": self.port,
                "ip": "127.0.0.1",
                "open_browser": False,
                "base_url": "/user/alice/",
                "root_dir": str(tmp_path / "root"),
                "reraise_server_extension_failures": True,
                "allow_root": True,
            },
            "IdentityProvider": {"token": TOKEN},
            "LiberTEMProxy": {
                "command": command or [sys.executable, str(FAKE_SERVER)],
                "extra_env": extra_env,
                "stop_timeout": 3.0,
            },
        }
        (tmp_path / "config" / "jupyter_server_config.json").write_text(json.dumps(config))
        env = dict(os.environ)
        env.update(
            HOME=str(tmp_path / "home"),
            JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
            JUPYTER_DATA_DIR=str(tmp_path / "data"),
            JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
            LIBERTEM_ROOT=str(tmp_path),
            TMPDIR=str(self.tmp),
            # a Jupyter that hangs instead of stopping is sent SIGABRT: its threads' stacks
            # then end up in its log (see _assert_all_gone)
            PYTHONFAULTHANDLER="1",
        )
        self.log = open(tmp_path / "jupyter.log", "wb")
        self.log_path = tmp_path / "jupyter.log"
        # with a terminal on stdin, Jupyter handles Ctrl-C itself (confirm, or twice to skip)
        self._pty = pty.openpty() if tty else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server"],
            env=env,
            stdin=self._pty[1] if self._pty else subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait(self._ready, 60, "jupyter server to answer")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            self.get("api/status")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def request(self, path: str, method: str = "GET") -> bytes:
        req = urllib.request.Request(
            self.base + path, method=method, headers={"Authorization": f"token {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read()

    def get(self, path: str) -> dict:
        return json.loads(self.request(path))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        if self._pty:
            for fd in self._pty:
                os.close(fd)


@pytest.fixture
def jupyter(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[JupyterProcess]:
    tty = "at a terminal" in request.node.name
    j = JupyterProcess(tmp_path, {"LIBERTEM_FAKE_WORKERS": "2"}, tty=tty)
    try:
        yield j
    finally:
        j.close()


def _tgkill(pid: int, sig: int) -> None:
    """Send ``sig`` to a thread of ``pid`` other than its main thread (Linux tgkill(2))."""
    import ctypes

    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others, "the process has no other thread"
    libc = ctypes.CDLL(None, use_errno=True)
    sys_tgkill = 234  # x86_64; the test machines are x86_64
    assert libc.syscall(sys_tgkill, pid, others[0], sig) == 0, ctypes.get_errno()


def _backend(j: JupyterProcess) -> tuple[int, list[int], Path]:
    info = j.get("libertem/_fake/pid")
    token_arg = next(a for a in info["argv"] if a.startswith("--token-path="))
    return info["pid"], info["workers"], Path(token_arg.split("=", 1)[1]).parent


def _assert_all_gone(
    j: JupyterProcess, pid: int, workers: list[int], tmpdir: Path, within: float = 60
) -> None:
    try:
        j.proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        j.proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack
        with contextlib.suppress(subprocess.TimeoutExpired):
            j.proc.wait(timeout=10)
        raise AssertionError(
            f"Jupyter did not exit within {within:g} s; its log ends:\n"
            + j.log_path.read_text()[-8000:]
        ) from None
    _wait(lambda: not process_alive(pid), 10, "libertem-server to exit")
    _wait(lambda: not any(process_alive(w) for w in workers), 10, "workers to exit")
    assert not tmpdir.exists(), "token directory left behind"
    assert list(j.tmp.iterdir()) == [], list(j.tmp.iterdir())


@pytest.mark.parametrize(
    "how",
    [
        "SIGTERM",
        "Ctrl-C twice at a terminal",
        "SIGINT without terminal",
        "SIGINT without terminal, to another thread",
        "File > Shut Down",
    ],
)
def test_stopping_jupyter_stops_everything(jupyter, how):
    pid, workers, tmpdir = _backend(jupyter)
    assert process_alive(pid) and all(process_alive(w) for w in workers)
    if how == "SIGTERM":
        jupyter.proc.send_signal(signal.SIGTERM)
    elif how == "Ctrl-C twice at a terminal":
        jupyter.proc.send_signal(signal.SIGINT)
        # the second ^C counts only after Jupyter has swapped in its stop handler and asks
        _wait(
            lambda: (
                "Shut down this Jupyter server" in jupyter.log_path.read_text()
                or "Shutdown this" in jupyter.log_path.read_text()
            ),
            10,
            "the confirm prompt",
        )
        jupyter.proc.send_signal(signal.SIGINT)
    elif how == "SIGINT without terminal":  # KeyboardInterrupt: only our atexit hook runs
        jupyter.proc.send_signal(signal.SIGINT)
    elif how == "SIGINT without terminal, to another thread":
        # what the kernel may do with a process-wide signal: hand it to a thread that is not
        # the main one (asyncio's waitpid threads); the idle main thread must still wake up
        _tgkill(jupyter.proc.pid, signal.SIGINT)
    else:
        jupyter.request("api/shutdown", method="POST")
    # a signal handed to another thread once took Jupyter 15 s to 60+ s to notice (it slept
    # until its next timer); with the wake-up fd it stops like the others, in a few seconds
    within = 10 if how.endswith("another thread") else 60
    _assert_all_gone(jupyter, pid, workers, tmpdir, within)
    log = jupyter.log_path.read_text()
    if not how.startswith("SIGINT without terminal"):
        assert "Stopping LiberTEM before Jupyter exits" in log
    if how == "SIGTERM":
        # Jupyter's own handler ran (simpervisor's would have exited without this line)
        assert "received signal 15, stopping" in log


def _wrapper_without_exec(tmp_path: Path) -> list[str]:
    """A site wrapper like ``module load ...; libertem-server "$@"``: the shell stays the parent,
    so the parent-death signal reaches the shell, not libertem-server."""
    script = tmp_path / "libertem-wrapper.sh"
    script.write_text(f'#!/bin/sh\n"{sys.executable}" "{FAKE_SERVER}" "$@"\necho wrapper done\n')
    script.chmod(0o755)
    return [str(script)]


@pytest.mark.parametrize("launch", ["direct", "wrapper script without exec"])
def test_jupyter_sigkill_leaves_nothing(tmp_path: Path, launch: str) -> None:
    """Jupyter killed with SIGKILL (no cleanup code of its own runs): the guard in LiberTEM's
    process group still takes libertem-server, its workers and its token directory down."""
    command = _wrapper_without_exec(tmp_path) if launch != "direct" else None
    j = JupyterProcess(tmp_path, {"LIBERTEM_FAKE_WORKERS": "2"}, command=command)
    pgid = None
    try:
        pid, workers, tmpdir = _backend(j)
        pgid = os.getpgid(pid)
        members = group_members(pgid)
        assert pid in members and all(w in members for w in workers), (members, pid, workers)
        if launch != "direct":
            assert pgid != pid, "the wrapper shell should lead the group"
        guards = [m for m in members if m not in (pid, pgid, *workers)]
        assert len(guards) == 1, members
        j.proc.send_signal(signal.SIGKILL)
        j.proc.wait(timeout=10)
        # the workers ignore their parent's death on purpose (real dask workers do not)
        _wait(lambda: not group_members(pgid), 15, f"process group {pgid} to be empty")
        assert not tmpdir.exists(), "token directory left behind"
        assert list(j.tmp.iterdir()) == [], list(j.tmp.iterdir())
    finally:
        j.close()
        if pgid is not None and group_members(pgid):  # the test failed: do not leak
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
