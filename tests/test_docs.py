"""The documentation: it builds without warnings, its reference is complete, and what it shows runs.

The Sphinx build (``-W``) goes into a temporary directory. Every code block of the built pages is
then read back from Sphinx's doctrees, so the blocks tested are exactly the ones shown:

- blocks included from ``docs/snippets/`` are checked by the validator registered for that
  file in ``SNIPPETS`` (run, loaded into the real code, or at least parsed); a snippet file
  without a validator, or one that no page shows, fails the test;
- inline ``python`` blocks are loaded as Jupyter config into a real ``LiberTEMProxy``;
- inline ``console`` blocks: each command is either run here (``RUN``) or listed in ``NOT_RUN``
  with the reason; a new command that is in neither fails the test;
- ``text`` blocks are illustrations (log excerpts) and are not run; other inline languages fail:
  put them into ``docs/snippets/`` and give them a validator.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .helpers import free_port, missing

pytestmark = [pytest.mark.docs]

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SNIPPET_DIR = DOCS / "snippets"
FAKE_SERVER = REPO / "tests" / "fake_libertem_server.py"
BIN = Path(sys.executable).parent
TOKEN = "docs-test-token-0d0c5"
BASE_URL = "/user/alice/"
APACHE = Path("/usr/sbin/apache2")
APACHE_MODULES = Path("/usr/lib/apache2/modules")


# ------------------------------------------------------------------------------ the build


@dataclass
class Block:
    """One code block as shown on a built page."""

    page: str
    language: str
    text: str
    snippet: Path | None  # the docs/snippets file it was included from, if any


@dataclass
class Built:
    html: Path
    blocks: list[Block]
    seconds: float

    def page(self, name: str) -> str:
        return (self.html / f"{name}.html").read_text(encoding="utf-8")


def _blocks(doctrees: Path) -> list[Block]:
    from docutils import nodes

    blocks = []
    for path in sorted(doctrees.glob("*.doctree")):
        with open(path, "rb") as f:
            tree = pickle.load(f)
        for node in tree.findall(nodes.literal_block):
            source = node.get("source")
            snippet = Path(source).resolve() if source else None
            if snippet is not None and snippet.parent != SNIPPET_DIR:
                snippet = None
            blocks.append(Block(path.stem, node.get("language", ""), node.astext(), snippet))
    return blocks


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    try:
        import furo  # noqa: F401
        import sphinx  # noqa: F401
    except ImportError:
        missing('sphinx/furo not installed (pip install -e ".[docs]")')
    out = tmp_path_factory.mktemp("docs")
    t = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-d",
            str(out / "doctrees"),
            str(DOCS),
            str(out / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - t
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout}\n{proc.stderr}"
    return Built(out / "html", _blocks(out / "doctrees"), seconds)


def test_build_without_warnings(built: Built) -> None:
    # -W turned every warning into a failure of the fixture; here: the pages are all there
    for page in (
        "index",
        "overview",
        "installation",
        "usage",
        "configuration",
        "deployment",
        "troubleshooting",
    ):
        assert (built.html / f"{page}.html").is_file(), page
    print(f"docs built in {built.seconds:.1f} s")


def test_reference_lists_every_option(built: Built) -> None:
    from libertem_jupyter_proxy.extension import LiberTEMProxy

    html = built.page("configuration")
    traits = LiberTEMProxy.class_own_traits(config=True)
    assert len(traits) >= 15
    for name, trait in traits.items():
        anchor = "config-" + name.replace("_", "-")
        assert f'id="{anchor}"' in html, f"no section for {name}"
        assert f"LiberTEMProxy.{name}" in html, name
        first_words = " ".join(textwrap.dedent(trait.help).split()[:4])
        assert first_words.replace('"', "&quot;") in html, f"help of {name} missing"


def test_every_error_page_is_explained(built: Built) -> None:
    from libertem_jupyter_proxy.pages import _TITLES

    html = built.page("troubleshooting")
    headings = re.findall(r"<h3>(.*?)<a class=\"headerlink\"", html)
    for title in _TITLES.values():
        assert title in headings, f"troubleshooting.rst has no section {title!r}"


def test_screenshots_and_picture_are_shown(built: Built) -> None:
    html = built.page("overview")
    for png in (DOCS / "_static" / "screenshots").glob("*.png"):
        assert png.name in html, f"{png.name} is not shown"
        assert png.stat().st_size < 150_000, f"{png.name} is too big for the repository"
    assert "flow.svg" in html


def test_every_block_is_checked(built: Built) -> None:
    """Every block shown is validated by one of the checks below (or is plain text)."""
    shown = {b.snippet.name for b in built.blocks if b.snippet is not None}
    files = {p.name for p in SNIPPET_DIR.iterdir() if p.is_file()}
    assert files - shown == set(), f"snippets no page shows: {files - shown}"
    assert shown - set(SNIPPETS) == set(), f"snippets without a validator: {shown - set(SNIPPETS)}"
    for b in built.blocks:
        if b.snippet is None:
            assert b.language in ("console", "python", "text"), (
                f"{b.page}: inline {b.language!r} block; put it into docs/snippets/ and give it "
                f"a validator in tests/test_docs.py:\n{b.text}"
            )


# ------------------------------------------------------------------------------ inline blocks


def _console_commands(built: Built) -> list[tuple[str, str]]:
    out = []
    for b in built.blocks:
        if b.snippet is None and b.language == "console":
            for line in b.text.splitlines():
                if line.startswith("$ "):
                    out.append((b.page, line[2:].strip()))
    return out


# commands that are run here, with what their output must contain
RUN: dict[str, Callable[[str], bool]] = {
    "jupyter server extension list": lambda out: (
        re.search(r"libertem_jupyter_proxy .*OK", out) is not None
    ),
    "jupyter labextension list": lambda out: "libertem-jupyter-proxy" in out,
    'python -c "import sys; print(sys.prefix)"': lambda out: out.strip() == sys.prefix,
}
# commands that are not run here, and why
NOT_RUN: dict[str, str] = {
    r"^pip (install|uninstall)\b": "changes the test environment (installs from PyPI)",
    r"^/opt/\S+/pip install\b": "installs into /opt (example paths)",
    r"^python3 -m venv /opt/": "creates an environment in /opt (example path)",
}


def test_console_commands(built: Built) -> None:
    commands = _console_commands(built)
    assert commands, "no console blocks found"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = 0
    for page, cmd in commands:
        if cmd in RUN:
            proc = subprocess.run(
                cmd, shell=True, capture_output=True, text=True, env=env, timeout=120
            )
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"{page}: {cmd!r} failed:\n{out}"
            assert RUN[cmd](out), f"{page}: unexpected output of {cmd!r}:\n{out}"
            ran += 1
        else:
            assert any(re.search(p, cmd) for p in NOT_RUN), (
                f"{page}: command {cmd!r} is neither run (RUN) nor explained (NOT_RUN)"
            )
    assert ran >= 3


def _load_python_config(text: str) -> Any:
    """Execute a config file the way Jupyter does: ``c`` and ``get_config()`` provided."""
    from traitlets.config import Config

    c = Config()
    exec(compile(text, "<docs>", "exec"), {"c": c, "get_config": lambda: c})
    return c


def _check_proxy_config(c: Any) -> Any:
    """Every ``c.LiberTEMProxy.x`` exists and has a valid value; returns the configured app."""
    from traitlets.config import Config

    from libertem_jupyter_proxy.extension import LiberTEMProxy

    traits = LiberTEMProxy.class_own_traits(config=True)
    section = c.get("LiberTEMProxy", Config())
    unknown = set(section) - set(traits)
    assert not unknown, f"not options of LiberTEMProxy: {unknown}"
    app = LiberTEMProxy(config=Config({"LiberTEMProxy": section}))
    for name, value in section.items():
        assert getattr(app, name) == value, name
    return app


def _check_cli_flags(flags: list[str]) -> Any:
    from traitlets.config.loader import KVArgParseConfigLoader

    from libertem_jupyter_proxy.extension import LiberTEMProxy

    proxy_flags = [f for f in flags if f.startswith("--LiberTEMProxy.")]
    cfg = KVArgParseConfigLoader(proxy_flags, classes=[LiberTEMProxy]).load_config()
    return _check_proxy_config(cfg)


def test_inline_python_blocks(built: Built) -> None:
    blocks = [b for b in built.blocks if b.snippet is None and b.language == "python"]
    assert blocks
    for b in blocks:
        c = _load_python_config(b.text)
        _check_proxy_config(c)
        if "Spawner" in c and "args" in c.Spawner:
            _check_cli_flags(list(c.Spawner.args))


def test_command_line_examples() -> None:
    """Every ``--LiberTEMProxy....`` command line written in the pages' text parses."""
    found = 0
    for rst in DOCS.glob("*.rst"):
        for literal in re.findall(r"``([^`\n]*--LiberTEMProxy\.[^`\n]*)``", rst.read_text()):
            args = [a for a in shlex.split(literal) if a.startswith("--")]
            _check_cli_flags(args)
            found += 1
    assert found >= 3


