"""End to end with the real libertem-server (``pip install libertem``); marked slow, run in CI."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from .test_lifecycle import navigate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("libertem-server") is None, reason="LiberTEM not installed"),
    pytest.mark.proxy_config(command=[], start_timeout=120.0, stop_timeout=10.0),
]


async def test_real_gui_shutdown_and_restart(client, supervisor):
    r = await navigate(client, supervisor)  # the loading page first, then the GUI
    assert r.code == 200, r.body[:500]
    assert b"<title>LiberTEM</title>" in r.body or b"LiberTEM" in r.body
    first_pid, first_port = supervisor.run.pid, supervisor.run.port

    # the GUI's config call and its assets come through the proxy
    cfg = await client.json("libertem/api/config/")
    assert cfg["status"] == "ok"
    asset = next(
        part.split('"')[0]
        for part in r.body.decode().split('src="')[1:]
        if part.startswith("./assets/") or part.startswith("assets/")
    )
    ra = await client.fetch("libertem/" + asset.removeprefix("./"))
    assert ra.code == 200 and len(ra.body) > 1000

    # the events websocket opens (nothing is sent before a cluster exists)
    ws = await client.websocket("libertem/api/events/")
    assert ws.protocol is not None

    # the GUI's Shutdown button
    exited = supervisor.run.exited
    r = await client.fetch("libertem/api/shutdown/", method="DELETE")
    assert r.code == 200
    assert json.loads(r.body)["messageType"] == "SERVER_SHUTDOWN"
    await asyncio.wait_for(exited.wait(), 60)
    assert supervisor.last_exit_code == 0
    assert await asyncio.wait_for(ws.read_message(), 30) is None  # the socket dropped

    # the next visit starts a new process and serves the GUI again
    r = await navigate(client, supervisor)
    assert r.code == 200 and b"LiberTEM" in r.body
    assert supervisor.run.pid != first_pid
    assert supervisor.run.port != first_port
    assert supervisor.starts == 2


async def test_upload_over_libertems_body_limit_gets_its_400(client, supervisor):
    """libertem-server (tornado's default ``max_body_size``, 100 MiB) refuses a larger body with
    a bare "400 Bad Request" and closes with the body unread (a reset). The browser must see
    that 400, not a 502 (it did with the first version of the proxy's own upload path)."""
    await client.json("libertem/api/config/")  # LiberTEM is running
    # the whole body at once: its first bytes go out with the head, so they are unread in
    # LiberTEM's socket when it closes (the reset that lost the 400)
    r = await client.fetch(
        "libertem/api/config/connection/",
        method="PUT",
        body=b"L" * (100 * 1024 * 1024 + 1),
        headers={"Content-Type": "application/json"},
        request_timeout=120,
    )
    assert r.code == 400, (r.code, r.body[:300])
    # LiberTEM is still there and answers the next request
    assert (await client.json("libertem/api/config/"))["status"] == "ok"
