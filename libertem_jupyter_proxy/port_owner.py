"""Prove that the socket listening on 127.0.0.1:<port> belongs to libertem-server's process group.

Why: the port is chosen before libertem-server binds it (it needs 1-4 s of imports first) and it
is on libertem-server's command line, which every user of the machine can read in
``/proc/<pid>/cmdline``. Another user who binds that port first would receive the readiness
probe - with the secret ``X-Api-Key`` - and could serve HTML under Jupyter's origin. So the
proxy must not send anything to the port before it knows whose socket is listening there.

How (Linux): the kernel's socket table - asked through sock_diag(7) netlink, or read from
``/proc/net/tcp`` and ``/proc/net/tcp6`` where that is not allowed - lists every socket of the
network namespace with its state, local address, owner uid and inode number (proc(5)).
``/proc/<pid>/fd/<n>`` of a process is a symlink ``socket:[<inode>]`` for each socket it holds,
readable only for processes of our own uid. The port is trusted when *every* listening socket
that a connection to ``127.0.0.1:<port>`` could reach (bound to ``127.0.0.1``, ``0.0.0.0``,
``::`` or ``::ffff:127.0.0.1``) is an open file of a live member of the run's process group.
Another uid cannot hold such an fd, cannot join our process group (``setpgid(2)`` only works
within one session and for one's own children) and cannot share the port with our listener
(``SO_REUSEPORT`` requires the same effective uid, socket(7)). After the proof, the kernel keeps
the port ours for as long as libertem-server keeps the socket open.

Without ``/proc/net/tcp`` (macOS, BSD) there is nothing to read: :func:`check` answers
:attr:`Owner.UNVERIFIABLE` and the caller decides (the supervisor logs a warning and proceeds,
as documented in docs/security.rst).
"""

from __future__ import annotations

import enum
import ipaddress
import os
import pwd
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import BackendError
from .guard import group_members

__all__ = [
    "Listener",
    "Owner",
    "PortSquatted",
    "Verdict",
    "check",
    "listeners",
    "squatted_error",
]

_PROC_NET = ("/proc/net/tcp", "/proc/net/tcp6")
_LISTEN = "0A"  # TCP_LISTEN in include/net/tcp_states.h, as /proc/net/tcp prints it

# Local addresses whose listener receives a connection to 127.0.0.1 (":: " only when the socket
# is dual-stack, which /proc does not show: counted to be safe).
_REACHES_LOOPBACK = frozenset(
    {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("0.0.0.0"),
        ipaddress.ip_address("::"),
        ipaddress.ip_address("::ffff:127.0.0.1"),
        # a dual-stack socket bound to the v4-mapped wildcard also receives 127.0.0.1
        ipaddress.ip_address("::ffff:0.0.0.0"),
    }
)