# ------------------------------------------------------------------------------ snippets


def _snippet(name: str) -> str:
    return (SNIPPET_DIR / name).read_text(encoding="utf-8")


def check_server_config(tmp_path: Path) -> None:
    c = _load_python_config(_snippet("jupyter_server_config.py"))
    app = _check_proxy_config(c)
    assert (
        app.libertem_server_path
        == json.loads(_snippet("libertem_jupyter_proxy.json"))["libertem_server_path"]
    ), "the two ways to name libertem-server in the docs should show the same path"


def check_json_file(tmp_path: Path) -> None:
    """The documented file is read by the real lookup, from $LIBERTEM_ROOT/etc/."""
    from libertem_jupyter_proxy.command import CommandError, resolve_command

    data = json.loads(_snippet("libertem_jupyter_proxy.json"))
    etc = tmp_path / "root" / "etc"
    etc.mkdir(parents=True)
    (etc / "libertem_jupyter_proxy.json").write_text(_snippet("libertem_jupyter_proxy.json"))
    environ = {"LIBERTEM_ROOT": str(tmp_path / "root")}
    # the example path does not exist here: the error must name it and the file
    with pytest.raises(CommandError) as err:
        resolve_command(environ=environ)
    assert data["libertem_server_path"] in err.value.message
    assert str(etc / "libertem_jupyter_proxy.json") in err.value.message
    # the same file pointing at a program that exists: that program is used
    exe = tmp_path / "libertem-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (etc / "libertem_jupyter_proxy.json").write_text(
        _snippet("libertem_jupyter_proxy.json").replace(data["libertem_server_path"], str(exe))
    )
    resolved = resolve_command(environ=environ)
    assert resolved.argv == [str(exe)]
    assert resolved.source == str(etc / "libertem_jupyter_proxy.json")


