"""A bounded soak (bench/soak.py) in CI: mixed traffic while the backend is shut down and
crashed; no error outside the restart windows and no growth of fds, tasks or memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.soak]

SOAK = Path(__file__).parents[1] / "bench" / "soak.py"


def test_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--minutes",
            "1.5",
            "--chaos-interval",
            "15",
            "--json",
            str(out),
        ],
        check=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    print(json.dumps(report, indent=2))
    assert report["restarts"] >= 4
    assert report["served_total"] > 500
    assert all(
        report["served"].get(op, 0) > 0 for op in ("page", "api", "download", "upload", "websocket")
    )
    assert report["errors_outside_windows"] == 0, report["outside_examples"]
    start, end = report["start"], report["end"]
    assert end["fds"] <= start["fds"] + 4, (start, end)
    assert end["tasks"] <= start["tasks"] + 2, (start, end)
    assert end["rss_mib"] <= start["rss_mib"] + 32, (start, end)
