"""Another user of the machine attacks the real libertem-server and its dask cluster (issue 14).

The test creates a real second Unix user (``useradd``; removed afterwards) and runs the
attacker's code as that uid: a Python subprocess started as root imports what it needs, then
drops to the attacker's uid, gid and no supplementary groups (``setresuid``: no capabilities
are left) and only then attacks. It must not be able to

- get LiberTEM's token by binding libertem-server's port before libertem-server does (the port
  is on the world-readable command line),
- run code on the local dask cluster LiberTEM starts (plain ``tcp://``, or ``tls://`` with keys
  of its own),
- read the run's private directory (token, TLS keys, dask scratch space) or any secret on the
  world-readable command lines,
- signal LiberTEM's processes,

while the owner's cluster keeps working (LiberTEM's own client connects over TLS; the owner runs
code on the workers with the run's keys) and "Connect to existing cluster" to a plain
``tcp://`` scheduler still works. Needs root (to create the user); marked slow.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

from libertem_jupyter_proxy import process

from .test_lifecycle import navigate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating a second user needs root"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="no useradd"),
    pytest.mark.skipif(shutil.which("libertem-server") is None, reason="LiberTEM not installed"),
    pytest.mark.proxy_config(command=[], start_timeout=120.0, stop_timeout=10.0),
]

# Runs as root up to the privilege drop: everything the attack needs must be imported before,
# because the interpreter's own files may be unreadable for the attacker (/root is 0700).
_PRELUDE = """
import faulthandler, json, os, select, signal, socket, sys, time, urllib.error, urllib.request
faulthandler.dump_traceback_later(240, exit=True)  # a hang shows where, in stderr
uid, gid, home = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
want_dask, args = sys.argv[4] == "1", json.loads(sys.argv[5])
if want_dask:
    import asyncio
    import distributed, distributed.comm.tcp, distributed.security
    from distributed import Client
    from distributed.comm import connect
    from distributed.security import Security
    STRANGER = Security.temporary()  # the attacker's own CA, certificate and key
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
os.environ["HOME"] = home
os.chdir(home)
def report(**kw):
    print(json.dumps(kw), flush=True)
with open("/proc/self/status") as f:
    caps = [l.split()[1] for l in f if l.startswith("CapEff")]
report(uid=os.getuid(), euid=os.geteuid(), groups=os.getgroups(), cap_eff=caps[0])
"""

_SQUAT = """
# Find libertem-server's port on its command line and bind it before libertem-server does.
deadline = time.monotonic() + args["timeout"]
report(state="watching")
port = None
while port is None and time.monotonic() < deadline:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\\0")
        except OSError:
            continue
        if not any(a.startswith("--token-path=" + args["marker"]) for a in argv):
            continue
        port = next(int(a[7:]) for a in argv if a.startswith("--port="))
        break
if port is None:
    report(state="not found")
    sys.exit(0)
srv = socket.socket()
try:
    srv.bind(("127.0.0.1", port))
except OSError as e:
    report(state="too late", port=port, error=str(e))
    sys.exit(0)
srv.listen(16)
report(state="squatted", port=port)
connections, got = 0, b""
while True:  # serve until the test closes our stdin
    ready, _, _ = select.select([srv, sys.stdin], [], [])
    if sys.stdin in ready and not sys.stdin.read(1):
        break
    if srv in ready:
        conn, _ = srv.accept()
        connections += 1
        conn.settimeout(2)
        try:
            got += conn.recv(65536)
        except OSError:
            pass
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 12\\r\\n\\r\\n<h1>evil</h1>")
        conn.close()