def check_lab_overrides(tmp_path: Path) -> None:
    data = json.loads(_snippet("lab-overrides.json"))
    package = json.loads((REPO / "labextension" / "package.json").read_text())
    schema = json.loads((REPO / "labextension" / "schema" / "plugin.json").read_text())
    assert list(data) == [f"{package['name']}:plugin"]
    for key, value in data[f"{package['name']}:plugin"].items():
        assert key in schema["properties"], key
        assert value in schema["properties"][key].get("enum", [value]), value


def check_status_example(tmp_path: Path) -> None:
    from libertem_jupyter_proxy.supervisor import Supervisor, SupervisorConfig

    shown = json.loads(_snippet("status-example.json"))
    real = Supervisor(SupervisorConfig()).status()
    # GET status adds the process group's figures (api.StatusHandler, resources.py)
    from dataclasses import fields

    from libertem_jupyter_proxy.resources import GroupResources

    real["resources"] = {f.name: None for f in fields(GroupResources)}
    real["sizing"] = None  # added by api.StatusHandler (sizing.py; see status-sizing.json)
    assert set(shown) == set(real), f"status fields differ: {set(shown) ^ set(real)}"
    assert set(shown["resources"]) == set(real["resources"]), shown["resources"]


def _fake_hpc(tmp_path: Path, module_loads_into: Path) -> dict[str, str]:
    """A stand-in ``module`` shell function (exported, as Lmod does) whose ``load`` puts a
    ``libertem-server`` (the project's fake) on PATH, and records its arguments."""
    bindir = module_loads_into
    bindir.mkdir(parents=True, exist_ok=True)
    server = bindir / "libertem-server"
    server.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_SERVER))} "$@"\n'
    )
    server.chmod(0o755)
    record = tmp_path / "module-calls"
    env = {
        **os.environ,
        "BASH_FUNC_module%%": (
            f'() {{ echo "$*" >> {shlex.quote(str(record))}; '
            f'if [ "$1" = load ]; then export PATH={shlex.quote(str(bindir))}:$PATH; fi; }}'
        ),
        "SLURM_CPUS_PER_TASK": "2",
        "TMPDIR": str(tmp_path),
    }
    return env


