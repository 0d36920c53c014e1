"""A real single-node HPC for the end-to-end test: munge, Slurm, Lmod, JupyterHub, batchspawner.

Runs as root, inside a network namespace that ``make test-hpc`` creates (``unshare --net``, then
``ip link set lo up``): slurmctld, slurmd and srun listen on 0.0.0.0 and there is no setting to
change that, so the namespace makes every address loopback by construction (and the fixed ports
below cannot collide with anything on the machine).

Started and stopped here, in this order:

- a Unix test user (``useradd``; removed with its home at the end);
- ``munged`` as user munge (the key from Debian's package);
- ``slurmctld`` and ``slurmd`` with ``docs/snippets/slurm.conf`` and ``cgroup.conf`` (the files
  the docs show, placeholders filled in); at the end the ``slurm_<host>`` cgroup directories
  Slurm leaves behind are removed;
- JupyterHub (``tests/hpc/jupyterhub_config.py``, which loads
  ``docs/snippets/jupyterhub_config_slurm.py`` and ``jupyterhub_config_single_node.py``) with
  configurable-http-proxy, user servers as
  Slurm jobs; LiberTEM from its own venv through ``docs/snippets/libertem-wrapper.sh`` and the
  Lmod module ``docs/snippets/libertem-module.lua``.

``tests/hpc/setup.sh`` builds the environments below ``/opt/ltjp-hpc`` (``HPC_DIR``). Without them
(or outside a network namespace, or not as root) the test is skipped, unless
``LTJP_HPC_REQUIRED=1`` (set by ``make test-hpc``) makes that a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .. import helpers

REPO = Path(__file__).resolve().parents[2]
SNIPPETS = REPO / "docs" / "snippets"
HPC_DIR = Path(os.environ.get("HPC_DIR", "/opt/ltjp-hpc"))
LIBERTEM_ENV = HPC_DIR / "libertem-venv"
JUPYTER_ENV = HPC_DIR / "jupyter-venv"
CHP = HPC_DIR / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
NUMBA_CACHE = HPC_DIR / "numba-cache"
ARTIFACTS = Path(os.environ.get("HPC_ARTIFACTS", REPO / "hpc-artifacts")).resolve()
HUB = "http://127.0.0.1:8000"
PASSWORD = "hpc-test-password-not-secret"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOT = Path("/sys/fs/cgroup")


# ---------------------------------------------------------------------------- helpers


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """:func:`tests.helpers.wait_until`, polling a little less often (Slurm's commands)."""
    return helpers.wait_until(predicate, timeout, what, interval)


def _die_with_parent() -> None:
    """SIGTERM when pytest dies (even by SIGKILL): no daemon outlives an interrupted run."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def fill(template: Path, values: dict[str, str]) -> str:
    """A docs snippet with its ``@NAME@`` placeholders replaced; every one must be used."""
    text = template.read_text()
    for name, value in values.items():
        assert f"@{name}@" in text, f"@{name}@ missing in {template}"
        text = text.replace(f"@{name}@", value)
    assert "@" not in "".join(
        line for line in text.splitlines() if not line.lstrip().startswith(("#", "--"))
    ), f"unfilled placeholder in {template}"
    return text


def uid_processes(uid: int) -> list[tuple[int, str]]:
    """Live processes of ``uid``: (pid, command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z":
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found.append((int(entry), cmd.strip()))
    return found


def run_dirs(uid: int, *roots: Path) -> list[Path]:
    """The proxy's run directories (``libertem-proxy-*``) of ``uid`` below ``roots``."""
    out = []
    for root in roots:
        with contextlib.suppress(OSError):
            for p in root.glob("libertem-proxy-*"):
                with contextlib.suppress(OSError):
                    if p.lstat().st_uid == uid:
                        out.append(p)
    return out


def in_own_netns() -> bool:
    """Only ``lo`` exists: this process runs in a network namespace of its own."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]  # (/sys/class/net is not)


def _require() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (creates a user, starts Slurm)")
    if not in_own_netns():
        problems.append("must run in a network namespace of its own (make test-hpc does that)")
    for p in (
        LIBERTEM_ENV / "bin" / "libertem-server",
        JUPYTER_ENV / "bin" / "jupyterhub",
        JUPYTER_ENV / "bin" / "batchspawner-singleuser",
        CHP,
        Path("/usr/sbin/slurmctld"),
        Path("/usr/sbin/slurmd"),
        Path("/usr/sbin/munged"),
        Path("/etc/profile.d/lmod.sh"),
        Path("/usr/bin/chromium"),
    ):
        if not p.exists():
            problems.append(f"{p} missing (run tests/hpc/setup.sh; .ci/run installs packages)")
    if problems:
        msg = "HPC test not possible here: " + "; ".join(problems)
        if os.environ.get("LTJP_HPC_REQUIRED"):
            pytest.fail(msg)
        pytest.skip(msg)


# ---------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """The running stack, as the test sees it."""

    root: Path
    user: str
    uid: int
    home: Path
    service_token: str
    slurm_env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def hub_api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{HUB}/hub/api/{path.lstrip('/')}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.service_token}"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def server(self) -> dict[str, Any]:
        return self.hub_api("GET", f"users/{self.user}")["servers"].get("", {})

    def slurm(self, *argv: str) -> str:
        return subprocess.run(
            argv, env=self.slurm_env, capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def jobs(self) -> list[str]:
        """Job ids of the test user that Slurm still knows (any state but finished)."""
        return self.slurm("squeue", "-h", "-u", self.user, "-o", "%i").split()

    def processes(self) -> list[tuple[int, str]]:
        return uid_processes(self.uid)

    def run_dirs(self) -> list[Path]:
        return run_dirs(self.uid, Path("/tmp"), Path("/var/tmp"), self.home)

    def log(self, name: str) -> str:
        p = self.logs.get(name)
        return p.read_text(errors="replace") if p and p.exists() else ""

    def save_logs(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for name, p in self.logs.items():
            if p.exists():
                shutil.copy(p, dest / f"{name}.log")
        for p in self.home.glob("jupyterhub_slurmspawner_*.log"):
            shutil.copy(p, dest / p.name)


def _start(
    c: Cluster, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    log = c.root / "log" / f"{name}.out"
    c.logs.setdefault(name, log)
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    c.procs[name] = proc
    return proc


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _create_user(root: Path) -> tuple[str, int, Path]:
    name = "ltjphpc" + secrets.token_hex(3)
    home = root / "home" / name
    home.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash", name],
        check=True,
        capture_output=True,
    )
    return name, pwd.getpwnam(name).pw_uid, home


def _remove_user(name: str, uid: int) -> list[str]:
    killed = [f"{pid}: {cmd}" for pid, cmd in uid_processes(uid)]
    for pid, _ in uid_processes(uid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not uid_processes(uid), 10, "the user's processes to die")
    subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)
    return killed


def _slurm_cgroup_dirs() -> list[Path]:
    """What Slurm (cgroup/v1) created: ``<controller>/slurm_<host>`` and ``slurm``."""
    found = []
    for controller in CGROUP_ROOT.iterdir():
        for name in ("slurm", f"slurm_{os.uname().nodename}"):
            d = controller / name
            if d.is_dir():
                found.append(d)
    return found


def _remove_cgroup_tree(d: Path) -> None:
    """rmdir bottom-up (cgroup directories cannot be removed with their files)."""
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        d.rmdir()


def _start_munge(c: Cluster) -> None:
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    shutil.chown(run, "munge", "munge")
    argv = ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground", "--force"]
    _start(c, "munged", argv, {"PATH": SYSTEM_PATH})

    def ok() -> bool:
        cred = subprocess.run(["munge", "-n"], capture_output=True, check=False)
        if cred.returncode:
            return False
        check = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, check=False)
        return check.returncode == 0

    wait_until(ok, 20, "munged (munge -n | unmunge)")


def _start_slurm(c: Cluster) -> None:
    d = c.root / "slurm"
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir(parents=True)
    shutil.chown(d / "state", "slurm", "slurm")
    shutil.chown(d / "log", "slurm", "slurm")
    node = subprocess.run(
        ["slurmd", "-C"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    host = os.uname().nodename
    (d / "slurm.conf").write_text(
        fill(SNIPPETS / "slurm.conf", {"HOST": host, "DIR": str(d), "NODE": node})
    )
    shutil.copy(SNIPPETS / "cgroup.conf", d / "cgroup.conf")
    os.chmod(d, 0o755)
    c.logs["slurmctld"] = d / "log" / "slurmctld.log"
    c.logs["slurmd"] = d / "log" / "slurmd.log"
    env = c.slurm_env
    _start(c, "slurmctld-out", ["slurmctld", "-D", "-i"], env)
    wait_until(lambda: _quiet(["scontrol", "ping"], env), 30, "slurmctld to answer")
    _start(c, "slurmd-out", ["slurmd", "-D"], env)

    def idle() -> bool:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, check=False
        )
        return out.stdout.strip() == "idle"

    wait_until(idle, 30, "the node to be idle (sinfo)")


def _quiet(argv: list[str], env: dict[str, str]) -> bool:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    return r.returncode == 0 and "DOWN" not in r.stdout


def _start_hub(c: Cluster) -> None:
    hub = c.root / "hub"
    hub.mkdir()
    modules = c.root / "modulefiles"
    (modules / "libertem").mkdir(parents=True)
    (modules / "libertem" / "0.16.0.lua").write_text(
        fill(
            SNIPPETS / "libertem-module.lua",
            {"LIBERTEM_ENV": str(LIBERTEM_ENV), "NUMBA_CACHE_DIR": str(NUMBA_CACHE)},
        )
    )
    wrapper = c.root / "bin" / "libertem-wrapper.sh"
    wrapper.parent.mkdir()
    shutil.copy(SNIPPETS / "libertem-wrapper.sh", wrapper)
    wrapper.chmod(0o755)
    site = hub / "jupyterhub_config_slurm.py"
    site.write_text(
        fill(
            SNIPPETS / "jupyterhub_config_slurm.py",
            {
                "JUPYTER_ENV": str(JUPYTER_ENV),
                "MODULEPATH": str(modules),
                "WRAPPER": str(wrapper),
            },
        )
    )
    for p in (c.root, modules, modules / "libertem", wrapper.parent):
        p.chmod(0o755)
    env = {
        **c.slurm_env,
        "PATH": f"{JUPYTER_ENV / 'bin'}:{SYSTEM_PATH}",
        "HOME": str(hub),
        "LANG": "C.UTF-8",
        "LTJP_HPC_SITE_CONFIG": str(site),
        "LTJP_HPC_SINGLE_NODE_CONFIG": str(SNIPPETS / "jupyterhub_config_single_node.py"),
        "LTJP_HPC_CHP": str(CHP),
        "LTJP_HPC_HUB_DIR": str(hub),
        "LTJP_HPC_PASSWORD": PASSWORD,
        "LTJP_HPC_USER": c.user,
        "LTJP_HPC_SERVICE_TOKEN": c.service_token,
    }
    config = REPO / "tests" / "hpc" / "jupyterhub_config.py"
    proc = _start(
        c, "jupyterhub", [str(JUPYTER_ENV / "bin" / "jupyterhub"), "-f", str(config)], env, cwd=hub
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyterhub exited with {proc.returncode}:\n{c.log('jupyterhub')}")
        try:
            with urllib.request.urlopen(f"{HUB}/hub/api/", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    wait_until(ready, 90, "JupyterHub to answer")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    _require()
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def cluster(artifacts: Path) -> Iterator[Cluster]:
    """munge + Slurm + JupyterHub with batchspawner, a test user; all gone afterwards."""
    _require()
    # not below pytest's 0700 temporary base: the test user must reach its home and the files
    root = Path(tempfile.mkdtemp(prefix="ltjp-hpc-", dir="/tmp"))
    root.chmod(0o755)
    (root / "log").mkdir()
    user, uid, home = _create_user(root)
    slurm_env = {"PATH": SYSTEM_PATH, "SLURM_CONF": str(root / "slurm" / "slurm.conf")}
    c = Cluster(root, user, uid, home, secrets.token_hex(24), slurm_env)
    notes: list[str] = []
    # a new user has no files yet; anything of its uid in /tmp is from an earlier (interrupted)
    # run whose user had the same uid, and would be taken for this run's leftovers
    for stale in c.run_dirs():
        notes.append(f"removed stale {stale}")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        _start_munge(c)
        _start_slurm(c)
        _start_hub(c)
        yield c
    finally:
        if "jupyterhub" in c.procs:
            with contextlib.suppress(Exception):
                c.hub_api("DELETE", f"users/{user}/server")
            _stop(c.procs["jupyterhub"], 60)
        with contextlib.suppress(Exception):
            for job in c.jobs():
                notes.append(f"job {job} still known to Slurm: scancel")
                c.slurm("scancel", job)
        for name in ("slurmd-out", "slurmctld-out", "munged"):
            if name in c.procs:
                _stop(c.procs[name])
        c.save_logs(artifacts / "logs")
        for left in c.run_dirs():  # the test reports them; they must not outlive the user
            notes.append(f"removed {left}")
            shutil.rmtree(left, ignore_errors=True)
        notes += [f"killed {k}" for k in _remove_user(user, uid)]
        for d in _slurm_cgroup_dirs():
            _remove_cgroup_tree(d)
        left = _slurm_cgroup_dirs()
        shutil.rmtree(root, ignore_errors=True)
        if notes or left:
            print("HPC teardown:\n  " + "\n  ".join(notes + [f"left {d}" for d in left]))
