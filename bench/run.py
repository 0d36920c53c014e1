#!/usr/bin/env python3
"""Benchmark: direct to the backend vs this extension vs jupyter-server-proxy 4.6.0, one run.

The machine has 2 noisy cores, so a lone absolute time means little: every workload is repeated
and the repetitions are interleaved (direct, ours, jsp, then the next repetition in a rotated
order), each figure is the median of its repetitions, and the verdicts use ratios to "direct"
measured in the same run. See bench/README.md for how to read the table.

    python bench/run.py --quick            # < 3 minutes, every metric, smaller sizes
    python bench/run.py                    # full sizes (1 GiB download, 512 MiB upload)
    python bench/run.py --only download    # one workload group, e.g. while optimising
    python bench/run.py --only get_c16 --profile   # + py-spy profile of our Jupyter
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import profiling
import setups
import workloads as w
from report import ROWS, print_table, summarise
from setups import Target

MiB = 1 << 20
TARGETS = ("direct", "ours", "jsp")


@dataclass(frozen=True)
class Plan:
    """Sizes and repetition counts of one mode."""

    reps: int
    duration: float
    download: int
    upload: int
    latency_reps: int
    big_ws_reps: int
    cold_reps: int
    aborts: int


QUICK = Plan(
    reps=3,
    duration=0.6,
    download=256 * MiB,
    upload=128 * MiB,
    latency_reps=7,
    big_ws_reps=1,
    cold_reps=3,
    aborts=200,
)
FULL = Plan(
    reps=5,
    duration=2.0,
    download=1024 * MiB,
    upload=512 * MiB,
    latency_reps=21,
    big_ws_reps=3,
    cold_reps=5,
    aborts=1000,
)


def groups(plan: Plan) -> dict[str, tuple[int, Any]]:
    """Workload group -> (repetitions, measurement taking a Target)."""
    d = plan.duration
    return {
        "get_c1": (plan.reps, lambda t: w.small_gets(t, 1, d)),
        "get_c16": (plan.reps, lambda t: w.small_gets(t, 16, d)),
        "download": (plan.reps, lambda t: w.download(t, plan.download)),
        "ttfb": (plan.latency_reps, lambda t: w.ttfb(t, plan.download)),
        "sse": (plan.latency_reps, lambda t: w.sse_first(t)),
        "upload": (plan.reps, lambda t: w.upload(t, plan.upload)),
        "ws_rt": (plan.reps, lambda t: w.ws_round_trips(t, d)),
        "ws_1mib": (plan.reps, lambda t: w.ws_binary(t, d)),
        "ws_64mib": (plan.big_ws_reps, lambda t: w.ws_big_message(t)),
        "gui": (1, w.gui_first_load),
        "aborts": (1, lambda t: w.aborts(t, plan.aborts)),
        "cold_start": (plan.cold_reps, None),  # special: needs fresh processes
    }


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:120] if text else type(e).__name__


async def measure_once(fn: Any, target: Target, timeout: float) -> dict[str, Any]:
    """One repetition; an error (e.g. jupyter-server-proxy refusing a 1 GiB body) is a result."""
    try:
        return await asyncio.wait_for(fn(target), timeout)
    except Exception as e:  # recorded, never fatal: the other targets still get measured
        return {"error": short_error(e)}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = QUICK if args.quick else FULL
        self.workdir = setups.make_workdir()
        self.targets: dict[str, Target] = {}
        self.client_dir: Path | None = None
        self.jsp_python: Path | None = None
        self.samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.profiles: dict[str, Any] = {}
        self.started = time.time()

    async def start(self, names: list[str]) -> None:
        self.client_dir = setups.ensure_client_dir(log)
        if "jsp" in names:
            self.jsp_python = setups.ensure_jsp_venv(log)
        for name in names:
            log(f"starting {name}")
            if name == "direct":
                target = await setups.start_direct(self.workdir / "direct", self.client_dir)
            else:
                target = await setups.start_jupyter(
                    name, self.workdir / name, self.client_dir, self.jsp_python
                )
                # the first request starts the backend; the warm-up is not measured
                await w.cold_start_proxy(target)
            self.targets[name] = target

    def stop(self) -> None:
        for target in self.targets.values():
            setups.stop(target)
        if not self.args.keep:
            setups.cleanup_dir(self.workdir)

    async def run_group(self, group: str, reps: int, fn: Any) -> None:
        self.samples[group] = {name: [] for name in self.targets}
        names = list(self.targets)
        ours = self.targets.get("ours")
        # one py-spy for all repetitions: short operations (a first byte) would otherwise end
        # before py-spy has attached; while other targets run, our Jupyter only idles
        recorder = (
            profiling.start(ours, group, self.workdir) if self.args.profile and ours else None
        )
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate
            for name in order:
                sample = await measure_once(fn, self.targets[name], timeout=300.0)
                self.samples[group][name].append(sample)
            await asyncio.sleep(0.05)
        if recorder is not None:
            self.profiles[group] = profiling.finish(recorder)
        log(f"{group}: " + ", ".join(f"{n}={brief(self.samples[group][n])}" for n in names))

    async def run_cold_start(self, reps: int) -> None:
        """Direct: spawn -> first 200 of the backend itself. Proxies: a fresh Jupyter per
        repetition (jupyter-server-proxy cannot stop its process and start it again), then the
        time from the first request to its 200."""
        self.samples["cold_start"] = {name: [] for name in self.targets}
        for rep in range(reps):
            for name in self.targets:
                workdir = self.workdir / f"cold-{name}-{rep}"
                try:
                    if name == "direct":
                        workdir.mkdir(parents=True)
                        sample = await w.cold_start_direct(workdir, self.client_dir)
                    else:
                        fresh = await setups.start_jupyter(
                            name, workdir, self.client_dir, self.jsp_python
                        )
                        try:
                            await asyncio.sleep(0.3)  # let Jupyter finish its own start-up work
                            sample = await asyncio.wait_for(w.cold_start_proxy(fresh), 120)
                        finally:
                            setups.stop(fresh)
                except Exception as e:
                    sample = {"error": short_error(e)}
                self.samples["cold_start"][name].append(sample)
        log(
            "cold_start: "
            + ", ".join(f"{n}={brief(s)}" for n, s in self.samples["cold_start"].items())
        )

    async def run(self) -> dict[str, Any]:
        plan_groups = groups(self.plan)
        selected = self.args.only or list(plan_groups)
        unknown = [g for g in selected if g not in plan_groups]
        if unknown:
            raise SystemExit(f"unknown group(s) {unknown}; choose from {list(plan_groups)}")
        names = [t for t in TARGETS if t not in self.args.skip]
        try:
            await self.start(names)
            for group in selected:
                reps, fn = plan_groups[group]
                if group == "cold_start":
                    await self.run_cold_start(reps)
                else:
                    await self.run_group(group, reps, fn)
        finally:
            self.stop()
        return self.result()

    def result(self) -> dict[str, Any]:
        started = self.started
        return {
            "meta": {
                "mode": "quick" if self.args.quick else "full",
                "plan": self.plan.__dict__,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "seconds": round(time.time() - started, 1),
                "python": platform.python_version(),
                "cpus": __import__("os").cpu_count(),
                "client_dir": str(self.client_dir) if self.client_dir else None,
                "jsp_version": setups.JSP_VERSION,
                "git": git_state(),
            },
            "rows": summarise(self.samples),
            "samples": self.samples,
            "profiles": self.profiles,
        }


def git_state() -> dict[str, Any]:
    """Which code was measured: the commit and any uncommitted change to the extension."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(setups.REPO), *args], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": git("status", "--porcelain", "--", "libertem_jupyter_proxy").splitlines(),
    }