def check_wrapper(tmp_path: Path) -> None:
    """The wrapper script, run by the real supervisor: found, started, ready, stopped gracefully
    (exit 0, which only happens if SIGINT reached libertem-server: that is what exec is for)."""
    from libertem_jupyter_proxy.command import resolve_command
    from libertem_jupyter_proxy.supervisor import Supervisor, SupervisorConfig

    wrapper = SNIPPET_DIR / "libertem-wrapper.sh"
    assert wrapper.stat().st_mode & stat.S_IXUSR, "the wrapper snippet must be executable"
    assert resolve_command(server_path=str(wrapper)).argv == [str(wrapper)]
    env = _fake_hpc(tmp_path, tmp_path / "modules" / "libertem" / "bin")

    async def scenario() -> tuple[dict[str, Any], float]:
        old = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            sup = Supervisor(
                SupervisorConfig(
                    libertem_server_path=str(wrapper), start_timeout=30, stop_timeout=8
                )
            )
            run = await sup.ensure_running()
            cmdline = Path(f"/proc/{run.pid}/cmdline").read_bytes().split(b"\0")
            # exec: the process the proxy started is now libertem-server itself
            assert any(b"fake_libertem_server.py" in part for part in cmdline), cmdline
            # no --cpus: the GUI asks, and proposes the job's CPUs (c.LiberTEMProxy.cpus)
            assert not any(p.startswith(b"--cpus") for p in cmdline), cmdline
            t = time.monotonic()
            await sup.stop()
            return sup.status(), time.monotonic() - t
        finally:
            os.environ.clear()
            os.environ.update(old)

    status, took = asyncio.run(scenario())
    assert status["state"] == "stopped"
    assert status["last_exit_code"] == 0, status  # graceful: SIGINT reached libertem-server
    assert took < 8, f"stopping took {took:.1f} s: the stop was not graceful"
    calls = (tmp_path / "module-calls").read_text().split("\n")
    assert calls[0] == "load libertem/0.16.0", calls


def check_hub_slurm(tmp_path: Path) -> None:
    """Parsed here; run for real (placeholders filled) by tests/hpc (make test-hpc)."""
    c = _load_python_config(_snippet("jupyterhub_config_slurm.py"))
    assert c.JupyterHub.spawner_class == "batchspawner.SlurmSpawner"
    assert c.SlurmSpawner.req_srun == "srun --export=ALL"
    assert "module use @MODULEPATH@" in c.SlurmSpawner.req_prologue
    app = _check_cli_flags(list(c.Spawner.args))
    assert app.libertem_server_path == "@WRAPPER@"
    _check_run_by_hpc_test("jupyterhub_config_slurm.py")


def _check_run_by_hpc_test(name: str) -> None:
    """The HPC end-to-end test (tests/hpc/) uses this very snippet file."""
    conftest = (REPO / "tests" / "hpc" / "conftest.py").read_text()
    assert f'SNIPPETS / "{name}"' in conftest, f"tests/hpc/conftest.py does not use {name}"


