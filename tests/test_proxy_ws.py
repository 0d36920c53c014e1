"""The websocket bridge: auth, Origin, frames, close codes, refusals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError

from libertem_jupyter_proxy.base import ProxyHandlerBase
from libertem_jupyter_proxy.supervisor import State

# every websocket test runs with both relays (threads, event loop): conftest
pytestmark = pytest.mark.usefixtures("both_websocket_relays")


async def test_text_and_binary_echo(client):
    ws = await client.websocket()
    await ws.write_message("hello ü")
    assert await ws.read_message() == "hello ü"
    blob = bytes(range(256)) * 10
    await ws.write_message(blob, binary=True)
    msg = await ws.read_message()
    assert isinstance(msg, bytes) and msg == blob
    ws.close()


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_INITIAL_STATE": "1"})
async def test_backend_message_on_open(client):
    ws = await client.websocket()
    msg = json.loads(await ws.read_message())
    assert msg["messageType"] == "INITIAL_STATE"
    ws.close()


async def test_anonymous_handshake_is_403_and_starts_nothing(client, supervisor):
    with pytest.raises(HTTPClientError) as e:
        await client.websocket(auth="none")
    assert e.value.code == 403
    assert supervisor.starts == 0


async def test_foreign_origin_refused(client, supervisor):
    with pytest.raises(HTTPClientError) as e:
        await client.websocket(origin="http://evil.example")
    assert e.value.code == 403
    assert supervisor.starts == 0


async def test_backend_close_code_reaches_browser(client):
    ws = await client.websocket()
    await ws.write_message("!close 4001 custom reason")
    assert await ws.read_message() is None
    assert ws.close_code == 4001
    assert ws.close_reason == "custom reason"


async def test_browser_close_code_reaches_backend(client, supervisor):
    """The fake records the close code it received; ask it through a second socket."""
    ws = await client.websocket()
    await ws.write_message("x")
    await ws.read_message()
    ws.close(4002, "bye from browser")
    info = await client.json("libertem/_fake/pid")
    # give the backend's on_close a moment by polling its report
    for _ in range(100):
        info = await client.json("libertem/_fake/pid")
        if info.get("last_ws_close"):
            break
        await asyncio.sleep(0.02)
    assert info.get("last_ws_close") == [4002, "bye from browser"]


async def test_backend_drop_drops_browser(client, supervisor):
    ws = await client.websocket()
    await ws.write_message("!drop")
    assert await ws.read_message() is None
    assert ws.close_code in (None, 1006)


async def test_websocket_closed_when_backend_shuts_down(client, supervisor):
    ws = await client.websocket()
    r = await client.fetch("libertem/api/shutdown/", method="DELETE")
    assert r.code == 200
    assert await asyncio.wait_for(ws.read_message(), 20) is None
    await asyncio.wait_for(supervisor.wait_for_state(State.STOPPED), 20)
    # the tab's reconnect is refused (a Shutdown stays shut); the next visit starts it again
    with pytest.raises(HTTPClientError) as refused:
        await client.websocket()
    assert refused.value.code == 503
    r = await client.fetch("libertem/", headers={"Accept": "text/html"})
    await supervisor.wait_start()
    ws2 = await client.websocket()
    await ws2.write_message("again")
    assert await ws2.read_message() == "again"
    ws2.close()


async def test_websocket_closed_when_backend_killed(client, supervisor):
    ws = await client.websocket()
    os.kill(supervisor.run.pid, signal.SIGKILL)
    assert await asyncio.wait_for(ws.read_message(), 20) is None


@pytest.mark.proxy_config(extra_env={"LIBERTEM_FAKE_WS_SUBPROTOCOL": "lt.v1"})
async def test_subprotocol_chosen_by_backend(client):
    ws = await client.websocket(subprotocols=["other", "lt.v1"])
    assert ws.selected_subprotocol == "lt.v1"
    ws.close()


async def test_upstream_refusal_is_http_error(client, supervisor):
    """A path the backend has no websocket for: the browser gets an HTTP error, never a 101."""
    with pytest.raises(HTTPClientError) as e:
        await client.websocket("libertem/api/no-such-socket/")
    assert e.value.code == 404


@pytest.mark.proxy_config(websocket_max_message_size=1024 * 1024)
async def test_max_message_size_is_a_setting(client):
    ws = await client.websocket(max_message_size=64 * 1024 * 1024)
    await ws.write_message(b"a" * (1024 * 1024 - 16), binary=True)
    assert len(await ws.read_message()) == 1024 * 1024 - 16
    await ws.write_message(b"a" * (2 * 1024 * 1024), binary=True)
    assert await ws.read_message() is None
    assert ws.close_code == 1009


async def test_websocket_count_in_status(client, supervisor):
    ws = await client.websocket()
    await ws.write_message("x")
    await ws.read_message()
    assert (await client.json("libertem-proxy/api/status"))["websockets"] == 1
    ws.close()
    for _ in range(200):
        if supervisor.websockets == 0:
            break
        await asyncio.sleep(0.01)
    assert supervisor.websockets == 0


async def test_write_after_close_raises(client):
    ws = await client.websocket()
    ws.close()
    with pytest.raises(WebSocketClosedError):
        await ws.write_message("late")


async def test_pings_answered(client):
    """A browser's pings are answered by the proxy (the GUI itself sends none)."""
    import aiohttp

    cookie = await client.login()
    url = f"ws://127.0.0.1:{client.port}{client.base_url}libertem/api/events/"
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(
            url, headers={"Cookie": cookie, "Origin": client.origin}, autoping=False
        ) as ws:
            await ws.ping(b"are you there")
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.PONG
            assert msg.data == b"are you there"
            await ws.send_str("still works")
            assert (await ws.receive(timeout=10)).data == "still works"


