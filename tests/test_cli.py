"""``python -m nspool``: --version, plain-text help, and ``bench`` in its quick mode (its figures
are checked for shape and sign only: timings are the machine's business)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _procs import NO_NAMESPACES

import nspool
from nspool.__main__ import main

FIGURES = ("spawn", "spawn_private_proc", "round_trip", "throughput", "teardown", "teardown_left")
FIGURE_KEYS = {
    "label",
    "unit",
    "nspool",
    "peer",
    "ratio",
    "nspool_range",
    "peer_range",
    "ratio_range",
    "note",
    "error",
}


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 0
    out = capsys.readouterr()
    assert not out.err
    return out.out


def _bench(
    *args: str, prefix: tuple[str, ...] = ("-m", "nspool")
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *prefix, "bench", "--quick", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(capsys, "--version") == f"nspool {nspool.__version__}\n"


def test_no_command_prints_the_help_and_succeeds() -> None:
    """``python -m nspool`` alone is a question, not a mistake: the help, on stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "nspool"], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("usage: python -m nspool")
    assert all(command in proc.stdout for command in ("demo", "doctor", "bench"))


def test_help_is_plain_text_and_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    out = _cli(capsys, "--help")
    for command in ("demo", "doctor", "bench"):  # each with its one-line help beside it
        assert [line for line in out.splitlines() if line.split()[:1] == [command]][0].split()[1:]
    bench = _cli(capsys, "bench", "--help")
    assert "--json" in bench and "--quick" in bench
    for text in (out, bench, _cli(capsys, "demo", "--help"), _cli(capsys, "doctor", "--help")):
        assert "`" not in text and "::" not in text, text


def test_bench_json() -> None:
    done = _bench("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)  # stdout is the JSON object alone
    assert "nspool bench:" in done.stderr  # progress went to stderr
    assert set(report) == {
        "nspool",
        "quick",
        "isolation",
        "machine",
        "params",
        "figures",
        "left_behind",
        "seconds",
        "ok",
    }
    assert report["nspool"] == nspool.__version__
    assert report["quick"] is True and report["ok"] is True and report["left_behind"] == 0
    assert report["isolation"] in ("root", "user namespace")
    assert set(report["machine"]) == {"cpus", "kernel", "python", "uid", "root"}
    assert report["machine"]["cpus"] >= 1
    params = report["params"]
    assert set(params) == {
        "workers",
        "repeats",
        "spawns",
        "calls",
        "tasks",
        "tree",
        "left_after_s",
    }
    figures = report["figures"]
    assert tuple(figures) == FIGURES
    for key, fig in figures.items():
        assert set(fig) == FIGURE_KEYS, key
        assert fig["error"] is None, (key, fig["error"])
    for key in ("spawn", "spawn_private_proc", "round_trip", "throughput"):
        fig = figures[key]
        for value in (fig["nspool"], fig["peer"], fig["ratio"], *fig["ratio_range"]):
            assert isinstance(value, float) and value > 0, (key, fig)
    assert figures["teardown"]["nspool"] > 0 and figures["teardown"]["peer"] is None
    left = figures["teardown_left"]
    assert left["nspool"] == 0  # killed with the task
    assert left["peer"] == params["tree"]  # the stdlib pool leaves the whole tree running
    assert report["seconds"] > 0


def test_bench_table() -> None:
    done = _bench()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "nspool bench:" not in out  # progress lines stay on stderr
    assert out.splitlines()[1].startswith("machine: ")
    rows = [line.strip() for line in out.splitlines()]
    for label in (
        "worker spawn ",
        "worker spawn, private /proc ",
        "round trip, submit->result ",
        "throughput, 500 tasks at once ",
        "teardown, 20-process tree ",
        "still running 0.05 s later ",
    ):
        row = next((r for r in rows if r.startswith(label)), None)
        assert row is not None and "not measured" not in row, (label, out)
    assert "6 of 6 figures measured; nothing left behind" in out


def test_bench_reports_a_refusal_and_fails() -> None:
    done = _bench(prefix=("-c", NO_NAMESPACES))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 of 6 figures measured" in done.stdout
    assert "not measured [1]" in done.stdout
    assert "[1] refused here: " in done.stdout  # the kernel's own reason follows
    assert "NamespaceError" in done.stdout