report(state="done", connections=connections, received=got.decode(errors="replace"))
"""

_PROBE = """
def probe(address, conn_args):
    # one dask comm to ``address``, asking its identity: what any client (or attacker) does
    # first; an answer means the port would also take "run" and execute code
    async def go():
        comm = await connect(address, timeout=4, **conn_args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return "ANSWERED " + repr(await asyncio.wait_for(comm.read(), 4))[:300]
        finally:
            comm.abort()
    try:
        return asyncio.run(asyncio.wait_for(go(), 10))  # an HTTP port never answers
    except BaseException as e:
        return f"{type(e).__name__}: {e}"[:300]
"""

_CLUSTER = (
    _PROBE
    + """
# Every listening port of LiberTEM's process group, as plain tcp and as tls with keys of our
# own; the scheduler also with a full Client.run; then LiberTEM's private files and processes.
stranger = STRANGER.get_connection_args("client")
for port in args["ports"]:
    report(port=port, tcp=probe(f"tcp://127.0.0.1:{port}", {}),
           tls=probe(f"tls://127.0.0.1:{port}", stranger))
for port in args["schedulers"]:
    for address, kw in ((f"tcp://127.0.0.1:{port}", {}),
                        (f"tls://127.0.0.1:{port}", {"security": STRANGER})):
        try:
            with Client(address, timeout=6, **kw) as c:  # only on the scheduler port
                outcome = "RAN " + repr(c.run(os.getpid))
        except BaseException as e:
            outcome = f"{type(e).__name__}: {e}"[:300]
        report(client=address, outcome=outcome)
for path in args["paths"]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").read()
        report(path=path, result="READ")
    except OSError as e:
        report(path=path, result=type(e).__name__)
for pid in args["pids"]:
    for what, fn in (("kill", lambda: os.kill(pid, signal.SIGTERM)),
                     ("environ", lambda: open(f"/proc/{pid}/environ", "rb").read())):
        try:
            fn()
            report(pid=pid, what=what, result="DONE")
        except OSError as e:
            report(pid=pid, what=what, result=type(e).__name__)
    if pid == args.get("pgid"):  # the group as a whole, through its leader's id
        try:
            os.killpg(pid, signal.SIGTERM)
            report(pid=pid, what="killpg", result="DONE")
        except OSError as e:
            report(pid=pid, what="killpg", result=type(e).__name__)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            report(pid=pid, what="cmdline", result=f.read().decode(errors="replace"))
    except OSError as e:
        report(pid=pid, what="cmdline", result=type(e).__name__)
for port in args["http_ports"]:
    for path in ("health", "proxy/8786/127.0.0.1/status", "info/main/workers.html"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=5) as r:
                report(http=port, path=path, status=r.status)
        except urllib.error.HTTPError as e:
            report(http=port, path=path, status=e.code)
        except OSError as e:
            report(http=port, path=path, status=type(e).__name__)
"""
)

_OWNER = (
    "import asyncio, json, os, sys\n"
    "from distributed import Client\n"
    "from distributed.comm import connect\n"
    "from distributed.security import Security\n"
    + _PROBE
    + """
security = Security(require_encryption=True, tls_ca_file=sys.argv[1], tls_client_cert=sys.argv[2],
                    tls_client_key=sys.argv[3])
for port in json.loads(sys.argv[4]):
    answer = probe(f"tls://127.0.0.1:{port}", security.get_connection_args("client"))
    if "'Scheduler'" in answer:
        with Client(f"tls://127.0.0.1:{port}", security=security, timeout=10) as c:
            print(json.dumps({"scheduler": port, "ran": sorted(c.run(os.getpid).values())}))
"""
)

# what a refused dask connection looks like (anything else, e.g. an ImportError after the
# privilege drop, would make a "refused" meaningless)
_REFUSALS = (
    "OSError",
    "TimeoutError",
    "CommClosedError",
    "FatalCommClosedError",
    "StreamClosedError",
    "SSLError",
)


@dataclass
class OtherUser:
    name: str
    uid: int
    gid: int
    home: str

    def start(self, code: str, args: dict[str, Any], dask: bool = False) -> subprocess.Popen:
        """Run ``code`` as this user (after the prelude's privilege drop)."""
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                _PRELUDE + code,
                str(self.uid),
                str(self.gid),
                self.home,
                "1" if dask else "0",
                json.dumps(args),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin", "HOME": self.home, "PYTHONDONTWRITEBYTECODE": "1"},
            cwd="/",
        )

    @staticmethod
    def read_reports(proc: subprocess.Popen) -> list[dict[str, Any]]:
        if proc.stdin is not None:
            proc.stdin.close()
            proc.stdin = None  # communicate() must not flush it again
        out, err = proc.communicate(timeout=300)
        reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert reports, f"attacker printed nothing; stderr:\n{err[-3000:]}"
        if proc.returncode != 0:  # shown with any failed assertion on the reports
            reports.append({"exit": proc.returncode, "stderr": err[-3000:]})
        return reports


def _check_identity(report: dict[str, Any], user: OtherUser) -> None:
    """The attacker really ran as the other user, without privileges."""
    assert report["uid"] == report["euid"] == user.uid
    assert report["groups"] == []
    assert int(report["cap_eff"], 16) == 0


@pytest.fixture(scope="module")
def other_user() -> Iterator[OtherUser]:
    name = f"ltjp-x{secrets.token_hex(4)}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
    )
    try:
        pw = pwd.getpwnam(name)
        home = tempfile.mkdtemp(prefix="ltjp-attacker-")
        os.chown(home, pw.pw_uid, pw.pw_gid)
        yield OtherUser(name, pw.pw_uid, pw.pw_gid, home)
    finally:
        for p in psutil.process_iter(["uids"]):  # only processes of the user made here
            if p.info["uids"] and p.info["uids"].real == pwd.getpwnam(name).pw_uid:
                p.kill()
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run(["userdel", name], check=True)


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch, jp_dirs: Any) -> Iterator[str]:
    """Run directories under a world-traversable parent (like /tmp on a real machine), so only
    the run directory's own 0700 protects them."""
    parent = tempfile.mkdtemp(prefix="ltjp-shared-", dir="/tmp")
    os.chmod(parent, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", parent)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def _group_listeners(pgid: int) -> list[tuple[int, int, str]]:
    """(pid, port, address) of every loopback-reachable TCP listener of the process group."""
    members = set(process.group_members(pgid))
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in members:
            if c.laddr.ip in ("0.0.0.0", "127.0.0.1", "::", "::ffff:127.0.0.1"):
                found.append((c.pid, c.laddr.port, c.laddr.ip))
    return found


async def _connect(client: Any, connection: dict[str, Any]) -> dict[str, Any]:
    r = await client.fetch(
        "libertem/api/config/connection/",
        method="PUT",
        body=json.dumps({"connection": connection}),
        headers={"Content-Type": "application/json"},
        request_timeout=180,
    )
    assert r.code == 200, r.body[:1000]
    return json.loads(r.body)


async def test_squatting_the_port_gets_no_token(client, supervisor, other_user, shared_tmp):
    attacker = other_user.start(_SQUAT, {"marker": shared_tmp + "/", "timeout": 120})
    try:
        assert attacker.stdout is not None
        _check_identity(json.loads(attacker.stdout.readline()), other_user)
        assert json.loads(attacker.stdout.readline())["state"] == "watching"
        r = await navigate(client, supervisor)
        assert r.code == 200, r.body[:500]
        assert b"evil" not in r.body
        assert b"LiberTEM" in r.body
        cfg = await client.json("libertem/api/config/")  # the real one answers
        assert cfg["status"] == "ok"
    finally:
        reports = OtherUser.read_reports(attacker)
    states = {rep.get("state"): rep for rep in reports}
    # the attack did happen as meant: the port was the attacker's before libertem-server bound it
    assert "squatted" in states, reports
    squatted_port = states["squatted"]["port"]
    assert states["done"]["connections"] == 0, states["done"]
    assert supervisor.starts == 2  # the first start was abandoned, the second on a new port
    assert supervisor.run.port != squatted_port
    assert supervisor.crash_count == 0


async def test_other_user_cannot_use_read_or_signal_the_cluster(
    client, supervisor, other_user, shared_tmp
):
    # the other user prepares dask's scratch space in the shared temporary directory before the
    # cluster exists: dask would accept it and put the scheduler's work directory, first on
    # every worker's sys.path, inside it (red-team finding: code execution as the owner)
    prepared = os.path.join(os.environ["TMPDIR"], "dask-scratch-space")
    os.mkdir(prepared)
    os.chown(prepared, other_user.uid, other_user.gid)
    os.chmod(prepared, 0o777)
    r = await navigate(client, supervisor)
    assert r.code == 200, r.body[:500]
    run = supervisor.run
    # the GUI's "Connect" with a local cluster: LiberTEM's own client joins it over TLS
    answer = await _connect(client, {"type": "LOCAL", "numWorkers": 1, "cudas": {}})
    assert answer["status"] == "ok", answer
    assert os.listdir(prepared) == []  # nothing of the cluster went into the prepared directory
    assert os.path.isdir(os.path.join(run.tmpdir, "dask-scratch-space"))  # it is in the run's

    listeners = _group_listeners(run.pid)
    ports = sorted({port for _pid, port, _ip in listeners if port != run.port})
    assert len(ports) >= 3, listeners  # scheduler, nanny and worker at least
    tls_dir = os.path.join(run.tmpdir, "dask-tls")

    # the owner, holding the run's keys, finds the scheduler and runs code on the workers
    def owner() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-c",
                _OWNER,
                f"{tls_dir}/ca.pem",
                f"{tls_dir}/cluster.pem",
                f"{tls_dir}/cluster-key.pem",
                json.dumps(ports),
            ],
            env={k: v for k, v in os.environ.items() if not k.startswith("DASK_")},
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = await asyncio.get_running_loop().run_in_executor(None, owner)
    found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(found) == 1, (done.stdout, done.stderr[-3000:], listeners)
    scheduler_port = found[0]["scheduler"]
    worker_pids = set(process.group_members(run.pid))
    assert found[0]["ran"] and set(found[0]["ran"]) <= worker_pids

    token_path = os.path.join(run.tmpdir, "token")
    attacker = other_user.start(
        _CLUSTER,
        {
            "ports": ports,
            "paths": [
                run.tmpdir,
                token_path,
                os.path.join(tls_dir, "cluster-key.pem"),
                os.path.join(run.tmpdir, "dask-worker-space"),
            ],
            "pids": sorted(worker_pids),
            "http_ports": ports,
            "schedulers": [scheduler_port],
            "pgid": run.pid,
        },
        dask=True,
    )
    reports = await asyncio.get_running_loop().run_in_executor(
        None, OtherUser.read_reports, attacker
    )
    _check_identity(reports[0], other_user)
    tried = [rep for rep in reports if "tcp" in rep]
    assert sorted(rep["port"] for rep in tried) == ports
    for rep in tried:
        for scheme in ("tcp", "tls"):
            outcome = rep[scheme]
            assert not outcome.startswith("ANSWERED"), rep
            assert outcome.split(":")[0] in _REFUSALS, rep
    clients = [rep for rep in reports if "client" in rep]
    assert len(clients) == 2
    for rep in clients:
        assert rep["outcome"].split(":")[0] in _REFUSALS, rep
    files = [rep for rep in reports if "path" in rep and "result" in rep]
    assert len(files) == 4
    assert all(rep["result"] == "PermissionError" for rep in files), files
    sigs = [rep for rep in reports if rep.get("what") in ("kill", "killpg", "environ")]
    assert {rep["what"] for rep in sigs} == {"kill", "killpg", "environ"}
    assert all(rep["result"] == "PermissionError" for rep in sigs), sigs
    cmdlines = [rep["result"] for rep in reports if rep.get("what") == "cmdline"]
    assert cmdlines and all(run.token not in c for c in cmdlines)
    assert all("BEGIN" not in c for c in cmdlines)  # no key material either
    # the dashboard (read-only, reachable by everyone) lost its proxy route
    http = [rep for rep in reports if "http" in rep]
    dashboards = {rep["http"] for rep in http if rep["path"] == "health" and rep["status"] == 200}
    assert dashboards, http
    for rep in http:
        if rep["http"] in dashboards and rep["path"] != "health":
            assert rep["status"] == 404, rep

    # LiberTEM survived all of it
    assert not run.exited.is_set()
    assert all(psutil.pid_exists(pid) for pid in worker_pids)
    cfg = await client.json("libertem/api/config/")
    assert cfg["status"] == "ok"