def _relay_threads() -> int:
    return sum(t.name.startswith("libertem websocket") for t in threading.enumerate())


async def _settled(supervisor, websockets: int, threads: int) -> None:
    """Wait until the counts are reached (a closed websocket ends a moment after its close)."""
    for _ in range(500):
        if supervisor.websockets == websockets and _relay_threads() == threads:
            return
        await asyncio.sleep(0.02)
    assert (supervisor.websockets, _relay_threads()) == (websockets, threads)


@pytest.mark.proxy_config(websocket_threads=1)
async def test_websockets_beyond_websocket_threads_use_the_event_loop(client, supervisor):
    """The first websocket gets its two threads, the second is relayed on the event loop; both
    relay, and once the first is closed the next one gets threads again."""
    first = await client.websocket()
    await first.write_message("one")
    assert await first.read_message() == "one"
    await _settled(supervisor, 1, 2)
    second = await client.websocket()
    await second.write_message("two")
    assert await second.read_message() == "two"
    await _settled(supervisor, 2, 2)
    first.close()
    await _settled(supervisor, 1, 0)
    third = await client.websocket()
    await third.write_message("three")
    assert await third.read_message() == "three"
    await _settled(supervisor, 2, 2)
    second.close()
    third.close()
    await _settled(supervisor, 0, 0)


async def test_no_thread_to_spare_relays_on_the_event_loop(client, supervisor, monkeypatch):
    """The machine gives no thread (``RuntimeError: can't start new thread`` under a limit on
    processes, simulated here): the websocket is relayed on the event loop instead of being
    dropped right after its 101 (found by the red team of issue 17)."""
    real_start = threading.Thread.start

    def refusing_start(self: threading.Thread) -> None:
        if self.name.startswith("libertem websocket"):
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", refusing_start)
    ws = await client.websocket()
    await ws.write_message("still relayed")
    assert await asyncio.wait_for(ws.read_message(), 10) == "still relayed"
    await _settled(supervisor, 1, 0)
    ws.close()
    await _settled(supervisor, 0, 0)


async def test_browser_messages_count_as_activity(client, serverapp, monkeypatch):
    """A GUI tab that keeps sending (and nothing else) keeps Jupyter active for the culler.
    The threaded relay counts messages and the event loop looks once a second
    (``ws_threads.ACTIVITY_INTERVAL``, shortened here); the event-loop relay reports them."""
    monkeypatch.setattr("libertem_jupyter_proxy.ws_threads.ACTIVITY_INTERVAL", 0.05)
    recorded = asyncio.Event()
    record = ProxyHandlerBase.record_activity

    def record_and_tell(self: ProxyHandlerBase) -> None:
        record(self)
        recorded.set()

    monkeypatch.setattr(ProxyHandlerBase, "record_activity", record_and_tell)
    settings = serverapp.web_app.settings
    ws = await client.websocket()
    recorded.clear()
    before = settings.get("libertem_proxy_last_activity")
    await ws.write_message("still here")
    assert await ws.read_message() == "still here"
    await asyncio.wait_for(recorded.wait(), 5)
    after = settings["libertem_proxy_last_activity"]
    assert before is None or after > before
    ws.close()
