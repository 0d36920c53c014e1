"""Optional py-spy profiles of our Jupyter process while a workload group runs (``--profile``).

py-spy samples the Jupyter process from outside (no code change, no restart), so the profile
shows where Jupyter spends its CPU for exactly one workload: tornado, aiohttp, our handlers, or
Jupyter's own per-request work (auth, logging, activity tracking). The raw (collapsed stacks)
output is kept next to the JSON result; the summary lists the functions with the most samples,
by own time and including callees.

Read it with care on a busy 2-core machine: py-spy samples a thread that is runnable but not
running as if it ran, so a process descheduled inside ``send()`` (loopback delivery wakes the
receiver) shows long "own time" in socket writes. psutil's CPU seconds in the table are the
reliable cost; the profile tells where, roughly.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setups import Target


@dataclass
class Recorder:
    proc: subprocess.Popen[bytes] | None
    output: Path
    error: str = ""


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(target: Target, group: str, workdir: Path) -> Recorder:
    output = workdir / f"profile-{group}.txt"
    exe = py_spy()
    if exe is None or target.jupyter is None:
        return Recorder(None, output, "py-spy not found (pip install py-spy)")
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(target.jupyter.pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(output),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return Recorder(proc, output)


def finish(rec: Recorder, top: int = 15) -> dict[str, Any]:
    """Stop py-spy (SIGINT makes it write the file) and summarise the stacks."""
    if rec.proc is None:
        return {"error": rec.error}
    rec.proc.send_signal(signal.SIGINT)
    try:
        _, err = rec.proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        rec.proc.kill()
        return {"error": "py-spy did not stop"}
    if not rec.output.exists():
        return {"error": err.decode(errors="replace")[-300:]}
    keep = Path(__file__).parent / "results" / "profiles"
    keep.mkdir(parents=True, exist_ok=True)
    kept = keep / f"{os.getpid()}-{rec.output.name}"
    shutil.copy(rec.output, kept)
    return summarise(rec.output.read_text(), top) | {"raw": str(kept)}


def _frame(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``module.py:func``."""
    name, _, where = frame.partition(" (")
    file = where.split(":", 1)[0].rsplit("/", 1)[-1]
    return f"{file}:{name}" if file else name


def summarise(raw: str, top: int) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n

    def share(counter: collections.Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, round(100 * c / total, 1)) for name, c in counter.most_common(n)]

    ours = collections.Counter(
        {k: v for k, v in inclusive.items() if k.split(":")[0] in _OUR_FILES}
    )
    # frames on (nearly) every stack are the event loop and Jupyter's start-up: no information
    inclusive = collections.Counter({k: v for k, v in inclusive.items() if v < 0.9 * total})
    idle = own.get("selectors.py:EpollSelector.select", 0)
    return {
        "samples": total,
        "idle_pct": round(100 * idle / total, 1) if total else 0.0,
        "own_pct": share(own, top),
        "inclusive_pct": share(inclusive, top * 2),
        "ours_inclusive_pct": share(ours, top),
    }


_OUR_FILES = {
    "http_proxy.py",
    "ws_proxy.py",
    "base.py",
    "headers.py",
    "security.py",
    "supervisor.py",
}


def print_summary(profiles: dict[str, Any]) -> None:
    for group, prof in profiles.items():
        print(
            f"\n### py-spy, our Jupyter, {group} ({prof.get('samples', 0)} samples, "
            f"{prof.get('idle_pct', 0)}% waiting in epoll)"
        )
        if "error" in prof:
            print(f"  {prof['error']}")
            continue
        if not prof["samples"]:
            print("  no samples: the operation was shorter than py-spy's attach time")
            continue
        print("  own time:       " + "; ".join(f"{n} {p}%" for n, p in prof["own_pct"][:10]))
        print(
            "  incl. (ours):   " + "; ".join(f"{n} {p}%" for n, p in prof["ours_inclusive_pct"][:8])
        )
        print("  incl. (all):    " + "; ".join(f"{n} {p}%" for n, p in prof["inclusive_pct"][:14]))
        print(f"  raw stacks:     {prof['raw']}")
