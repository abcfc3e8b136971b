"""Run the benchmark suite: write ``benchmarks/results/<date>.md``, ``latest.md`` (a link to it)
and plots.

    python -m benchmarks.run [--quick] [--only NAME ...] [--out DIR] [--no-plots]
    python benchmarks/run.py ...

Exit status 0 when every measurement ran and no process was left behind, 1 otherwise.
This module stays light to import: spawned workers of some pools re-import ``__main__``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collections.abc import Callable, Sequence  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    import datetime

    from benchmarks._peers import AsyncPeer, SyncPeer
    from benchmarks._suite import Bench, BenchResult, Config, Figures

RESULTS = Path(__file__).resolve().parent / "results"
#: modules named ``bench_*`` define ``BENCHES``; these run first, in this order, then the others
ORDER = (
    "roundtrip",
    "throughput",
    "payload",
    "coldstart",
    "firstpool",
    "respawn",
    "churn",
    "scaling",
    "teardown",
    "memory",
    "isolation",
    "limits",
)


def all_benches() -> list[Bench]:
    import importlib
    import pkgutil

    import benchmarks

    found: list[Bench] = []
    for mod in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if mod.name.startswith("bench_"):
            found += importlib.import_module(f"benchmarks.{mod.name}").BENCHES
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(found, key=lambda b: rank.get(b.name, len(ORDER)))


def _measure(bench: Bench, peer: SyncPeer | AsyncPeer, cfg: Config, rep: int) -> Figures:
    from benchmarks._peers import SyncPeer

    if isinstance(peer, SyncPeer):
        assert bench.sync is not None
        return bench.sync(peer, cfg, rep)
    import anyio

    aio = bench.aio
    assert aio is not None

    async def main() -> Figures:
        with anyio.fail_after(600):
            return await aio(peer, cfg, rep)

    return anyio.run(main, backend=peer.backend)


def run_bench(bench: Bench, cfg: Config, log: Callable[[str], None]) -> BenchResult:
    import random
    import time

    from benchmarks._peers import async_peers, settle, sync_peers
    from benchmarks._stats import NAN
    from benchmarks._suite import BenchResult, Table

    started = time.monotonic()
    tables = []
    fronts: list[tuple[str, Sequence[SyncPeer | AsyncPeer]]] = []
    if bench.sync is not None:
        fronts.append(("sync", bench.peers() if bench.peers else sync_peers()))
    if bench.aio is not None:
        fronts.append(("async", async_peers()))
    for kind, peers in fronts:
        table = Table(kind, bench.metrics(cfg, kind), baseline_name=bench.baseline)
        table.ratio_label = bench.ratio
        active: list[SyncPeer | AsyncPeer] = []
        for peer in peers:
            why = peer.missing or bench.skip(peer)
            if why:
                table.missing[peer.name] = why
            else:
                active.append(peer)
                table.values[peer.name] = {m.key: [] for m in table.metrics}
        reps = cfg.pick(*bench.repeats)
        for rep in range(-1 if bench.prime else 0, reps):
            # A new order each repeat (seeded: runs compare): drift hits all alike, and no
            # peer always follows the same one (whose shutdown may leave the machine cold).
            order = list(active)
            random.Random(f"{bench.name}/{kind}/{rep}").shuffle(order)
            for peer in order:
                t = time.monotonic()
                figures: Figures = {}
                try:
                    figures = _measure(bench, peer, cfg, rep)
                except Exception as exc:  # noqa: BLE001 - one pool's failure is a finding
                    msg = f"repeat {rep}: {type(exc).__name__}: {exc}"[:300]
                    table.errors.setdefault(peer.name, []).append(msg)
                    log(f"  ! {peer.name}: {msg}")
                left = settle()
                if left:
                    table.leftovers.setdefault(peer.name, []).extend(left)
                    log(f"  ! {peer.name} left {len(left)} process(es): {left[:2]}")
                label = "prime" if rep < 0 else f"{rep + 1}/{reps}"
                log(f"[{bench.name}/{kind} {label}] {peer.name}: {time.monotonic() - t:.2f} s")
                if rep >= 0:
                    for m in table.metrics:
                        table.values[peer.name][m.key].append(figures.get(m.key, NAN))
        tables.append(table)
    return BenchResult(bench, tables, time.monotonic() - started)


def _nspool_source() -> str:
    """Where nspool was imported from, and its git revision (or $NSPOOL_BENCH_REV)."""
    import os
    import subprocess

    import nspool

    where = os.path.dirname(os.path.dirname(os.path.abspath(nspool.__file__)))
    rev = os.environ.get("NSPOOL_BENCH_REV", "")
    if not rev:
        try:
            rev = subprocess.run(
                ["git", "-C", where, "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            rev = "unknown revision"
    return f"{where} ({rev})"


def _meta(
    cfg: Config,
    argv: Sequence[str],
    started: datetime.datetime,
    seconds: float,
    load: tuple[float, float],
) -> dict[str, str]:
    import os
    import platform
    from importlib import metadata

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for dist in ("nspool", "loky", "pebble", "anyio", "trio", "trio-parallel", "cloudpickle"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} (missing)")
    return {
        "date": started.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python -m benchmarks.run", *argv]),
        "nspool source": _nspool_source(),
        "mode": "quick (smoke test: tiny counts, 1 repeat)" if cfg.quick else "full",
        "machine": f"{os.cpu_count()} CPUs, {cpu}; Linux {platform.release()}",
        "python": platform.python_version(),
        "versions": ", ".join(versions),
        "load average (1 min) at start / end": f"{load[0]:.2f} / {load[1]:.2f}",
        "duration": f"{seconds:.0f} s",
    }


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import datetime
    import os
    import time

    from benchmarks import _report
    from benchmarks._peers import settle, stop_helpers
    from benchmarks._suite import Config

    benches = all_benches()
    names = [b.name for b in benches]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny counts, < 60 s")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=names,
        metavar="NAME",
        help=f"run only these: {', '.join(names)}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default benchmarks/results, "
        "or benchmarks/results/quick with --quick)",
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = Config(quick=args.quick)
    out: Path = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started, t0, load0 = datetime.datetime.now(), time.monotonic(), os.getloadavg()[0]
    results = [run_bench(b, cfg, log) for b in benches if not args.only or b.name in args.only]
    stop_helpers()
    final = settle()
    meta = _meta(cfg, argv, started, time.monotonic() - t0, (load0, os.getloadavg()[0]))
    day = started.strftime("%Y-%m-%d")
    plots = {}
    if not args.no_plots:
        for r in results:
            name = f"{day}-{r.bench.name}.png"
            if _report.plot(r, out / name):
                plots[r.bench.name] = name
    text = _report.markdown(results, meta, plots)
    if final:
        text += "\n**Processes left after the whole run (killed):** " + "; ".join(final) + "\n"
    (out / f"{day}.md").write_text(text)
    # latest.md is a link to the newest dated report, not a second copy of it. Replaced, never
    # written through: writing to it would overwrite the report it pointed at.
    link = out / ".latest.md.new"
    link.unlink(missing_ok=True)
    link.symlink_to(f"{day}.md")
    link.replace(out / "latest.md")
    from benchmarks._goals import goal_lines

    log("\nlatency goals (issue 13):\n" + "\n".join(goal_lines(results)))
    log(f"wrote {out / f'{day}.md'} and latest.md")
    problems = final or any(t.errors or t.leftovers for r in results for t in r.tables)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