async def test_connect_to_existing_plain_tcp_cluster_still_works(
    client, supervisor, other_user, shared_tmp
):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    scheduler = subprocess.Popen(  # noqa: ASYNC220
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host=127.0.0.1",
            "--port=0",
            "--no-dashboard",
            "--no-show",
        ],
        env=clean,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    worker = None
    try:
        assert scheduler.stderr is not None
        address = next(
            line.split("Scheduler at:")[1].strip()
            for line in scheduler.stderr
            if "Scheduler at:" in line
        )
        assert address.startswith("tcp://127.0.0.1:")
        worker = subprocess.Popen(  # noqa: ASYNC220
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nthreads=1",
                "--no-nanny",
                "--no-dashboard",
                "--host=127.0.0.1",
                "--resources=CPU=1,compute=1,ndarray=1",
            ],
            env=clean,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
        )
        r = await navigate(client, supervisor)
        assert r.code == 200, r.body[:500]
        answer = await _connect(client, {"type": "TCP", "address": address})
        assert answer["status"] == "ok", answer
        # control: the attack code works as the other user where nothing protects a cluster
        # (a plain tcp:// scheduler someone started by hand is open to everyone: not ours)
        attacker = other_user.start(
            _CLUSTER,
            {
                "ports": [int(address.rsplit(":", 1)[1])],
                "schedulers": [int(address.rsplit(":", 1)[1])],
                "paths": [],
                "pids": [],
                "http_ports": [],
            },
            dask=True,
        )
        reports = await asyncio.get_running_loop().run_in_executor(
            None, OtherUser.read_reports, attacker
        )
        _check_identity(reports[0], other_user)
        assert reports[1]["tcp"].startswith("ANSWERED"), reports
        plain = [rep for rep in reports if rep.get("client", "").startswith("tcp://")]
        assert plain and plain[0]["outcome"].startswith("RAN"), reports
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