class Owner(enum.Enum):
    NONE = "none"  # nobody listens on the port yet: keep waiting
    GROUP = "group"  # every listener that 127.0.0.1:<port> reaches is held by the group
    FOREIGN = "foreign"  # at least one of them is not: never talk to the port
    UNVERIFIABLE = "unverifiable"  # no /proc/net/tcp on this system


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket as /proc/net/tcp{,6} shows it."""

    address: str  # the local address it is bound to, e.g. "127.0.0.1" or "::"
    port: int
    uid: int  # the uid that created the socket
    inode: int  # the socket's inode number (``socket:[inode]`` in /proc/<pid>/fd)


@dataclass(frozen=True)
class Verdict:
    owner: Owner
    foreign: list[Listener] = field(default_factory=list)


def decode_address(text: str) -> tuple[str, int]:
    """``"0100007F:1F90"`` -> ``("127.0.0.1", 8080)``.

    The kernel prints the address as 32-bit words in host byte order (``%08X`` of the raw
    ``__be32``/``in6_addr.s6_addr32``), the port as a plain number in hex.
    """
    hexaddr, hexport = text.split(":")
    raw = b"".join(
        int(hexaddr[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hexaddr), 8)
    )
    return str(ipaddress.ip_address(raw)), int(hexport, 16)


def _parse(lines: Iterable[str], port: int) -> list[Listener]:
    found = []
    for line in lines:
        fields = line.split()
        # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        try:
            address, lport = decode_address(fields[1])
        except ValueError:
            continue
        if lport != port or not _reaches(address):
            continue
        found.append(Listener(address, lport, int(fields[7]), int(fields[9])))
    return found


# sock_diag(7): the kernel's socket table, filtered in the kernel (what ss(8) uses)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCPF_LISTEN = 1 << 10
_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2 without its inet_diag_sockid
_SOCKID = struct.Struct("!HH16s16s")  # ports and addresses in network order (then if, cookie)
_SOCKID_SIZE = _SOCKID.size + 12
_MSG_HEAD = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode


def _listeners_netlink(port: int) -> list[Listener] | None:
    """Listening TCP sockets on ``port`` through sock_diag; None if that is not available.

    Why not only /proc/net/tcp: reading it makes the kernel format every TCP socket of the
    host (measured: ~55 ms for 1,100 sockets on a busy 2-core test machine, so seconds on a
    login node), while a sock_diag dump of listeners with a source port only walks the
    listening hash (inet_diag_dump_icsk filters ``idiag_sport``), well under a millisecond.
    """
    found: list[Listener] = []
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    except (OSError, AttributeError):
        return None
    with sock:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            body = _REQ.pack(family, socket.IPPROTO_TCP, 0, _TCPF_LISTEN)
            body += _SOCKID.pack(port, 0, b"", b"") + bytes(12)
            header = _NLMSGHDR.pack(
                _NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, seq, 0
            )
            try:
                sock.send(header + body)
                done = False
                while not done:
                    data = sock.recv(65536)
                    offset = 0
                    while offset + _NLMSGHDR.size <= len(data):
                        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                        if kind == _NLMSG_DONE:
                            done = True
                            break
                        if kind == _NLMSG_ERROR:
                            if family == socket.AF_INET6:
                                done = True  # no IPv6 in this kernel
                                break
                            return None
                        if kind == _SOCK_DIAG_BY_FAMILY:
                            found.append(_decode_diag(data, offset + _NLMSGHDR.size))
                        if length < _NLMSGHDR.size:
                            return None
                        offset += (length + 3) & ~3
            except OSError:
                return None
    return [sock for sock in found if sock.port == port and _reaches(sock.address)]


def _decode_diag(data: bytes, offset: int) -> Listener:
    fam, _state, _timer, _retrans = _MSG_HEAD.unpack_from(data, offset)
    sport, _dport, src, _dst = _SOCKID.unpack_from(data, offset + _MSG_HEAD.size)
    raw = src[:4] if fam == socket.AF_INET else src
    _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(data, offset + _MSG_HEAD.size + _SOCKID_SIZE)
    return Listener(str(ipaddress.ip_address(raw)), sport, uid, inode)


def _reaches(address: str) -> bool:
    return ipaddress.ip_address(address) in _REACHES_LOOPBACK


def listeners(port: int) -> list[Listener] | None:
    """Listening sockets that a connection to ``127.0.0.1:port`` could reach: from sock_diag,
    else from /proc/net/tcp{,6}; None if neither exists (not Linux). Raises nothing."""
    fast = _listeners_netlink(port)
    if fast is not None:
        return fast
    return listeners_proc(port)


def listeners_proc(port: int) -> list[Listener] | None:
    """:func:`listeners` from /proc/net/tcp{,6} (the slow path, also for tests)."""
    found: list[Listener] = []
    readable = False
    for path in _PROC_NET:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                next(f, None)  # the header line
                found.extend(_parse(f, port))
            readable = True
        except OSError:  # no IPv6 (tcp6 missing), or no /proc at all
            continue
    return found if readable else None


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """Inodes of the sockets the processes ``pids`` hold open (those we may inspect)."""
    inodes: set[int] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:  # gone, or not ours
            continue
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def check(port: int, pgid: int) -> Verdict:
    """Who listens on ``127.0.0.1:port``: nobody yet, process group ``pgid``, or someone else.

    Cost: one sock_diag query (about a millisecond); once something listens, also a look at
    the group leader's fds, and only if the socket is not there a scan of /proc for the rest
    of the group.
    """
    found = listeners(port)
    if found is None:
        return Verdict(Owner.UNVERIFIABLE)
    if not found:
        return Verdict(Owner.NONE)
    # the group leader (libertem-server itself) normally holds the listener: look there first,
    # and scan /proc for the rest of the group (tens of ms on a busy host) only if needed
    ours = socket_inodes([pgid])
    if any(sock.inode not in ours for sock in found):
        ours |= socket_inodes(group_members(pgid))
    foreign = [sock for sock in found if sock.inode not in ours]
    return Verdict(Owner.FOREIGN, foreign) if foreign else Verdict(Owner.GROUP)


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def describe(verdict: Verdict) -> str:
    """Who holds the foreign listeners, for the log and the error page."""
    owners = sorted({s.uid for s in verdict.foreign})
    return ", ".join(_user(uid) for uid in owners) or "an unknown process"


class PortSquatted(BackendError):
    """Someone else listens on the run's port: the run must be abandoned, nothing sent."""

    def __init__(self, port: int, verdict: Verdict) -> None:
        self.port = port
        self.verdict = verdict
        super().__init__(
            "port-squatted",
            f"Another program ({describe(verdict)}) was listening on port {port}, the port "
            "chosen for LiberTEM, before LiberTEM could use it.",
        )


def squatted_error(port: int, verdict: Verdict, attempts: int) -> BackendError:
    """The error page when every port tried was taken by another program first."""
    return BackendError(
        "port-squatted",
        f"Another program ({describe(verdict)}) was listening on port {port}, the port chosen "
        f"for LiberTEM, before LiberTEM could use it; the same happened on {attempts} ports in "
        "a row. Nothing was sent to that program (in particular not LiberTEM's key).",
        hint="On a machine shared with other people, another user may be trying to intercept "
        "LiberTEM: tell your administrator the user named here. Otherwise, a program that binds "
        "ports at random may be running; press Retry.",
    )