def brief(samples: list[dict[str, Any]]) -> str:
    """The first numeric field's median, or the first error, for the progress log."""
    for s in samples:
        if "error" in s:
            return f"ERR({s['error'][:40]})"
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))] if samples else []
    if not keys:
        return "-"
    values = [s[keys[0]] for s in samples if isinstance(s.get(keys[0]), (int, float))]
    return f"{keys[0]}={statistics.median(values):.4g}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    p.add_argument(
        "--only",
        action="append",
        metavar="GROUP",
        help="run only this workload group (repeatable): " + ", ".join(groups(QUICK)),
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=TARGETS,
        help="leave a target out (e.g. --skip jsp while iterating)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy record our Jupyter during each group (raw stacks in bench/results/profiles)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="directory for the JSON result (default bench/results)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    return p.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM: unwind like Ctrl-C, so the Jupyters and backends we started are stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(args)
    code = 0
    try:
        result = asyncio.run(bench.run())
    except KeyboardInterrupt:
        log("interrupted: writing what was measured so far")
        result, code = bench.result(), 130
    except Exception:
        traceback.print_exc()
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{result['meta']['mode']}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print_table(result, ROWS)
    if result["profiles"]:
        profiling.print_summary(result["profiles"])
    print(f"\nJSON: {path}  ({result['meta']['seconds']} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
