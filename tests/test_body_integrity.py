"""Body integrity, generated: whatever the size, chunking, speeds, framing and transport, the
bytes that arrive have the sender's sha256, or the failure is visible to the receiver (never a
200 with wrong bytes), and ``requests_in_flight`` is back to 0 after each case.

``hypothesis`` draws: direction (upload, download), size (0 B .. 16 MiB; the 64 MiB cases are
fixed examples, few on purpose), piece size, client and backend pauses, Content-Length or
chunked, ``Expect: 100-continue``, and a backend that dies mid-body. Downloads of a known
length over plain HTTP take the splice path; chunked ones and everything under Jupyter's TLS
take the streaming path: the rig runs both transports.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from . import jupyter_rig, scripts
from .helpers import settled
from .jupyter_rig import Rig
from .raw_backend import pattern
from .raw_http import chunked

rig = jupyter_rig.rig  # the fixtures
tls_files = jupyter_rig.tls_files

KiB = 1024
MiB = 1024 * KiB
MAX_EXAMPLES = int(os.environ.get("LJP_INTEGRITY_EXAMPLES", "25"))  # per transport


@dataclass(frozen=True)
class Case:
    upload: bool
    size: int
    piece: int
    client_pause: float
    backend_pause: float
    chunked: bool
    expect: bool
    cut: int | None  # the backend dies after this many body bytes

    def __repr__(self) -> str:
        return "Case(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


@st.composite
def cases(draw: st.DrawFn) -> Case:
    upload = draw(st.booleans())
    size = draw(
        st.one_of(st.integers(0, 64 * KiB), st.integers(64 * KiB, 4 * MiB), st.just(16 * MiB))
    )
    # no more than ~2000 pieces, so a case stays quick
    piece = draw(st.integers(max(1, size // 2000), max(1, min(size, 512 * KiB))))
    pieces = -(-size // piece) if size else 0
    slow_ok = pieces <= 50  # pauses only where they cost little time
    client_pause = draw(st.sampled_from([0.0, 0.002])) if slow_ok else 0.0
    backend_pause = draw(st.sampled_from([0.0, 0.002])) if slow_ok else 0.0
    framing = draw(st.booleans())
    expect = upload and size > 0 and not framing and draw(st.booleans())
    cut = None
    if size > 1 and draw(st.integers(0, 5)) == 0:
        cut = draw(st.integers(0, size - 1))
    return Case(upload, size, piece, client_pause, backend_pause, framing, expect, cut)


async def check_case(rig: Rig, case: Case, seed: int) -> None:
    sid = scripts.new_id()
    if case.upload:
        data = pattern(seed, case.size)
        pieces = [data[i : i + case.piece] for i in range(0, case.size, case.piece)]
        ok = scripts.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if case.cut is not None:
            # the backend reads part of the body, then dies
            steps: list[Any] = [["sleep", case.backend_pause], ["close"]]
        else:
            steps = [["read_body_slow", max(case.piece, 64 * KiB), case.backend_pause], ok]
        h: list[tuple[str, Any]] = [scripts.header(steps, sid)]
        if case.chunked:
            h.append(("Transfer-Encoding", "chunked"))
            body = chunked(pieces)
        else:
            h.append(("Content-Length", str(case.size)))
            body = pieces
        if case.expect:
            h.append(("Expect", "100-continue"))
        resp, _ = await rig.proxied("PUT", "upload", h, body, pause=case.client_pause)
        if resp.status == 200:
            rec = await rig.record(sid)
            assert rec["body_len"] == case.size, (rec, case)
            assert rec["body_sha256"] == hashlib.sha256(data).hexdigest(), case
            assert case.cut is None, "a backend that died answered 200?"
        else:
            assert case.cut is not None, (resp.status, resp.body[:300], case)
            assert resp.status in (502, 503, 504) or resp.truncated, resp
    else:
        framing = "chunked" if case.chunked else "length"
        head = [("Content-Type", "application/octet-stream")]
        head.append(
            ("Transfer-Encoding", "chunked") if case.chunked else ("Content-Length", str(case.size))
        )
        steps = [
            scripts.send(scripts.response_head("200 OK", head)),  # type: ignore[arg-type]
            ["body", seed, case.size, case.piece, case.backend_pause, framing, False, case.cut],
        ]
        resp, _ = await rig.proxied(
            "GET", "download", [scripts.header(steps, sid)], pause=case.client_pause
        )
        if case.cut is not None and resp.status != 200:
            assert resp.status == 502, (resp.status, resp.body[:300])  # said before the body
        else:
            assert resp.status == 200, (resp.status, resp.body[:300])
        if case.cut is None:
            assert not resp.truncated, case
            assert len(resp.body) == case.size
            assert hashlib.sha256(resp.body).hexdigest() == scripts.sha(seed, case.size), case
        elif resp.status == 200:
            # the only acceptable outcome: the receiver can see that the body is broken
            assert resp.truncated or len(resp.body) != case.size, case
    await settled(rig.supervisor)


BIG = 64 * MiB


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases(), seed=st.integers(0, 2**20))
# the 64 MiB cases: few, fixed (an upload chunked with Expect-free framing and a slow backend
# read, a download of known length: the splice path over plain HTTP)
@example(case=Case(True, BIG, 1 * MiB, 0.0, 0.0, True, False, None), seed=1)
@example(case=Case(False, BIG, 1 * MiB, 0.0, 0.0, False, False, None), seed=2)
def _run(rig: Rig, io_loop: Any, ran: list[Case], case: Case, seed: int) -> None:
    ran.append(case)
    io_loop.run_sync(lambda: check_case(rig, case, seed), timeout=120)


def test_body_integrity(rig: Rig, io_loop: Any) -> None:
    """Generated uploads and downloads arrive whole or visibly broken, plain and TLS."""
    ran: list[Case] = []
    _run(rig, io_loop, ran)
    print(f"test_body_integrity[{rig.scheme}]: {len(ran)} generated cases")
