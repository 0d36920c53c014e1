"""The lifecycle does what the person meant (issue 13).

1. After a deliberate stop (GUI Shutdown = exit 0, stop API, idle stop) only a person starts
   LiberTEM again; websocket reconnects and API calls get a cheap 503 and are no activity.
2. An exit is seen when the process exits, even while a child still holds its pipes.
3. A stop during a start gives every waiter a clear answer and every counter returns to 0.
4. A malformed ``c.LiberTEMProxy`` option is named on the page, in the JSON and in the status.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest
from tornado.httpclient import HTTPClientError

from .conftest import process_alive

NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
FETCH = {"Accept": "application/json", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}


async def navigate(client, supervisor):
    r = await client.fetch("libertem/", headers=NAVIGATE)
    if r.code == 200 and b"Starting LiberTEM" in r.body:
        await supervisor.wait_start()
        r = await client.fetch("libertem/", headers=NAVIGATE)
    return r


async def wait_until(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"not reached within {timeout} s: {predicate}"
        await asyncio.sleep(0.02)


async def assert_stays_stopped(client, supervisor, app, reason_word: str) -> None:
    """What an open tab does after a stop: reconnect its websocket, call the API. None of it
    starts LiberTEM or counts as activity."""
    starts = supervisor.starts
    activity = supervisor.last_activity
    jupyter_activity = app.settings.get("libertem_proxy_last_activity")
    for _ in range(5):
        with pytest.raises(HTTPClientError) as refused:
            await client.websocket()
        assert refused.value.code == 503
        r = await client.fetch("libertem/api/config/", headers=FETCH)
        assert r.code == 503, r.body
        body = json.loads(r.body)
        assert body["state"] == "stopped"
        assert reason_word in body["reason"]
        # an asset or a non-root page is no "person coming back" either
        r = await client.fetch("libertem/assets/main.js", headers={"Accept": "text/html"})
        assert r.code == 503
    assert supervisor.starts == starts
    assert supervisor.state.value == "stopped"
    assert supervisor.requests_in_flight == 0 and supervisor.websockets == 0
    assert supervisor.last_activity == activity
    assert app.settings.get("libertem_proxy_last_activity") == jupyter_activity
    status = await client.json("libertem-proxy/api/status")
    assert reason_word in status["stop_reason"]


async def test_gui_shutdown_stays_shut_until_a_navigation(client, supervisor, app):
    r = await navigate(client, supervisor)
    assert r.code == 200
    first = supervisor.run
    r = await client.fetch("libertem/api/shutdown/", method="DELETE")
    assert r.code == 200
    await asyncio.wait_for(first.exited.wait(), 20)
    await supervisor.wait_for_state(supervisor.state.STOPPED)
    await assert_stays_stopped(client, supervisor, app, "GUI")
    # a page with Fetch Metadata that is not a navigation (an iframe's fetch) does not start it
    r = await client.fetch("libertem/", headers={**NAVIGATE, "Sec-Fetch-Mode": "cors"})
    assert r.code == 503
    assert b"Start LiberTEM" in r.body  # a page for people, with the Start button
    # a person opening the GUI does
    r = await navigate(client, supervisor)
    assert r.code == 200 and b"LiberTEM" in r.body
    assert supervisor.starts == 2
    assert supervisor.stop_reason is None
    # and then everything works again, websocket included
    ws = await client.websocket()
    ws.close()


async def test_stop_api_stays_shut_until_start_api(client, supervisor, app):
    await navigate(client, supervisor)
    r = await client.fetch("libertem-proxy/api/stop", method="POST", auth="token")
    assert r.code == 200
    assert json.loads(r.body)["state"] == "stopped"
    await assert_stays_stopped(client, supervisor, app, "stop API")
    r = await client.fetch("libertem-proxy/api/start", method="POST", auth="token")
    assert r.code == 200
    assert supervisor.starts == 2
    r = await client.fetch("libertem/api/config/", headers=FETCH)
    assert r.code == 200


async def test_without_fetch_metadata_an_html_get_of_the_root_is_a_person(client, supervisor):
    await navigate(client, supervisor)
    await client.fetch("libertem-proxy/api/stop", method="POST", auth="token")
    r = await client.fetch("libertem/", headers={"Accept": "text/html"})  # curl, old browsers
    assert r.code == 200
    await supervisor.wait_start()
    assert supervisor.starts == 2


@pytest.mark.proxy_config(idle_timeout=0.3)
async def test_idle_stop_stays_shut(client, supervisor, app):
    await navigate(client, supervisor)
    run = supervisor.run
    await asyncio.wait_for(run.exited.wait(), 20)
    await supervisor.wait_for_state(supervisor.state.STOPPED)
    assert supervisor.idle_stops == 1
    await assert_stays_stopped(client, supervisor, app, "idle")


async def test_crash_is_not_a_deliberate_stop(client, supervisor):
    """After a crash the current policy stays: the next request of any kind restarts it."""
    await navigate(client, supervisor)
    run = supervisor.run
    os.kill(run.pid, signal.SIGKILL)
    await asyncio.wait_for(run.exited.wait(), 10)
    assert supervisor.stop_reason is None
    r = await client.fetch("libertem/api/config/", headers=FETCH)
    assert r.code == 200
    assert supervisor.starts == 2


# ------------------------------------------------------------------ 2: exit seen at once


def _pids(path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("how", ["gui-shutdown", "crash", "stop-api"])
async def test_exit_seen_while_a_child_holds_the_pipes(client, supervisor, tmp_path, how):
    holders = tmp_path / "holders"
    supervisor.config.extra_env = {
        "LIBERTEM_FAKE_PIPE_HOLDER": "1",
        "LIBERTEM_FAKE_WORKER_PIDFILE": str(holders),
    }
    supervisor.config.stop_timeout = 60.0  # a stop that waits for the pipes would take this long
    await navigate(client, supervisor)
    run = supervisor.run
    [holder] = _pids(holders)
    assert process_alive(holder)
    if how == "gui-shutdown":
        await client.fetch("libertem/api/shutdown/", method="DELETE")
    elif how == "crash":
        os.kill(run.pid, signal.SIGKILL)
    else:
        await asyncio.wait_for(supervisor.stop(), 20)
    # the holder lives for an hour: only waiting on the pid sees this exit
    await asyncio.wait_for(run.exited.wait(), 20)
    assert supervisor.state.value == ("failed" if how == "crash" else "stopped")
    assert supervisor.status()["pid"] is None
    # the rest of the group (the holder) goes with the run, and the log reader with it
    await wait_until(lambda: not process_alive(holder))
    await wait_until(lambda: run.reader is not None and run.reader.done())
    assert supervisor.last_exit_code == (-signal.SIGKILL if how == "crash" else 0)


async def test_crash_at_start_seen_while_a_child_holds_the_pipes(client, supervisor, tmp_path):
    holders = tmp_path / "holders"
    supervisor.config.extra_env = {
        "LIBERTEM_FAKE_PIPE_HOLDER": "1",
        "LIBERTEM_FAKE_WORKER_PIDFILE": str(holders),
        "LIBERTEM_FAKE_CRASH": "3",
    }
    r = await asyncio.wait_for(client.fetch("libertem/api/config/", headers=FETCH), 20)
    assert r.code == 502
    assert json.loads(r.body)["exit_code"] == 3
    assert "SimulatedCrash" in "\n".join(json.loads(r.body)["log"])
    [holder] = _pids(holders)
    await wait_until(lambda: not process_alive(holder))


async def test_a_child_in_its_own_session_does_not_keep_the_run(client, supervisor, tmp_path):
    """A child that left the process group keeps the pipe open: the run still ends, and the
    log reader is stopped instead of waiting for that child."""
    holders = tmp_path / "holders"
    supervisor.config.extra_env = {
        "LIBERTEM_FAKE_PIPE_HOLDER": "session",
        "LIBERTEM_FAKE_WORKER_PIDFILE": str(holders),
    }
    try:
        await navigate(client, supervisor)
        run = supervisor.run
        await asyncio.wait_for(supervisor.stop(), 20)
        assert run.exited.is_set()
        assert run.reader is not None and run.reader.done()
        assert not os.path.exists(run.tmpdir)
    finally:
        for pid in _pids(holders):  # out of every group we stop: ours to clean up
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ 3: stop during a start


async def test_stop_during_start_answers_every_waiter(client, supervisor):
    supervisor.config.extra_env = {"LIBERTEM_FAKE_START_DELAY": "30"}
    await client.login()
    api = [
        asyncio.ensure_future(client.fetch("libertem/api/config/", headers=FETCH)) for _ in range(5)
    ]
    page = asyncio.ensure_future(client.fetch("libertem/", headers=NAVIGATE))
    ws = asyncio.ensure_future(client.websocket())
    await supervisor.wait_for_state(supervisor.state.STARTING)
    await wait_until(lambda: supervisor.requests_in_flight >= 5)
    r = await client.fetch("libertem-proxy/api/stop", method="POST", auth="token")
    assert r.code == 200
    answers = await asyncio.wait_for(asyncio.gather(*api), 20)
    for a in answers:
        assert a.code == 503, (a.code, a.body[:300])
        assert json.loads(a.body)["state"] == "stopped"
    # the loading page if it was sent before the stop, else the page saying it is stopped
    shown = await asyncio.wait_for(page, 20)
    assert shown.code == 200 or (shown.code == 503 and b"Start LiberTEM" in shown.body)
    with pytest.raises(HTTPClientError) as refused:
        await asyncio.wait_for(ws, 20)
    assert refused.value.code == 503
    await wait_until(lambda: supervisor.requests_in_flight == 0)
    assert supervisor.websockets == 0
    assert supervisor.state.value == "stopped"
    assert supervisor.status()["pid"] is None
    # the next navigation starts it (no stale "unseen" error from the cancelled start)
    supervisor.config.extra_env = {}
    r = await navigate(client, supervisor)
    assert r.code == 200 and b"LiberTEM" in r.body


async def test_stop_during_crash_backoff(client, supervisor, tmp_path):
    """A stop while the supervisor waits out the backoff after a crash: the waiter gets 503."""
    supervisor.config.backoff_base = 30.0
    await navigate(client, supervisor)
    run = supervisor.run
    os.kill(run.pid, signal.SIGKILL)
    await asyncio.wait_for(run.exited.wait(), 10)
    waiter = asyncio.ensure_future(client.fetch("libertem/api/config/", headers=FETCH))
    await wait_until(lambda: supervisor.requests_in_flight == 1)
    await client.fetch("libertem-proxy/api/stop", method="POST", auth="token")
    r = await asyncio.wait_for(waiter, 20)
    assert r.code == 503
    assert supervisor.state.value == "stopped"
    await wait_until(lambda: supervisor.requests_in_flight == 0)


# ------------------------------------------------------------------ 4: malformed options


@pytest.mark.proxy_config(start_timeout="2 minutes", extra_args=5)
async def test_malformed_option_is_named_everywhere(client, supervisor):
    r = await client.fetch("libertem/", headers=NAVIGATE)
    assert r.code == 500
    page = r.body.decode()
    assert "c.LiberTEMProxy.start_timeout" in page
    assert "&#39;2 minutes&#39;" in page  # the value given, escaped
    assert "a float" in page
    assert "c.LiberTEMProxy.extra_args" in page
    r = await client.fetch("libertem/api/config/", headers=FETCH)
    assert r.code == 500
    problems = {p["option"]: p for p in json.loads(r.body)["problems"]}
    assert problems["start_timeout"]["value"] == "'2 minutes'"
    assert "float" in problems["start_timeout"]["expected"]
    assert problems["extra_args"]["value"] == "5"
    with pytest.raises(HTTPClientError) as refused:
        await client.websocket()
    assert refused.value.code == 500
    status = await client.json("libertem-proxy/api/status")
    assert status["config_error"]["error"] == "config"
    assert {p["option"] for p in status["config_error"]["problems"]} == {
        "start_timeout",
        "extra_args",
    }
    r = await client.fetch(
        "libertem-proxy/api/start",
        method="POST",
        auth="token",
        headers={"Content-Type": "application/json"},
    )
    assert r.code == 502 and "start_timeout" in r.body.decode()
    assert supervisor.starts == 0
    # the valid options around them were applied (no order-dependent half configuration)
    assert supervisor.config.stop_timeout == 3.0
    assert supervisor.config.backoff_base == 0.05


# --- found by the red-team review -------------------------------------------------------------


@pytest.mark.parametrize(
    "purpose",
    [{"Sec-Purpose": "prefetch"}, {"Sec-Purpose": "prefetch;prerender"}, {"Purpose": "prefetch"}],
)
async def test_a_prefetch_is_no_person(client, supervisor, app, purpose):
    """The browser loads a page ahead (address-bar prediction, speculation rules) with the
    navigation's Fetch Metadata plus Sec-Purpose; that must not undo a deliberate stop."""
    await navigate(client, supervisor)
    r = await client.fetch("libertem-proxy/api/stop", method="POST", auth="token")
    assert r.code == 200
    r = await client.fetch("libertem/", headers={**NAVIGATE, **purpose})
    assert r.code == 503
    await assert_stays_stopped(client, supervisor, app, "stop API")


async def test_refused_reconnects_are_not_logged_as_errors(client, supervisor, caplog):
    """An open tab's reconnect loop after a stop: once a second for as long as the tab is
    open; those expected 503s were each an error line in Jupyter's log."""
    await navigate(client, supervisor)
    r = await client.fetch("libertem-proxy/api/stop", method="POST", auth="token")
    assert r.code == 200
    caplog.set_level("INFO")
    caplog.clear()
    for _ in range(3):
        r = await client.fetch("libertem/api/config/", headers=FETCH)
        assert r.code == 503
    errors = [rec for rec in caplog.records if rec.levelname == "ERROR"]
    assert errors == [], [rec.getMessage() for rec in errors]


@pytest.mark.proxy_config(cwd="/nonexistent/working/dir")
async def test_missing_cwd_is_named(client, supervisor):
    r = await client.fetch("libertem/api/config/", headers=FETCH)
    assert r.code >= 500
    body = json.loads(r.body)
    assert "c.LiberTEMProxy.cwd" in body["hint"] and "/nonexistent/working/dir" in body["message"]
