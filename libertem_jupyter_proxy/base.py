"""What every handler of ours shares: the supervisor, the prefix, auth and the cross-site rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jupyter_server._tz import utcnow
from jupyter_server.base.handlers import JupyterHandler
from tornado import web

from . import pages
from .errors import StoppedError
from .headers import upstream_headers
from .security import cross_site_reason

if TYPE_CHECKING:
    from .backend_run import BackendRun
    from .errors import BackendError
    from .supervisor import Supervisor

SETTINGS_KEY = "libertem_proxy"
PROXY_PATH = "libertem/"


class ProxyHandlerBase(JupyterHandler):
    """Base for the proxy handlers; thin on purpose: state lives in the supervisor."""

    @property
    def supervisor(self) -> Supervisor:
        return self.settings[SETTINGS_KEY].supervisor

    @property
    def proxy_settings(self) -> Any:
        return self.settings[SETTINGS_KEY]

    @property
    def prefix(self) -> str:
        """``{base_url}libertem/`` as the browser sees it."""
        return self.base_url + PROXY_PATH

    @property
    def _track_activity(self) -> bool:  # type: ignore[override]
        """Proxied requests count as activity for Jupyter's idle culler, except excluded paths."""
        tracked = getattr(self, "_tracked", None)
        if tracked is None:  # computed once per request (websockets ask per message)
            rest = self.upstream_path()[1:]
            tracked = not any(p.search(rest) for p in self.proxy_settings.activity_exclude)
            self._tracked = tracked
        return tracked

    def upstream_path(self) -> str:
        """The raw (still percent-encoded) path below our prefix, starting with ``/``.

        Built from ``request.path`` rather than the decoded route argument so that encoded
        characters (the GUI has an asset with a space) reach the backend exactly as sent.
        """
        path = self.request.path
        rest = path[len(self.prefix) :] if path.startswith(self.prefix) else ""
        return "/" + rest

    def check_xsrf_cookie(self) -> None:
        """Replace Jupyter's ``_xsrf`` check by the Origin/Referer rule (see security.py)."""
        if not hasattr(self, "_jupyter_current_user"):
            return  # called by tornado before prepare(); prepare() calls us again
        if self.token_authenticated or self.settings.get("disable_check_xsrf", False):
            return
        reason = cross_site_reason(
            self.request.method or "",
            self.request.headers,
            self.request.headers.get("Host"),
            self.allow_origin,
            self.allow_origin_pat,
        )
        if reason is not None:
            self.log.warning("%s (path %s)", reason, self.request.path)
            raise web.HTTPError(403, reason)

    def jupyter_cookie_names(self) -> set[str]:
        names = {"_xsrf"}
        try:
            names.add(self.identity_provider.get_cookie_name(self))
        except Exception:  # an identity provider without cookies
            pass
        return names

    def build_upstream_headers(self, run: BackendRun, drop: frozenset[str] = frozenset()):
        return upstream_headers(
            self.request.headers,
            token=run.token,
            prefix=self.prefix,
            proto=self.request.protocol,
            host=self.request.host,
            remote_ip=self.request.remote_ip,
            jupyter_cookie_names=self.jupyter_cookie_names(),
            drop=drop,
        )

    def record_activity(self) -> None:
        """Proxied use counts as activity of this Jupyter server (JupyterHub's idle culler reads
        it), except for paths listed in ``activity_exclude`` (polling)."""
        if self._track_activity:
            self.settings["libertem_proxy_last_activity"] = utcnow()

    def is_navigation(self) -> bool:
        """A browser loading a page (as opposed to fetch/XHR, assets or scripts)."""
        if self.request.method != "GET":
            return False
        mode = self.request.headers.get("Sec-Fetch-Mode")
        if mode is not None:
            return mode == "navigate"
        return "text/html" in self.request.headers.get("Accept", "")

    def is_person(self) -> bool:
        """A person opening the GUI: the request that may start LiberTEM after a deliberate stop.

        The rule (docs/usage.rst, "What starts and stops LiberTEM"): a GET of the GUI's root
        page ``{base_url}libertem/`` that the browser marks as a document navigation. Browsers
        since 2020 send Fetch Metadata (W3C "Fetch Metadata Request Headers"): then it must be
        ``Sec-Fetch-Mode: navigate`` with ``Sec-Fetch-Dest`` ``document`` (a tab) or ``iframe``
        / ``frame`` (an embedded panel). Without those headers (older browsers, curl), an
        ``Accept`` that asks for ``text/html`` counts. Never: websockets (the GUI's reconnect
        loop), fetch/XHR calls, assets, other paths below the GUI.
        """
        if self.request.method != "GET" or self.upstream_path() != "/":
            return False
        headers = self.request.headers
        # a page the browser loads ahead in case the person goes there (address-bar
        # predictions, speculation rules: "Sec-Purpose: prefetch[;prerender]", older
        # "Purpose: prefetch") is marked as a navigation too, but nobody asked for it
        purpose = headers.get("Sec-Purpose", "") + headers.get("Purpose", "")
        if "prefetch" in purpose.lower():
            return False
        mode = headers.get("Sec-Fetch-Mode")
        if mode is not None:
            dest = headers.get("Sec-Fetch-Dest", "document")
            return mode == "navigate" and dest in ("document", "iframe", "frame")
        return "text/html" in headers.get("Accept", "")

    def refuse_if_stopped(self) -> bool:
        """Answer at once (and return True) when this request may not have a backend: the
        configuration is invalid, or LiberTEM was stopped on purpose and this is not a person
        starting it. Called before the request counts as activity."""
        error = self.supervisor.refusal(self.is_person())
        if error is None:
            return False
        # an open tab's reconnect loop asks about once a second for as long as it stays open:
        # its expected 503s are not errors worth a log line each (Jupyter logs 5xx as errors)
        self._quiet_refusal = isinstance(error, StoppedError)
        self.send_backend_error(error)
        return True

    _quiet_refusal = False

    def _log(self) -> None:
        if self._quiet_refusal:  # one debug line instead of Jupyter's error-level access line
            self.log.debug(
                "%d %s %s (LiberTEM stopped on purpose)",
                self.get_status(),
                self.request.method,
                self.request.path,
            )
            return
        super()._log()

    def send_loading_page(self) -> None:
        self.clear()
        self.set_status(200)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(pages.render_loading(self, self.supervisor))

    def wants_html(self) -> bool:
        """A browser navigation (rather than an API call or a script)."""
        accept = self.request.headers.get("Accept", "")
        return self.request.method in ("GET", "HEAD") and "text/html" in accept

    def send_backend_error(self, error: BackendError) -> None:
        """Explain a backend failure: a page for people, JSON for programs. Never a traceback."""
        status = pages.status_for(error)
        self.clear()
        self.set_status(status)
        if self.wants_html():
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.finish(pages.render_error(self, error))
        else:
            self.set_header("Content-Type", "application/json")
            self.finish(pages.error_json(error))
