"""Model-based test of the backend's lifecycle (issue 13), with hypothesis' stateful testing.

A :class:`~hypothesis.stateful.RuleBasedStateMachine` drives the REAL Jupyter server, handlers
and supervisor, with the fake libertem-server as a controllable backend, through what people,
browser tabs and LiberTEM do: navigations, API calls, websocket connects and reconnect loops,
client aborts, the GUI's Shutdown, stop/start/restart API calls, crashes, hangs and slow starts,
a child holding the log pipe, idle stops and Jupyter stopping. After every step it checks:

- at most one libertem process group is alive;
- the reported state matches the processes (once nothing is in progress);
- counters are never negative, and return to 0 when the clients are quiet;
- after a deliberate stop only a navigation or an explicit start starts a new process;
- at the end: no process left, no run directory left.

Each example gets a fresh :class:`Supervisor` in the same Jupyter. The size is bounded for CI
(``LTJP_MODEL_EXAMPLES`` examples of at most ``LTJP_MODEL_STEPS`` steps; ``make test-model``
runs a longer search). Failures it finds become ordinary tests in test_lifecycle_intent.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from tornado.httpclient import HTTPClientError

from libertem_jupyter_proxy.supervisor import State, Supervisor

from .conftest import process_alive
from .test_lifecycle_intent import FETCH, NAVIGATE

EXAMPLES = int(os.environ.get("LTJP_MODEL_EXAMPLES", "12"))
STEPS = int(os.environ.get("LTJP_MODEL_STEPS", "20"))
STEP_TIMEOUT = 60.0

MODES: dict[str, dict[str, str]] = {
    "normal": {},
    "slow-start": {"LIBERTEM_FAKE_START_DELAY": "0.8"},
    "crash-at-start": {"LIBERTEM_FAKE_CRASH": "3"},
    "hang": {"LIBERTEM_FAKE_HANG": "1"},  # accepts TCP, never answers: the start times out
    "pipe-holder": {"LIBERTEM_FAKE_PIPE_HOLDER": "1", "LIBERTEM_FAKE_WORKERS": "1"},
}
# what any answer may be: never a 500 (a traceback) and never no answer (599)
OK_CODES = {200, 502, 503, 504}

counted = {"examples": 0, "steps": 0, "actions": 0}


def _pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class LifecycleModel(RuleBasedStateMachine):
    """The model: ``deliberate`` (stopped on purpose, only a person may start) and the set of
    processes ever started (from the fake's pid files)."""

    # set by the test function before the run (hypothesis makes the instances)
    io_loop: Any
    client: Any
    settings_obj: Any
    workdir: Path
    template: Any
    template_log: Any

    def __init__(self) -> None:
        super().__init__()
        counted["examples"] += 1
        n = counted["examples"]
        self.dir = self.workdir / f"example-{n}"
        self.dir.mkdir()
        self.pidfile = self.dir / "pids"
        self.workerfile = self.dir / "workers"
        config = self.template
        self.sup = Supervisor(type(config)(**vars(config)), log=self.template_log)
        self.settings_obj.supervisor = self.sup
        self.mode = "normal"
        self._apply_mode()
        self.deliberate = False
        self.seen_idle_stops = 0
        self.websockets: list[Any] = []
        self.jupyter_stopped = False

    # ------------------------------------------------------------------ helpers

    def run(self, coro_fn: Any) -> Any:
        counted["actions"] += 1
        return self.io_loop.run_sync(coro_fn, timeout=STEP_TIMEOUT)

    def _apply_mode(self) -> None:
        self.sup.config.extra_env = {
            **MODES[self.mode],
            "LIBERTEM_FAKE_PIDFILE": str(self.pidfile),
            "LIBERTEM_FAKE_WORKER_PIDFILE": str(self.workerfile),
        }

    def _observe_idle_stops(self) -> None:
        if self.sup.idle_stops > self.seen_idle_stops:
            self.seen_idle_stops = self.sup.idle_stops
            self.deliberate = True

    def _starts(self) -> int:
        return len(_pids(self.pidfile))

    def _check_answer(self, code: int, explicit: bool, starts_before: int) -> None:
        assert code in OK_CODES, code
        self._observe_idle_stops()
        if self.deliberate and not explicit:
            assert code == 503, f"{code} after a deliberate stop"
            assert self._starts() == starts_before, "a non-person request started LiberTEM"

    async def _fetch(self, path: str, **kw: Any) -> Any:
        return await self.client.fetch(path, request_timeout=STEP_TIMEOUT - 5, **kw)

    # ------------------------------------------------------------------ rules

    @initialize(idle=st.sampled_from([0.0, 0.0, 0.5]))
    def configure(self, idle: float) -> None:
        self.sup.config.idle_timeout = idle

    @precondition(lambda self: not self.jupyter_stopped)
    @rule(mode=st.sampled_from(sorted(MODES)))
    def set_backend_mode(self, mode: str) -> None:
        """How the NEXT start of libertem-server behaves."""
        self.mode = mode
        self._apply_mode()

    @precondition(lambda self: not self.jupyter_stopped)
    @rule()
    def navigate(self) -> None:
        r = self.run(lambda: self._fetch("libertem/", headers=NAVIGATE))
        assert r.code in OK_CODES, r.code
        if r.code == 503:  # only if an idle stop came during this very request
            assert self.sup.stop_reason is not None and "idle" in self.sup.stop_reason
        self.deliberate = False
        self._observe_idle_stops()

    @precondition(lambda self: not self.jupyter_stopped)
    @rule(path=st.sampled_from(["libertem/api/config/", "libertem/assets/main.js"]))
    def api_call(self, path: str) -> None:
        self._observe_idle_stops()
        before = self._starts()
        r = self.run(lambda: self._fetch(path, headers=FETCH))
        self._check_answer(r.code, False, before)

    @precondition(lambda self: not self.jupyter_stopped)
    @rule(attempts=st.integers(1, 4), keep=st.booleans())
    def websocket_reconnects(self, attempts: int, keep: bool) -> None:
        """A GUI tab's reconnect loop: connect, (maybe) keep it open, try again."""
        self._observe_idle_stops()
        before = self._starts()

        async def attempt() -> int:
            try:
                ws = await asyncio.wait_for(self.client.websocket(), STEP_TIMEOUT - 5)
            except HTTPClientError as e:
                return e.code
            if keep:
                self.websockets.append(ws)
            else:
                ws.close()
            return 200

        for _ in range(attempts):
            code = self.run(attempt)
            self._check_answer(code, False, before)

    @precondition(lambda self: not self.jupyter_stopped)
    @rule()
    def close_websockets(self) -> None:
        for ws in self.websockets:
            ws.close()
        self.websockets.clear()

    @precondition(lambda self: not self.jupyter_stopped)
    @rule()
    def client_abort(self) -> None:
        """A browser that sends a request and goes away before the answer."""
        self._observe_idle_stops()
        before = self._starts()

        async def abort() -> None:
            cookie = self.client.cookie or await self.client.login()
            _reader, writer = await asyncio.open_connection("127.0.0.1", self.client.port)
            path = self.client.url("libertem/_fake/slow?seconds=0.5")
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.client.port}\r\n"
                f"Cookie: {cookie}\r\n"
                "Accept: application/json\r\n\r\n".encode()
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()

        self.run(abort)
        self._observe_idle_stops()
        if self.deliberate:
            assert self._starts() == before

    @precondition(lambda self: not self.jupyter_stopped)
    @rule()
    def gui_shutdown(self) -> None:
        # preconditions only read the model: the backend's readiness depends on timing, and
        # hypothesis must be able to replay a sequence when it shrinks a failure
        if not self.sup.ready:
            return
        run = self.sup.run

        async def shutdown() -> int:
            r = await self._fetch("libertem/api/shutdown/", method="DELETE")
            await asyncio.wait_for(run.exited.wait(), 20)
            return r.code

        code = self.run(shutdown)
        assert code in OK_CODES
        if code == 200:
            self.deliberate = True

    @precondition(lambda self: not self.jupyter_stopped)
    @rule()
    def stop_api(self) -> None:
        r = self.run(lambda: self._fetch("libertem-proxy/api/stop", method="POST", auth="token"))
        assert r.code == 200, r.code
        assert json.loads(r.body)["state"] == "stopped"
        self.deliberate = True

    @precondition(lambda self: not self.jupyter_stopped)
    @rule(which=st.sampled_from(["start", "restart"]))
    def start_api(self, which: str) -> None:
        r = self.run(
            lambda: self._fetch(
                f"libertem-proxy/api/{which}",
                method="POST",
                auth="token",
                headers={"Content-Type": "application/json"},
            )
        )
        assert r.code in (200, 502, 503), r.code  # 503: an idle stop came right after
        self.deliberate = False
        self._observe_idle_stops()

    @precondition(lambda self: not self.jupyter_stopped)
    @rule()
    def crash(self) -> None:
        if not self.sup.ready:
            return
        run = self.sup.run
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGKILL)
        self.run(lambda: asyncio.wait_for(run.exited.wait(), 20))

    @precondition(lambda self: not self.jupyter_stopped)
    @rule()
    def stop_during_start(self) -> None:
        """A person opens the GUI (slow start), then presses stop before it is up."""
        self.mode = "slow-start"
        self._apply_mode()

        async def race() -> tuple[int, list[int]]:
            waiters = [asyncio.ensure_future(self._fetch("libertem/", headers=NAVIGATE))]
            if not self.sup.ready:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.sup.wait_for_state(State.STARTING), 5)
                waiters.append(asyncio.ensure_future(self._fetch("libertem/api/config/")))
                await asyncio.sleep(0.1)
            stop = await self._fetch("libertem-proxy/api/stop", method="POST", auth="token")
            answers = await asyncio.gather(*waiters)
            return stop.code, [a.code for a in answers]

        stop_code, codes = self.run(race)
        assert stop_code == 200
        for code in codes:
            assert code in OK_CODES, codes
        # the navigation may reach Jupyter after the stop: then a person started it again
        # (found by this model on tornado 6.2: the model, not the proxy, was wrong)
        self.deliberate = self.sup.stop_reason is not None

    @precondition(lambda self: not self.jupyter_stopped)
    @rule(seconds=st.sampled_from([0.1, 0.6]))
    def time_passes(self, seconds: float) -> None:
        self.run(lambda: asyncio.sleep(seconds))
        self._observe_idle_stops()

    @precondition(lambda self: not self.jupyter_stopped)
    @rule()
    def clients_go_quiet(self) -> None:
        """Close every websocket; every counter must come back to 0."""
        self.close_websockets()
        self.run(self._counters_back_to_zero)

    @precondition(lambda self: not self.jupyter_stopped)
    @rule()
    def jupyter_stops(self) -> None:
        self.close_websockets()
        self.run(lambda: self.sup.stop("Jupyter is stopping"))
        self.jupyter_stopped = True
        self.deliberate = True
        self._assert_nothing_left()

    @precondition(lambda self: self.jupyter_stopped)
    @rule()
    def after_jupyter_stopped(self) -> None:
        """Nothing comes back by itself once Jupyter stopped it."""
        self.run(lambda: asyncio.sleep(0.2))
        self._assert_nothing_left()

    # ------------------------------------------------------------------ invariants

    async def _counters_back_to_zero(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while self.sup.requests_in_flight or self.sup.websockets:
            assert loop.time() < deadline, (self.sup.requests_in_flight, self.sup.websockets)
            await asyncio.sleep(0.02)

    @invariant()
    def counters_never_negative(self) -> None:
        counted["steps"] += 1  # invariants run once after each step (and once after setup)
        assert self.sup.requests_in_flight >= 0
        assert self.sup.websockets >= 0
        assert self.sup.starts >= 0 and self.sup.crash_count >= 0

    @invariant()
    def at_most_one_process_group(self) -> None:
        alive = [p for p in _pids(self.pidfile) if process_alive(p)]
        assert len(alive) <= 1, f"two libertem-servers alive: {alive}"
        groups = {_pgid(p) for p in alive + _pids(self.workerfile) if process_alive(p)} - {None}
        assert len(groups) <= 1, f"processes of more than one run alive: {groups}"

    def _quiet(self) -> bool:
        busy = [self.sup._start_task, self.sup._stop_task, *self.sup._tasks]
        return all(t is None or t.done() for t in busy)

    @invariant()
    def state_matches_processes(self) -> None:
        if not self._quiet():
            return
        alive = [p for p in _pids(self.pidfile) if process_alive(p)]
        status = self.sup.status()
        if self.sup.state is State.RUNNING:
            assert alive == [self.sup.run.pid], (alive, status)
            assert status["pid"] == self.sup.run.pid
        elif self.sup.state in (State.STOPPED, State.FAILED):
            assert not alive, (self.sup.state, alive)
            assert status["pid"] is None
            leftovers = [p for p in _pids(self.workerfile) if process_alive(p)]
            assert not leftovers, f"workers of a finished run alive: {leftovers}"
        if self.deliberate and not self.sup.ready:
            assert self.sup.stop_reason is not None

    def _assert_nothing_left(self) -> None:
        async def gone() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            pids = _pids(self.pidfile) + _pids(self.workerfile)
            while any(process_alive(p) for p in pids):
                assert loop.time() < deadline, [p for p in pids if process_alive(p)]
                await asyncio.sleep(0.02)
            await self._counters_back_to_zero()

        self.run(gone)
        rundirs = [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("libertem-proxy-")]
        assert not rundirs, f"run directories left behind: {rundirs}"

    def teardown(self) -> None:
        self.close_websockets()
        self.run(lambda: self.sup.stop("end of example"))
        self._assert_nothing_left()


@pytest.mark.proxy_config(
    start_timeout=2.5, stop_timeout=2.0, restart_backoff=0.05, max_crashes=3, crash_window=30.0
)
def test_lifecycle_model(io_loop, serverapp, client, tmp_path, monkeypatch, capsys):
    # run directories go to a directory of this test only, so "none left" can be checked
    rundirs = tmp_path / "rundirs"
    rundirs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rundirs))
    proxy_settings = serverapp.web_app.settings["libertem_proxy"]
    LifecycleModel.io_loop = io_loop
    LifecycleModel.client = client
    LifecycleModel.settings_obj = proxy_settings
    LifecycleModel.workdir = tmp_path
    LifecycleModel.template = proxy_settings.supervisor.config
    LifecycleModel.template_log = proxy_settings.supervisor.log
    counted.update(examples=0, steps=0, actions=0)
    try:
        run_state_machine_as_test(
            LifecycleModel,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            ),
        )
    finally:
        with capsys.disabled():
            print(
                f"\nlifecycle model: {counted['examples']} examples, "
                f"{counted['steps'] - counted['examples']} steps, "
                f"{counted['actions']} requests/waits/signals"
            )
