"""From repetitions to the table: medians per target, ratios to direct, verdicts on targets.

A target is checked against "ours" (and, for comparison, "jsp"): ratios to direct measured in
the same run, absolute limits only where the issue gives one (RSS growth, CPU ratio), and
"direct + N ms" for latencies.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """One line of the table: ``field`` of the samples of workload ``group``."""

    group: str
    field: str
    label: str
    unit: str
    kind: str = "info"  # info | ratio_min | abs_max | delta_max | pass
    limit: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.group}.{self.field}"

    def target_text(self) -> str:
        return {
            "info": "",
            "ratio_min": f">= {self.limit:g}x",
            "abs_max": f"<= {self.limit:g}",
            "delta_max": f"<= direct+{self.limit:g}",
            "pass": "pass",
        }[self.kind]


ROWS: list[Row] = [
    Row("get_c1", "rps", "small GET c=1", "req/s", "ratio_min", 0.5),
    Row("get_c1", "p50_ms", "  latency p50", "ms"),
    Row("get_c1", "jup_cpu_us", "  Jupyter CPU/req", "us"),
    Row("get_c1", "be_cpu_us", "  backend CPU/req", "us"),
    Row("get_c1", "cpu_ratio", "  Jupyter/backend CPU", "x", "abs_max", 2),
    Row("get_c16", "rps", "small GET c=16", "req/s", "ratio_min", 0.5),
    Row("get_c16", "p50_ms", "  latency p50", "ms"),
    Row("get_c16", "jup_cpu_us", "  Jupyter CPU/req", "us"),
    Row("get_c16", "be_cpu_us", "  backend CPU/req", "us"),
    Row("get_c16", "cpu_ratio", "  Jupyter/backend CPU", "x", "abs_max", 2),
    Row("download", "mib_s", "download", "MiB/s", "ratio_min", 0.8),
    Row("download", "rss_growth_mib", "  Jupyter RSS growth", "MiB", "abs_max", 16),
    Row("download", "jup_cpu_s_per_gib", "  Jupyter CPU/GiB", "s"),
    Row("ttfb", "ms", "download first byte", "ms", "delta_max", 5),
    Row("sse", "ms", "first SSE, Accept */*", "ms", "delta_max", 5),
    Row("upload", "mib_s", "upload", "MiB/s", "ratio_min", 0.7),
    Row("upload", "rss_growth_mib", "  Jupyter RSS growth", "MiB", "abs_max", 16),
    Row("upload", "jup_cpu_s_per_gib", "  Jupyter CPU/GiB", "s"),
    Row("ws_rt", "per_s", "ws 1 KiB round trips", "1/s", "ratio_min", 0.6),
    Row("ws_rt", "jup_cpu_us", "  Jupyter CPU/round trip", "us"),
    Row("ws_1mib", "mib_s", "ws 1 MiB binary echo", "MiB/s", "ratio_min", 0.7),
    Row("ws_1mib", "rss_growth_mib", "  Jupyter RSS growth", "MiB"),
    Row("ws_64mib", "pass", "ws 64 MiB each way", "ok", "pass"),
    Row("ws_64mib", "s", "  time", "s"),
    Row("cold_start", "ms", "cold start to first 200", "ms", "delta_max", 50),
    Row("gui", "wire_kib", "GUI first load, wire", "KiB"),
    Row("gui", "gzip6_kib", "  same, if gzip -6", "KiB"),
    Row("aborts", "fd_growth", "aborts: fd growth", "fds", "abs_max", 2),
    Row("aborts", "task_growth", "  asyncio task growth", "tasks", "abs_max", 0),
    Row("aborts", "rss_growth_mib", "  RSS growth", "MiB", "abs_max", 4),
    Row("aborts", "aborted", "  aborts done", "n"),
    Row("aborts", "hung", "  requests that hung", "n", "abs_max", 0),
    Row("aborts", "healthy_after", "  proxy works after", "ok", "pass"),
]


def median_of(samples: list[dict[str, Any]], field: str) -> tuple[float | None, str | None]:
    """Median of the numeric values; the first error if no repetition produced a value."""
    values = [s[field] for s in samples if isinstance(s.get(field), (int, float))]
    if values:
        return float(statistics.median(values)), None
    errors = [s["error"] for s in samples if "error" in s]
    return None, (errors[0] if errors else None)


def verdict(row: Row, value: float | None, direct: float | None) -> bool | None:
    if row.kind == "info":
        return None
    if value is None:
        return False
    if row.kind == "ratio_min":
        return direct is not None and direct > 0 and value / direct >= row.limit
    if row.kind == "abs_max":
        return value <= row.limit
    if row.kind == "delta_max":
        return direct is not None and value <= direct + row.limit
    return value >= 1.0  # pass


def summarise(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One dict per table row with medians, ratios, verdicts and error texts."""
    rows = []
    for row in ROWS:
        by_target = samples.get(row.group)
        if not by_target:
            continue
        out: dict[str, Any] = {
            "key": row.key,
            "label": row.label.strip(),
            "unit": row.unit,
            "target": row.target_text(),
        }
        direct, _ = median_of(by_target.get("direct", []), row.field)
        for name, reps in by_target.items():
            value, error = median_of(reps, row.field)
            out[name] = value
            out[f"{name}_error"] = error
            out[f"{name}_reps"] = len(reps)
            if name != "direct":
                out[f"{name}_ratio"] = value / direct if value is not None and direct else None
                out[f"{name}_ok"] = verdict(row, value, direct)
        rows.append(out)
    return rows


def fmt(value: float | None, error: str | None = None) -> str:
    if value is None:
        return f"ERR {error[:18]}" if error else "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def mark(ok: bool | None) -> str:
    return {True: "yes", False: "NO", None: ""}[ok]


def print_table(result: dict[str, Any], rows: list[Row]) -> None:
    """The table the issue asks for, in Markdown so it can be pasted into an issue."""
    meta = result["meta"]
    print(
        f"\n## libertem-jupyter-proxy benchmark ({meta['mode']}, {meta['started']}, "
        f"medians of {meta['plan']['reps']} interleaved reps; latencies of "
        f"{meta['plan']['latency_reps']})\n"
    )
    header = [
        "metric",
        "unit",
        "direct",
        "ours",
        "ours/direct",
        "jsp",
        "jsp/direct",
        "target",
        "ours ok",
        "jsp ok",
    ]
    lines = [header, ["---"] * len(header)]
    for r in result["rows"]:
        lines.append(
            [
                r["label"],
                r["unit"],
                fmt(r.get("direct"), r.get("direct_error")),
                fmt(r.get("ours"), r.get("ours_error")),
                fmt(r.get("ours_ratio")),
                fmt(r.get("jsp"), r.get("jsp_error")),
                fmt(r.get("jsp_ratio")),
                r["target"],
                mark(r.get("ours_ok")),
                mark(r.get("jsp_ok")),
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [str(c).ljust(widths[i]) for i, c in enumerate(line)]
        print("| " + " | ".join(cells) + " |")
    errors = {
        f"{name}: {r['key']}": r[f"{name}_error"]
        for r in result["rows"]
        for name in ("direct", "ours", "jsp")
        if r.get(f"{name}_error") and r.get(name) is None
    }
    if errors:
        print("\nErrors (a metric with no successful repetition):")
        for key, text in errors.items():
            print(f"- {key}: {text}")
