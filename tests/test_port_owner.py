"""The proof that libertem-server's port is its own before anything is sent there (issue 14).

Unit level: decoding /proc/net/tcp{,6} and telling the run's listener from anybody else's.
Proxy level (fake libertem-server): a port held by another process is never talked to, the
start moves to another port, and three squatted ports in a row end in a clear error page.
The same attack from a real second Unix user against the real libertem-server is in
tests/test_shared_machine.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libertem_jupyter_proxy import backend_run, port_owner
from libertem_jupyter_proxy.port_owner import Owner

from .test_lifecycle import navigate

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/net/tcp"), reason="the proof reads Linux's /proc/net/tcp"
)

_LISTENER = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""


def _encode(address: str, port: int) -> str:
    """Write an address the way the kernel prints it in /proc/net/tcp (32-bit host-order words)."""
    raw = ipaddress.ip_address(address).packed
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    return "".join(f"{int.from_bytes(w, sys.byteorder):08X}" for w in words) + f":{port:04X}"


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(min_value=0, max_value=65535),
)
def test_decode_address_inverts_the_kernels_format(address, port):
    decoded, decoded_port = port_owner.decode_address(_encode(str(address), port))
    assert ipaddress.ip_address(decoded) == address
    assert decoded_port == port


def test_netlink_and_proc_agree(listen_elsewhere):
    """Both ways of reading the socket table find the same listeners (sock_diag is the fast
    one; /proc/net/tcp the fallback where netlink is not allowed)."""
    ports = [listen_elsewhere(host)[1] for host in ("127.0.0.1", "0.0.0.0")]
    if socket.has_ipv6:
        ports.append(listen_elsewhere("::")[1])
    ports.append(backend_run.free_port())
    for port in ports:
        fast = port_owner._listeners_netlink(port)
        if fast is None:
            pytest.skip("sock_diag netlink not available here")
        assert sorted(fast, key=repr) == sorted(port_owner.listeners_proc(port), key=repr)


def test_leader_not_holding_the_socket_is_still_group(listen_elsewhere):
    """A wrapper script as group leader, libertem-server below it: the group scan finds it."""
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "sys.argv[1], '127.0.0.1', '0'])",
            _LISTENER,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    try:
        port = int(leader.stdout.readline())
        assert port_owner.check(port, leader.pid).owner is Owner.GROUP
    finally:
        os.killpg(leader.pid, 9)
        leader.wait()


def test_decode_known_lines():
    # as printed on little-endian x86-64
    if sys.byteorder == "little":
        assert port_owner.decode_address("0100007F:1F90") == ("127.0.0.1", 8080)
        assert port_owner.decode_address("0000000000000000FFFF00000100007F:0050") == (
            "::ffff:7f00:1",
            80,
        )
    assert port_owner.decode_address("00000000:0016") == ("0.0.0.0", 22)


@pytest.fixture
def listen_elsewhere() -> Iterator:
    """Start listeners in other processes, each in its own process group."""
    procs: list[subprocess.Popen] = []

    def start(host: str = "127.0.0.1", port: int = 0) -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LISTENER, host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            process_group=0,
        )
        procs.append(proc)
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_nobody_listening():
    port = backend_run.free_port()
    assert port_owner.check(port, os.getpgid(0)).owner is Owner.NONE


def test_own_group_and_foreign_group(listen_elsewhere):
    proc, port = listen_elsewhere()
    assert port_owner.check(port, proc.pid).owner is Owner.GROUP
    verdict = port_owner.check(port, os.getpgid(0))  # our group does not hold it
    assert verdict.owner is Owner.FOREIGN
    assert verdict.foreign[0].uid == os.getuid()
    assert verdict.foreign[0].address == "127.0.0.1"
    assert "uid" in port_owner.describe(verdict)


# "::ffff:0.0.0.0": a dual-stack socket on the v4-mapped wildcard also receives 127.0.0.1
# (red-team finding: such a squatter was not named)
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::ffff:0.0.0.0"])
def test_wildcard_listener_reaches_loopback(listen_elsewhere, host):
    if ":" in host and not socket.has_ipv6:
        pytest.skip("no IPv6")
    _, port = listen_elsewhere(host)
    assert port_owner.check(port, os.getpgid(0)).owner is Owner.FOREIGN


def test_other_loopback_address_does_not_count(listen_elsewhere):
    _, port = listen_elsewhere("127.0.0.2")
    assert port_owner.check(port, os.getpgid(0)).owner is Owner.NONE


def test_one_foreign_listener_among_ours_is_foreign(listen_elsewhere):
    """Ours on 127.0.0.1 and another on :: (possible when ours is IPv4 only): not trusted."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    ours, port = listen_elsewhere("127.0.0.1")
    try:
        _, _ = listen_elsewhere("::", port)
    except ValueError:
        pytest.skip("this kernel refuses :: next to 127.0.0.1 on one port")
    verdict = port_owner.check(port, ours.pid)
    assert verdict.owner is Owner.FOREIGN
    assert [s.address for s in verdict.foreign] == ["::"]


# ---------------------------------------------------------------- through the proxy


class Squatter:
    """A listener in the test process (never in the backend's process group) that never
    accepts: afterwards we can tell whether anybody connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        self.sock.setblocking(False)
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def squatted_ports(monkeypatch) -> Iterator:
    """Make the supervisor's next ``n`` port choices fall on ports squatted beforehand (the
    race of choosing a port and binding it, made deterministic)."""
    squatters: list[Squatter] = []
    real_free_port = backend_run.free_port

    def squat(n: int) -> list[Squatter]:
        new = [Squatter() for _ in range(n)]
        squatters.extend(new)
        queue = [s.port for s in new]
        monkeypatch.setattr(
            backend_run, "free_port", lambda: queue.pop(0) if queue else real_free_port()
        )
        return new

    yield squat
    for s in squatters:
        s.close()


async def test_squatted_port_is_never_talked_to_and_start_moves_on(
    client, supervisor, squatted_ports
):
    (squatter,) = squatted_ports(1)
    r = await navigate(client, supervisor)
    assert r.code == 200, r.body[:300]
    assert supervisor.run.port != squatter.port
    assert supervisor.starts == 2
    assert supervisor.crash_count == 0  # somebody else's doing, not a LiberTEM crash
    assert squatter.connections() == 0  # not even a connection, let alone the token


async def test_three_squatted_ports_give_a_clear_error(client, supervisor, squatted_ports):
    squatters = squatted_ports(3)
    r = await client.fetch("libertem/api/config/", headers={"Accept": "application/json"})
    assert r.code == 502
    data = json.loads(r.body)
    assert data["error"] == "port-squatted"
    assert str(squatters[-1].port) in data["message"]
    assert f"uid {os.getuid()}" in data["message"]
    assert supervisor.starts == 3
    assert supervisor.crash_count == 0
    # a browser gets the page that says so (the next start is squatted three times too)
    squatters += squatted_ports(3)
    r = await navigate(client, supervisor)
    assert r.code == 502
    assert b"Another program took LiberTEM&#39;s port" in r.body
    assert b"not LiberTEM&#39;s key" in r.body
    assert all(s.connections() == 0 for s in squatters)
    # no token directory is left behind by the abandoned starts
    assert not os.path.exists(supervisor.run.tmpdir)
