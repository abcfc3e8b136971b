"""Print pip constraints that pin every dependency of nspool to the oldest release that
``pyproject.toml`` allows: ``name==X`` for each ``name>=X`` among the runtime dependencies
and the extras named on the command line (their own ``nspool[...]`` references followed).

    python scripts/lower_bounds.py test trio > constraints.txt
    pip install --constraint constraints.txt -e '.[test]'

`make test`'s lower-bounds stage installs the suite this way, so that a bound that is too low
fails here rather than on a user's machine. A requirement's environment marker is kept on its
constraint line; a requirement without a lower bound is reported on stderr and left free.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

#: name[extras] (specifiers) ; marker
_REQ = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def _requirements(project: dict[str, object], extras: list[str]) -> list[str]:
    optional = project.get("optional-dependencies", {})
    assert isinstance(optional, dict)
    name = str(project["name"])
    reqs = list(project.get("dependencies", []))  # type: ignore[call-overload]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise SystemExit(f"no extra {extra!r} in pyproject.toml")
        for req in optional[extra]:
            m = _REQ.match(req)
            if m and m.group(1).lower() == name.lower():  # nspool[trio]: follow it
                todo.extend(e.strip() for e in (m.group(2) or "[]")[1:-1].split(",") if e)
            else:
                reqs.append(req)
    return reqs


def constraints(pyproject: Path, extras: list[str]) -> list[str]:
    """The constraint lines for the runtime dependencies plus ``extras``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = []
    for req in _requirements(project, extras):
        m = _REQ.match(req)
        if m is None:
            raise SystemExit(f"cannot parse requirement {req!r}")
        name, specs, marker = m.group(1), m.group(3), m.group(4) or ""
        low = re.search(r">=\s*([^,\s]+)", specs)
        if low is None:
            print(f"lower_bounds: {req!r} has no lower bound: left free", file=sys.stderr)
            continue
        lines.append(f"{name}=={low.group(1)}{marker}")
    return lines


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(constraints(root / "pyproject.toml", sys.argv[1:])))
