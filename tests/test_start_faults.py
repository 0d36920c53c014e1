"""Faults injected into a start: whatever fails, the start ends in ``failed`` with a clear
answer, nothing of the run is left behind, and the next start works.

Regression (red-team review): with the local ports exhausted (by another user, or Jupyter out of
file descriptors), ``free_port()`` raised ``OSError`` out of the start; the supervisor stayed in
``starting`` for ever, every later start failed with "invalid backend transition", and the run
directory (token, dask keys) stayed in the temporary directory.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from libertem_jupyter_proxy import backend_run, process


def _run_dirs() -> list[Path]:
    """The proxy's run directories in this test's TMPDIR (conftest points TMPDIR there)."""
    return sorted(Path(os.environ["TMPDIR"]).glob("libertem-proxy-*"))


async def _start(client) -> tuple[int, dict]:
    r = await client.fetch(
        "libertem-proxy/api/start",
        method="POST",
        auth="token",
        body="{}",
        headers={"Content-Type": "application/json"},  # a script, not the error page's form
    )
    return r.code, json.loads(r.body)


async def test_no_free_port_fails_clearly_and_the_next_start_works(client, supervisor, monkeypatch):
    real_free_port = backend_run.free_port

    def exhausted() -> int:
        raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))

    monkeypatch.setattr(backend_run, "free_port", exhausted)
    code, body = await _start(client)
    assert code >= 500, body
    assert "No free TCP port" in json.dumps(body), body
    status = await client.json("libertem-proxy/api/status")
    assert status["state"] == "failed", status
    assert "No free TCP port" in status["last_error"]["message"]
    assert _run_dirs() == []  # token and dask keys removed with the run directory

    monkeypatch.setattr(backend_run, "free_port", real_free_port)  # ports free again
    code, body = await _start(client)
    assert code == 200, body
    assert (await client.json("libertem/api/config/"))["status"] == "ok"


async def test_unexpected_error_while_starting_never_leaves_it_starting(
    client, supervisor, monkeypatch
):
    real_spawn = process.spawn

    async def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(process, "spawn", broken)
    code, body = await _start(client)
    assert code >= 500, body
    assert "injected fault" in json.dumps(body)
    assert supervisor.state.value == "failed"
    assert _run_dirs() == []

    monkeypatch.setattr(process, "spawn", real_spawn)
    code, body = await _start(client)
    assert code == 200, body
    assert (await client.json("libertem/api/config/"))["status"] == "ok"
