"""A task's traceback names the real file and shows the source line, also for functions
pickled by value (defined in ``__main__``, closures, notebook cells), whatever the
cloudpickle release does with a code object's file name (3.1.3 writes "<dynamic-code>")."""

from __future__ import annotations

import linecache
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

import nspool
from nspool import NSPoolExecutor
from nspool._core import serialize

NSPOOL_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nspool.__file__)))


def _remote_tb(exc: BaseException | None) -> str:
    assert exc is not None, "the task did not fail"
    cause = exc.__cause__
    assert cause is not None, "no remote traceback"
    return str(getattr(cause, "tb", cause))


def test_code_pickled_by_value_keeps_its_file_name() -> None:
    """The bytes themselves carry the file name (and a nested function's too)."""

    def outer() -> Any:
        def inner() -> int:
            return 1

        return inner

    copy = serialize.loads(serialize.dumps(outer))
    assert copy.__code__.co_filename == __file__, cloudpickle.__version__
    assert copy().__code__.co_filename == __file__


def test_main_function_traceback_names_the_script_and_its_line(tmp_path: Path) -> None:
    """What a user sees for a function defined in the script they ran."""
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent(
            """\
            from nspool import NSPoolExecutor

            def bad(x):
                raise RuntimeError(x)  # the line a user wants to see

            if __name__ == "__main__":
                with NSPoolExecutor(1) as ex:
                    exc = ex.submit(bad, 123).exception(timeout=60)
                print(exc.__cause__)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=NSPOOL_ROOT)
    out = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert f'File "{script}", line 4, in bad' in out.stdout, out.stdout
    assert "raise RuntimeError(x)  # the line a user wants to see" in out.stdout, out.stdout
    assert "<dynamic-code>" not in out.stdout


def test_closure_traceback_shows_its_source_line() -> None:
    """A closure is pickled by value: its frame still names this file and shows the line."""
    marker = "closure-marker-51c2"

    def fails() -> None:
        raise ValueError(marker)  # CLOSURE-LINE

    with NSPoolExecutor(1) as ex:
        tb = _remote_tb(ex.submit(fails).exception(timeout=60))
    assert f'File "{__file__}"' in tb, tb
    assert "raise ValueError(marker)  # CLOSURE-LINE" in tb, tb


def test_notebook_cell_traceback_shows_the_cell_source() -> None:
    """A notebook cell has no file: IPython registers its source in ``linecache`` under a
    made-up name. That source travels with the function, so the worker shows the line."""
    filename = "/nonexistent/ipykernel_4242/3141592653.py"
    source = "def cell_fn(x):\n    raise KeyError(x)  # CELL-LINE-9b1e\n"
    lines = source.splitlines(keepends=True)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    linecache.cache[filename] = (len(source), None, lines, filename)
    try:
        exec(compile(source, filename, "exec"), namespace)
        with NSPoolExecutor(1) as ex:
            tb = _remote_tb(ex.submit(namespace["cell_fn"], 7).exception(timeout=60))
    finally:
        del linecache.cache[filename]
    assert f'File "{filename}", line 2, in cell_fn' in tb, tb
    assert "raise KeyError(x)  # CELL-LINE-9b1e" in tb, tb
