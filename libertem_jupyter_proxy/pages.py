"""Error pages and their JSON twins.

Everything that can carry text from elsewhere (log lines, paths, exit messages) is rendered
through a Jinja environment with autoescaping on, so nothing from a log or a request can turn
into markup (the CVE-2024-35225 class of bug in jupyter-server-proxy).
"""

from __future__ import annotations

import json
from functools import cache
from typing import TYPE_CHECKING

import jinja2
import markupsafe

from .errors import BackendError
from .supervisor import Supervisor

if TYPE_CHECKING:
    from jupyter_server.base.handlers import JupyterHandler

_TITLES = {
    "not-found": "LiberTEM could not be started",
    "exited": "LiberTEM stopped while starting",
    "timeout": "LiberTEM did not start in time",
    "crash-loop": "LiberTEM keeps crashing",
    "died": "LiberTEM stopped while answering",
    "request-timeout": "LiberTEM did not answer in time",
    "unreachable": "LiberTEM did not answer",
    "port-squatted": "Another program took LiberTEM's port",
    "stopped": "LiberTEM is stopped",
    "config": "The LiberTEM proxy is misconfigured",
}


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("libertem_jupyter_proxy", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def status_for(error: BackendError) -> int:
    """HTTP status for a backend failure: 504 for a timeout, 503 while stopped on purpose,
    500 for the proxy's own invalid configuration, else 502."""
    return {"timeout": 504, "request-timeout": 504, "stopped": 503, "config": 500}.get(
        error.kind, 502
    )


def error_json(error: BackendError) -> str:
    return json.dumps(error.to_dict())


def render_error(handler: JupyterHandler, error: BackendError) -> str:
    """The page a scientist sees when LiberTEM is not available, with a Retry button."""
    return (
        _environment()
        .get_template("error.html")
        .render(
            title=_TITLES.get(error.kind, "LiberTEM is not available"),
            error=error,
            button="Start LiberTEM" if error.kind == "stopped" else "Retry",
            retry_action=handler.base_url + "libertem-proxy/api/start",
            next_url=handler.base_url + "libertem/",
            xsrf_form_html=markupsafe.Markup(handler.xsrf_form_html()),
        )
    )


def render_loading(handler: JupyterHandler, supervisor: Supervisor) -> str:
    """The page shown at once while LiberTEM starts; it turns into the GUI by itself.

    With JavaScript it polls the status API and shows the latest log lines as they come;
    without, a ``<noscript>`` refresh reloads it every few seconds.
    """
    status = supervisor.status()
    api = handler.base_url + "libertem-proxy/api/"
    return (
        _environment()
        .get_template("loading.html")
        .render(
            elapsed=float(status.get("start_elapsed") or 0.0),
            timeout=supervisor.config.start_timeout,
            log_lines=list(supervisor.log_tail)[-20:],
            status_url=api + "status",
            log_url=api + "log?lines=20",
            refresh_seconds=2,
            # JupyterHub's single-user servers check XSRF on cookie-authenticated GETs of API
            # routes too: the page's status polls send the token as X-XSRFToken, like JupyterLab
            xsrf_token=handler.xsrf_token.decode("ascii"),
        )
    )
