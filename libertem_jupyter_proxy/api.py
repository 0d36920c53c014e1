"""Status and control API under ``{base_url}libertem-proxy/api/``.

Ordinary Jupyter API handlers: Jupyter's authentication, and its XSRF/Origin rules for POST.
Nothing here ever includes the backend's token.
"""

from __future__ import annotations

import json

from jupyter_server.base.handlers import APIHandler
from tornado import web

from .base import SETTINGS_KEY
from .errors import BackendError
from .resources import status_resources
from .supervisor import Supervisor


class _ControlBase(APIHandler):
    @property
    def supervisor(self) -> Supervisor:
        return self.settings[SETTINGS_KEY].supervisor

    def _finish_status(self, status: int = 200, error: BackendError | None = None) -> None:
        """Answer with the status; a form POST from an error page is sent on to ``next``."""
        nxt = self.get_body_argument("next", None) if self._is_form() else None
        if nxt is not None and nxt.startswith(self.base_url) and not nxt.startswith("//"):
            self.redirect(nxt)
            return
        body = self.supervisor.status()
        if error is not None:
            body["error"] = error.to_dict()
        self.set_status(status)
        self.finish(json.dumps(body))

    def _is_form(self) -> bool:
        ctype = self.request.headers.get("Content-Type", "")
        return ctype.startswith("application/x-www-form-urlencoded") or ctype.startswith(
            "multipart/form-data"
        )


class StatusHandler(_ControlBase):
    _track_activity = False  # monitoring must not keep the server alive

    @web.authenticated
    async def get(self) -> None:
        body = self.supervisor.status()
        # memory, CPU, processes, workers of LiberTEM's process group (resources.py)
        body["resources"] = await status_resources(self.supervisor)
        # the worker count the GUI proposes and where it came from (sizing.py)
        sizing = self.settings[SETTINGS_KEY].sizing
        body["sizing"] = sizing.to_dict() if sizing is not None else None
        self.finish(json.dumps(body))


class LogHandler(_ControlBase):
    _track_activity = False

    @web.authenticated
    def get(self) -> None:
        try:
            lines = max(0, min(10_000, int(self.get_argument("lines", "100"))))
        except ValueError:
            raise web.HTTPError(400, "lines must be an integer") from None
        tail = list(self.supervisor.log_tail)[-lines:] if lines else []
        self.finish(json.dumps({"lines": tail}))


class StartHandler(_ControlBase):
    """Start LiberTEM now (and forget past crashes: this is the Retry button)."""

    @web.authenticated
    async def post(self) -> None:
        self.supervisor.reset_failures()
        try:
            await self.supervisor.ensure_running()
        except BackendError as e:
            if self._is_form():  # back to the GUI URL, which shows the error page again
                self._finish_status()
                return
            self._finish_status(502, e)
            return
        self._finish_status()


class StopHandler(_ControlBase):
    """Stop LiberTEM gracefully; the next visit starts it again."""

    @web.authenticated
    async def post(self) -> None:
        await self.supervisor.stop()
        self._finish_status()


class RestartHandler(_ControlBase):
    @web.authenticated
    async def post(self) -> None:
        await self.supervisor.stop()
        self.supervisor.reset_failures()
        try:
            await self.supervisor.ensure_running()
        except BackendError as e:
            self._finish_status(502, e)
            return
        self._finish_status()
