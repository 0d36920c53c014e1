"""The backend's lifecycle as one explicit state machine.

::

    STOPPED --ensure_running--> STARTING --ready--> RUNNING --exit 0--> STOPPED
                                   |                   |--exit != 0--> FAILED (crash, counted)
                                   |--error----------> FAILED
    RUNNING/STARTING --stop()--> STOPPING --> STOPPED
    FAILED --ensure_running--> STARTING (after backoff), or the crash-loop error
    FAILED --stop()--> STOPPED

Who may start it (``docs/usage.rst`` has the table): at first, any request (lazy start). After
a *deliberate* stop (exit 0 = the GUI's Shutdown, the stop API, an idle stop, Jupyter stopping)
only an *explicit* request does, i.e. a person: a page navigation to the GUI, the Start/Retry
button, the start API; everything else gets :class:`StoppedError` (HTTP 503) at once. After a
crash the next request of any kind restarts it, within the crash limits.

One :class:`Supervisor` lives per Jupyter server. Every start gets a new process object, a new
free port, a new token in a new 0700 directory and a new pooled HTTP client; everything of a run
is in one :class:`BackendRun` and is cleaned up when that run ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiohttp.abc

from . import backend_run, port_owner, process, upstream
from .backend_run import BackendRun
from .command import CommandError, ResolvedCommand, resolve_command
from .errors import BackendError, StoppedError, exit_description

__all__ = ["BackendError", "BackendRun", "State", "Supervisor", "SupervisorConfig"]

LOG_PREFIX = "[LiberTEM]"

# Variables of the Jupyter/JupyterHub process that libertem-server has no business seeing.
_SECRET_ENV = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "JUPYTER_TOKEN", "JUPYTERHUB_OAUTH_SECRET")


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


_ALLOWED = {
    State.STOPPED: {State.STARTING},
    State.STARTING: {State.RUNNING, State.FAILED, State.STOPPING, State.STOPPED},
    State.RUNNING: {State.STOPPED, State.FAILED, State.STOPPING},
    State.STOPPING: {State.STOPPED},
    State.FAILED: {State.STARTING, State.STOPPED},
}


@dataclass
class SupervisorConfig:
    """Plain values taken from the ``LiberTEMProxy`` traitlets (see extension.py for the help)."""

    command: Sequence[str] = ()
    libertem_server_path: str = ""
    extra_args: Sequence[str] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    local_directory: str = ""
    start_timeout: float = 90.0
    stop_timeout: float = 10.0
    term_timeout: float = 3.0
    max_crashes: int = 3
    crash_window: float = 120.0
    backoff_base: float = 1.0
    ready_interval: float = 0.02
    log_lines: int = 500
    idle_timeout: float = 0.0
    dask_tls: bool = True


class Supervisor:
    """Starts libertem-server on demand, watches it, restarts it by policy and stops it."""

    def __init__(self, config: SupervisorConfig, log: logging.Logger | None = None) -> None:
        self.config = config
        self.log = log or logging.getLogger("libertem_jupyter_proxy")
        self.state = State.STOPPED
        self.run: BackendRun | None = None
        self.log_tail: deque[str] = deque(maxlen=config.log_lines)
        self.starts = 0
        self.crashes: deque[float] = deque()
        self.crash_count = 0
        self.last_exit_code: int | None = None
        self.last_exit_time: float | None = None
        self.last_error: BackendError | None = None
        self.unseen_error: BackendError | None = None
        self.last_activity = time.monotonic()
        self.websockets = 0
        self.requests_in_flight = 0
        self.idle_stops = 0
        # why LiberTEM is stopped on purpose; None when any request may start it
        self.stop_reason: str | None = None
        # a malformed c.LiberTEMProxy option: nothing is started while this is set
        self.config_error: BackendError | None = None
        self._cancelling_start = False
        self._start_task: asyncio.Task[BackendRun] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._generation = 0
        self._tasks: set[asyncio.Future[None]] = set()
        self._listeners: list[Callable[[State], None]] = []

    # ------------------------------------------------------------------ state

    def _set_state(self, new: State) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"invalid backend transition {self.state.value} -> {new.value}")
        self.log.debug("LiberTEM backend: %s -> %s", self.state.value, new.value)
        self.state = new
        for listener in list(self._listeners):
            listener(new)

    def add_listener(self, fn: Callable[[State], None]) -> None:
        self._listeners.append(fn)

    async def wait_for_state(self, state: State) -> None:
        """Return once the backend is in ``state`` (at once if it already is)."""
        if self.state is state:
            return
        reached = asyncio.Event()

        def listener(new: State) -> None:
            if new is state:
                reached.set()

        self._listeners.append(listener)
        try:
            await reached.wait()
        finally:
            self._listeners.remove(listener)

    def touch(self) -> None:
        """Record activity (for idle shutdown and status)."""
        self.last_activity = time.monotonic()

    @property
    def ready(self) -> bool:
        """A backend is running and answered its readiness check."""
        return self.state is State.RUNNING and self.run is not None and not self.run.exited.is_set()

    def request_started(self) -> None:
        self.requests_in_flight += 1
        self.touch()

    def request_finished(self) -> None:
        self.requests_in_flight -= 1
        self.touch()

    def websocket_opened(self) -> None:
        self.websockets += 1
        self.touch()

    def websocket_closed(self) -> None:
        self.websockets -= 1
        self.touch()

    # ------------------------------------------------------------------ public API

    def refusal(self, explicit: bool) -> BackendError | None:
        """Why a request may not have a backend now, without waiting: the configuration error,
        or :class:`StoppedError` for a non-explicit request after a deliberate stop (cheap, so
        the handlers can answer before counting the request as activity)."""
        if self.config_error is not None:
            return self.config_error
        if not explicit and self.stop_reason is not None:
            return StoppedError(self.stop_reason)
        return None

    async def ensure_running(self, explicit: bool = True) -> BackendRun:
        """Return a ready backend, starting one if needed. Concurrent callers share one start.

        ``explicit``: the request is a person asking for LiberTEM (a navigation to the GUI,
        the start API); only such a request starts it after a deliberate stop. Raises
        :class:`BackendError` (``StoppedError`` for a refused non-explicit request, also when a
        stop ends the start it waited for).
        """
        refused = self.refusal(explicit)
        if refused is not None:
            raise refused
        self.touch()
        if self.ready:
            assert self.run is not None
            return self.run
        self.stop_reason = None
        if self.state is State.STOPPING and self._stop_task is not None:
            await asyncio.shield(self._stop_task)
        if self._start_task is None or self._start_task.done():
            self._check_crash_loop()
            self._start_task = asyncio.ensure_future(self._start())
        return await asyncio.shield(self._start_task)

    async def wait_start(self) -> None:
        """Wait for a start in progress to end, however it ends (the loading page's job)."""
        task = self._start_task
        if task is not None and not task.done():
            with contextlib.suppress(BackendError, asyncio.CancelledError):
                await asyncio.shield(task)

    def note_background_start(self, fut: asyncio.Future[BackendRun]) -> None:
        """Done-callback of a start nobody waits for (behind a loading page): keep its error
        for the next page view instead of silently starting again."""
        if fut.cancelled():
            return
        error = fut.exception()
        # a start ended by stop() is no failure to show: the next navigation starts again
        if isinstance(error, BackendError) and not isinstance(error, StoppedError):
            self.unseen_error = error

    def reset_failures(self) -> None:
        """Forget past crashes (the user pressed Retry)."""
        self.crashes.clear()
        self.last_error = None
        self.unseen_error = None

    async def stop(self, reason: str = "stopped with the stop API") -> None:
        """Stop libertem-server: SIGINT (graceful), then SIGTERM, then SIGKILL to its group.

        A deliberate stop: until a person starts it again (see :meth:`ensure_running`), other
        requests get :class:`StoppedError` naming ``reason``.
        """
        self.stop_reason = reason
        if self._stop_task is None or self._stop_task.done():
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    def kill_now(self) -> None:
        """Synchronous last resort for interpreter exit (``atexit``).

        Jupyter runs ``stop_extension`` on SIGTERM and on a confirmed Ctrl-C, but a SIGINT that
        arrives without a terminal surfaces as KeyboardInterrupt and the process exits without
        any cleanup. Then this kills the process group and removes the token directory.
        """
        run = self.run
        if run is None:
            return
        if run.pid is not None:
            process.kill_group_now(run.pid, self.config.term_timeout)
        shutil.rmtree(run.tmpdir, ignore_errors=True)

    def status(self) -> dict[str, object]:
        """A JSON-able snapshot for the status API. Never contains the token."""
        run = self.run
        now = time.monotonic()
        return {
            "state": self.state.value,
            "pid": run.pid if run and not run.exited.is_set() else None,
            "uptime": (now - run.ready_at)
            if run and run.ready_at and self.state is State.RUNNING
            else None,
            "start_elapsed": (now - run.started_at)
            if run and self.state is State.STARTING
            else None,
            "starts": self.starts,
            "crashes": self.crash_count,
            "last_exit_code": self.last_exit_code,
            "last_exit_time": self.last_exit_time,
            "last_error": self.last_error.to_dict() if self.last_error else None,
            "seconds_since_activity": now - self.last_activity,
            "websockets": self.websockets,
            "requests_in_flight": self.requests_in_flight,
            "idle_timeout": self.config.idle_timeout,
            "idle_stops": self.idle_stops,
            "stop_reason": self.stop_reason,
            "config_error": self.config_error.to_dict() if self.config_error else None,
        }

    # ------------------------------------------------------------------ crash policy

    def _recent_crashes(self) -> int:
        cutoff = time.monotonic() - self.config.crash_window
        while self.crashes and self.crashes[0] < cutoff:
            self.crashes.popleft()
        return len(self.crashes)

    def _check_crash_loop(self) -> None:
        n = self._recent_crashes()
        if n >= self.config.max_crashes:
            last = self.last_error
            raise BackendError(
                "crash-loop",
                f"LiberTEM crashed {n} times in the last {self.config.crash_window:.0f} seconds, "
                "so it is not started again automatically.",
                exit_code=self.last_exit_code,
                log_lines=last.log_lines if last else self._tail(50),
                hint="Read the log lines below for the cause, fix it, then press Retry.",
            )

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task that is kept referenced until it ends (tasks are weakly held
        by the event loop and could otherwise be garbage-collected mid-way)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count_crash(self) -> None:
        self.crashes.append(time.monotonic())
        self.crash_count += 1

    def _backoff(self) -> float:
        """Seconds to wait before the next start: doubles with each recent crash."""
        n = self._recent_crashes()
        if n == 0 or not self.crashes:
            return 0.0
        delay = self.config.backoff_base * 2 ** (n - 1)
        return max(0.0, self.crashes[-1] + delay - time.monotonic())

    def _tail(self, n: int) -> list[str]:
        return list(self.log_tail)[-n:]

    # ------------------------------------------------------------------ starting

    async def _start(self) -> BackendRun:
        """One start, shared by every waiter. A :meth:`stop` during it cancels it; then every
        waiter gets :class:`StoppedError` (never a bare ``CancelledError``, which tornado turns
        into a 500 or, before 6.5, into no answer at all)."""
        try:
            return await self._start_attempts()
        except asyncio.CancelledError:
            if not self._cancelling_start:
                raise
            raise StoppedError(self.stop_reason or "stopped while starting") from None

    async def _start_attempts(self) -> BackendRun:
        delay = self._backoff()
        if delay > 0:
            self.log.info("LiberTEM crashed recently; waiting %.1f s before the next start", delay)
            await asyncio.sleep(delay)
        self._set_state(State.STARTING)
        try:
            for attempt in range(3):
                run = await self._start_once()
                try:
                    await self._wait_ready(run)
                except _PortTaken:
                    self.log.warning(
                        "Port %d was taken before LiberTEM bound it; retrying", run.port
                    )
                    await self._cleanup_run(run)
                    if attempt == 2:
                        raise BackendError(
                            "exited",
                            "LiberTEM could not bind a free port three times in a row.",
                            log_lines=self._tail(50),
                        ) from None
                    continue
                except port_owner.PortSquatted as squat:  # nothing was sent to it
                    await self._cleanup_run(run)
                    if attempt == 2:
                        raise port_owner.squatted_error(squat.port, squat.verdict, 3) from None
                    continue
                self.last_error = None
                run.ready_at = time.monotonic()
                self._set_state(State.RUNNING)
                self.log.info(
                    "LiberTEM is ready on 127.0.0.1:%d (pid %s) after %.2f s",
                    run.port,
                    run.pid,
                    run.ready_at - run.started_at,
                )
                if self.config.idle_timeout > 0:
                    run.idle_watch = asyncio.ensure_future(self._idle_watch(run))
                return run
            raise AssertionError("unreachable")
        except BackendError as e:
            self.last_error = e
            if self.state is State.STARTING:
                self._set_state(State.FAILED)
            raise
        except Exception as e:
            # never stay in STARTING (every later start would be refused): an unforeseen
            # error fails this start, with its run cleaned up, like any other failed start
            self.log.exception("Starting LiberTEM failed unexpectedly")
            if self.run is not None and not self.run.exited.is_set():
                await self._kill_run(self.run)
            error = BackendError(
                "exited",
                f"Starting LiberTEM failed: {type(e).__name__}: {e}",
                log_lines=self._tail(50),
            )
            self.last_error = error
            if self.state is State.STARTING:
                self._set_state(State.FAILED)
            raise error from e
        except asyncio.CancelledError:  # stop() during a start
            if self.run is not None:
                await self._kill_run(self.run)
            if self.state is State.STARTING:
                self._set_state(State.STOPPED)
            raise

    def _resolve(self) -> ResolvedCommand:
        try:
            return resolve_command(self.config.command, self.config.libertem_server_path)
        except CommandError as e:
            raise BackendError("not-found", e.message, hint=e.hint, tried=e.tried) from None

    def _environment(self, cluster: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(cluster)  # the dask cluster's TLS keys and HTTP routes (dask_tls.py)
        env.update({str(k): str(v) for k, v in self.config.extra_env.items()})
        return env

    async def _start_once(self) -> BackendRun:
        resolved = self._resolve()
        tmpdir, token, token_path = backend_run.new_run_dir()
        try:
            cluster_env = backend_run.cluster_environment(tmpdir, self.config.dask_tls)
        except BackendError:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        local_dir = self.config.local_directory or os.path.join(tmpdir, "dask-worker-space")
        self._generation += 1
        try:
            port = backend_run.free_port()
        except OSError as e:  # ports or file descriptors exhausted (maybe by another user)
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise BackendError(
                "not-found",
                f"No free TCP port on 127.0.0.1 for LiberTEM: {e.strerror or e}.",
                hint="All local ports or this process's file descriptors are in use; "
                "Retry once some are free.",
            ) from None
        run = BackendRun(self._generation, port, token, tmpdir)
        argv = [
            *resolved.argv,
            *self.config.extra_args,
            "--no-browser",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--token-path={token_path}",
            f"--local-directory={local_dir}",
        ]
        self.log.info("Starting LiberTEM (%s): %s", resolved.source, " ".join(argv))
        self.run = run
        self.starts += 1
        if self.config.cwd and not os.path.isdir(self.config.cwd):  # noqa: ASYNC240 (one stat)
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise BackendError(
                "not-found",
                f"The working directory for LiberTEM does not exist: {self.config.cwd}",
                hint="Fix c.LiberTEMProxy.cwd (or leave it empty for Jupyter's root directory).",
            )
        try:
            run.proc = await process.spawn(
                argv,
                self._environment(cluster_env),
                self.config.cwd or None,
                on_exit=lambda code, run=run: self._on_exit(run, code),
            )
        except OSError as e:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise BackendError(
                "not-found",
                f"Could not start {argv[0]}: {e.strerror or e}.",
                hint=f"Check the program named by {resolved.source}.",
                tried=resolved.tried,
            ) from None
        stdout = run.proc.asyncio_process.stdout
        run.reader = asyncio.ensure_future(self._read_log(stdout))
        await self._start_guard(run)
        run.session = backend_run.new_session()
        run.pool = upstream.Pool(run.port)
        return run

    async def _start_guard(self, run: BackendRun) -> None:
        """Put a :mod:`.guard` into the run's process group, so no part of it outlives Jupyter.

        Not fatal when it fails: the run still has its parent-death signal, and while Jupyter
        lives every stop path kills the whole group anyway.
        """
        assert run.pid is not None
        try:
            run.guard = await process.spawn_guard(run.pid, self.config.term_timeout, run.tmpdir)
        except (OSError, subprocess.SubprocessError) as e:
            if not run.exited.is_set():  # an instant exit is reported by _wait_ready instead
                self.log.warning(
                    "Could not start the guard for LiberTEM's process group %d (%s); if Jupyter "
                    "is killed with SIGKILL, LiberTEM's worker processes may outlive it.",
                    run.pid,
                    e,
                )

    async def _read_log(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the limit: keep what we can
                line = await stream.read(65536)
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            self.log_tail.append(text)
            # one access-log line per proxied request would double Jupyter's own log volume
            level = logging.DEBUG if "tornado.access" in text else logging.INFO
            self.log.log(level, "%s %s", LOG_PREFIX, text)

    async def _wait_ready(self, run: BackendRun) -> None:
        """Poll ``GET /`` with the token while watching for an early exit."""
        deadline = run.started_at + self.config.start_timeout
        assert run.session is not None
        headers = {"X-Api-Key": run.token}
        while True:
            if run.exited.is_set():
                # the rest of its group first: a child holding the log pipe would delay the
                # last lines (and the answer) until the drain timeout
                await self._cleanup_run(run)
                tail = self._tail(50)
                port_taken = any("address already in use" in ln.lower() for ln in tail)
                if run.exit_code == 1 and port_taken:
                    raise _PortTaken()  # our race, not LiberTEM's crash: not counted
                if run.exit_code != 0:
                    self._count_crash()
                raise BackendError(
                    "exited",
                    f"LiberTEM {exit_description(run.exit_code)} while starting.",
                    exit_code=run.exit_code,
                    log_lines=tail,
                    hint="The last lines it wrote are below; they usually name the problem.",
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._kill_run(run)
                raise BackendError(
                    "timeout",
                    f"LiberTEM did not answer within {self.config.start_timeout:g} seconds.",
                    log_lines=self._tail(50),
                    hint="If your LiberTEM needs longer (slow file systems, big environments), "
                    "raise c.LiberTEMProxy.start_timeout.",
                )
            if not backend_run.prove_port(run, self.log):  # never send the token before
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(run.exited.wait(), self.config.ready_interval)
                continue
            try:
                timeout = aiohttp.ClientTimeout(total=min(2.0, remaining))
                async with run.session.get(
                    f"{run.base_url}/", headers=headers, timeout=timeout
                ) as resp:
                    await resp.read()
                    if resp.status < 500:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            # wake up early if the process exits
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(run.exited.wait(), self.config.ready_interval)

    async def _drain_log(self, run: BackendRun) -> None:
        if run.reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(run.reader), 2.0)

    async def _idle_watch(self, run: BackendRun) -> None:
        """Stop ``run`` gracefully once nobody has used it for ``idle_timeout`` seconds.

        "Nobody" means: no open browser websocket (an open GUI tab keeps its events socket),
        no request in flight, and no request or websocket message for that long. The memory
        (230 MiB plus about 230 MiB per worker) goes back to the machine; the next visit starts
        LiberTEM again through the loading page.
        """
        timeout = self.config.idle_timeout
        interval = min(max(timeout / 4, 0.05), 30.0)
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(run.exited.wait(), interval)
            if run.exited.is_set() or run is not self.run or self.state is not State.RUNNING:
                return
            idle = time.monotonic() - self.last_activity
            if self.websockets == 0 and self.requests_in_flight == 0 and idle >= timeout:
                self.log.info("LiberTEM was idle for %.0f s; stopping it to free memory", idle)
                self.idle_stops += 1
                self._background(self.stop(f"idle for {idle:.0f} s, stopped to free memory"))
                return

    # ------------------------------------------------------------------ exit and stop

    def _on_exit(self, run: BackendRun, code: int) -> None:
        """Called by the process watcher when the main process exits, whatever the reason."""
        run.exit_code = code
        run.exited.set()
        self.last_exit_code = code
        self.last_exit_time = time.time()
        level = logging.INFO if code == 0 or run.stopping else logging.WARNING
        self.log.log(level, "LiberTEM (pid %s) %s", run.pid, exit_description(code))
        if run is not self.run:
            return
        if self.state is State.RUNNING:
            if not run.stopping and code != 0:
                self._count_crash()
            if code == 0:
                # LiberTEM's own Shutdown (GUI button or DELETE api/shutdown/): a person's stop
                self.stop_reason = "shut down from the LiberTEM GUI (exit code 0)"
                self._set_state(State.STOPPED)
            else:
                self.last_error = BackendError(
                    "exited",
                    f"LiberTEM {exit_description(code)}.",
                    exit_code=code,
                    log_lines=self._tail(50),
                )
                self._set_state(State.FAILED)
            # workers left behind, the token dir and the HTTP client go with the run
            self._background(self._cleanup_run(run))

    async def _stop(self) -> None:
        if self._start_task is not None and not self._start_task.done():
            self._cancelling_start = True
            self._start_task.cancel()
            try:
                with contextlib.suppress(asyncio.CancelledError, BackendError):
                    await self._start_task
            finally:
                self._cancelling_start = False
        run = self.run
        if run is None or self.state not in (State.RUNNING, State.STARTING):
            if run is not None:
                await self._cleanup_run(run)
            if self.state is State.FAILED:
                self._set_state(State.STOPPED)
            return
        self._set_state(State.STOPPING)
        await self._kill_run(run)
        self._set_state(State.STOPPED)

    async def _kill_run(self, run: BackendRun) -> None:
        """Graceful stop, then escalate; always ends with the group gone and the run cleaned."""
        run.stopping = True
        proc = run.proc
        # a graceful stop only for a run that became ready: libertem-server ignores SIGINT
        # while it is still importing, so a stop during a start waited the whole stop_timeout
        if proc is not None and not run.exited.is_set() and run.ready_at is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(run.exited.wait(), self.config.stop_timeout)
        await self._cleanup_run(run)

    async def _cleanup_run(self, run: BackendRun) -> None:
        """Make sure nothing of ``run`` is left: processes of its group, token dir, HTTP client."""
        if run.pid is not None:
            await process.kill_group(run.pid, self.config.term_timeout, self.log)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(run.exited.wait(), 5.0)
        if run.guard is not None:
            await process.retire_guard(run.guard)
            run.guard = None
        if run.reader is not None:
            await self._drain_log(run)
            if not run.reader.done():
                # a process outside the group (it left with setsid) still holds the pipe: stop
                # reading, so the log never keeps a finished run around
                run.reader.cancel()
                if run.proc is not None:
                    run.proc.close_pipes()
        if run.session is not None and not run.session.closed:
            await run.session.close()
        if run.pool is not None:
            run.pool.close()
        shutil.rmtree(run.tmpdir, ignore_errors=True)


class _PortTaken(Exception):
    """The chosen port was bound by someone else between choosing and binding."""
