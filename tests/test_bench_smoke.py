"""The benchmark suite in its smallest mode, so that it cannot rot. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The peers it compares with come with the `bench` extra (make test installs it for the
# newest Python only).
for _peer in ("loky", "pebble", "trio_parallel", "psutil", "matplotlib", "numpy"):
    pytest.importorskip(
        _peer, reason="the benchmark peers are not installed: pip install nspool[bench]"
    )


@pytest.mark.timeout(300)
def test_benchmark_suite_runs_in_quick_mode(tmp_path: Path) -> None:
    # A subprocess: the peers' spawned workers must not re-import pytest's main module.
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "latest.md").read_text()
    assert "| nspool |" in report or "nspool" in report.splitlines()[0]
    assert "left processes behind" not in report
    # every latency goal has its row, with its benchmarks run (issue 13)
    assert "## Latency goals (issue 13)" in report
    assert "goals met in this run" in out.stderr
    goals = report.split("## Latency goals (issue 13)")[1].split("\n## ")[0]
    assert "not measured" not in goals and goals.count("\n| ") >= 11, goals
    assert list(tmp_path.glob("*.png"))
