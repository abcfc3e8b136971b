"""The import graph of the nspool package, read from its source: cycles, and each module's size.

    python scripts/import_graph.py [--max-lines 700] [--edges]

Every ``import`` and ``from ... import`` in a module counts, wherever it stands: at the top, in
a function, under ``if TYPE_CHECKING:``. ``from package import name`` is an edge to the
submodule ``package.name`` where there is one, else to ``package``. Importing a submodule also
runs its packages' ``__init__.py``; those implicit edges are left out (``nspool/__init__.py``
names the public classes for type checkers, and every module would otherwise close a circle
through it), so keep a package's ``__init__.py`` free of imports of its own modules.

Prints each module's line count, every cycle found (a strongly connected set of modules, with
one circle through it), and exits 1 when there is a cycle or a module longer than
``--max-lines``; 0 otherwise. Nothing is imported or run.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "nspool"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # The longest prefix that is one of our modules (``import a.b.c`` imports a.b.c).
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the sets of modules that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    out.append(sorted(group))
    return out


def circle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One circle inside a strongly connected ``group``, from its first module back to it."""
    members = set(group)
    start = group[0]
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                return [*paths[node], start]
            if child not in paths:
                paths[child] = [*paths[node], child]
                todo.append(child)
    return [start, start]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-lines", type=int, default=700, help="most lines a module may have")
    parser.add_argument("--edges", action="store_true", help="also print what each module imports")
    args = parser.parse_args(argv)

    modules = find_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    too_long = []
    print("lines  module")
    for name, path in modules.items():
        lines = len(path.read_text().splitlines())
        mark = ""
        if lines > args.max_lines:
            too_long.append(name)
            mark = f"  <- over {args.max_lines}"
        print(f"{lines:5}  {path.relative_to(ROOT)}{mark}")
        if args.edges and graph[name]:
            print(f"         imports {', '.join(sorted(graph[name]))}")
    cycles = [g for g in strongly_connected(graph) if len(g) > 1]
    print()
    print(f"{len(modules)} modules, {sum(len(e) for e in graph.values())} imports between them")
    if cycles:
        for group in cycles:
            print(f"cycle among {len(group)} modules: {' -> '.join(circle_through(group, graph))}")
    else:
        print("no import cycles")
    if too_long:
        print(f"over {args.max_lines} lines: {', '.join(too_long)}")
    return 1 if cycles or too_long else 0


if __name__ == "__main__":
    sys.exit(main())
