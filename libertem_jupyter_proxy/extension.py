"""The Jupyter server extension: options, handler registration, and the stop hook.

An ``ExtensionApp`` rather than a plain load function, because Jupyter awaits
``stop_extension()`` on shutdown (Ctrl-C, SIGTERM, File > Shut Down); a load function has no
stop hook and its children outlive the server.
"""

from __future__ import annotations

import atexit
import json
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import url_path_join
from tornado.ioloop import IOLoop
from tornado.routing import PathMatches, Rule
from traitlets import Bool, Dict, Float, Int, List, TraitError, Unicode, Union, validate

from . import config_check, signal_wakeup
from ._version import __version__
from .api import LogHandler, RestartHandler, StartHandler, StatusHandler, StopHandler
from .base import PROXY_PATH, SETTINGS_KEY
from .http_proxy import AddSlashHandler, HttpProxyHandler
from .sizing import CpuFigure, cpu_figure
from .supervisor import Supervisor, SupervisorConfig
from .ws_proxy import WebSocketProxyHandler
from .ws_threads import ThreadBridge

API_PATH = "libertem-proxy/api"


class _WebSocketUpgrade(PathMatches):
    """Matches the proxy path only for websocket upgrade requests.

    The GUI uses one URL space for pages, API calls and its websocket, so the same path must go
    to the websocket bridge or to the HTTP proxy depending on the ``Upgrade`` header.
    """

    def match(self, request):  # type: ignore[no-untyped-def]
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return None
        return super().match(request)


@dataclass
class ProxySettings:
    """What the handlers read from ``settings["libertem_proxy"]``."""

    supervisor: Supervisor
    websocket_max_message_size: int
    max_body_size: int
    connect_timeout: float
    read_timeout: float
    client_timeout: aiohttp.ClientTimeout
    activity_exclude: list[re.Pattern[str]]
    loading_page_delay: float
    compress: bool
    websocket_threads: int = 16
    # the running ThreadBridges (ws_threads), counted against websocket_threads
    thread_bridges: set[ThreadBridge] = field(default_factory=set)
    sizing: CpuFigure | None = None  # c.LiberTEMProxy.cpus, resolved once at start (sizing.py)

    @property
    def cpus(self) -> int | None:
        """Workers the GUI proposes (adaptations.py); None: LiberTEM's own count."""
        return self.sizing.cpus if self.sizing is not None else None


