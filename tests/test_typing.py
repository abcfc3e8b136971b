"""``mypy --strict`` on a user's file (tests/typecheck/user_side.py) against the *installed*
nspool, as a user's project meets it: the wheel or the editable install of this environment,
found the way mypy finds any installed package (py.typed, and a .pth it can read)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

USER_SIDE = Path(__file__).parent / "typecheck" / "user_side.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed in this environment (the `lint` extra brings it)",
)


def test_the_public_api_type_checks_as_a_user_meets_it(tmp_path: Path) -> None:
    # A folder of its own: the checkout is not on mypy's path there, and the repository's own
    # mypy configuration (files, python_version 3.10) is not read; the cache goes with the
    # folder. The target version is this interpreter's, so each Python of the test matrix
    # checks its own branch of version-dependent declarations.
    shutil.copy(USER_SIDE, tmp_path / "user_side.py")
    (tmp_path / "mypy.ini").write_text("[mypy]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",  # with --warn-unused-ignores: each line that must fail is checked
            "--config-file",
            "mypy.ini",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--python-executable",
            sys.executable,
            "--no-color-output",
            "--no-error-summary",
            "user_side.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
