"""The benchmark suite in its smallest mode, so that it cannot rot. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_benchmark_suite_runs_in_quick_mode(tmp_path: Path) -> None:
    # The peers it compares with come with the `bench` extra (make test installs it for the
    # newest Python only).
    for peer in ("loky", "pebble", "trio_parallel", "psutil", "matplotlib", "numpy"):
        pytest.importorskip(
            peer, reason="the benchmark peers are not installed: pip install nspool[bench]"
        )
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


@pytest.mark.timeout(120)
def test_round_trip_profiler_runs() -> None:
    """``benchmarks.profile_roundtrip`` wraps the worker's own functions: a change of their
    signatures must fail here, not the next time someone profiles (standard library only)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_roundtrip"]
        + ["--calls", "60", "--rounds", "1", "--warmup", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for row in ("| worker | _wipe_leftovers", "| program | Future.set_result", "floor"):
        assert row in out.stdout, out.stdout[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