class LiberTEMProxy(ExtensionApp):
    """Serves the LiberTEM GUI at ``{base_url}libertem/``.

    Configure it as ``c.LiberTEMProxy.<option>`` in ``jupyter_server_config.py``.
    """

    name = "libertem_jupyter_proxy"
    version = __version__
    description = __doc__
    load_other_extensions = True

    command = List(
        Unicode(),
        default_value=[],
        help="""Full command that starts libertem-server, e.g. ["/opt/lt/bin/libertem-server"] or
        ["/usr/bin/env", "bash", "/opt/site/libertem-wrapper.sh"]. The proxy appends
        --no-browser, --host, --port, --token-path and --local-directory. Takes precedence over
        libertem_server_path and the JSON file.""",
    ).tag(config=True)

    libertem_server_path = Unicode(
        "",
        help="""Path to libertem-server or to a wrapper script that ends with
        `exec libertem-server "$@"`. If empty, the JSON file
        <$LIBERTEM_ROOT or sys.prefix>/etc/libertem_jupyter_proxy.json (key
        "libertem_server_path") is read, then libertem-server is looked up on PATH.""",
    ).tag(config=True)

    extra_args = List(
        Unicode(),
        default_value=[],
        help="""Extra command-line arguments for libertem-server, e.g. ["--cpus=4"] or
        ["--snooze-timeout=30"]. Host, port, token path and browser cannot be overridden.""",
    ).tag(config=True)

    extra_env = Dict(
        value_trait=Unicode(),
        default_value={},
        help="Extra environment variables for libertem-server (added to Jupyter's environment).",
    ).tag(config=True)

    cwd = Unicode(
        "",
        help="Working directory of libertem-server; default: Jupyter's root directory.",
    ).tag(config=True)

    local_directory = Unicode(
        "",
        help="""Scratch directory for LiberTEM's dask workers (libertem-server -d). Default: a
        fresh directory inside the run's private temporary directory, removed on stop, instead of
        dask-worker-space/ in the notebook directory.""",
    ).tag(config=True)

    start_timeout = Float(
        90.0, min=0.1, help="Seconds to wait for libertem-server to answer after starting it."
    ).tag(config=True)

    stop_timeout = Float(
        10.0,
        min=0.0,
        help="""Seconds to wait for a graceful stop (SIGINT) before SIGTERM and then SIGKILL are
        sent to libertem-server's whole process group.""",
    ).tag(config=True)

    max_crashes = Int(
        3,
        min=1,
        help="""After this many crashes (non-zero exits) within crash_window seconds, LiberTEM is
        not restarted automatically; users see an error page with the last log lines and a
        Retry button.""",
    ).tag(config=True)

    crash_window = Float(120.0, min=0.0, help="Window (seconds) in which crashes are counted.").tag(
        config=True
    )

    restart_backoff = Float(
        1.0,
        min=0.0,
        help="""Delay before restarting after a crash, doubled with each further recent crash.""",
    ).tag(config=True)

    websocket_max_message_size = Int(
        128 * 1024 * 1024,
        min=0,
        help="Largest websocket message relayed, in bytes, in either direction.",
    ).tag(config=True)

    websocket_threads = Int(
        16,
        min=0,
        help="""Websockets relayed at once on threads of their own (two each, one per
        direction), the fastest relay for the GUI's small messages. Websockets beyond this number,
        and all of them under Jupyter's own TLS (certfile), are relayed on Jupyter's event loop,
        as with 0.""",
    ).tag(config=True)

    max_body_size = Int(
        100 * 1024**3,
        min=0,
        help="Largest request body (upload) accepted, in bytes. Bodies are streamed, not held.",
    ).tag(config=True)

    connect_timeout = Float(
        10.0, min=0.1, help="Seconds to wait for a TCP connection to libertem-server."
    ).tag(config=True)

    read_timeout = Float(
        300.0,
        min=0.0,
        help="""Seconds libertem-server may stay completely silent while answering one HTTP
        request before that request fails (an idle timeout: a long download that keeps sending
        data is never cut). While an upload is sent it is the longest time libertem-server may
        take none of the body (like nginx's proxy_send_timeout). 0 disables it. There is no
        total request timeout.""",
    ).tag(config=True)

    activity_exclude = List(
        Unicode(),
        default_value=[],
        help="""Regular expressions of paths below libertem/ (e.g. "^api/config/$") whose requests
        do not count as user activity for Jupyter's idle culler (polling).""",
    ).tag(config=True)

    idle_timeout = Float(
        0.0,
        min=0.0,
        help="""Stop libertem-server gracefully after this many seconds without use (no open GUI
        tab, no request) to give its memory back; 0 turns this off. The next visit starts it
        again.""",
    ).tag(config=True)

    compress = Bool(
        True,
        help="""gzip text responses (HTML, JS, CSS, JSON) for browsers that accept it;
        libertem-server itself never compresses. Streaming responses stay streaming.""",
    ).tag(config=True)

    loading_page_delay = Float(
        0.5,
        min=0.0,
        help="""A browser opening the GUI while LiberTEM starts gets the loading page if the start
        takes longer than this many seconds (API requests and websockets wait instead).""",
    ).tag(config=True)

    cpus = Union(
        [Int(), Unicode()],
        default_value="auto",
        help="""Number of workers LiberTEM's GUI proposes (its api/config/ answer is rewritten, see
        the docs' HPC section). "auto": the smallest of the CPU affinity, the cgroup CPU quota,
        CPU_LIMIT, SLURM_CPUS_ON_NODE/SLURM_JOB_CPUS_PER_NODE and a memory bound (cgroup memory
        limit or MEM_LIMIT, 768 MiB reserved + 384 MiB per worker). An integer: that number.
        "host": LiberTEM's own count (the host's physical cores), nothing rewritten.""",
    ).tag(config=True)

    @validate("cpus")
    def _valid_cpus(self, proposal: Any) -> int | str:
        value = proposal["value"]
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            value = int(value)  # from the command line: --LiberTEMProxy.cpus=4
        if value in ("auto", "host") or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise TraitError(
            f"LiberTEMProxy.cpus must be 'auto', 'host' or an integer >= 1, not {value!r}"
        )

    dask_tls = Bool(
        True,
        help="""Mutual TLS for the dask cluster LiberTEM starts (GUI "Connect" with a local
        cluster, or --cpus): each start makes a new certificate authority, certificate and key
        in its private directory, and only processes holding them can use the cluster. Without
        it, every user of the machine (and other machines) who reaches the scheduler's port can
        run code as you. Turn it off only where nobody else can reach the machine. "Connect to
        existing cluster" with a tcp:// address works either way.""",
    ).tag(config=True)

    @validate("command", "extra_args")
    def _json_list(self, proposal: Any) -> list[str]:
        """Accept ``--LiberTEMProxy.command='["a", "b"]'`` on the command line too.

        traitlets turns a single command-line value into a one-item list, so a JSON list
        written there would otherwise become the name of a program that does not exist.
        """
        value = list(proposal["value"])
        if len(value) == 1 and value[0].lstrip().startswith("["):
            try:
                parsed = json.loads(value[0])
            except json.JSONDecodeError as e:
                raise TraitError(
                    f"LiberTEMProxy.{proposal['trait'].name} looks like a JSON list but is not "
                    f"valid JSON: {e.msg}"
                ) from None
            if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                raise TraitError(
                    f"LiberTEMProxy.{proposal['trait'].name} must be a list of strings"
                )
            return parsed
        return value

    def _load_config(self, cfg: Any, section_names: Any = None, traits: Any = None) -> None:
        """Load the options one by one: a malformed one is recorded (see config_check.py), the
        others load, and LiberTEM refuses to start until it is fixed (not a warning in the log
        and a half-applied configuration)."""
        cfg = config_check.load_checked(self, cfg, section_names, traits)
        super()._load_config(cfg, section_names=section_names, traits=traits)

    def parse_command_line(self, argv: Any = None) -> None:
        """Keep ``extra_args`` as configured.

        jupyter_server calls this with the server's leftover positional arguments (``jupyter lab
        a.ipynb`` gives ``["a.ipynb"]``), and traitlets' ``Application.parse_command_line`` then
        assigns them to ``self.extra_args``, an attribute of ``Application`` that our option of
        the same name shadows: the configured arguments were lost, and file names given to
        Jupyter were passed to libertem-server (which then exits with code 2). Positional
        arguments are never ours, so the configured value (or the default) is put back.
        """
        super().parse_command_line(argv)
        name = "extra_args"
        if name in self._find_my_config(self.config):
            self._load_config(self.config, traits={name: self.traits()[name]})
        else:
            self.extra_args = []

    def _supervisor_config(self) -> SupervisorConfig:
        root = getattr(self.serverapp, "root_dir", None) if self.serverapp else None
        return SupervisorConfig(
            command=list(self.command),
            libertem_server_path=self.libertem_server_path,
            extra_args=list(self.extra_args),
            extra_env=dict(self.extra_env),
            cwd=self.cwd or root or None,
            local_directory=self.local_directory,
            start_timeout=self.start_timeout,
            stop_timeout=self.stop_timeout,
            max_crashes=self.max_crashes,
            crash_window=self.crash_window,
            backoff_base=self.restart_backoff,
            idle_timeout=self.idle_timeout,
            dask_tls=self.dask_tls,
        )

    def initialize_settings(self) -> None:
        # the loop Jupyter will run (tornado's current one; created here if need be)
        signal_wakeup.install(IOLoop.current().asyncio_loop)  # type: ignore[attr-defined]
        self.supervisor = Supervisor(self._supervisor_config(), log=self.log)
        self.supervisor.config_error = config_check.report(self)
        atexit.register(self.supervisor.kill_now)
        self.settings[SETTINGS_KEY] = ProxySettings(
            supervisor=self.supervisor,
            websocket_max_message_size=self.websocket_max_message_size,
            websocket_threads=self.websocket_threads,
            max_body_size=self.max_body_size,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            client_timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.connect_timeout,
                sock_read=self.read_timeout or None,
            ),
            activity_exclude=[re.compile(p) for p in self.activity_exclude],
            loading_page_delay=self.loading_page_delay,
            compress=self.compress,
            sizing=cpu_figure(self.cpus),
        )
        self.log.info(self.settings[SETTINGS_KEY].sizing.describe())

    def initialize_handlers(self) -> None:
        assert self.serverapp is not None
        base_url = self.serverapp.web_app.settings["base_url"]
        proxied = url_path_join(base_url, PROXY_PATH) + "(.*)"
        # The websocket rule must come first; both are added in one call so they stay ordered.
        self.serverapp.web_app.add_handlers(
            ".*$",
            [
                Rule(_WebSocketUpgrade(proxied), WebSocketProxyHandler),
                (proxied, HttpProxyHandler),
            ],
        )
        self.handlers.extend(
            [
                (PROXY_PATH.rstrip("/"), AddSlashHandler),
                (f"{API_PATH}/status", StatusHandler),
                (f"{API_PATH}/log", LogHandler),
                (f"{API_PATH}/start", StartHandler),
                (f"{API_PATH}/restart", RestartHandler),
                (f"{API_PATH}/stop", StopHandler),
            ]
        )

    async def stop_extension(self) -> None:
        """Jupyter is stopping: stop libertem-server and everything it started."""
        supervisor = getattr(self, "supervisor", None)
        if supervisor is not None:
            self.log.info("Stopping LiberTEM before Jupyter exits")
            await supervisor.stop("Jupyter is stopping")
            atexit.unregister(supervisor.kill_now)
        settings = self.settings.get(SETTINGS_KEY)
        if settings is not None:  # no websocket thread may outlive Jupyter's event loop
            for bridge in list(settings.thread_bridges):
                bridge.abort()
