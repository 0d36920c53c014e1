"""What a user sees while LiberTEM starts, fails or idles (issue 4), with the fake backend."""

from __future__ import annotations

import asyncio
import json
import re
import sys

import pytest

from libertem_jupyter_proxy.supervisor import State

from .test_lifecycle import navigate

HTML = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_START_DELAY": "3"})
async def test_loading_page_during_slow_start(client, supervisor):
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await client.fetch("libertem/", headers=HTML)
    assert loop.time() - t0 < 2.0  # at once, not after the 3 s start
    assert r.code == 200
    body = r.body.decode()
    assert "Starting LiberTEM" in body
    assert r.headers["Cache-Control"] == "no-store"
    assert '<meta http-equiv="refresh"' in body  # works without JavaScript too
    assert f"{client.base_url}libertem-proxy/api/status" in body
    assert supervisor.state.value == "starting"
    # meanwhile an API call waits for readiness instead of getting the page
    api = await client.fetch("libertem/api/config/", headers={"Accept": "application/json"})
    assert api.code == 200 and json.loads(api.body)["status"] == "ok"
    # and the next navigation gets the GUI
    r = await client.fetch("libertem/", headers=HTML)
    assert b"<title>LiberTEM</title>" in r.body


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_START_DELAY": "3"})
async def test_loading_page_shows_log_lines_escaped(client, supervisor):
    supervisor.config.extra_args = ["--log-level=INFO"]
    await client.fetch("libertem/", headers=HTML)
    # wait until the fake has written a progress line, then load the page again
    for _ in range(200):
        if any("fake" in line.lower() for line in supervisor.log_tail):
            break
        await asyncio.sleep(0.02)
    supervisor.log_tail.append("<script>alert('log')</script>")
    r = await client.fetch("libertem/", headers=HTML)
    body = r.body.decode()
    assert "Starting LiberTEM" in body
    assert "&lt;script&gt;alert(" in body
    assert "<script>alert(" not in body
    log = await client.json("libertem-proxy/api/log?lines=50")
    assert "<script>alert('log')</script>" in log["lines"]  # JSON; the page renders it as text


@pytest.mark.proxy_config(loading_page_delay=20.0)
async def test_quick_start_gets_gui_without_loading_page(client):
    r = await client.fetch("libertem/", headers=HTML)
    assert b"<title>LiberTEM</title>" in r.body


async def test_asset_requests_never_get_loading_page(client):
    r = await client.fetch(
        "libertem/assets/LiberTEM%20logo.png",
        headers={"Accept": "image/*", "Sec-Fetch-Mode": "no-cors"},
    )
    assert r.code == 200 and r.body.startswith(b"\x89PNG")


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_CRASH": "7"})
async def test_failed_background_start_shows_error_not_new_start(client, supervisor):
    r = await navigate(client, supervisor)
    assert r.code == 502
    assert b"exited with code 7" in r.body
    assert supervisor.starts == 1  # the error page did not trigger another start
    assert b'id="retry"' in r.body and b'name="_xsrf"' in r.body


async def test_not_found_error_as_json_for_api(client, supervisor, jp_dirs, monkeypatch):
    monkeypatch.setenv("PATH", str(jp_dirs["home"]))
    monkeypatch.setattr(sys, "executable", str(jp_dirs["home"] / "python"))  # not Jupyter's env
    supervisor.config.command = ()
    r = await client.fetch("libertem/api/config/", headers={"Accept": "application/json"})
    assert r.code == 502
    data = json.loads(r.body)
    assert data["error"] == "not-found"
    assert any("PATH" in t for t in data["tried"])


async def test_websocket_during_failure_gets_http_error(client, supervisor):
    supervisor.config.extra_env = {"LIBERTEM_FAKE_CRASH": "5"}
    from tornado.httpclient import HTTPClientError

    with pytest.raises(HTTPClientError) as e:
        await client.websocket()
    assert e.value.code == 502


async def test_status_fields(client, supervisor):
    await client.fetch("libertem/api/config/")
    status = await client.json("libertem-proxy/api/status")
    for key in (
        "state",
        "pid",
        "uptime",
        "starts",
        "crashes",
        "last_exit_code",
        "last_exit_time",
        "last_error",
        "seconds_since_activity",
        "websockets",
        "idle_timeout",
    ):
        assert key in status, key
    assert status["state"] == "running" and status["uptime"] >= 0
    assert supervisor.run.token not in json.dumps(status)


async def test_restart_api_gives_new_process(client, supervisor):
    first = (await client.json("libertem/_fake/pid"))["pid"]
    r = await client.fetch("libertem-proxy/api/restart", method="POST", auth="token")
    assert r.code == 200
    second = (await client.json("libertem/_fake/pid"))["pid"]
    assert first != second


@pytest.mark.proxy_config(idle_timeout=0.5)
async def test_idle_shutdown_and_restart(client, supervisor):
    await client.fetch("libertem/api/config/")
    run = supervisor.run
    await asyncio.wait_for(run.exited.wait(), 10)
    await asyncio.wait_for(supervisor.wait_for_state(State.STOPPED), 10)
    assert supervisor.last_exit_code == 0  # graceful
    assert supervisor.idle_stops == 1 and supervisor.crash_count == 0
    # an idle stop is deliberate (issue 13): API calls get 503, a person opening the GUI restarts
    r = await client.fetch("libertem/api/config/")
    assert r.code == 503
    r = await client.fetch("libertem/", headers={"Accept": "text/html"})
    await supervisor.wait_start()
    r = await client.fetch("libertem/api/config/")
    assert r.code == 200 and supervisor.run is not run


@pytest.mark.proxy_config(idle_timeout=0.3)
async def test_open_websocket_prevents_idle_shutdown(client, supervisor):
    ws = await client.websocket()
    run = supervisor.run
    # three idle periods pass with the GUI tab (its websocket) open: still running
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(run.exited.wait(), 1.2)
    ws.close()
    await asyncio.wait_for(run.exited.wait(), 10)


async def test_proxied_requests_count_as_jupyter_activity(client, serverapp):
    settings = serverapp.web_app.settings
    await client.fetch("libertem/api/config/")
    first = settings["libertem_proxy_last_activity"]
    await client.fetch("libertem/api/config/")
    assert settings["libertem_proxy_last_activity"] > first
    assert serverapp.web_app.last_activity() >= settings["libertem_proxy_last_activity"]


@pytest.mark.proxy_config(activity_exclude=[r"^api/config/$"])
async def test_activity_exclude(client, serverapp):
    settings = serverapp.web_app.settings
    await client.fetch("libertem/")
    marked = settings["libertem_proxy_last_activity"]
    api_marked = settings.get("api_last_activity")
    await client.fetch("libertem/api/config/")
    assert settings["libertem_proxy_last_activity"] == marked
    assert settings.get("api_last_activity") == api_marked


async def test_backend_log_in_jupyter_log(client, supervisor, caplog):
    caplog.set_level("INFO")
    await client.fetch("libertem/api/config/")
    messages = [rec.getMessage() for rec in caplog.records]
    assert any(re.match(r"^\[LiberTEM\] .*LiberTEM listening on", m) for m in messages), messages
