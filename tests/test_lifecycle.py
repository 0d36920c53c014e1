"""Starting, restarting, crashing and stopping libertem-server (the fake) through the proxy."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from .conftest import descendants_by_marker, process_alive


async def navigate(client, supervisor, path: str = "libertem/"):
    """A browser navigation: if the loading page comes first, wait for the start, load again."""
    r = await client.fetch(path, headers={"Accept": "text/html"})
    if r.code == 200 and b"Starting LiberTEM" in r.body:
        await supervisor.wait_start()
        r = await client.fetch(path, headers={"Accept": "text/html"})
    return r


async def _pid(client) -> dict:
    return await client.json("libertem/_fake/pid")


async def _wait_for(predicate, timeout: float = 20.0, interval: float = 0.02) -> None:
    """Poll a condition (on state we cannot await directly, like another process's exit)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


async def test_first_visit_starts_with_expected_command_line(client, supervisor, jp_dirs):
    info = await _pid(client)
    argv = info["argv"]
    assert "--no-browser" in argv
    assert "--host=127.0.0.1" in argv
    assert f"--port={info['port']}" in argv
    token_arg = next(a for a in argv if a.startswith("--token-path="))
    token_path = Path(token_arg.split("=", 1)[1])
    assert token_path.read_text() == supervisor.run.token
    assert (token_path.parent.stat().st_mode & 0o777) == 0o700
    assert (token_path.stat().st_mode & 0o777) == 0o600
    # scratch space inside the private temp dir, not dask-worker-space/ in the notebook dir
    assert info["local_directory"].startswith(str(token_path.parent))
    assert info["cwd"] == str(jp_dirs["root"])
    assert supervisor.state.value == "running"


async def test_restart_after_gui_shutdown(client, supervisor):
    first = await _pid(client)
    tmpdir = supervisor.run.tmpdir
    exited = supervisor.run.exited
    r = await client.fetch("libertem/api/shutdown/", method="DELETE")
    assert r.code == 200
    assert json.loads(r.body)["messageType"] == "SERVER_SHUTDOWN"
    await asyncio.wait_for(exited.wait(), 20)
    assert supervisor.last_exit_code == 0
    await _wait_for(lambda: not os.path.exists(tmpdir))
    # the next visit starts a new process on a new port with a new token
    r = await client.fetch("libertem/", headers={"Accept": "text/html"})
    assert r.code == 200 and b"LiberTEM" in r.body
    second = await _pid(client)
    assert second["pid"] != first["pid"]
    assert second["port"] != first["port"]
    assert supervisor.starts == 2
    assert supervisor.crash_count == 0  # exit 0 is a normal stop, not a crash
    assert not process_alive(first["pid"])


async def test_concurrent_first_requests_start_one_backend(client, supervisor, tmp_path):
    pidfile = tmp_path / "pids"
    supervisor.config.extra_env = {
        "LIBERTEM_FAKE_PIDFILE": str(pidfile),
        "LIBERTEM_FAKE_START_DELAY": "0.5",
    }
    await client.login()
    results = await asyncio.gather(*(client.fetch("libertem/api/config/") for _ in range(50)))
    assert [r.code for r in results] == [200] * 50
    assert supervisor.starts == 1
    assert len(pidfile.read_text().split()) == 1


async def test_crash_then_restart(client, supervisor):
    first = await _pid(client)
    exited = supervisor.run.exited
    os.kill(first["pid"], signal.SIGKILL)
    await asyncio.wait_for(exited.wait(), 10)
    assert supervisor.state.value == "failed"
    assert supervisor.crash_count == 1
    second = await _pid(client)
    assert second["pid"] != first["pid"]


@pytest.mark.proxy_config(
    extra_env={"LIBERTEM_FAKE_CRASH": "3"}, max_crashes=3, restart_backoff=0.05
)
async def test_crash_at_start_is_bounded_and_explained(client, supervisor):
    seen = []
    for _ in range(3):
        r = await navigate(client, supervisor)
        seen.append(r.code)
        assert r.code == 502
        assert b"exited with code 3" in r.body
        assert b"SimulatedCrash" in r.body  # the last stderr lines are on the page
        assert b"Retry" in r.body
    assert supervisor.starts == 3
    # a fourth request does not start it again: crash-loop page, no new process
    r = await navigate(client, supervisor)
    assert r.code == 502
    assert b"keeps crashing" in r.body
    assert supervisor.starts == 3
    # API callers get the same facts as JSON
    r = await client.fetch("libertem/api/config/", headers={"Accept": "application/json"})
    data = json.loads(r.body)
    assert data["error"] == "crash-loop"
    assert data["exit_code"] == 3
    assert any("SimulatedCrash" in line for line in data["log"])


async def test_crash_backoff_grows(client, supervisor, tmp_path):
    count = tmp_path / "crashes"
    count.write_text("2")
    supervisor.config.extra_env = {"LIBERTEM_FAKE_CRASH_COUNT_FILE": str(count)}
    supervisor.config.backoff_base = 0.2
    loop = asyncio.get_running_loop()
    r1 = await client.fetch("libertem/api/config/")
    assert r1.code == 502
    t0 = loop.time()
    r2 = await client.fetch("libertem/api/config/")
    t1 = loop.time()
    assert r2.code == 502
    r3 = await client.fetch("libertem/api/config/")
    t2 = loop.time()
    assert r3.code == 200  # the third start succeeds
    # second start waited >= 0.2 s after the first crash, the third >= 0.4 s after the second
    assert t1 - t0 >= 0.2
    assert t2 - t1 >= 0.4


async def test_retry_button_resets_crash_loop(client, supervisor, tmp_path):
    count = tmp_path / "crashes"
    count.write_text("3")
    supervisor.config.extra_env = {"LIBERTEM_FAKE_CRASH_COUNT_FILE": str(count)}
    for _ in range(4):
        await client.fetch("libertem/")
    assert supervisor.starts == 3
    # the error page's form posts here (Jupyter's XSRF rules apply: use the token as a script)
    r = await client.fetch("libertem-proxy/api/start", method="POST", body="", auth="token")
    assert r.code == 200
    assert json.loads(r.body)["state"] == "running"
    r = await client.fetch("libertem/api/config/")
    assert r.code == 200


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_NEVER_LISTEN": "1"}, start_timeout=1.0)
async def test_start_timeout(client, supervisor):
    r = await navigate(client, supervisor)
    assert r.code == 504
    assert b"did not answer within 1 seconds" in r.body
    assert b"start_timeout" in r.body
    assert supervisor.run.exited.is_set()  # the hung process was killed


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_HANG": "1"}, start_timeout=1.5)
async def test_backend_that_accepts_but_never_answers(client, supervisor):
    r = await client.fetch("libertem/api/config/")
    assert r.code == 504
    assert json.loads(r.body)["error"] == "timeout"


@pytest.mark.proxy_config(
    extra_env={
        "LIBERTEM_FAKE_IGNORE_SIGINT": "1",
        "LIBERTEM_FAKE_IGNORE_SIGTERM": "1",
        "LIBERTEM_FAKE_WORKERS": "2",
    },
    stop_timeout=0.5,
)
async def test_stop_escalates_and_kills_whole_group(client, supervisor):
    info = await _pid(client)
    workers = info["workers"]
    assert len(workers) == 2 and all(process_alive(p) for p in workers)
    tmpdir = supervisor.run.tmpdir
    await supervisor.stop()
    assert supervisor.state.value == "stopped"
    assert supervisor.last_exit_code == -signal.SIGKILL
    assert not process_alive(info["pid"])
    assert not any(process_alive(p) for p in workers)
    assert not os.path.exists(tmpdir)


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_WORKERS": "2"})
async def test_workers_of_a_crashed_backend_are_reaped(client, supervisor):
    info = await _pid(client)
    exited = supervisor.run.exited
    os.kill(info["pid"], signal.SIGKILL)
    await asyncio.wait_for(exited.wait(), 10)
    await _wait_for(lambda: not any(process_alive(p) for p in info["workers"]))


async def test_graceful_stop_is_sigint(client, supervisor):
    await _pid(client)
    await supervisor.stop()
    assert supervisor.last_exit_code == 0  # SIGINT is a graceful exit for libertem-server


async def test_status_api(client, supervisor):
    status = await client.json("libertem-proxy/api/status")
    assert status["state"] == "stopped" and status["pid"] is None
    info = await _pid(client)
    status = await client.json("libertem-proxy/api/status")
    assert status["state"] == "running"
    assert status["pid"] == info["pid"]
    assert status["starts"] == 1
    log = await client.json("libertem-proxy/api/log?lines=5")
    assert any("LiberTEM listening on" in line for line in log["lines"]) or log["lines"]
    r = await client.fetch("libertem-proxy/api/status", auth="none")
    assert r.code == 403


async def test_stop_api_requires_xsrf_or_token(client, supervisor):
    await _pid(client)
    # a cookie-authenticated POST without Jupyter's XSRF token is refused
    r = await client.fetch("libertem-proxy/api/stop", method="POST", body="")
    assert r.code in (403, 404)
    assert supervisor.state.value == "running"
    r = await client.fetch("libertem-proxy/api/stop", method="POST", body="", auth="token")
    assert r.code == 200
    assert supervisor.state.value == "stopped"


async def test_not_found_page_names_what_was_tried(client, supervisor, jp_dirs, monkeypatch):
    monkeypatch.setenv("PATH", str(jp_dirs["home"]))
    monkeypatch.setattr(sys, "executable", str(jp_dirs["home"] / "python"))  # not Jupyter's env
    supervisor.config.command = ()
    r = await client.fetch("libertem/", headers={"Accept": "text/html"})
    assert r.code == 502
    body = r.body.decode()
    assert "libertem-server was not found" in body
    assert str(jp_dirs["prefix"] / "etc" / "libertem_jupyter_proxy.json") in body
    assert "Traceback" not in body


async def test_invalid_json_config_named_on_page(client, supervisor, jp_dirs):
    cfg = jp_dirs["prefix"] / "etc" / "libertem_jupyter_proxy.json"
    cfg.parent.mkdir()
    cfg.write_text('{"libertem_server_path": <script>alert(1)</script>}')
    supervisor.config.command = ()
    r = await client.fetch("libertem/", headers={"Accept": "text/html"})
    body = r.body.decode()
    assert r.code == 502
    assert str(cfg) in body and "not valid JSON" in body
    assert "<script>" not in body


async def test_error_page_escapes_backend_output(client, supervisor):
    supervisor.config.extra_env = {"LIBERTEM_FAKE_CRASH": "1"}
    supervisor.config.extra_args = ["--log-level=<img src=x onerror=alert(1)>"]
    r = await navigate(client, supervisor)
    assert r.code == 502
    assert b"<img src=x" not in r.body
    assert b"&lt;img src=x" in r.body


def test_no_fake_workers_left_behind():
    """Runs last in this module: every fake worker of the tests above is gone."""
    assert descendants_by_marker("libertem-fake-worker") == []