def check_hpc_file(tmp_path: Path) -> None:
    """slurm.conf, cgroup.conf, the Lmod module, the one-machine hub part: run by tests/hpc."""


def check_slurm_conf(tmp_path: Path) -> None:
    settings = dict(
        line.split("=", 1)
        for line in _snippet("slurm.conf").splitlines()
        if "=" in line and not line.startswith("#") and not line.startswith("@")
    )
    # the settings the docs explain
    assert settings["ProctrackType"] == "proctrack/cgroup"
    assert settings["TaskPlugin"] == "task/cgroup,task/affinity"
    cgroup = dict(
        line.split("=", 1) for line in _snippet("cgroup.conf").splitlines() if "=" in line
    )
    assert cgroup["ConstrainCores"] == "yes" and cgroup["ConstrainRAMSpace"] == "yes"
    for name in ("slurm.conf", "cgroup.conf", "libertem-module.lua"):
        _check_run_by_hpc_test(name)
    _check_run_by_hpc_test("jupyterhub_config_single_node.py")


def check_status_sizing(tmp_path: Path) -> None:
    from libertem_jupyter_proxy.sizing import Bound, CpuFigure

    shown = json.loads(_snippet("status-sizing.json"))["sizing"]
    real = CpuFigure("auto", 1, "affinity", [Bound("affinity", 1, "x")]).to_dict()
    assert set(shown) == set(real)
    assert all(set(b) == set(real["bounds"][0]) for b in shown["bounds"])  # type: ignore[index]


def _mib(quantity: str) -> float:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}
    m = re.fullmatch(r"([0-9.]+)([KMGT])i?", str(quantity))
    assert m, quantity
    return float(m.group(1)) * units[m.group(2)]


def check_z2jh(tmp_path: Path) -> None:
    """Structure and the worker/limit rule the docs state; test_live_server loads the file
    into a real Jupyter server."""
    yaml = pytest.importorskip("yaml")
    values = yaml.safe_load(_snippet("z2jh-config.yaml"))
    single = values["singleuser"]
    files = single["extraFiles"]
    (entry,) = files.values()
    # the extension's own config file (ExtensionApp: jupyter_<name>_config) in a config dir
    assert entry["mountPath"] == "/etc/jupyter/jupyter_libertem_jupyter_proxy_config.json"
    from traitlets.config import Config

    _check_proxy_config(Config(entry["data"]))
    cpus = [
        int(a.split("=", 1)[1])
        for a in entry["data"]["LiberTEMProxy"]["extra_args"]
        if a.startswith("--cpus=")
    ]
    assert cpus, "the example should set the worker count"
    assert cpus[0] <= float(single["cpu"]["limit"]) - 1, "workers = CPU limit minus one"
    assert _mib(single["memory"]["limit"]) >= 300 + 230 * cpus[0] + 1024


def check_dockerfile(tmp_path: Path) -> None:
    # not built here (needs Docker and network): both packages must be installed by it
    text = _snippet("Dockerfile")
    assert re.search(r"pip install .*libertem-jupyter-proxy.* libertem\b", text), text


def check_nginx(tmp_path: Path) -> None:
    # run by the end-to-end suite: make sure it still uses this very file
    conftest = (REPO / "tests" / "e2e" / "conftest.py").read_text()
    assert '"docs" / "snippets" / "nginx-jupyterhub.conf"' in conftest


