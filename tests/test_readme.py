"""The README works as written: every ```python block runs, top to bottom, as a program of its
own, and where a ```text block follows it (after a line of prose at most) the program prints
exactly that. The quick start's demo runs and ends with OK."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nspool import NSPoolExecutor, open_pool

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


def readme_examples() -> list[tuple[int, str, str | None]]:
    """(line number, code, expected output or None) of each python block of the README."""
    text = README.read_text()
    blocks = [
        (text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2), m)
        for m in _BLOCK.finditer(text)
    ]
    out = []
    for i, (line, lang, body, m) in enumerate(blocks):
        if lang != "python":
            continue
        expected = None
        if i + 1 < len(blocks) and blocks[i + 1][1] == "text":
            between = text[m.end() : blocks[i + 1][3].start()]
            if between.count("\n\n") <= 2:  # only a short line ("prints") in between
                expected = blocks[i + 1][2]
        out.append((line, body, expected))
    return out


EXAMPLES = readme_examples()


def test_the_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 3
    assert all(expected for _, _, expected in EXAMPLES), "every example says what it prints"


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a program in a session of its own; kill the session if it hangs."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"{args} ran past {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.parametrize(
    "line,code,expected", EXAMPLES, ids=[f"README.md:{line}" for line, _, _ in EXAMPLES]
)
def test_readme_example_runs_as_written(
    line: int, code: str, expected: str | None, tmp_path: Path
) -> None:
    if "dask" in code:
        pytest.importorskip("distributed", reason="the Dask example needs nspool[dask]")
    if "memory_limit=" in code:
        from nspool._cgroups import layout

        why = {c: w for c, w in layout.check(["memory", "pids", "cpu"]).items() if w}
        if why:
            pytest.skip(f"the limits example needs cgroups this user can't have here: {why}")
    script = tmp_path / "example.py"
    script.write_text(code)
    done = _run([sys.executable, str(script)], tmp_path, 120)
    assert done.returncode == 0, f"README.md:{line} failed:\n{done.stderr}"
    if expected is not None:
        assert done.stdout == expected, f"README.md:{line} printed:\n{done.stdout}"


def test_the_demo_runs_and_says_ok() -> None:
    done = _run([sys.executable, "-m", "nspool", "demo"], ROOT, 120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("OK: nothing outlived its task or the pool")
    assert "kill_leftovers=False" in done.stdout  # part 1 says what it shows


def _plain_signature(name: str, fn: Callable[..., object]) -> str:
    """``name(arg=default, ..., *, kw=default, ...)`` as the README writes a signature."""
    parts: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and "*" not in parts:
            parts.append("*")
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{name}({', '.join(parts)})"


@pytest.mark.parametrize(
    "name,fn", [("NSPoolExecutor", NSPoolExecutor.__init__), ("open_pool", open_pool)]
)
def test_the_readme_signatures_match_the_code(name: str, fn: Callable[..., object]) -> None:
    text = " ".join(README.read_text().split())  # a signature may wrap over lines
    written = re.findall(rf"`({name}\(max_workers=[^`]*\))`", text)
    assert written == [_plain_signature(name, fn)]