def check_traefik(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    static = yaml.safe_load(_snippet("traefik-static.yml"))
    dynamic = yaml.safe_load(_snippet("traefik-dynamic.yml"))
    (ep,) = static["entryPoints"]
    router = dynamic["http"]["routers"]["jupyterhub"]
    assert router["entryPoints"] == [ep]
    assert router["service"] in dynamic["http"]["services"]
    lb = dynamic["http"]["services"][router["service"]]["loadBalancer"]
    assert lb["passHostHeader"] is True
    assert static["entryPoints"][ep]["transport"]["respondingTimeouts"]["readTimeout"] == 0


def check_live(tmp_path: Path) -> None:
    """status-api.sh and apache-jupyterhub.conf run in test_live_server (one Jupyter server)."""


SNIPPETS: dict[str, Callable[[Path], None]] = {
    "jupyter_server_config.py": check_server_config,
    "libertem_jupyter_proxy.json": check_json_file,
    "lab-overrides.json": check_lab_overrides,
    "status-example.json": check_status_example,
    "libertem-wrapper.sh": check_wrapper,
    "jupyterhub_config_slurm.py": check_hub_slurm,
    "jupyterhub_config_single_node.py": check_hpc_file,
    "slurm.conf": check_slurm_conf,
    "cgroup.conf": check_slurm_conf,
    "libertem-module.lua": check_hpc_file,
    "status-sizing.json": check_status_sizing,
    "z2jh-config.yaml": check_z2jh,
    "Dockerfile": check_dockerfile,
    "nginx-jupyterhub.conf": check_nginx,
    "traefik-static.yml": check_traefik,
    "traefik-dynamic.yml": check_traefik,
    "status-api.sh": check_live,
    "apache-jupyterhub.conf": check_live,
}


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet(name: str, tmp_path: Path) -> None:
    SNIPPETS[name](tmp_path)


# ------------------------------------------------------------------------------ live server


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()}")
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"token {TOKEN}"})
            with urllib.request.urlopen(req, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class LiveServer:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE_URL}"


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    """``jupyter server`` with the extension and the fake backend; its config dir holds the
    Zero to JupyterHub example's config file, exactly as the chart would write it."""
    yaml = pytest.importorskip("yaml")
    dirs = {n: tmp_path / n for n in ("home", "config", "data", "runtime", "root", "tmp")}
    for d in dirs.values():
        d.mkdir()
    (entry,) = yaml.safe_load(_snippet("z2jh-config.yaml"))["singleuser"]["extraFiles"].values()
    (dirs["config"] / Path(entry["mountPath"]).name).write_text(json.dumps(entry["data"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
    env.update(
        HOME=str(dirs["home"]),
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTER_PLATFORM_DIRS="0",
        TMPDIR=str(dirs["tmp"]),
    )
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        f"--ServerApp.base_url={BASE_URL}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={TOKEN}",
        "--ServerApp.open_browser=False",
        "--ServerApp.allow_root=True",
        f"--ServerApp.root_dir={dirs['root']}",
        "--ServerApp.reraise_server_extension_failures=True",
        "--ServerApp.jpserver_extensions=libertem_jupyter_proxy=True",
        f"--LiberTEMProxy.command={sys.executable}",
        f"--LiberTEMProxy.command={FAKE_SERVER}",
    ]
    log = tmp_path / "jupyter.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=dirs["root"],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}{BASE_URL}api/status", proc, log)
        yield LiveServer(port, log)
    finally:
        _stop(proc)


@pytest.mark.slow
def test_live_server(live_server: LiveServer, tmp_path: Path) -> None:
    """status-api.sh against a real Jupyter server, then Apache's snippet in front of it."""
    if shutil.which("curl") is None:
        missing("curl not installed")
    env = {**os.environ, "JUPYTER_URL": live_server.url, "JUPYTER_TOKEN": TOKEN}
    proc = subprocess.run(
        ["bash", str(SNIPPET_DIR / "status-api.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + live_server.log.read_text()
    answers = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    status, start, log, restart, stop = answers
    # the Zero to JupyterHub example's settings reached the extension
    assert status["idle_timeout"] == 1800, status
    assert start["state"] == "running" and restart["state"] == "running"
    assert restart["starts"] == start["starts"] + 1
    assert log["lines"], log
    assert stop["state"] == "stopped"
    assert "[LiberTEM]" in live_server.log.read_text()

    _apache_in_front(live_server, tmp_path)


APACHE_MAIN = """\
ServerRoot "{root}"
Listen 127.0.0.1:{port}
PidFile {root}/httpd.pid
ErrorLog {root}/error.log
LogLevel warn
LoadModule mpm_event_module {mods}/mod_mpm_event.so
LoadModule authz_core_module {mods}/mod_authz_core.so
LoadModule proxy_module {mods}/mod_proxy.so
LoadModule proxy_http_module {mods}/mod_proxy_http.so
LoadModule headers_module {mods}/mod_headers.so
User {user}
Group {group}
Include {site}
"""


def _apache_in_front(server: LiveServer, tmp_path: Path) -> None:
    if not APACHE.exists():
        pytest.skip("Debian apache2 not installed: the Apache snippet was not run")
    import grp
    import pwd

    root = tmp_path / "apache"
    root.mkdir()
    port = free_port()
    site = root / "jupyterhub.conf"
    site.write_text(
        _snippet("apache-jupyterhub.conf")
        .replace("@PORT@", str(port))
        .replace("@SERVER_NAME@", "127.0.0.1")
        .replace("@JUPYTERHUB@", f"127.0.0.1:{server.port}")
    )
    (root / "httpd.conf").write_text(
        APACHE_MAIN.format(
            root=root,
            port=port,
            mods=APACHE_MODULES,
            site=site,
            # as root (CI), Apache's workers must switch to an unprivileged user
            user="nobody" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name,
            group=grp.getgrgid(65534).gr_name
            if os.getuid() == 0
            else grp.getgrgid(os.getgid()).gr_name,
        )
    )
    log = root / "stdout.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [str(APACHE), "-f", str(root / "httpd.conf"), "-DFOREGROUND"],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    front = f"http://127.0.0.1:{port}{BASE_URL}"
    try:
        _wait_http(front + "api/status", proc, log, timeout=30)

        # log in like a browser: the token in the URL once, then Jupyter's cookie
        import http.cookiejar

        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        opener.open(front + f"api/status?token={TOKEN}", timeout=30).read()
        assert len(jar) > 0, "no login cookie"
        origin = f"http://127.0.0.1:{port}"

        def get(path: str) -> tuple[int, bytes]:
            with opener.open(front + path, timeout=60) as resp:
                return resp.status, resp.read()

        # LiberTEM was stopped on purpose above: a person starts it again (the start API;
        # a plain GET is not a navigation and gets the "stopped" answer)
        start = urllib.request.Request(
            front + "libertem-proxy/api/start",
            method="POST",
            data=b"{}",
            headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
        )
        with opener.open(start, timeout=120) as resp:
            assert json.loads(resp.read())["state"] == "running"
        status, body = get("libertem/")
        assert status == 200 and b'<div id="root">' in body, body[:300]
        # a percent-encoded name (the real GUI has "LiberTEM%20logo-....png") passes unchanged
        status, _ = get("libertem/assets/LiberTEM%20style.css")
        assert status == 200
        # the GUI's PUT, cookie-authenticated: passes the Origin rule only if Host is preserved
        req = urllib.request.Request(
            front + "libertem/api/config/connection/",
            method="PUT",
            data=json.dumps({"connection": {"type": "LOCAL", "numWorkers": 1}}).encode(),
            headers={"Origin": origin, "Content-Type": "application/json"},
        )
        with opener.open(req, timeout=60) as resp:
            assert resp.status == 200
        cookies = "; ".join(f"{c.name}={c.value}" for c in jar)
        asyncio.run(_websocket_through(front, origin, cookies))
    finally:
        _stop(proc)
        print((root / "error.log").read_text() if (root / "error.log").exists() else "")


async def _websocket_through(front: str, origin: str, cookies: str) -> None:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    url = front.replace("http://", "ws://") + "libertem/api/events/"
    req = HTTPRequest(url, headers={"Cookie": cookies, "Origin": origin})
    ws = await websocket_connect(req)
    try:
        await ws.write_message("hello through apache")
        assert await asyncio.wait_for(ws.read_message(), 30) == "hello through apache"
        await ws.write_message("!binary 300000")
        msg = await asyncio.wait_for(ws.read_message(), 30)
        assert isinstance(msg, bytes) and len(msg) == 300_000
    finally:
        ws.close()
